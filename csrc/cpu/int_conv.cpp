// Integer convolution on the CPU: direct (implicit-GEMM) convolution on a channels-last copy
// of each input image, exact int32 accumulation, and a vectorized epilogue (scale, bias,
// optional residual, ReLU, then a float cast or requantization to int8 / uint8).
//
// Weights are prepacked as int8 in blocks of 16 output channels by quads of input channels
// ([tap][channel quad][16 channels][4], see _conv2d_prepack), and one step of the K loop is one
// tap and four adjacent channels of one pixel, broadcast against that 64-byte row. Output
// channels live in the vector lanes, so there is no horizontal sum, short K (9 for a
// 1-channel stem) costs nothing extra, and the epilogue works on whole vectors of channels.
// - With AVX-512 VNNI: the image copy is bytes, x itself for uint8 input and x + 128 for int8,
//   padded with the zero point (in that domain), and each step is one vpdpbusd (four unsigned
//   bytes times four signed weights, 16 channels) per pixel and block, in tiles of 8 pixels
//   by two 16-channel blocks. The zero point comes off at the end: sum (x' - z') w =
//   sum x' w - z' sum w, with the weight sums of each block taken once per call; per-row
//   weight offsets o (rows beyond int8) add o x the window sum of (x - z). Twice the K values
//   per instruction of vpdpwssd on int16 pairs.
// - Otherwise the exact multiply-add is vpmaddwd on int16 (vpmaddubsw would saturate): the
//   image copy is int16 with the zero point subtracted (padding is then plain 0, values
//   -255..255 so uint8 input works too), and the weights are repacked once per call into
//   int16 channel pairs with any weight offsets added back; one step is one channel pair.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "dw_rows.h"
#include "requant_avx512.h"
#include "vnni_asm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SYNQ_INT_CONV_X86 1
#include <immintrin.h>
#else
#define SYNQ_INT_CONV_X86 0
#endif

namespace synq {
namespace {

constexpr int kCB = 16;  // output channels per packed weight block
constexpr int kQ = 4;    // input channels per packed quad
constexpr int kPT = 8;   // output pixels per micro-kernel tile

const char* kWho = "synq quantized_conv2d (cpu backend): ";
// |w_offset| at most this: an int8 weight plus its offset fits int16
constexpr int32_t kMaxOffset = 32767 - 128;

// dw: the compact depthwise layout (groups = C = Cout): one byte per channel and tap,
// (groups, 1, kh, kw, 1, 1), the general layout less its 63 zero bytes per tap.
struct PackedShape {
  int64_t groups, NB, kh, kw, Cq;  // Cq: channel quads, ceil(C / groups / 4)
  bool dw;
  int64_t row() const { return dw ? 1 : kQ * kCB; }  // bytes per (tap, quad)
  int64_t numel() const { return groups * NB * kh * kw * Cq * row(); }
};

PackedShape packed_shape(const at::Tensor& w, int64_t groups) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar,
              "synq conv2d_prepack: w must be 4-D int8 (Cout, C / groups, kh, kw), got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(groups >= 1 && w.size(0) % groups == 0, "synq conv2d_prepack: groups = ",
              groups, " must divide Cout = ", w.size(0));
  const int64_t Og = w.size(0) / groups;
  const bool dw = groups > 1 && Og == 1 && w.size(1) == 1;
  return {groups, (Og + kCB - 1) / kCB, w.size(2), w.size(3), (w.size(1) + kQ - 1) / kQ, dw};
}

// Packs w (contiguous) into dst (ps.numel() elements, every one written).
void prepack_into(const at::Tensor& w, const PackedShape& ps, int8_t* dst) {
  const int64_t groups = ps.groups, NB = ps.NB, kh = ps.kh, kw = ps.kw, Cq = ps.Cq;
  const int64_t Og = w.size(0) / groups, Cg = w.size(1);
  const int8_t* src = w.const_data_ptr<int8_t>();
  if (ps.dw) {  // (C, 1, kh, kw) contiguous is the compact layout already
    std::memcpy(dst, src, ps.numel());
    return;
  }
  // Destination offset of each source element of one output channel (the (c, ky, kx) run).
  const int64_t K = Cg * kh * kw;
  std::vector<int32_t> tab(K);
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t ky = 0; ky < kh; ++ky)
      for (int64_t kx = 0; kx < kw; ++kx)
        tab[(c * kh + ky) * kw + kx] =
            static_cast<int32_t>(((ky * kw + kx) * Cq + c / kQ) * kQ * kCB + c % kQ);
  const int64_t block = kh * kw * Cq * kQ * kCB;
  // One 16-channel block at a time, k outer: the writes fill whole cache lines in order and
  // the reads are 16 sequential streams.
  at::parallel_for(0, groups * NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t gb = b0; gb < b1; ++gb) {
      const int64_t g = gb / NB, o0 = (gb % NB) * kCB;
      const int64_t nv = std::min<int64_t>(kCB, Og - o0);
      int8_t* d = dst + gb * block;
      if (nv < kCB || Cg % kQ) std::memset(d, 0, block);
      const int8_t* s = src + (g * Og + o0) * K;
      for (int64_t k = 0; k < K; ++k) {
        int8_t* dk = d + tab[k];
        for (int64_t n = 0; n < nv; ++n) dk[kQ * n] = s[n * K + k];
      }
    }
  });
}

// Packed weight: int8 (groups, NB, kh, kw, ceil(Cg / 4), 64); element [g, b, ky, kx, j, 4n+e]
// = w[g Og + 16 b + n, 4 j + e, ky, kx], 0 past Og or Cg. Depthwise (groups = C = Cout > 1):
// (groups, 1, kh, kw, 1, 1), element [g, 0, ky, kx, 0, 0] = w[g, 0, ky, kx].
at::Tensor conv2d_prepack_cpu(const at::Tensor& w_, int64_t groups) {
  const PackedShape ps = packed_shape(w_, groups);
  const auto w = w_.contiguous();
  auto out = at::empty({ps.groups, ps.NB, ps.kh, ps.kw, ps.Cq, ps.row()},
                       w.options().dtype(at::kChar));
  prepack_into(w, ps, out.mutable_data_ptr<int8_t>());
  return out;
}

// ---- micro-kernels: out[r * 16 + n] = sum_k dot(quad at px[r] + off[k], w[k][n]) ----------

// int16 image (x - z), portable.
void micro_portable(const int16_t* const* px, int mr, const int32_t* off, int64_t nq,
                    const int8_t* w, int32_t* out) {
  for (int r = 0; r < mr; ++r)
    for (int n = 0; n < kCB; ++n) {
      int32_t s = 0;
      for (int64_t k = 0; k < nq; ++k) {
        const int16_t* a = px[r] + off[k];
        const int8_t* b = w + k * kQ * kCB + kQ * n;
        for (int e = 0; e < kQ; ++e) s += static_cast<int32_t>(a[e]) * b[e];
      }
      out[r * kCB + n] = s;
    }
}

#if SYNQ_INT_CONV_X86
// acc + v, accumulating in acc's register: GCC 12 put each sum of micro_avx2 in a new
// register and moved it back (9 moves and a spill a step).
__attribute__((target("avx2"), always_inline)) inline __m256i add_in_place(__m256i acc,
                                                                          __m256i v) {
  asm("vpaddd %1, %0, %0" : "+x"(acc) : "x"(v));
  return acc;
}

// int16 image, AVX2: one step is a channel pair of a pixel (32 bits) broadcast against the
// pair's weights for 16 channels ([pair][16 channels][2] int16, repacked from the quads once
// per call by repack_pairs), one vpmaddwd per 8 channels; MR <= 6 (12 accumulators).
template <int MR>
__attribute__((target("avx2"))) void micro_avx2(const int16_t* const* px, const int32_t* off,
                                                int64_t np, const int16_t* w, int32_t* out) {
  __m256i c0[MR], c1[MR];
  const int16_t* p[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm256_setzero_si256();
    c1[r] = _mm256_setzero_si256();
    p[r] = px[r];
  }
  for (int64_t k = 0; k < np; ++k) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 32 + 16));
    const int64_t o = off[k];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256i a = _mm256_castps_si256(
          _mm256_broadcast_ss(reinterpret_cast<const float*>(p[r] + o)));
      c0[r] = add_in_place(c0[r], _mm256_madd_epi16(a, w0));
      c1[r] = add_in_place(c1[r], _mm256_madd_epi16(a, w1));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kCB), c0[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kCB + 8), c1[r]);
  }
}

// The AVX2 kernel's weights, once per call: each quad row of int8 [16 channels][4] becomes
// two int16 pair rows, [16][e0, e1] and [16][e2, e3], over nb blocks of nq rows; with weight
// offsets (woff, 16 per block) added back, which int16 holds (9-bit), so that this path needs
// no window sums. Padding channels past C / groups get the offset too, but their image
// values are 0 (x - z with zero channels), so they add nothing.
__attribute__((target("avx2"))) void repack_pairs(const int8_t* w, int64_t nb, int64_t nq,
                                                  const int32_t* woff, int16_t* d) {
  // per 128-bit lane (4 channels x 4 bytes): the (e0, e1) halves first, then (e2, e3)
  const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i ov[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    if (woff)
      for (int h = 0; h < 2; ++h) {  // (o[n], o[n]) for channels 8h .. 8h + 7, as int16
        const __m256i o32 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(woff + b * kCB + 8 * h));
        ov[h] = _mm256_or_si256(_mm256_and_si256(o32, _mm256_set1_epi32(0xFFFF)),
                                _mm256_slli_epi32(o32, 16));
      }
    for (int64_t i = b * nq; i < (b + 1) * nq; ++i) {
      const int8_t* src = w + i * kQ * kCB;
      int16_t* p0 = d + i * kQ * kCB;  // pair row (e0, e1)
      int16_t* p1 = p0 + 2 * kCB;      // pair row (e2, e3)
      for (int h = 0; h < 2; ++h) {    // channels 8h .. 8h + 7
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * h));
        v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0 + 16 * h),
                            _mm256_add_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)),
                                             ov[h]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1 + 16 * h),
                            _mm256_add_epi16(
                                _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)), ov[h]));
      }
    }
  }
}

