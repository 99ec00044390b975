// Depthwise 3x3 convs (stride 1 or 2, no dilation) on AVX-512 VNNI, a run of output pixels
// along one row at a time, with the requantizing epilogue in registers (int8 / uint8 output,
// channels-last, no residual: what an exported model's depthwise layers run). int_conv.cpp's
// general depthwise kernels take everything else (dw_micro_vnni, or without VNNI the AVX2
// and portable ones).
//
// The image is int16 (x - zero point, padded with 0), the weights int16 (offsets folded in).
// vpdpwssd multiplies pairs of int16; the pairs run down a window column: (row 0, row 1) and
// (row 2, 0). An input column's pairs serve every output pixel whose window holds it (three
// for stride 1), where the general kernel interleaves each pixel's taps afresh: per pixel and
// 32 channels about 19 instructions for the products at stride 1 (3 loads and 4 unpacks a
// column, 12 vpdpwssd; about 26 at stride 2, two new columns a pixel) against 30, and no int32
// round trip through memory before the epilogue.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "requant_avx512.h"
#include "vnni_asm.h"

namespace synq::dw_rows {

constexpr int kMaxPx = 8;     // output pixels a call
constexpr int kPairW = 384;   // int16 weights per block pair: 12 vectors of 32

// The epilogue's constants (the float32 order of int_conv.cpp's epilogue_avx512).
struct Requant {
  float inv, lo, hi;  // 1 / out_scale; qmin - zero, qmax - zero
  int32_t oz;
  bool relu, hs;  // ReLU, or Hardswish (requant::hardswish), before the quantization
};

// Index in a block pair's weights of channel c (0..31 of the pair), weight row ky, column kx:
// vector (kx, p = ky / 2, h) with h = 0 for the unpacklo lanes (channels 8 L + i of 128-bit
// lane L, i < 4) and 1 for the unpackhi ones (8 L + 4 + i); element 2 (4 L + i) + ky % 2.
// Row 3 (p = 1, second element) is the zero that pairs with row 2.
inline int64_t weight_index(int c, int ky, int kx) {
  const int L = c / 8, h = (c % 8) / 4, i = c % 4;
  return ((kx * 2 + ky / 2) * 2 + h) * 32 + 2 * (4 * L + i) + ky % 2;
}

#define SYNQ_DW_ROWS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
// (lambdas do not inherit their function's target; inlined, they keep the accumulators in
// registers)
#define SYNQ_DW_ROWS_LAMBDA \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))

// MR output pixels at x (window origin of pixel 0; pixel j's is x + j S cs), 32 channels (16
// with HALF: the last block of an odd count). cs: int16 elements between input columns, rs:
// between input rows. w: the block pair's weights; sc, bs: its 32 scales and biases. out: the
// output of pixel 0 at the pair's first channel, ostep bytes between pixels; nv0 / nv1: valid
// channels of the two 16-channel halves (16 but at the end of the channels).
template <int MR, int S, bool HALF>
SYNQ_DW_ROWS_TARGET void row_kernel(const int16_t* x, int64_t cs, int64_t rs, const int16_t* w,
                                    const float* sc, const float* bs, const Requant& q,
                                    uint8_t* out, int64_t ostep, int nv0, int nv1) {
  __m512i lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) lo[j] = hi[j] = _mm512_setzero_si512();
  const __m512i zero = _mm512_setzero_si512();
  const __mmask32 m = HALF ? 0xFFFFu : 0xFFFFFFFFu;
  auto load = [&](const int16_t* p) SYNQ_DW_ROWS_LAMBDA {
    return HALF ? _mm512_maskz_loadu_epi16(m, p) : _mm512_loadu_si512(p);
  };
  auto wv = [&](int kx, int p, int h) SYNQ_DW_ROWS_LAMBDA {
    return _mm512_loadu_si512(w + ((kx * 2 + p) * 2 + h) * 32);
  };
  // column X feeds pixel j = (X - kx) / S with weight column kx, where that is a whole number
  // in [0, MR): fixed at compile time, so the accumulators stay in registers
  auto column = [&]<int X>() SYNQ_DW_ROWS_LAMBDA {
    const int16_t* c = x + X * cs;
    const __m512i r0 = load(c), r1 = load(c + rs), r2 = load(c + 2 * rs);
    const __m512i p0l = _mm512_unpacklo_epi16(r0, r1), p0h = _mm512_unpackhi_epi16(r0, r1);
    const __m512i p1l = _mm512_unpacklo_epi16(r2, zero), p1h = _mm512_unpackhi_epi16(r2, zero);
    auto tap = [&]<int KX>() SYNQ_DW_ROWS_LAMBDA {
      constexpr int d = X - KX;
      if constexpr (d >= 0 && d % S == 0 && d / S < MR) {
        constexpr int j = d / S;
        lo[j] = dpwssd(dpwssd(lo[j], p0l, wv(KX, 0, 0)), p1l, wv(KX, 1, 0));
        hi[j] = dpwssd(dpwssd(hi[j], p0h, wv(KX, 0, 1)), p1h, wv(KX, 1, 1));
      }
    };
    tap.template operator()<0>();
    tap.template operator()<1>();
    tap.template operator()<2>();
  };
  [&]<int... Xs>(std::integer_sequence<int, Xs...>) SYNQ_DW_ROWS_LAMBDA {
    (column.template operator()<Xs>(), ...);
  }(std::make_integer_sequence<int, (MR - 1) * S + 3>{});

