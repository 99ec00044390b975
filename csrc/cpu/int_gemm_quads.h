// AVX-512 VNNI micro-kernels of int_gemm.cpp, for int8 and packed int4 weights: vpdpbusd
// multiplies 64 unsigned bytes by 64 signed bytes and adds each group of four products into
// one of 16 int32 lanes, twice the K values of vpdpwssd on int16 pairs; int8 weights are used
// as stored, int4 ones unpacked in registers (their low nibbles, then their high ones: the
// left rows are stored in that order). The left operand must be unsigned, so it is stored as
// a + 128 (exact in a byte) and the result corrected by 128 * sum_k b[n, k]:
//   sum_k a[k] b[k] = sum_k (a[k] + 128) b[k] - 128 sum_k b[k]   (in int32, wrapping)
// The raw sum is at most 255 * 128 * K in size: within int32 up to K = 65536, the API's limit
// (and the vector adds and the correction wrap, so the result is exact whenever it fits).
// Included by int_gemm.cpp only.
#pragma once

#include <cstdint>

namespace synq {

// One K block of a micro-kernel's tile, for both kernel families: left rows a[r] (offset to
// the block, padded to whole steps past K), weight rows b[j] (bytes, offset to the block) with
// `nfull` whole steps, and an optional last step taken from zero-padded copies bt[j].
template <typename A, int MR, int NR>
struct GemmTile {
  const A* a[MR];
  const uint8_t* b[NR];
  const uint8_t* bt[NR];
  int64_t nfull;
  bool tail;
  int64_t pf;  // bytes from b[j] to the next tile's row j (its lines are prefetched), or 0
};

}  // namespace synq

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "vnni_asm.h"

namespace synq {
namespace quads {

constexpr int kMR = 4;        // left rows per tile
constexpr int kNR = 4;        // weight rows per tile
constexpr int64_t kStep = 64;  // K values (bytes of each operand) a step

// Left rows as bytes of a + 128 (128 past K).
using Tile = GemmTile<uint8_t, kMR, kNR>;

#define SYNQ_QUADS __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// The lane sums of four vectors, in lanes 0..3 (13 instructions where four
// _mm512_reduce_add_epi32 take about 36).
SYNQ_QUADS inline __m128i sum4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  // each 128-bit lane: partial sums of v0, v1, v2, v3
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// 64 weights of one step as signed bytes: 64 int8, or 32 bytes of packed int4 whose low
// nibbles (even k) come first and high nibbles (odd k) second, the order in which the left
// rows are stored for int4 weights (see widen_rows).
template <bool B4>
SYNQ_QUADS inline __m512i load_w(const uint8_t* p) {
  if constexpr (B4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m512i w = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_and_si256(v, m)),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
    const __m512i eight = _mm512_set1_epi8(8);
    return _mm512_sub_epi8(_mm512_xor_si512(w, eight), eight);  // sign-extend 4 -> 8 bits
  } else {
    return _mm512_loadu_si512(p);
  }
}

// The same weights as unsigned bytes: b + 128 (int8), or v + 8 = nibble ^ 8 (int4).
template <bool B4>
SYNQ_QUADS inline __m512i load_w_unsigned(const uint8_t* p) {
  if constexpr (B4) {
    const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                       _mm256_set1_epi8(static_cast<char>(0x88)));
    const __m256i m = _mm256_set1_epi8(0x0F);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                              _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
  } else {
    return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(-128));
  }
}

// One step of the 4 x 4 tile at left offset `off`, weights w[j]; with SUMS, s[j] += sum of w[j]'s
// bytes (the correction term, when the caller has no precomputed weight sums).
template <bool SUMS>
SYNQ_QUADS __attribute__((always_inline)) inline void tile_step(__m512i (&c)[kMR][kNR],
                                                                __m512i (&s)[kNR],
                                                                const __m512i (&w)[kNR],
                                                                const Tile& t, int64_t off) {
  for (int r = 0; r < kMR; ++r) {
    const __m512i x = _mm512_loadu_si512(t.a[r] + off);
    for (int j = 0; j < kNR; ++j) c[r][j] = dpbusd(c[r][j], x, w[j]);
  }
  if constexpr (SUMS) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int j = 0; j < kNR; ++j) s[j] = dpbusd(s[j], ones, w[j]);
  }
}