// The AVX-512 epilogue of one 16-channel block with a channels-last output: its constants
// (make_epi, per block and call) and one pixel's row (y = acc * scale + bias, + residual,
// ReLU, then float32 out or q = clamp(round(y * inv)) + zero as bytes). Shared by
// epilogue_avx512 (rows from an int32 buffer) and micro_vnni (rows from its registers).
struct EpiVec {
  __m512 s0, b0, inv, lo, hi, rsv;
  __m512i ozv, rzv;
  __mmask16 m;
  bool part, relu, hs;
  at::ScalarType res_t, out_t;
  const void* res;  // at the block's first channel of image bi, or null
  void* out;        // likewise

#define SYNQ_EPI_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
  // y of one pixel's sums iv (residual at ri), before the output conversion
  SYNQ_EPI_INLINE __m512 value(__m512i iv, int64_t ri) const {
    __m512 y = requant::scale_bias(iv, s0, b0);
    if (res) {
      __m512 rv;
      if (res_t == at::kFloat) {
        const float* rp = static_cast<const float*>(res) + ri;
        rv = part ? _mm512_maskz_loadu_ps(m, rp) : _mm512_loadu_ps(rp);
      } else {
        const uint8_t* rp = static_cast<const uint8_t*>(res) + ri;
        const __m128i b8 = part ? _mm_maskz_loadu_epi8(m, rp)
                                : _mm_loadu_si128(reinterpret_cast<const __m128i*>(rp));
        const __m512i r32 = res_t == at::kChar ? _mm512_cvtepi8_epi32(b8)
                                               : _mm512_cvtepu8_epi32(b8);
        rv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(r32, rzv)), rsv);
      }
      y = _mm512_add_ps(y, rv);
    }
    if (relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
    else if (hs) y = requant::hardswish(y);
    return y;
  }
  // the requantized integers of y (in the output dtype's range)
  SYNQ_EPI_INLINE __m512i quantize(__m512 y) const {
    return requant::quantize(y, inv, lo, hi, ozv);
  }
  // one pixel: y, converted, stored at o (channels-last)
  SYNQ_EPI_INLINE void row(__m512i iv, int64_t o, int64_t ri) const {
    const __m512 y = value(iv, ri);
    if (out_t == at::kFloat) {
      float* op = static_cast<float*>(out) + o;
      if (part)
        _mm512_mask_storeu_ps(op, m, y);
      else
        _mm512_storeu_ps(op, y);
      return;
    }
    const __m512i q = quantize(y);
    uint8_t* op = static_cast<uint8_t*>(out) + o;
    if (part)  // in byte range already: truncating narrow
      _mm_mask_storeu_epi8(op, m, _mm512_cvtepi32_epi8(q));
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(op), _mm512_cvtepi32_epi8(q));
  }
#undef SYNQ_EPI_INLINE
};

// Byte image (x', padded with z'), AVX-512 VNNI: one vpdpbusd per pixel and step; out gets
// the sums minus fix[n] = z' sum_k w[k][n], plus o[n] S[r] with weight offsets (o non-null).
// With epi (one per block), the rows go through the epilogue in registers instead, to the
// outputs at poff[r] (residuals at roff[r]).
// One or two 16-channel blocks (NBK) per tile, each with its own weights, fix, offsets and
// output: two blocks share each broadcast quad, 8 loads for 12 vpdpbusd at MR = 6 instead
// of 7 for 6.
struct VnniBlock {
  const int8_t* w;
  const int32_t* fix;
  const int32_t* o;  // weight offsets, or null
  int32_t* out;
};

template <int MR, int NBK>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void micro_vnni(
    const uint8_t* const* px, const int32_t* off, int64_t nq, const VnniBlock* blk,
    const int32_t* S, const EpiVec* epi, const int64_t* poff, const int64_t* roff) {
  __m512i c[NBK][MR];
  const uint8_t* p[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    for (int b = 0; b < NBK; ++b) c[b][r] = _mm512_setzero_si512();
    p[r] = px[r];
  }
  const int8_t* w0 = blk[0].w;
  const int8_t* w1 = blk[NBK - 1].w;
  for (int64_t k = 0; k < nq; ++k) {
    const __m512i wk0 = _mm512_loadu_si512(w0 + k * kQ * kCB);
    const __m512i wk1 = _mm512_loadu_si512(w1 + k * kQ * kCB);
    const int64_t o = off[k];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, p[r] + o, sizeof(quad));
      const __m512i q = _mm512_set1_epi32(quad);
      c[0][r] = dpbusd(c[0][r], q, wk0);
      if constexpr (NBK == 2) c[1][r] = dpbusd(c[1][r], q, wk1);
    }
  }
  for (int b = 0; b < NBK; ++b) {
    const __m512i f = _mm512_loadu_si512(blk[b].fix);
    if (blk[b].o) {
      const __m512i ov = _mm512_loadu_si512(blk[b].o);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
        c[b][r] = _mm512_add_epi32(c[b][r], _mm512_mullo_epi32(ov, _mm512_set1_epi32(S[r])));
    }
    if (epi) {
      const EpiVec e = epi[b];  // a local copy: the byte stores cannot alias it
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) e.row(_mm512_sub_epi32(c[b][r], f), poff[r], roff[r]);
      continue;
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      _mm512_storeu_si512(blk[b].out + r * kCB, _mm512_sub_epi32(c[b][r], f));
  }
}

// fix[n] = z' * sum of block w's column n (nq rows of 64 bytes).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void block_fix(const int8_t* w,
                                                                       int64_t nq, int32_t z,
                                                                       int32_t* fix) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s = _mm512_setzero_si512();
  for (int64_t k = 0; k < nq; ++k) s = dpbusd(s, ones, _mm512_loadu_si512(w + k * kQ * kCB));
  _mm512_storeu_si512(fix, _mm512_mullo_epi32(s, _mm512_set1_epi32(z)));
}
#endif

// acc[r][n] += o[n] S[r] (weight offsets; the exact sum fits int32, the steps wrap).
void add_offsets(int mr, const int32_t* o, const int32_t* S, int32_t* out) {
  for (int r = 0; r < mr; ++r)
    for (int n = 0; n < kCB; ++n)
      out[r * kCB + n] = static_cast<int32_t>(static_cast<uint32_t>(out[r * kCB + n]) +
                                              static_cast<uint32_t>(o[n]) *
                                                  static_cast<uint32_t>(S[r]));
}

// w16: the block's weights as int16 pair rows (AVX2; off then has one entry per pair, 2 nq),
// else null (portable, on w, one off entry per quad).
void run_micro(const int16_t* const* px, int mr, const int32_t* off, int64_t nq,
               const int8_t* w, const int16_t* w16, const int32_t* o, const int32_t* S,
               int32_t* out) {
#if SYNQ_INT_CONV_X86
  if (w16) {
    const int64_t np = 2 * nq;
    for (int r = 0; r < mr;) {
      const int n = mr - r > 6 ? 4 : mr - r;  // 8 pixels as 4 + 4
      switch (n) {
        case 6: micro_avx2<6>(px + r, off, np, w16, out + r * kCB); break;
        case 5: micro_avx2<5>(px + r, off, np, w16, out + r * kCB); break;
        case 4: micro_avx2<4>(px + r, off, np, w16, out + r * kCB); break;
        case 3: micro_avx2<3>(px + r, off, np, w16, out + r * kCB); break;
        case 2: micro_avx2<2>(px + r, off, np, w16, out + r * kCB); break;
        default: micro_avx2<1>(px + r, off, np, w16, out + r * kCB);
      }
      r += n;
    }
    return;  // (weight offsets are in w16)
  }
#endif
  micro_portable(px, mr, off, nq, w, out);
  if (o) add_offsets(mr, o, S, out);
}

#if SYNQ_INT_CONV_X86
template <int NBK>
void run_micro_vnni(const uint8_t* const* px, int mr, const int32_t* off, int64_t nq,
                    const VnniBlock* blk, const int32_t* S, const EpiVec* epi,
                    const int64_t* poff, const int64_t* roff) {
  switch (mr) {
    case 8: return micro_vnni<8, NBK>(px, off, nq, blk, S, epi, poff, roff);
    case 7: return micro_vnni<7, NBK>(px, off, nq, blk, S, epi, poff, roff);
    case 6: return micro_vnni<6, NBK>(px, off, nq, blk, S, epi, poff, roff);
    case 5: return micro_vnni<5, NBK>(px, off, nq, blk, S, epi, poff, roff);
    case 4: return micro_vnni<4, NBK>(px, off, nq, blk, S, epi, poff, roff);
    case 3: return micro_vnni<3, NBK>(px, off, nq, blk, S, epi, poff, roff);
    case 2: return micro_vnni<2, NBK>(px, off, nq, blk, S, epi, poff, roff);
    default: return micro_vnni<1, NBK>(px, off, nq, blk, S, epi, poff, roff);
  }
}
#endif

// ---- the convolution ----------------------------------------------------------------------

struct ConvArgs {
  // input
  const uint8_t* x;
  bool x_u8;
  int64_t B, C, H, W, sxb, sxc, sxh, sxw;
  int32_t xz;
  // geometry
  int64_t groups, Cg, Og, Cout, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
  int64_t Cp, Hp, Wp, NB, nq;  // nq: K steps (taps x channel quads)
  const int8_t* wp;     // packed weights
  int64_t wrow;         // bytes per (tap, quad) of wp: 64, or 1 in the compact depthwise layout
  const int16_t* wp16;  // the same as int16 (AVX2 path), or null
  // epilogue: per group, NB * 16 scales and biases (0 past Og); depthwise: one per channel
  const float* scale;
  const float* bias;
  const int32_t* woff;  // weight-row offsets, as scale (0 past Og), or null
  int32_t zb;           // the image copy's zero: 0 (int16, x - z) or z' (bytes)
  bool relu, hs;        // ReLU or Hardswish (F.hardswish's steps) after the residual
  // residual (optional): float32, or int8 / uint8 with scale and zero
  const void* res;
  at::ScalarType res_t;
  int64_t srb, src, sry, srx;  // strides: image, channel, row, column
  float rs;
  int32_t rz;
  // output
  void* out;
  at::ScalarType out_t;
  int64_t sob, soc, soy, sox;
  float inv_os;  // requantization: q = clamp(round(y * inv_os) + oz)
  int32_t oz, qmin, qmax;
};

#if SYNQ_INT_CONV_X86
// A channels-last row of W pixels (C channels, pixel stride sxw) into d, Cp >= C int16 per
// pixel: 16 channels a vector, the rest of C one by one, zeros past C. (Only C % 16 == 0
// took vectors before: a depthwise conv's C of 72, padded to 80, went channel by channel
// with strided stores, 2.5x slower than C = 64 or 80.)
__attribute__((target("avx2"))) void widen_row_cl_avx2(const uint8_t* xr, int64_t sxw,
                                                       int64_t W, int64_t C, int64_t Cp,
                                                       bool u8, int16_t xz, int16_t* d) {
  const __m256i z = _mm256_set1_epi16(xz);
  const int64_t C16 = C / 16 * 16;
  for (int64_t ix = 0; ix < W; ++ix) {
    const uint8_t* s = xr + ix * sxw;
    int16_t* dp = d + ix * Cp;
    for (int64_t c = 0; c < C16; c += 16) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + c));
      const __m256i w = u8 ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dp + c), _mm256_sub_epi16(w, z));
    }
    for (int64_t c = C16; c < C; ++c)
      dp[c] = static_cast<int16_t>((u8 ? static_cast<int16_t>(s[c])
                                       : static_cast<int16_t>(static_cast<int8_t>(s[c]))) - xz);
    for (int64_t c = C; c < Cp; ++c) dp[c] = 0;
  }
}
#else
void widen_row_cl_avx2(const uint8_t*, int64_t, int64_t, int64_t, int64_t, bool, int16_t,
                       int16_t*) {}
#endif