  // back to channel order (0-15 = lo.0 hi.0 lo.1 hi.1, 16-31 = lo.2 hi.2 lo.3 hi.3), then
  // y = acc * scale + bias, ReLU, q = clamp(round(y * inv)) + zero as bytes
  const __m512i i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const __m512 s0 = _mm512_loadu_ps(sc), b0 = _mm512_loadu_ps(bs);
  const __m512 s1 = _mm512_loadu_ps(sc + 16), b1 = _mm512_loadu_ps(bs + 16);
  const __m512 inv = _mm512_set1_ps(q.inv), qlo = _mm512_set1_ps(q.lo);
  const __m512 qhi = _mm512_set1_ps(q.hi), fz = _mm512_setzero_ps();
  const __m512i oz = _mm512_set1_epi32(q.oz);
  const bool relu = q.relu, hs = q.hs;
  const __mmask16 m0 = static_cast<__mmask16>((1u << nv0) - 1);
  const __mmask16 m1 = static_cast<__mmask16>((1u << nv1) - 1);
  auto requant = [&](__m512i v, __m512 s, __m512 b) SYNQ_DW_ROWS_LAMBDA {
    __m512 y = requant::scale_bias(v, s, b);
    if (relu) y = _mm512_max_ps(y, fz);
    else if (hs) y = requant::hardswish(y);
    return _mm512_cvtepi32_epi8(requant::quantize(y, inv, qlo, qhi, oz));
  };
#pragma GCC unroll 8
  for (int j = 0; j < MR; ++j) {
    uint8_t* o = out + j * ostep;
    const __m128i q0 = requant(_mm512_permutex2var_epi64(lo[j], i0, hi[j]), s0, b0);
    if (nv0 == 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), q0);
    else
      _mm_mask_storeu_epi8(o, m0, q0);
    if (!HALF) {
      const __m128i q1 = requant(_mm512_permutex2var_epi64(lo[j], i1, hi[j]), s1, b1);
      if (nv1 == 16)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), q1);
      else
        _mm_mask_storeu_epi8(o + 16, m1, q1);
    }
  }
}

#undef SYNQ_DW_ROWS_TARGET
#undef SYNQ_DW_ROWS_LAMBDA

using RowFn = void (*)(const int16_t*, int64_t, int64_t, const int16_t*, const float*,
                       const float*, const Requant&, uint8_t*, int64_t, int, int);

template <int S, bool HALF, int... Ms>
RowFn pick(int mr, std::integer_sequence<int, Ms...>) {
  RowFn fn = nullptr;
  ((mr == Ms + 1 ? (fn = row_kernel<Ms + 1, S, HALF>, 0) : 0), ...);
  return fn;
}

// The kernel for mr pixels (1..kMaxPx), stride s (1 or 2), a half pair or a full one.
inline RowFn kernel_for(int mr, int s, bool half) {
  const auto px = std::make_integer_sequence<int, kMaxPx>{};
  if (s == 1) return half ? pick<1, true>(mr, px) : pick<1, false>(mr, px);
  return half ? pick<2, true>(mr, px) : pick<2, false>(mr, px);
}

}  // namespace synq::dw_rows
#endif