// out[r][j] = sum over the block of (a + 128) b, minus 128 sum b when SUMS (else the caller
// subtracts 128 times its precomputed weight row sums).
template <bool SUMS, bool B4>
SYNQ_QUADS void micro(const Tile& t, int32_t out[kMR][kNR]) {
  constexpr int64_t bstep = B4 ? kStep / 2 : kStep;  // weight bytes a step
  __m512i c[kMR][kNR], s[kNR], w[kNR];
  for (int j = 0; j < kNR; ++j) {
    s[j] = _mm512_setzero_si512();
    for (int r = 0; r < kMR; ++r) c[r][j] = _mm512_setzero_si512();
  }
  const int64_t n = t.nfull;
  for (int64_t ch = 0; ch < n; ++ch) {
    if (t.pf)
      for (int j = 0; j < kNR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(t.b[j] + t.pf + ch * bstep), _MM_HINT_T0);
    for (int j = 0; j < kNR; ++j) w[j] = load_w<B4>(t.b[j] + ch * bstep);
    tile_step<SUMS>(c, s, w, t, ch * kStep);
  }
  if (t.tail) {
    for (int j = 0; j < kNR; ++j) w[j] = load_w<B4>(t.bt[j]);
    tile_step<SUMS>(c, s, w, t, n * kStep);
  }
  __m128i fix = _mm_setzero_si128();
  if constexpr (SUMS) fix = _mm_slli_epi32(sum4(s[0], s[1], s[2], s[3]), 7);
  for (int r = 0; r < kMR; ++r)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out[r]),
                     _mm_sub_epi32(sum4(c[r][0], c[r][1], c[r][2], c[r][3]), fix));
}

// One left row against the tile's weight rows (rows left over, and M < 4), bound by the
// weights' memory traffic. The operands swap roles here: the weights become the unsigned side
// (b + 128, one xor) and the row the signed one (a, one xor of a + 128, shared by the four
// weight rows), so the correction is 128 sum_k a[k], one vpdpbusd per row vector rather than
// one per weight vector: 10 vpdpbusd per 8 weight vectors instead of 16. (Packed int4
// weights: v + 8 unsigned, so the correction is 8 sum_k a[k].)
template <bool B4>
SYNQ_QUADS void micro_row(const Tile& t, int32_t out[kMR][kNR]) {
  constexpr int64_t bstep = B4 ? kStep / 2 : kStep;
  const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8(-128);
  __m512i c[kNR], d[kNR], s = _mm512_setzero_si512(), e = s;
  for (int j = 0; j < kNR; ++j) c[j] = d[j] = _mm512_setzero_si512();
  const uint8_t* a = t.a[0];
  const int64_t n = t.nfull;
  int64_t ch = 0;
  // Two steps an iteration into two accumulator sets: more loads in flight.
  for (; ch + 2 <= n; ch += 2) {
    const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(a + ch * kStep), flip);
    const __m512i y = _mm512_xor_si512(_mm512_loadu_si512(a + (ch + 1) * kStep), flip);
    s = dpbusd(s, ones, x);
    e = dpbusd(e, ones, y);
    if (t.pf)
      for (int j = 0; j < kNR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(t.b[j] + t.pf + ch * bstep), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(t.b[j] + t.pf + (ch + 1) * bstep), _MM_HINT_T0);
      }
    for (int j = 0; j < kNR; ++j) {
      c[j] = dpbusd(c[j], load_w_unsigned<B4>(t.b[j] + ch * bstep), x);
      d[j] = dpbusd(d[j], load_w_unsigned<B4>(t.b[j] + (ch + 1) * bstep), y);
    }
  }
  for (int last = 0; last < 2; ++last) {  // an odd step left, then the zero-padded tail
    if (last == 0 ? ch >= n : !t.tail) continue;
    const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(a + (last == 0 ? ch : n) * kStep), flip);
    s = dpbusd(s, ones, x);
    for (int j = 0; j < kNR; ++j) {
      const uint8_t* w = last == 0 ? t.b[j] + ch * bstep : t.bt[j];
      c[j] = dpbusd(c[j], load_w_unsigned<B4>(w), x);
    }
  }
  for (int j = 0; j < kNR; ++j) c[j] = _mm512_add_epi32(c[j], d[j]);
  const uint32_t fix = static_cast<uint32_t>(_mm512_reduce_add_epi32(_mm512_add_epi32(s, e)))
                       << (B4 ? 3 : 7);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out[0]),
                   _mm_sub_epi32(sum4(c[0], c[1], c[2], c[3]), _mm_set1_epi32(static_cast<int32_t>(fix))));
}

// sums[n] = sum_k b[n, k] over K int8 values of each of rows [n0, n1).
SYNQ_QUADS void row_sums(const uint8_t* b, int64_t ld, int64_t K, int64_t n0, int64_t n1,
                         int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  const int64_t full = K / kStep;
  const __mmask64 tail = K % kStep ? (~__mmask64{0}) >> (kStep - K % kStep) : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = b + n * ld;
    __m512i s = _mm512_setzero_si512(), e = s;
    int64_t i = 0;
    for (; i + 2 <= full; i += 2) {
      s = dpbusd(s, ones, _mm512_loadu_si512(p + i * kStep));
      e = dpbusd(e, ones, _mm512_loadu_si512(p + (i + 1) * kStep));
    }
    if (i < full) s = dpbusd(s, ones, _mm512_loadu_si512(p + i * kStep));
    if (tail) s = dpbusd(s, ones, _mm512_maskz_loadu_epi8(tail, p + full * kStep));
    sums[n] = _mm512_reduce_add_epi32(_mm512_add_epi32(s, e));
  }
}

#undef SYNQ_QUADS

}  // namespace quads
}  // namespace synq
#endif