// One image into buf: (Hp, Wp, Cp) int16 of x - xz, zero in the padding and past C.
void widen_image(const ConvArgs& a, int64_t bi, int16_t* buf) {
  const int64_t Cp = a.Cp, Wp = a.Wp, rowlen = Wp * Cp;
  std::memset(buf, 0, sizeof(int16_t) * a.ph * rowlen);
  std::memset(buf + (a.ph + a.H) * rowlen, 0, sizeof(int16_t) * (a.Hp - a.ph - a.H) * rowlen);
  const uint8_t* xb = a.x + bi * a.sxb;
  const int16_t xz = static_cast<int16_t>(a.xz);
  for (int64_t iy = 0; iy < a.H; ++iy) {
    int16_t* row = buf + (iy + a.ph) * rowlen;
    std::memset(row, 0, sizeof(int16_t) * a.pw * Cp);
    std::memset(row + (a.pw + a.W) * Cp, 0, sizeof(int16_t) * (Wp - a.pw - a.W) * Cp);
    const uint8_t* xr = xb + iy * a.sxh;
    int16_t* d0 = row + a.pw * Cp;
    if (a.sxc == 1 && cpu_use_avx2()) {
      widen_row_cl_avx2(xr, a.sxw, a.W, a.C, Cp, a.x_u8, xz, d0);
    } else if (a.sxc == 1 && Cp == a.C) {
      // channels-last with an even C: one contiguous run per pixel
      for (int64_t ix = 0; ix < a.W; ++ix) {
        const uint8_t* s = xr + ix * a.sxw;
        int16_t* d = d0 + ix * Cp;
        if (a.x_u8)
          for (int64_t c = 0; c < a.C; ++c) d[c] = static_cast<int16_t>(s[c] - xz);
        else
          for (int64_t c = 0; c < a.C; ++c)
            d[c] = static_cast<int16_t>(static_cast<int8_t>(s[c]) - xz);
      }
    } else {
      for (int64_t ix = 0; ix < a.W; ++ix) {
        int16_t* d = d0 + ix * Cp;
        for (int64_t c = a.C; c < Cp; ++c) d[c] = 0;
      }
      for (int64_t c = 0; c < a.C; ++c) {
        const uint8_t* s = xr + c * a.sxc;
        int16_t* d = d0 + c;
        if (a.x_u8)
          for (int64_t ix = 0; ix < a.W; ++ix)
            d[ix * Cp] = static_cast<int16_t>(s[ix * a.sxw] - xz);
        else
          for (int64_t ix = 0; ix < a.W; ++ix)
            d[ix * Cp] = static_cast<int16_t>(static_cast<int8_t>(s[ix * a.sxw]) - xz);
      }
    }
  }
}

#if SYNQ_INT_CONV_X86
// Planar (NCHW) rows into the byte image's channel quads, 16 pixels at a time (SSE2, the x86-64
// baseline): each quad's four planes (z' past C) are interleaved by two rounds of unpacks into
// 16 four-byte pixels. xr: the row's first channel, plane stride sxc, unit column stride.
// Returns the pixels done (a multiple of 16); the caller finishes the row. A stem's planar
// image took one byte load and store per value: 28% of MobileNetV2's 3-channel stem.
int64_t widen_planes_u8(const uint8_t* xr, int64_t sxc, int64_t C, int64_t Cp, int64_t W,
                        uint8_t flip, uint8_t zq, uint8_t* d0) {
  const int64_t n16 = W / 16 * 16;
  const __m128i fl = _mm_set1_epi8(static_cast<char>(flip));
  const __m128i z = _mm_set1_epi8(static_cast<char>(zq));
  for (int64_t j = 0; j < Cp; j += kQ) {
    for (int64_t ix = 0; ix < n16; ix += 16) {
      __m128i v[kQ];
      for (int e = 0; e < kQ; ++e)
        v[e] = j + e < C ? _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                              xr + (j + e) * sxc + ix)), fl)
                         : z;
      const __m128i lo01 = _mm_unpacklo_epi8(v[0], v[1]), hi01 = _mm_unpackhi_epi8(v[0], v[1]);
      const __m128i lo23 = _mm_unpacklo_epi8(v[2], v[3]), hi23 = _mm_unpackhi_epi8(v[2], v[3]);
      const __m128i q[4] = {_mm_unpacklo_epi16(lo01, lo23), _mm_unpackhi_epi16(lo01, lo23),
                            _mm_unpacklo_epi16(hi01, hi23), _mm_unpackhi_epi16(hi01, hi23)};
      uint8_t* d = d0 + ix * Cp + j;
      if (Cp == kQ) {
        for (int k = 0; k < 4; ++k)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 16 * k), q[k]);
      } else {
        for (int k = 0; k < 4; ++k) {
          alignas(16) uint32_t t[4];
          _mm_store_si128(reinterpret_cast<__m128i*>(t), q[k]);
          for (int i = 0; i < 4; ++i) std::memcpy(d + (4 * k + i) * Cp, t + i, 4);
        }
      }
    }
  }
  return n16;
}
#endif

// One image into buf as bytes for the VNNI kernel: (Hp, Wp, Cp) of x' = x (uint8) or x + 128
// (int8), and z' (the zero point in that domain) in the padding and past C, so that padded
// taps cancel against the z' sum w correction.
void widen_image_u8(const ConvArgs& a, int64_t bi, uint8_t* buf) {
  const int64_t Cp = a.Cp, Wp = a.Wp, rowlen = Wp * Cp;
  const uint8_t flip = a.x_u8 ? 0 : 0x80;
  const uint8_t zq = static_cast<uint8_t>(a.xz) ^ flip;
  std::memset(buf, zq, a.ph * rowlen);
  std::memset(buf + (a.ph + a.H) * rowlen, zq, (a.Hp - a.ph - a.H) * rowlen);
  const uint8_t* xb = a.x + bi * a.sxb;
  for (int64_t iy = 0; iy < a.H; ++iy) {
    uint8_t* row = buf + (iy + a.ph) * rowlen;
    std::memset(row, zq, a.pw * Cp);
    std::memset(row + (a.pw + a.W) * Cp, zq, (Wp - a.pw - a.W) * Cp);
    const uint8_t* xr = xb + iy * a.sxh;
    uint8_t* d0 = row + a.pw * Cp;
    if (a.sxc == 1 && a.sxw == a.C && Cp == a.C) {  // channels-last, dense: one run per row
      const int64_t n = a.W * a.C;
      if (flip == 0)
        std::memcpy(d0, xr, n);
      else
        for (int64_t i = 0; i < n; ++i) d0[i] = xr[i] ^ 0x80;
    } else if (a.sxc == 1) {  // channels-last: one contiguous run per pixel
      for (int64_t ix = 0; ix < a.W; ++ix) {
        const uint8_t* src = xr + ix * a.sxw;
        uint8_t* d = d0 + ix * Cp;
        for (int64_t c = 0; c < a.C; ++c) d[c] = src[c] ^ flip;
        for (int64_t c = a.C; c < Cp; ++c) d[c] = zq;
      }
    } else {
      int64_t ix0 = 0;  // planes (NCHW): whole 16-pixel runs by vectors where columns are dense
#if SYNQ_INT_CONV_X86
      if (a.sxw == 1 && Cp % kQ == 0) ix0 = widen_planes_u8(xr, a.sxc, a.C, Cp, a.W, flip, zq, d0);
#endif
      for (int64_t ix = ix0; ix < a.W; ++ix)
        for (int64_t c = a.C; c < Cp; ++c) d0[ix * Cp + c] = zq;
      for (int64_t c = 0; c < a.C; ++c) {
        const uint8_t* src = xr + c * a.sxc;
        uint8_t* d = d0 + c;
        for (int64_t ix = ix0; ix < a.W; ++ix) d[ix * Cp] = src[ix * a.sxw] ^ flip;
      }
    }
  }
}

inline void widen_any(const ConvArgs& a, int64_t bi, int16_t* buf) { widen_image(a, bi, buf); }
inline void widen_any(const ConvArgs& a, int64_t bi, uint8_t* buf) { widen_image_u8(a, bi, buf); }

// Epilogue of one tile: acc (mr x 16 int32) for pixels p0.. of image bi, output channels
// co0 .. co0 + nv (nv <= 16) whose scales / biases start at sc / bs.
template <typename scalar_t>
void store_scalar(void* out, int64_t idx, float y, const ConvArgs& a) {
  static_cast<scalar_t*>(out)[idx] = static_cast<scalar_t>(y);
}

float residual_at(const ConvArgs& a, int64_t bi, int64_t co, int64_t oy, int64_t ox) {
  const int64_t i = bi * a.srb + co * a.src + oy * a.sry + ox * a.srx;
  switch (a.res_t) {
    case at::kFloat: return static_cast<const float*>(a.res)[i];
    case at::kChar:
      return static_cast<float>(static_cast<const int8_t*>(a.res)[i] - a.rz) * a.rs;
    default:
      return static_cast<float>(static_cast<const uint8_t*>(a.res)[i] - a.rz) * a.rs;
  }
}

void epilogue_portable(const ConvArgs& a, const int32_t* acc, int mr, int64_t bi, int64_t p0,
                       int64_t co0, int nv, const float* sc, const float* bs) {
  for (int r = 0; r < mr; ++r) {
    const int64_t p = p0 + r, oy = p / a.OW, ox = p % a.OW;
    for (int n = 0; n < nv; ++n) {
      float y = static_cast<float>(acc[r * kCB + n]) * sc[n] + bs[n];
      if (a.res) y = y + residual_at(a, bi, co0 + n, oy, ox);
      if (a.relu) y = y < 0.f ? 0.f : y;
      else if (a.hs) y = y * std::min(std::max(y + 3.f, 0.f), 6.f) / 6.f;
      const int64_t idx = bi * a.sob + (co0 + n) * a.soc + oy * a.soy + ox * a.sox;
      switch (a.out_t) {
        case at::kFloat: store_scalar<float>(a.out, idx, y, a); break;
        case at::kHalf: store_scalar<c10::Half>(a.out, idx, y, a); break;
        case at::kBFloat16: store_scalar<c10::BFloat16>(a.out, idx, y, a); break;
        default: {
          float t = y * a.inv_os;
          const float lo = static_cast<float>(a.qmin - a.oz);
          const float hi = static_cast<float>(a.qmax - a.oz);
          t = t > lo ? t : lo;  // same order (and NaN -> lo) as the max / min of the AVX2 path
          t = t < hi ? t : hi;
          const int32_t q = static_cast<int32_t>(std::nearbyint(t)) + a.oz;
          if (a.out_t == at::kChar)
            static_cast<int8_t*>(a.out)[idx] = static_cast<int8_t>(q);
          else
            static_cast<uint8_t*>(a.out)[idx] = static_cast<uint8_t>(q);
        }
      }
    }
  }
}

#if SYNQ_INT_CONV_X86
// Vector epilogue for float32 / int8 / uint8 output and a full 16-channel block. poff[r] /
// roff[r]: offsets of pixel r in the output / residual (the residual, if any, has unit
// channel stride). Channels-last output takes vector stores; otherwise (NCHW) the tile goes
// through a small buffer and is written channel by channel.
__attribute__((target("avx2"))) void epilogue_avx2(const ConvArgs& a, const int32_t* acc,
                                                   int mr, int64_t bi, const int64_t* poff,
                                                   const int64_t* roff, int64_t co0,
                                                   const float* sc, const float* bs) {
  const __m256 s0 = _mm256_loadu_ps(sc), s1 = _mm256_loadu_ps(sc + 8);
  const __m256 b0 = _mm256_loadu_ps(bs), b1 = _mm256_loadu_ps(bs + 8);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 inv = _mm256_set1_ps(a.inv_os);
  const __m256 lo = _mm256_set1_ps(static_cast<float>(a.qmin - a.oz));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(a.qmax - a.oz));
  const __m256i ozv = _mm256_set1_epi32(a.oz);
  const __m256 rsv = _mm256_set1_ps(a.rs);
  const __m256i rzv = _mm256_set1_epi32(a.rz);
  const bool cl = a.soc == 1;
  alignas(32) float tf[kPT][kCB];
  alignas(32) int32_t tq[kPT][kCB];
  const int64_t obase = bi * a.sob + co0 * a.soc;
  for (int r = 0; r < mr; ++r) {
    for (int v = 0; v < 2; ++v) {
      const __m256i iv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * kCB + 8 * v));
      __m256 y = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(iv), v ? s1 : s0), v ? b1 : b0);
      if (a.res) {
        const int64_t ri = bi * a.srb + co0 + 8 * v + roff[r];
        __m256 rv;
        if (a.res_t == at::kFloat) {
          rv = _mm256_loadu_ps(static_cast<const float*>(a.res) + ri);
        } else {
          const __m128i b8 = _mm_loadl_epi64(
              reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(a.res) + ri));
          const __m256i r32 = a.res_t == at::kChar ? _mm256_cvtepi8_epi32(b8)
                                                   : _mm256_cvtepu8_epi32(b8);
          rv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(r32, rzv)), rsv);
        }
        y = _mm256_add_ps(y, rv);
      }
      if (a.relu) {
        y = _mm256_max_ps(y, zero);
      } else if (a.hs) {
        const __m256 six = _mm256_set1_ps(6.f);
        y = _mm256_div_ps(_mm256_mul_ps(y, _mm256_min_ps(_mm256_max_ps(
                                               _mm256_add_ps(y, _mm256_set1_ps(3.f)), zero), six)),
                          six);
      }
      const int64_t o = obase + poff[r] + 8 * v;
      if (a.out_t == at::kFloat) {
        if (cl)
          _mm256_storeu_ps(static_cast<float*>(a.out) + o, y);
        else
          _mm256_store_ps(&tf[r][8 * v], y);
      } else {
        const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(y, inv), lo), hi);
        const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(t), ozv);  // nearest-even
        if (cl) {
          // the values are in byte range: narrow with saturating packs
          const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q),
                                              _mm256_extracti128_si256(q, 1));
          const __m128i q8 = a.out_t == at::kChar ? _mm_packs_epi16(q16, q16)
                                                  : _mm_packus_epi16(q16, q16);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(a.out) + o), q8);
        } else {
          _mm256_store_si256(reinterpret_cast<__m256i*>(&tq[r][8 * v]), q);
        }
      }
    }
  }
  if (cl) return;
  for (int n = 0; n < kCB; ++n) {
    const int64_t on = obase + n * a.soc;
    if (a.out_t == at::kFloat) {
      float* out = static_cast<float*>(a.out) + on;
      for (int r = 0; r < mr; ++r) out[poff[r]] = tf[r][n];
    } else {
      uint8_t* out = static_cast<uint8_t*>(a.out) + on;
      for (int r = 0; r < mr; ++r) out[poff[r]] = static_cast<uint8_t>(tq[r][n]);
    }
  }
}

// The constants of one block's epilogue (see EpiVec), for image bi and output channel co0
// (into *ep: an AVX-512 struct is not returned across functions of other targets).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void make_epi(
    EpiVec* ep, const ConvArgs& a, int64_t bi, int64_t co0, const float* sc, const float* bs,
    int nv) {
  EpiVec& e = *ep;
  // masked loads and stores only for a partial block: this CPU's masked stores (AMD family
  // 26) made the full blocks 15-25% slower (ResNet-20 at batch 256, MobileNetV2 at batch 8)
  e.part = nv < kCB;
  e.m = static_cast<__mmask16>((1u << nv) - 1);
  e.s0 = _mm512_loadu_ps(sc);
  e.b0 = _mm512_loadu_ps(bs);
  e.inv = _mm512_set1_ps(a.inv_os);
  e.lo = _mm512_set1_ps(static_cast<float>(a.qmin - a.oz));
  e.hi = _mm512_set1_ps(static_cast<float>(a.qmax - a.oz));
  e.ozv = _mm512_set1_epi32(a.oz);
  e.rsv = _mm512_set1_ps(a.rs);
  e.rzv = _mm512_set1_epi32(a.rz);
  e.relu = a.relu;
  e.hs = a.hs;
  e.res_t = a.res_t;
  e.out_t = a.out_t;
  const int64_t esz = a.out_t == at::kFloat ? 4 : 1, rsz = a.res_t == at::kFloat ? 4 : 1;
  e.res = a.res ? static_cast<const uint8_t*>(a.res) + (bi * a.srb + co0) * rsz : nullptr;
  e.out = static_cast<uint8_t*>(a.out) + (bi * a.sob + co0 * a.soc) * esz;
}

// epilogue_avx2 with the 16 channels in one 512-bit vector (AVX-512 F / BW): the same float32
// operations in the same order, so the same values; half the instructions, which matters where
// K is short (ResNet-20's 16-channel layers, MobileNetV2's 1x1 convs). nv < 16 (a last,
// partial block: MobileNetV2's 24-channel layers) masks the residual loads and the stores;
// scales and biases are padded to whole blocks.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void epilogue_avx512(
    const ConvArgs& a, const int32_t* acc, int mr, int64_t bi, const int64_t* poff,
    const int64_t* roff, int64_t co0, const float* sc, const float* bs, int nv) {
  // a's fields as locals (in e): the byte stores below may alias any object (char
  // aliasing), which made the compiler reload them from a after every store
  EpiVec e;
  make_epi(&e, a, bi, co0, sc, bs, nv);
  if (a.soc == 1) {
    for (int r = 0; r < mr; ++r) e.row(_mm512_loadu_si512(acc + r * kCB), poff[r], roff[r]);
    return;
  }
  // NCHW output: the rows into a tile, then each channel's pixels
  alignas(64) float tf[kPT][kCB];
  alignas(64) int32_t tq[kPT][kCB];
  for (int r = 0; r < mr; ++r) {  // (vector_epilogue_ok: a residual is channels-last)
    const __m512 y = e.value(_mm512_loadu_si512(acc + r * kCB), roff[r]);
    if (e.out_t == at::kFloat)
      _mm512_store_ps(tf[r], y);
    else
      _mm512_store_si512(tq[r], e.quantize(y));
  }
  for (int n = 0; n < nv; ++n) {
    if (e.out_t == at::kFloat) {
      float* o = static_cast<float*>(e.out) + n * a.soc;
      for (int r = 0; r < mr; ++r) o[poff[r]] = tf[r][n];
    } else {
      uint8_t* o = static_cast<uint8_t*>(e.out) + n * a.soc;
      for (int r = 0; r < mr; ++r) o[poff[r]] = static_cast<uint8_t>(tq[r][n]);
    }
  }
}

// The vector epilogue for this CPU, for nv output channels of the block (all 16 where there
// is no AVX-512).
void epilogue_vec(const ConvArgs& a, const int32_t* acc, int mr, int64_t bi,
                  const int64_t* poff, const int64_t* roff, int64_t co0, const float* sc,
                  const float* bs, int nv) {
  if (cpu_use_vnni()) return epilogue_avx512(a, acc, mr, bi, poff, roff, co0, sc, bs, nv);
  epilogue_avx2(a, acc, mr, bi, poff, roff, co0, sc, bs);
}
#endif

// Per-thread image buffers of at least n elements, reused across calls (a fresh multi-MB
// buffer per call costs more in page faults than the widening itself), 64-byte aligned: a
// pixel's channels then start on a cache line wherever a row of them fills whole lines. The
// heap gave 16-byte alignment, and the alignment (so whether every 64-byte load of the
// depthwise kernel split over two lines) changed from process to process.
template <typename T>
T* thread_buffer(int64_t n) {
  static thread_local std::vector<T> buf;
  constexpr int64_t kPad = 64 / sizeof(T);
  if (static_cast<int64_t>(buf.size()) < n + kPad) buf.resize(n + kPad);
  const auto p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<T*>((p + 63) & ~uintptr_t{63});
}

// Walks the output pixels of one image in tiles: for each pixel of the next tile, its window
// origin in the widened image (base + pixel offset), its output offset and its residual offset.
// (oy, ox) are stepped rather than divided: an idiv per pixel costs as much as the whole K
// loop of a 1-channel stem.
template <typename T>
struct PixelWalker {
  const ConvArgs& a;
  int64_t oy, ox, row_step, col_step;
  const T* row_base;
  PixelWalker(const ConvArgs& a_, const T* base, int64_t px0)
      : a(a_), oy(px0 / a_.OW), ox(px0 % a_.OW), row_step(a_.sh * a_.Wp * a_.Cp),
        col_step(a_.sw * a_.Cp), row_base(base + (px0 / a_.OW) * row_step) {}
  void next(int mr, const T** px, int64_t* poff, int64_t* roff) {
    for (int r = 0; r < mr; ++r) {
      px[r] = row_base + ox * col_step;
      poff[r] = oy * a.soy + ox * a.sox;
      roff[r] = a.res ? oy * a.sry + ox * a.srx : 0;
      if (++ox == a.OW) {
        ox = 0;
        ++oy;
        row_base += row_step;
      }
    }
  }
};

// Pixels [t0, t1) (in tiles of kPT) x channel blocks [nb0, nb1) of image bi, whose widened
// copy is `img` (int16, or bytes with `fix`: 16 int32 per block, see micro_vnni).
template <typename T>
void conv_tiles(const ConvArgs& a, const T* img, const int32_t* off, const int32_t* fix,
                const int32_t* S, int64_t bi, int64_t g, int64_t nb0, int64_t nb1, int64_t px0,
                int64_t px1, bool vec_epi) {
  constexpr bool bytes = std::is_same_v<T, uint8_t>;
  alignas(64) int32_t acc[2][kPT * kCB];
  const T* px[kPT];
  int64_t poff[kPT], roff[kPT];
  const T* ig = img + g * a.Cg;  // the group's first channel (Cg % 4 == 0 when groups > 1)
#if SYNQ_INT_CONV_X86
  // the byte kernel's rows go through the epilogue in its registers where the output is
  // channels-last (and the vector epilogue takes it)
  const bool fused = bytes && vec_epi && a.soc == 1 && cpu_use_vnni();
  EpiVec epi[2];
#endif
  for (int64_t nb = nb0; nb < nb1;) {
    // the byte kernel takes two blocks at a time where there are two
    const int nbk = bytes && nb + 1 < nb1 ? 2 : 1;
#if SYNQ_INT_CONV_X86
    if (fused)
      for (int k = 0; k < nbk; ++k) {
        const int64_t gb = g * a.NB + nb + k;
        make_epi(&epi[k], a, bi, g * a.Og + (nb + k) * kCB, a.scale + gb * kCB,
                 a.bias + gb * kCB,
                 static_cast<int>(std::min<int64_t>(kCB, a.Og - (nb + k) * kCB)));
      }
#endif
    PixelWalker<T> walk(a, ig, px0);
    for (int64_t p0 = px0; p0 < px1; p0 += kPT) {
      const int mr = static_cast<int>(std::min<int64_t>(kPT, px1 - p0));
      walk.next(mr, px, poff, roff);
      const int64_t gb = g * a.NB + nb;  // the first block's index over all groups
      const int32_t* Sp = S ? S + p0 : nullptr;
      if constexpr (bytes) {
#if SYNQ_INT_CONV_X86
        VnniBlock blk[2];
        for (int k = 0; k < nbk; ++k)
          blk[k] = {a.wp + (gb + k) * a.nq * kQ * kCB, fix + (gb + k) * kCB,
                    S ? a.woff + (gb + k) * kCB : nullptr, acc[k]};
        const EpiVec* e = fused ? epi : nullptr;
        if (nbk == 2)
          run_micro_vnni<2>(px, mr, off, a.nq, blk, Sp, e, poff, roff);
        else
          run_micro_vnni<1>(px, mr, off, a.nq, blk, Sp, e, poff, roff);
        if (fused) continue;
#endif
      } else {
        run_micro(px, mr, off, a.nq, a.wp + gb * a.nq * kQ * kCB,
                  a.wp16 ? a.wp16 + gb * a.nq * kQ * kCB : nullptr,
                  S ? a.woff + gb * kCB : nullptr, Sp, acc[0]);
      }
      for (int k = 0; k < nbk; ++k) {
        const int64_t co0 = g * a.Og + (nb + k) * kCB;
        const int nv = static_cast<int>(std::min<int64_t>(kCB, a.Og - (nb + k) * kCB));
        const float* sc = a.scale + (gb + k) * kCB;
        const float* bs = a.bias + (gb + k) * kCB;
#if SYNQ_INT_CONV_X86
        if (vec_epi && (nv == kCB || cpu_use_vnni())) {
          epilogue_vec(a, acc[k], mr, bi, poff, roff, co0, sc, bs, nv);
          continue;
        }
#endif
        epilogue_portable(a, acc[k], mr, bi, p0, co0, nv, sc, bs);
      }
    }
    nb += nbk;
  }
}

// Whether epilogue_avx2 handles this output (and residual) for full 16-channel blocks.
bool vector_epilogue_ok(const ConvArgs& a) {
  return cpu_use_avx2() && (!a.res || a.src == 1) &&
         (a.out_t == at::kFloat || a.out_t == at::kChar || a.out_t == at::kByte);
}

// Sum of n image values (SSE2, the x86-64 baseline: psadbw on bytes, pmaddwd on int16).
inline int32_t channel_sum(const uint8_t* p, int64_t n) {
  int64_t c = 0;
  int32_t t = 0;
#if SYNQ_INT_CONV_X86
  __m128i acc = _mm_setzero_si128();
  for (; c + 16 <= n; c += 16)
    acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c)),
                                          _mm_setzero_si128()));
  t = static_cast<int32_t>(_mm_cvtsi128_si64(acc) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc, acc)));
#endif
  for (; c < n; ++c) t += p[c];
  return t;
}

inline int32_t channel_sum(const int16_t* p, int64_t n) {
  int64_t c = 0;
  int32_t t = 0;
#if SYNQ_INT_CONV_X86
  __m128i acc = _mm_setzero_si128();
  for (; c + 8 <= n; c += 8)
    acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + c)),
                                            _mm_set1_epi16(1)));
  acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4E));
  acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xB1));
  t = _mm_cvtsi128_si32(acc);
#endif
  for (; c < n; ++c) t += p[c];
  return t;
}

#if SYNQ_INT_CONV_X86
// cs[i] = sum of the first Cg bytes of pixel i's quad, minus zsum, for a byte image of one
// channel quad a pixel (stems): eight pixels per vpmaddubsw / vpmaddwd pair.
__attribute__((target("avx2"))) void quad_sums_avx2(const uint8_t* img, int64_t n, int64_t Cg,
                                                    int32_t zsum, int32_t* cs) {
  alignas(32) int8_t m[32];
  for (int i = 0; i < 32; ++i) m[i] = i % kQ < Cg ? 1 : 0;
  const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
  const __m256i ones = _mm256_set1_epi16(1), zs = _mm256_set1_epi32(zsum);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(img + kQ * i));
    const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(v, mask), ones);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cs + i), _mm256_sub_epi32(t, zs));
  }
  for (; i < n; ++i) cs[i] = channel_sum(img + kQ * i, Cg) - zsum;
}
#endif

// S[g P + p] = sum over output pixel p's window of the group's (x - z) (0 in the padding):
// what a weight row's offset o multiplies (acc + o S, see conv_packed_impl). Separably: the
// per-pixel channel sums, then along y over whole padded rows (unit stride, vectorized by the
// compiler), then along x at the output columns only. (Along x first, over every padded row
// with the conv's column stride, took 16% of ResNet-18's stem with offsets.)
template <typename T>
void window_sums(const ConvArgs& a, const T* img, int32_t* S) {
  static thread_local std::vector<int32_t> cs, vs;
  const int64_t HW = a.Hp * a.Wp, P = a.OH * a.OW, Wp = a.Wp;
  if (static_cast<int64_t>(cs.size()) < HW) cs.resize(HW);
  if (static_cast<int64_t>(vs.size()) < a.OH * Wp) vs.resize(a.OH * Wp);
  const int32_t zsum = a.zb * static_cast<int32_t>(a.Cg);
  for (int64_t g = 0; g < a.groups; ++g) {
    bool done = false;
#if SYNQ_INT_CONV_X86
    if constexpr (std::is_same_v<T, uint8_t>) {
      if (a.groups == 1 && a.Cp == kQ && cpu_use_avx2()) {
        quad_sums_avx2(img, HW, a.Cg, zsum, cs.data());
        done = true;
      }
    }
#endif
    if (!done)
      for (int64_t i = 0; i < HW; ++i)
        cs[i] = channel_sum(img + i * a.Cp + g * a.Cg, a.Cg) - zsum;
    for (int64_t oy = 0; oy < a.OH; ++oy) {
      int32_t* v = vs.data() + oy * Wp;
      const int32_t* c0 = cs.data() + oy * a.sh * Wp;
      for (int64_t x = 0; x < Wp; ++x) v[x] = c0[x];
      for (int64_t ky = 1; ky < a.kh; ++ky) {
        const int32_t* c = c0 + ky * a.dh * Wp;
        for (int64_t x = 0; x < Wp; ++x) v[x] += c[x];
      }
    }
    int32_t* Sg = S + g * P;
    for (int64_t oy = 0; oy < a.OH; ++oy) {  // kx outer: unit stride (vectorized) at stride 1
      const int32_t* v = vs.data() + oy * Wp;
      int32_t* d = Sg + oy * a.OW;
      for (int64_t ox = 0; ox < a.OW; ++ox) d[ox] = v[ox * a.sw];
      for (int64_t kx = 1; kx < a.kw; ++kx) {
        const int32_t* w = v + kx * a.dw;
        for (int64_t ox = 0; ox < a.OW; ++ox) d[ox] += w[ox * a.sw];
      }
    }
  }
}

// Widens the images and runs body(img, S, bi, unit, px0, px1) over every image, every one of
// `units` channel units per image and every pixel: whole images per task when there are at
// least as many as threads (each thread widens into its own scratch), otherwise all images
// widened first, then pixel ranges (in tiles of `tile`) and units split across threads.
template <typename T, typename Body>
void conv_parallel(const ConvArgs& a, int64_t units, int64_t tile, int64_t work, Body body) {
  const int64_t P = a.OH * a.OW;
  const int64_t img_elems = a.Hp * a.Wp * a.Cp;
  const int64_t s_elems = a.woff ? a.groups * P : 0;  // window sums, for weight offsets
  const int64_t nth = at::get_num_threads();
  if (a.B >= nth && a.B > 1) {
    const int64_t grain = work < (1 << 18) ? a.B : 1;
    at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
      T* const buf = thread_buffer<T>(img_elems);
      std::vector<int32_t> S(s_elems);
      for (int64_t bi = b0; bi < b1; ++bi) {
        widen_any(a, bi, buf);
        if (s_elems) window_sums(a, buf, S.data());
        for (int64_t u = 0; u < units; ++u)
          body(buf, s_elems ? S.data() : nullptr, bi, u, int64_t{0}, P);
      }
    });
    return;
  }
  T* const bufs = thread_buffer<T>(a.B * img_elems);
  std::vector<int32_t> S(a.B * s_elems);
  for (int64_t bi = 0; bi < a.B; ++bi) {
    widen_any(a, bi, bufs + bi * img_elems);
    if (s_elems) window_sums(a, bufs + bi * img_elems, S.data() + bi * s_elems);
  }
  const int64_t ptiles = (P + tile - 1) / tile;
  const bool split = nth > 1 && work >= (1 << 18);
  const int64_t pch =
      split ? std::max<int64_t>(1, std::min(ptiles, (4 * nth + a.B * units - 1) / (a.B * units)))
            : 1;
  const int64_t total = a.B * units * pch;
  at::parallel_for(0, total, split ? 1 : total, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pc = t % pch, u = (t / pch) % units, bi = t / pch / units;
      const int64_t px0 = std::min(P, ptiles * pc / pch * tile);
      const int64_t px1 = std::min(P, ptiles * (pc + 1) / pch * tile);
      if (px0 < px1)
        body(bufs + bi * img_elems, s_elems ? S.data() + bi * s_elems : nullptr, bi, u, px0,
             px1);
    }
  });
}

template <typename T>
void conv_run_as(const ConvArgs& a, const int32_t* fix) {
  // K offsets in image elements from a pixel's window origin, one per tap and channel quad;
  // with groups > 1 each group reads its own channel slice of the full-width buffer (Cp = C,
  // Cg % 4 == 0) or (otherwise) its own copy.
  const int64_t cq = (a.Cg + kQ - 1) / kQ;
  std::vector<int32_t> off(a.kh * a.kw * cq);
  for (int64_t ky = 0; ky < a.kh; ++ky)
    for (int64_t kx = 0; kx < a.kw; ++kx)
      for (int64_t j = 0; j < cq; ++j)
        off[(ky * a.kw + kx) * cq + j] =
            static_cast<int32_t>((ky * a.dh * a.Wp + kx * a.dw) * a.Cp + kQ * j);
  if (a.wp16) {  // the AVX2 kernel steps by channel pairs: two entries per quad
    std::vector<int32_t> op(2 * off.size());
    for (size_t k = 0; k < off.size(); ++k) {
      op[2 * k] = off[k];
      op[2 * k + 1] = off[k] + 2;
    }
    off.swap(op);
  }
  const bool vec_epi = vector_epilogue_ok(a);
  const int64_t work = a.B * a.OH * a.OW * a.Cout * a.kh * a.kw * a.Cg;  // MACs
  const int64_t P = a.OH * a.OW;
  const int64_t per = std::is_same_v<T, uint8_t> ? 2 : 1;  // blocks per unit of work
  const int64_t upg = (a.NB + per - 1) / per;              // units per group
  conv_parallel<T>(a, a.groups * upg, kPT, work,
                   [&](const T* img, const int32_t* S, int64_t bi, int64_t u, int64_t px0,
                       int64_t px1) {
                     const int64_t g = u / upg, nb = u % upg * per;
                     conv_tiles(a, img, off.data(), fix, S ? S + g * P : nullptr, bi, g, nb,
                                std::min(a.NB, nb + per), px0, px1, vec_epi);
                   });
}

void conv_run(const ConvArgs& a) {
#if SYNQ_INT_CONV_X86
  if (cpu_use_vnni()) {
    ConvArgs b = a;
    b.zb = a.x_u8 ? a.xz : a.xz + 128;
    std::vector<int32_t> fix(a.groups * a.NB * kCB);
    for (int64_t k = 0; k < a.groups * a.NB; ++k)
      block_fix(a.wp + k * a.nq * kQ * kCB, a.nq, b.zb, fix.data() + k * kCB);
    return conv_run_as<uint8_t>(b, fix.data());
  }
#endif
  ConvArgs b = a;
  b.zb = 0;
  b.wp16 = nullptr;
#if SYNQ_INT_CONV_X86
  static thread_local std::vector<int16_t> w16;
  if (cpu_use_avx2()) {
    const int64_t n = a.groups * a.NB * a.nq * kQ * kCB;
    if (static_cast<int64_t>(w16.size()) < n) w16.resize(n);
    repack_pairs(a.wp, a.groups * a.NB, a.nq, a.woff, w16.data());
    b.wp16 = w16.data();
    b.woff = nullptr;  // in the int16 weights now
  }
#endif
  conv_run_as<int16_t>(b, nullptr);
}

// ---- depthwise (groups = C = Cout): channels in the vector lanes ------------------------------
//
// The general path gives each group its own 16-lane weight block (one lane used for a
// depthwise conv) and runs the groups one by one, about 20x slower than fp32 oneDNN. Here the
// widened image keeps every channel (Cp = C rounded up to 16, zeros past C), and one step of
// the micro-kernel takes 16 channels of one pixel at two taps, interleaves them with
// unpacklo / unpackhi (in-lane: channels 0-3 and 8-11, then 4-7 and 12-15) and multiplies
// them with the two taps' weights, laid out in the same order, by vpmaddwd.

constexpr int kDwPT = 4;  // pixels per depthwise tile: 8 accumulators + 6 temporaries

void dw_micro_portable(const int16_t* const* px, int mr, const int32_t* off, int64_t T,
                       const int16_t* wt, int nv, int32_t* out) {
  for (int r = 0; r < mr; ++r)
    for (int n = 0; n < kCB; ++n) {
      int32_t s = 0;
      if (n < nv)
        for (int64_t t = 0; t < T; ++t)
          s += static_cast<int32_t>(px[r][off[t] + n]) * wt[n * T + t];
      out[r * kCB + n] = s;
    }
}

#if SYNQ_INT_CONV_X86
template <int MR>
__attribute__((target("avx2"))) void dw_micro_avx2(const int16_t* const* px, const int32_t* off,
                                                   int64_t TP, const int16_t* w, int32_t* out) {
  __m256i lo[MR], hi[MR];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
  for (int64_t t = 0; t < TP; ++t) {
    const __m256i wl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 32));
    const __m256i wh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + t * 32 + 16));
    const int64_t o0 = off[2 * t], o1 = off[2 * t + 1];
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(px[r] + o0));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(px[r] + o1));
      lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(_mm256_unpacklo_epi16(a0, a1), wl));
      hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(_mm256_unpackhi_epi16(a0, a1), wh));
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kCB),
                        _mm256_permute2x128_si256(lo[r], hi[r], 0x20));  // channels 0-7
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * kCB + 8),
                        _mm256_permute2x128_si256(lo[r], hi[r], 0x31));  // channels 8-15
  }
}
// AVX-512 VNNI: two blocks (32 channels) of MR pixels a step. The same interleave over
// 128-bit lanes gives channels 0-3, 8-11, 16-19, 24-27 (lo) and 4-7, 12-15, 20-23, 28-31
// (hi); vpdpwssd multiplies and accumulates. HALF: one block only (the last of an odd count;
// the loads are masked to its 16 channels, so nothing past the image is read).
template <int MR, bool HALF>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void dw_micro_vnni(
    const int16_t* const* px, const int32_t* off, int64_t TP, const int16_t* w, int32_t* out0,
    int32_t* out1) {
  __m512i lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
  const __mmask32 m = HALF ? 0xFFFFu : 0xFFFFFFFFu;
  for (int64_t t = 0; t < TP; ++t) {
    const __m512i wl = _mm512_loadu_si512(w + t * 64);
    const __m512i wh = _mm512_loadu_si512(w + t * 64 + 32);
    const int64_t o0 = off[2 * t], o1 = off[2 * t + 1];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a0 = HALF ? _mm512_maskz_loadu_epi16(m, px[r] + o0)
                              : _mm512_loadu_si512(px[r] + o0);
      const __m512i a1 = HALF ? _mm512_maskz_loadu_epi16(m, px[r] + o1)
                              : _mm512_loadu_si512(px[r] + o1);
      lo[r] = dpwssd(lo[r], _mm512_unpacklo_epi16(a0, a1), wl);
      hi[r] = dpwssd(hi[r], _mm512_unpackhi_epi16(a0, a1), wh);
    }
  }
  // back to channel order: 0-15 = lo.0 hi.0 lo.1 hi.1, 16-31 = lo.2 hi.2 lo.3 hi.3 (lanes)
  const __m512i i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm512_storeu_si512(out0 + r * kCB, _mm512_permutex2var_epi64(lo[r], i0, hi[r]));
    if (!HALF) _mm512_storeu_si512(out1 + r * kCB, _mm512_permutex2var_epi64(lo[r], i1, hi[r]));
  }
}

using DwVnniFn = void (*)(const int16_t* const*, const int32_t*, int64_t, const int16_t*,
                          int32_t*, int32_t*);

template <bool HALF>
DwVnniFn dw_vnni_fn(int mr) {
  switch (mr) {
    case 8: return dw_micro_vnni<8, HALF>;
    case 7: return dw_micro_vnni<7, HALF>;
    case 6: return dw_micro_vnni<6, HALF>;
    case 5: return dw_micro_vnni<5, HALF>;
    case 4: return dw_micro_vnni<4, HALF>;
    case 3: return dw_micro_vnni<3, HALF>;
    case 2: return dw_micro_vnni<2, HALF>;
    default: return dw_micro_vnni<1, HALF>;
  }
}
#endif

struct DwWeights {
  int64_t T, TP, NBc;
  std::vector<int16_t> wt;   // portable: wt[c * T + t]
  std::vector<int16_t> wv;   // AVX2: per block and tap pair, 32 int16 (see above)
  std::vector<int16_t> wz;   // VNNI: per block pair and tap pair, 64 int16 (see above)
  std::vector<int16_t> w3;   // dw_rows: per block pair, dw_rows::kPairW int16
  std::vector<int32_t> off;  // tap offsets (2 * TP; an odd T's last pair reads tap 0 at weight 0)
  const float* sc;           // per channel, padded with 0 to whole pairs of 16-channel blocks
  const float* bs;           // (the full-pair kernels load channels c0 .. c0 + 31)
};

// The epilogue of one 16-channel block of mr pixels.
void dw_epilogue(const ConvArgs& a, const DwWeights& d, const int32_t* acc, int mr, int64_t bi,
                 int64_t p0, const int64_t* poff, const int64_t* roff, int64_t c0,
                 bool vec_epi) {
  const int nv = static_cast<int>(std::min<int64_t>(kCB, a.C - c0));
#if SYNQ_INT_CONV_X86
  if (vec_epi && (nv == kCB || cpu_use_vnni())) {
    epilogue_vec(a, acc, mr, bi, poff, roff, c0, d.sc + c0, d.bs + c0, nv);
    return;
  }
#endif
  epilogue_portable(a, acc, mr, bi, p0, c0, nv, d.sc + c0, d.bs + c0);
}

#if SYNQ_INT_CONV_X86
// VNNI: tiles of kPT pixels, two channel blocks a kernel call.
void dw_tiles_vnni(const ConvArgs& a, const DwWeights& d, const int16_t* img, int64_t bi,
                   int64_t px0, int64_t px1, bool vec_epi) {
  alignas(64) int32_t acc[2][kPT * kCB];
  const int16_t* pb[kPT];
  const int16_t* px[kPT];
  int64_t poff[kPT], roff[kPT];
  PixelWalker walk(a, img, px0);
  const int64_t pairs = (d.NBc + 1) / 2;
  for (int64_t p0 = px0; p0 < px1; p0 += kPT) {
    const int mr = static_cast<int>(std::min<int64_t>(kPT, px1 - p0));
    walk.next(mr, pb, poff, roff);
    const DwVnniFn full = dw_vnni_fn<false>(mr), half = dw_vnni_fn<true>(mr);
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const int64_t c0 = pr * 2 * kCB;
      const bool one = 2 * pr + 1 == d.NBc;
      for (int r = 0; r < mr; ++r) px[r] = pb[r] + c0;
      (one ? half : full)(px, d.off.data(), d.TP, d.wz.data() + pr * d.TP * 4 * kCB, acc[0],
                          acc[1]);
      dw_epilogue(a, d, acc[0], mr, bi, p0, poff, roff, c0, vec_epi);
      if (!one) dw_epilogue(a, d, acc[1], mr, bi, p0, poff, roff, c0 + kCB, vec_epi);
    }
  }
}
#endif

#if SYNQ_INT_CONV_X86
// dw_rows.h's kernels: VNNI, 3x3, stride 1 or 2, no dilation, int8 / uint8 channels-last
// output without a residual.
bool dw_rows_ok(const ConvArgs& a) {
  return cpu_use_vnni() && a.kh == 3 && a.kw == 3 && a.dh == 1 && a.dw == 1 &&
         a.sh == a.sw && (a.sh == 1 || a.sh == 2) &&
         (a.out_t == at::kChar || a.out_t == at::kByte) && !a.res && a.soc == 1;
}

// Pixels [px0, px1) of image bi in runs along output rows, every block pair.
void dw_rows_tiles(const ConvArgs& a, const DwWeights& d, const int16_t* img, int64_t bi,
                   int64_t px0, int64_t px1) {
  const dw_rows::Requant q{a.inv_os, static_cast<float>(a.qmin - a.oz),
                           static_cast<float>(a.qmax - a.oz), a.oz, a.relu, a.hs};
  const int64_t pairs = (d.NBc + 1) / 2;
  const int s = static_cast<int>(a.sh);
  uint8_t* const out = static_cast<uint8_t*>(a.out) + bi * a.sob;
  for (int64_t p = px0; p < px1;) {
    const int64_t oy = p / a.OW, ox0 = p % a.OW, n = std::min(a.OW - ox0, px1 - p);
    for (int64_t k = 0; k < n; k += dw_rows::kMaxPx) {
      const int mr = static_cast<int>(std::min<int64_t>(dw_rows::kMaxPx, n - k));
      const int64_t ox = ox0 + k;
      const int16_t* x = img + (oy * a.sh * a.Wp + ox * a.sw) * a.Cp;
      uint8_t* o = out + oy * a.soy + ox * a.sox;
      const dw_rows::RowFn full = dw_rows::kernel_for(mr, s, false);
      const dw_rows::RowFn half = dw_rows::kernel_for(mr, s, true);
      for (int64_t pr = 0; pr < pairs; ++pr) {
        const int64_t c0 = pr * 2 * kCB;
        const int nv0 = static_cast<int>(std::min<int64_t>(kCB, a.C - c0));
        const int nv1 = static_cast<int>(std::clamp<int64_t>(a.C - c0 - kCB, 0, kCB));
        (2 * pr + 1 == d.NBc ? half : full)(x + c0, a.Cp, a.Wp * a.Cp,
                                            d.w3.data() + pr * dw_rows::kPairW, d.sc + c0,
                                            d.bs + c0, q, o + c0, a.sox, nv0, nv1);
      }
    }
    p += n;
  }
}
#endif

// Pixels [px0, px1) of image bi, every channel block.
void dw_tiles(const ConvArgs& a, const DwWeights& d, const int16_t* img, int64_t bi,
              int64_t px0, int64_t px1, bool vec_epi) {
#if SYNQ_INT_CONV_X86
  if (cpu_use_vnni()) return dw_tiles_vnni(a, d, img, bi, px0, px1, vec_epi);
#endif
  alignas(32) int32_t acc[kPT * kCB];
  const int16_t* pb[kDwPT];
  const int16_t* px[kDwPT];
  int64_t poff[kDwPT], roff[kDwPT];
  PixelWalker walk(a, img, px0);
  const bool avx2 = cpu_use_avx2();
  for (int64_t p0 = px0; p0 < px1; p0 += kDwPT) {
    const int mr = static_cast<int>(std::min<int64_t>(kDwPT, px1 - p0));
    walk.next(mr, pb, poff, roff);
    for (int64_t nb = 0; nb < d.NBc; ++nb) {
      const int64_t c0 = nb * kCB;
      const int nv = static_cast<int>(std::min<int64_t>(kCB, a.C - c0));
      for (int r = 0; r < mr; ++r) px[r] = pb[r] + c0;
#if SYNQ_INT_CONV_X86
      if (avx2) {
        const int16_t* w = d.wv.data() + nb * d.TP * 2 * kCB;
        switch (mr) {
          case 4: dw_micro_avx2<4>(px, d.off.data(), d.TP, w, acc); break;
          case 3: dw_micro_avx2<3>(px, d.off.data(), d.TP, w, acc); break;
          case 2: dw_micro_avx2<2>(px, d.off.data(), d.TP, w, acc); break;
          default: dw_micro_avx2<1>(px, d.off.data(), d.TP, w, acc);
        }
      } else
#endif
        dw_micro_portable(px, mr, d.off.data(), d.T, d.wt.data() + c0 * d.T, nv, acc);
      dw_epilogue(a, d, acc, mr, bi, p0, poff, roff, c0, vec_epi);
    }
  }
}

// a: groups = C = Cout (one input and one output channel per group); element [c, 0, ky, kx,
// 0, 0] of the packed weight is w[c, 0, ky, kx], a.wrow bytes apart (1 in the compact layout,
// 64 in the general one). The int16 image of the AVX2 path, also where AVX-512 VNNI is
// present; 3x3 convs with a requantized output run dw_rows.h's kernels there.
void conv_run_dw(ConvArgs& a) {
  DwWeights d;
  d.T = a.kh * a.kw;
  d.TP = (d.T + 1) / 2;
  d.NBc = (a.C + kCB - 1) / kCB;
  a.Cp = d.NBc * kCB;
  d.wt.assign(d.NBc * kCB * d.T, 0);
  for (int64_t c = 0; c < a.C; ++c)
    for (int64_t t = 0; t < d.T; ++t)  // weight offsets added back (int16 holds them)
      d.wt[c * d.T + t] = static_cast<int16_t>(a.wp[(c * d.T + t) * a.wrow] +
                                               (a.woff ? a.woff[c] : 0));
  d.sc = a.scale;  // one per channel, NBc * 16 (see conv_packed_impl)
  d.bs = a.bias;
  const bool vec_epi = vector_epilogue_ok(a);
  a.woff = nullptr;  // in the weights now
  a.zb = 0;
#if SYNQ_INT_CONV_X86
  if (dw_rows_ok(a)) {
    const int64_t pairs = (d.NBc + 1) / 2;
    d.w3.assign(pairs * dw_rows::kPairW, 0);
    for (int64_t c = 0; c < a.C; ++c)
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx)
          d.w3[c / (2 * kCB) * dw_rows::kPairW +
               dw_rows::weight_index(static_cast<int>(c % (2 * kCB)), ky, kx)] =
              d.wt[c * d.T + ky * 3 + kx];
    conv_parallel<int16_t>(a, 1, dw_rows::kMaxPx, a.B * a.OH * a.OW * a.C * d.T,
                           [&](const int16_t* img, const int32_t*, int64_t bi, int64_t,
                               int64_t px0, int64_t px1) {
                             dw_rows_tiles(a, d, img, bi, px0, px1);
                           });
    return;
  }
#endif
  static const int kLane[2][8] = {{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}};
  d.wv.assign(d.NBc * d.TP * 2 * kCB, 0);
  for (int64_t nb = 0; nb < d.NBc; ++nb)
    for (int64_t t = 0; t < d.TP; ++t)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 8; ++i)
          for (int e = 0; e < 2; ++e) {
            const int64_t ch = nb * kCB + kLane[h][i], tap = 2 * t + e;
            if (ch < a.C && tap < d.T)
              d.wv[((nb * d.TP + t) * 2 + h) * kCB + 2 * i + e] = d.wt[ch * d.T + tap];
          }
  if (cpu_use_vnni()) {  // block pairs: per tap pair the lo halves of both, then the hi halves
    const int64_t pairs = (d.NBc + 1) / 2;
    d.wz.assign(pairs * d.TP * 4 * kCB, 0);
    for (int64_t nb = 0; nb < d.NBc; ++nb)
      for (int64_t t = 0; t < d.TP; ++t)
        for (int h = 0; h < 2; ++h)
          std::copy_n(d.wv.data() + ((nb * d.TP + t) * 2 + h) * kCB, kCB,
                      d.wz.data() + ((nb / 2 * d.TP + t) * 4 + 2 * h + nb % 2) * kCB);
  }
  d.off.assign(2 * d.TP, 0);
  for (int64_t ky = 0; ky < a.kh; ++ky)
    for (int64_t kx = 0; kx < a.kw; ++kx)
      d.off[ky * a.kw + kx] = static_cast<int32_t>((ky * a.dh * a.Wp + kx * a.dw) * a.Cp);
  conv_parallel<int16_t>(a, 1, cpu_use_vnni() ? kPT : kDwPT, a.B * a.OH * a.OW * a.C * d.T,
                [&](const int16_t* img, const int32_t*, int64_t bi, int64_t, int64_t px0,
                    int64_t px1) {
                  dw_tiles(a, d, img, bi, px0, px1, vec_epi);
                });
}

void check_1(const at::Tensor& t, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.scalar_type() == st && t.numel() == 1, kWho, name,
              " must be a one-element ", st, " tensor, got ", t.scalar_type(), " ", t.sizes());
}

void check_n(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, kWho, name,
              " must be a contiguous float32 tensor of ", n, " elements, got ", t.scalar_type(),
              " ", t.sizes());
}

// The shared body of both ops. wp: packed weights of shape ps (see conv2d_prepack_cpu);
// Cout from w_scale; x_zero in x's own domain (int8 or uint8 values); output allocated with `fmt`.
at::Tensor conv_packed_impl(const at::Tensor& x, const at::Tensor& x_scale,
                            const at::Tensor& x_zero, const PackedShape& ps,
                            const int8_t* wp, int64_t Cout,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, bool relu,
                            at::ScalarType out_dtype, at::MemoryFormat fmt,
                            const std::optional<at::Tensor>& out_scale,
                            const std::optional<at::Tensor>& out_zero,
                            const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& residual_scale,
                            const std::optional<at::Tensor>& residual_zero,
                            std::optional<int64_t> out_max,
                            const std::optional<at::Tensor>& w_offset, bool hardswish) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kChar || x.scalar_type() == at::kByte),
              kWho, "x must be 4-D int8 or uint8, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, kWho,
              "stride, padding and dilation must have 2 entries");
  ConvArgs a{};
  a.B = x.size(0); a.C = x.size(1); a.H = x.size(2); a.W = x.size(3);
  a.groups = groups;
  TORCH_CHECK(groups >= 1 && a.C % groups == 0 && Cout % groups == 0 && ps.groups == groups,
              kWho, "groups = ", groups, " does not fit C = ", a.C, ", Cout = ", Cout,
              ", packed weight groups = ", ps.groups);
  a.Cg = a.C / groups; a.Og = Cout / groups; a.Cout = Cout;
  a.kh = ps.kh; a.kw = ps.kw;
  a.NB = ps.NB;
  TORCH_CHECK(ps.Cq == (a.Cg + kQ - 1) / kQ && a.NB == (a.Og + kCB - 1) / kCB, kWho,
              "the packed weight (", ps.NB, " blocks of 16 output channels, ", ps.Cq,
              " channel quads) does not match C / groups = ", a.Cg, " and Cout / groups = ",
              a.Og);
  a.sh = stride[0]; a.sw = stride[1]; a.ph = padding[0]; a.pw = padding[1];
  a.dh = dilation[0]; a.dw = dilation[1];
  TORCH_CHECK(a.sh >= 1 && a.sw >= 1 && a.dh >= 1 && a.dw >= 1 && a.ph >= 0 && a.pw >= 0, kWho,
              "stride and dilation must be >= 1 and padding >= 0");
  a.OH = (a.H + 2 * a.ph - a.dh * (a.kh - 1) - 1) / a.sh + 1;
  a.OW = (a.W + 2 * a.pw - a.dw * (a.kw - 1) - 1) / a.sw + 1;
  TORCH_CHECK(a.OH >= 1 && a.OW >= 1, kWho, "empty output");
  check_1(x_scale, "x_scale", at::kFloat);
  check_1(x_zero, "x_zero", at::kInt);
  check_n(w_scale, "w_scale", Cout);
  if (bias) check_n(*bias, "bias", Cout);
  a.x = static_cast<const uint8_t*>(x.const_data_ptr());
  a.x_u8 = x.scalar_type() == at::kByte;
  a.sxb = x.stride(0); a.sxc = x.stride(1); a.sxh = x.stride(2); a.sxw = x.stride(3);
  a.xz = x_zero.const_data_ptr<int32_t>()[0];
  TORCH_CHECK(a.x_u8 ? (a.xz >= 0 && a.xz <= 255) : (a.xz >= -128 && a.xz <= 127), kWho,
              "x_zero = ", a.xz, " is outside the range of x's dtype ", x.scalar_type());
  // Channel quads: Cg is padded to a multiple of 4 (groups > 1 with other Cg: see below).
  if (a.kh == 1 && a.kw == 1 && a.ph == 0 && a.pw == 0 && (a.sh > 1 || a.sw > 1)) {
    // A strided 1x1 conv (projection shortcut) reads only every sh-th row and sw-th column:
    // view the input as that subsampled image and convolve with stride 1, so the widening
    // pass touches only the pixels used.
    a.H = a.OH; a.W = a.OW;
    a.sxh *= a.sh; a.sxw *= a.sw;
    a.sh = a.sw = 1;
  }
  a.Cp = groups == 1 ? (a.Cg + kQ - 1) / kQ * kQ : a.C;
  a.Hp = a.H + 2 * a.ph;
  a.Wp = a.W + 2 * a.pw;
  a.nq = a.kh * a.kw * ((a.Cg + kQ - 1) / kQ);
  a.wp = wp;
  a.wrow = ps.row();
  TORCH_CHECK(!(relu && hardswish), kWho, "relu and hardswish cannot both be set");
  a.relu = relu;
  a.hs = hardswish;
  const bool depthwise = groups > 1 && a.Cg == 1 && a.Og == 1;
  TORCH_CHECK(!ps.dw || depthwise, kWho, "a packed weight in the compact depthwise layout "
              "(last dim 1) needs groups = C = Cout, got groups = ", groups, ", C = ", a.C,
              ", Cout = ", Cout);
  // epilogue constants: per group NB * 16 (zero past Og), or per channel for a depthwise conv
  // (its kernel's layout; a general one would be 16 times the size, zeroed at every call)
  const int64_t est = depthwise ? 1 : a.NB * kCB;
  const int64_t epi_n = depthwise ? (a.C + 2 * kCB - 1) / (2 * kCB) * 2 * kCB : groups * est;
  const float xs = x_scale.const_data_ptr<float>()[0];
  const float* ws = w_scale.const_data_ptr<float>();
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  std::vector<float> sc(epi_n, 0.f), bs(epi_n, 0.f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t o = 0; o < a.Og; ++o) {
      sc[g * est + o] = xs * ws[g * a.Og + o];
      bs[g * est + o] = bp ? bp[g * a.Og + o] : 0.f;
    }
  a.scale = sc.data();
  a.bias = bs.data();
  // weight-row offsets: the packed rows are w - o (int8), so acc = conv(x - z, w - o) + o S
  std::vector<int32_t> wo;
  a.woff = nullptr;
  if (w_offset) {
    TORCH_CHECK(w_offset->scalar_type() == at::kInt && w_offset->is_contiguous() &&
                    w_offset->numel() == Cout,
                kWho, "w_offset must be a contiguous int32 tensor of ", Cout, " elements, got ",
                w_offset->scalar_type(), " ", w_offset->sizes());
    const int32_t* op = w_offset->const_data_ptr<int32_t>();
    // the depthwise and AVX2 kernels fold the offsets into int16 weights
    for (int64_t n = 0; n < Cout; ++n)
      TORCH_CHECK(op[n] >= -kMaxOffset && op[n] <= kMaxOffset, kWho, "w_offset must be within "
                  "+-", kMaxOffset, ", got ", op[n], " for output channel ", n);
    wo.assign(epi_n, 0);
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t o = 0; o < a.Og; ++o) wo[g * est + o] = op[g * a.Og + o];
    a.woff = wo.data();
  }
  // output
  const bool quant_out = out_dtype == at::kChar || out_dtype == at::kByte;
  TORCH_CHECK(quant_out || out_dtype == at::kFloat || out_dtype == at::kHalf ||
                  out_dtype == at::kBFloat16,
              kWho, "out_dtype must be float32, float16, bfloat16, int8 or uint8, got ",
              out_dtype);
  TORCH_CHECK(quant_out == (out_scale.has_value() && out_zero.has_value()) &&
                  out_scale.has_value() == out_zero.has_value(),
              kWho, "out_scale and out_zero are needed exactly when out_dtype is int8 / uint8");
  a.inv_os = 1.f;
  a.oz = 0;
  a.qmin = out_dtype == at::kByte ? 0 : -128;
  a.qmax = out_dtype == at::kByte ? 255 : 127;
  if (quant_out) {
    check_1(*out_scale, "out_scale", at::kFloat);
    check_1(*out_zero, "out_zero", at::kInt);
    a.inv_os = 1.f / out_scale->const_data_ptr<float>()[0];
    a.oz = out_zero->const_data_ptr<int32_t>()[0];
    TORCH_CHECK(a.oz >= a.qmin && a.oz <= a.qmax, kWho, "out_zero = ", a.oz,
                " is outside the range of out_dtype ", out_dtype);
  }
  if (out_max) {
    TORCH_CHECK(quant_out, kWho, "out_max applies to an int8 / uint8 output only");
    TORCH_CHECK(*out_max >= a.qmin && *out_max <= a.qmax, kWho, "out_max = ", *out_max,
                " is outside the range of out_dtype ", out_dtype);
    a.qmax = static_cast<int32_t>(*out_max);
  }
  // residual
  a.res = nullptr;
  if (residual) {
    const auto& r = *residual;
    TORCH_CHECK(r.dim() == 4 && r.size(0) == a.B && r.size(1) == Cout && r.size(2) == a.OH &&
                    r.size(3) == a.OW,
                kWho, "residual must have the output's shape (", a.B, ", ", Cout, ", ", a.OH,
                ", ", a.OW, "), got ", r.sizes());
    a.res_t = r.scalar_type();
    TORCH_CHECK(a.res_t == at::kFloat || a.res_t == at::kChar || a.res_t == at::kByte, kWho,
                "residual must be float32, int8 or uint8, got ", a.res_t);
    const bool rq = a.res_t != at::kFloat;
    TORCH_CHECK(rq == (residual_scale.has_value() && residual_zero.has_value()) &&
                    residual_scale.has_value() == residual_zero.has_value(),
                kWho, "residual_scale and residual_zero are needed exactly when residual is "
                "int8 / uint8");
    a.rs = 1.f;
    a.rz = 0;
    if (rq) {
      check_1(*residual_scale, "residual_scale", at::kFloat);
      check_1(*residual_zero, "residual_zero", at::kInt);
      a.rs = residual_scale->const_data_ptr<float>()[0];
      a.rz = residual_zero->const_data_ptr<int32_t>()[0];
    }
    a.res = r.const_data_ptr();
    a.srb = r.stride(0); a.src = r.stride(1); a.sry = r.stride(2); a.srx = r.stride(3);
  } else {
    TORCH_CHECK(!residual_scale && !residual_zero, kWho,
                "residual_scale / residual_zero given without a residual");
  }
  auto out = at::empty({a.B, Cout, a.OH, a.OW}, x.options().dtype(out_dtype), fmt);
  a.out = out.mutable_data_ptr();
  a.out_t = out_dtype;
  a.sob = out.stride(0); a.soc = out.stride(1); a.soy = out.stride(2); a.sox = out.stride(3);
  if (out.numel() == 0) return out;
  if (depthwise) {  // its own kernel
    conv_run_dw(a);
    return out;
  }
  if (groups > 1 && a.Cg % kQ) {
    // Cg not a multiple of 4: each group's channels would straddle the quads of the shared
    // buffer, so run the groups one by one on channel slices (rare: grouped 3-channel).
    for (int64_t g = 0; g < groups; ++g) {
      ConvArgs b = a;
      b.groups = 1; b.C = a.Cg; b.Cout = a.Og; b.Cp = (a.Cg + kQ - 1) / kQ * kQ;
      b.x = a.x + g * a.Cg * a.sxc;
      b.wp = a.wp + g * a.NB * a.nq * kQ * kCB;
      b.scale = a.scale + g * a.NB * kCB;
      b.bias = a.bias + g * a.NB * kCB;
      if (a.woff) b.woff = a.woff + g * a.NB * kCB;
      b.out = static_cast<uint8_t*>(a.out) + g * a.Og * a.soc * out.element_size();
      if (a.res)
        b.res = static_cast<const uint8_t*>(a.res) + g * a.Og * a.src * residual->element_size();
      conv_run(b);
    }
    return out;
  }
  conv_run(a);
  return out;
}

at::Tensor quantized_conv2d_packed_cpu(
    const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& x_zero,
    const at::Tensor& w_packed, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    bool relu, at::ScalarType out_dtype, const std::optional<at::Tensor>& out_scale,
    const std::optional<at::Tensor>& out_zero, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& residual_scale,
    const std::optional<at::Tensor>& residual_zero, std::optional<int64_t> out_max,
    const std::optional<at::Tensor>& w_offset, bool hardswish) {
  TORCH_CHECK(w_scale.dim() == 1, kWho, "w_scale must be 1-D (Cout,), got ", w_scale.sizes());
  TORCH_CHECK(w_packed.dim() == 6 && w_packed.scalar_type() == at::kChar &&
                  (w_packed.size(5) == kQ * kCB ||
                   (w_packed.size(5) == 1 && w_packed.size(1) == 1 && w_packed.size(4) == 1)) &&
                  w_packed.is_contiguous(),
              kWho, "w_packed must come from conv2d_prepack (6-D contiguous int8), got ",
              w_packed.scalar_type(), " ", w_packed.sizes());
  const PackedShape ps{w_packed.size(0), w_packed.size(1), w_packed.size(2), w_packed.size(3),
                       w_packed.size(4), w_packed.size(5) == 1};
  return conv_packed_impl(x, x_scale, x_zero, ps, w_packed.const_data_ptr<int8_t>(),
                          w_scale.size(0), w_scale, bias, stride,
                          padding, dilation, groups, relu, out_dtype,
                          at::MemoryFormat::ChannelsLast, out_scale, out_zero, residual,
                          residual_scale, residual_zero, out_max, w_offset, hardswish);
}

// The unpacked op (int8 x, weights packed per call): output in x's memory format.
at::Tensor quantized_conv2d_cpu(const at::Tensor& x, const at::Tensor& x_scale,
                                const at::Tensor& x_zero, const at::Tensor& w,
                                const at::Tensor& w_scale, const at::Tensor& w_rowsum,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups, bool relu, at::ScalarType out_dtype) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kChar, kWho, "x must be 4-D int8, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar, kWho, "w must be 4-D int8");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && w.size(0) % groups == 0 &&
                  w.size(1) == x.size(1) / groups,
              kWho, "groups = ", groups, " does not fit C = ", x.size(1), ", w ", w.sizes());
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              kWho, "out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  (void)w_rowsum;  // the zero point is subtracted from x before the products
  const auto fmt = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
                       ? at::MemoryFormat::ChannelsLast
                       : at::MemoryFormat::Contiguous;
  TORCH_CHECK(w_scale.numel() == w.size(0), kWho, "w_scale must have ", w.size(0),
              " elements, got ", w_scale.sizes());
  // Packed per call into a reused per-thread buffer (a fresh multi-MB tensor would cost
  // more in page faults than the packing itself); callers with a fixed weight should
  // prepack once and use _quantized_conv2d_packed.
  const PackedShape ps = packed_shape(w, groups);
  static thread_local std::vector<int8_t> wbuf;
  if (static_cast<int64_t>(wbuf.size()) < ps.numel()) wbuf.resize(ps.numel());
  prepack_into(w.contiguous(), ps, wbuf.data());
  return conv_packed_impl(x, x_scale, x_zero, ps, wbuf.data(), w.size(0), w_scale, bias,
                          stride, padding, dilation, groups, relu, out_dtype, fmt,
                          std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                          std::nullopt, std::nullopt, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) {
  m.impl("_conv2d_prepack", &conv2d_prepack_cpu);
  m.impl("_quantized_conv2d_packed", &quantized_conv2d_packed_cpu);
  m.impl("_quantized_conv2d", &quantized_conv2d_cpu);
}

}  // namespace synq
