// The large-M int8 GEMM of int_gemm.cpp on AVX-512 VNNI: the weights packed into column
// panels, four K values of one left row broadcast against them.
//
// int_gemm_quads.h multiplies K-contiguous rows and sums the lanes at the end: no packing,
// which wins for few left rows, but each 4 x 4 tile reloads its four left rows from L2 for
// every four weight rows, 16 bytes of L2 traffic per vpdpbusd. Here each vpdpbusd adds 4-byte
// dot products for 16 output columns at once: the weights of 48 columns are packed as
//   panel[q][v][c][i] = b[48 p + 16 v + c, 4 q + i]     (q: K quad, v < 3, c < 16, i < 4)
// (zero past N and K; int4 weights unpacked to int8 here), and a tile of 8 left rows x 48
// columns keeps 24 accumulators. A K quad of the tile costs 3 panel loads and 8 broadcasts of
// 4 left bytes for 24 vpdpbusd. A K block of the panel (kKQ quads, 24 KB) stays in L1 while
// the tiles of a block of left rows (kMC rows, in L2) pass over it.
//
// The left rows are bytes of a + 128 (widen_rows in int_gemm.cpp); the result is corrected
// by 128 times the weight column sums, summed while packing. Sums wrap as in int_gemm_quads.h.
// Included by int_gemm.cpp only.
#pragma once

#include <cstdint>

namespace synq {
namespace panel {

// quantized_linear's float32 epilogue (dequant in int_gemm.cpp, the same float operations in
// the same order), applied to a tile's sums in its last K block, in place of C:
//   out[m, n] = relu?(float(acc - xz[m] rs[n]) * (xs[m] ws[n]) + bias[n])
struct LinearEpilogue {
  const float* xs;
  const int32_t* xz;
  const float* ws;
  const int32_t* rs;
  const float* bias;  // or null
  bool relu;
};

}  // namespace panel
}  // namespace synq

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "vnni_asm.h"

namespace synq {
namespace panel {

constexpr int kMR = 8;                 // left rows per tile
constexpr int kNV = 3;                 // vectors of 16 columns per tile
constexpr int64_t kCols = 16 * kNV;    // columns per panel
constexpr int64_t kQuad = 64 * kNV;    // panel bytes per K quad
constexpr int64_t kKQ = 256;           // K quads per block (512 K values; 24 KB of panel)
constexpr int64_t kMC = 256;           // left rows per block (128 KB of them per K block)

#define SYNQ_PANEL __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// Transposes a 16 x 16 matrix of dwords in place: r[i] lane j <-> r[j] lane i.
SYNQ_PANEL inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int k = 0; k < 8; ++k) {
    a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  // b[4k + c], 128-bit lane L: column 4L + c of rows 4k .. 4k + 3
  for (int k = 0; k < 4; ++k) {
    b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
    b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
  }
  // the 4 x 4 transpose of 128-bit lanes across b[c], b[4 + c], b[8 + c], b[12 + c]
  for (int c = 0; c < 4; ++c) {
    const __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
  }
}

// 64 K values [k0, k0 + 64) of one weight row as signed bytes, zero at k >= K: int8 as
// stored, or packed int4 (value k in nibble k % 2 of byte k / 2, low first) sign-extended.
SYNQ_PANEL inline __m512i load_row(const uint8_t* row, int64_t K, int64_t k0, bool int4) {
  const int64_t left = K - k0;
  const __mmask64 m = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
  if (!int4) return _mm512_maskz_loadu_epi8(m, row + k0);
  const int64_t bytes = (std::min<int64_t>(left, 64) + 1) / 2;
  const __mmask32 mb = bytes >= 32 ? ~__mmask32{0} : (__mmask32{1} << bytes) - 1;
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mb, row + k0 / 2));
  const __m512i nib = _mm512_set1_epi16(0x0F);
  // each 16-bit lane: low nibble in its low byte, high nibble in its high byte
  const __m512i v = _mm512_or_si512(_mm512_and_si512(w, nib),
                                    _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(w, 4), nib), 8));
  const __m512i eight = _mm512_set1_epi8(8);
  return _mm512_maskz_sub_epi8(m, _mm512_xor_si512(v, eight), eight);
}

// Packs weight rows [48 p, 48 p + 48) (rows at b + n * ld, N rows in all) into `out`
// (kq * kQuad bytes, kq = ceil(K / 4)), and their column sums into sums[0 .. 48).
SYNQ_PANEL inline void pack(const uint8_t* b, int64_t ld, int64_t N, int64_t K, bool int4,
                            int64_t p, uint8_t* out, int32_t* sums) {
  const int64_t kq = (K + 3) / 4;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int v = 0; v < kNV; ++v) {
    const int64_t n0 = p * kCols + v * 16;
    __m512i s = _mm512_setzero_si512();
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c)
        r[c] = n0 + c < N ? load_row(b + (n0 + c) * ld, K, k0, int4) : _mm512_setzero_si512();
      transpose16(r);  // r[j]: quad k0 / 4 + j of the 16 columns
      const int64_t q0 = k0 / 4, nj = std::min<int64_t>(16, kq - q0);
      for (int64_t j = 0; j < nj; ++j) {
        s = dpbusd(s, ones, r[j]);
        _mm512_storeu_si512(out + (q0 + j) * kQuad + v * 64, r[j]);
      }
    }
    _mm512_storeu_si512(sums + v * 16, s);
  }
}

// Where a tile's sums go: C (rows ldc apart; ncols valid columns), added to the partial sums
// C holds from the earlier K blocks when `add`. In the last K block `fix` is the panel's
// column sums (128 fix[c] comes off), and with `epi` the float32 results of rows m.. and
// columns n0.. replace the int32 sums in C's memory (a float32 output doubles as the scratch).
struct TileOut {
  int32_t* C;
  int64_t ldc;
  int ncols;
  bool add;
  const int32_t* fix;
  const LinearEpilogue* epi;
  int64_t m, n0;
};

// The tile's sums over nq quads of a[r] . panel, for rows r < MR at a[r] (bytes of a + 128
// at the block's first K value), into o.
template <int MR>
SYNQ_PANEL void micro(const uint8_t* const* a, const uint8_t* bp, int64_t nq, const TileOut& o) {
  // The tile of C is read (add) and written after the loop: ask for its lines now. The rows
  // are N int32 apart, too far for the hardware prefetchers, and C is mostly out of cache.
  for (int r = 0; r < MR; ++r) {
    const char* c = reinterpret_cast<const char*>(o.C + r * o.ldc);
    for (int off = 0; off < 4 * o.ncols + 63; off += 64)
      _mm_prefetch(c + std::min(off, 4 * o.ncols - 1), _MM_HINT_T0);
  }
  __m512i acc[MR][kNV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kNV; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t q = 0; q < nq; ++q) {
    const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 64),
                  b2 = _mm512_loadu_si512(bp + 128);
    bp += kQuad;
    for (int r = 0; r < MR; ++r) {
      int32_t x4;
      std::memcpy(&x4, a[r] + 4 * q, 4);
      const __m512i x = _mm512_set1_epi32(x4);
      acc[r][0] = dpbusd(acc[r][0], x, b0);
      acc[r][1] = dpbusd(acc[r][1], x, b1);
      acc[r][2] = dpbusd(acc[r][2], x, b2);
    }
  }
  __mmask16 mask[kNV];
  __m512i corr[kNV];
  for (int v = 0; v < kNV; ++v) {
    const int left = o.ncols - 16 * v;
    mask[v] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
    corr[v] = o.fix ? _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask[v], o.fix + 16 * v), 7)
                    : _mm512_setzero_si512();
  }
  const LinearEpilogue* e = o.fix ? o.epi : nullptr;
  for (int v = 0; v < kNV; ++v) {
    __m512i rs = _mm512_setzero_si512();
    __m512 ws = _mm512_setzero_ps(), bias = ws;
    if (e) {
      rs = _mm512_maskz_loadu_epi32(mask[v], e->rs + o.n0 + 16 * v);
      ws = _mm512_maskz_loadu_ps(mask[v], e->ws + o.n0 + 16 * v);
      if (e->bias) bias = _mm512_maskz_loadu_ps(mask[v], e->bias + o.n0 + 16 * v);
    }
    for (int r = 0; r < MR; ++r) {
      int32_t* c = o.C + r * o.ldc + 16 * v;
      __m512i y = _mm512_sub_epi32(acc[r][v], corr[v]);
      if (o.add) y = _mm512_add_epi32(y, _mm512_maskz_loadu_epi32(mask[v], c));
      if (!e) {
        _mm512_mask_storeu_epi32(c, mask[v], y);
        continue;
      }
      const __m512i t = _mm512_sub_epi32(y, _mm512_mullo_epi32(_mm512_set1_epi32(e->xz[o.m + r]), rs));
      __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(t),
                               _mm512_mul_ps(_mm512_set1_ps(e->xs[o.m + r]), ws));
      if (e->bias) f = _mm512_add_ps(f, bias);
      if (e->relu) f = _mm512_max_ps(_mm512_setzero_ps(), f);  // y < 0 ? 0 : y, as dequant
      _mm512_mask_storeu_ps(reinterpret_cast<float*>(c), mask[v], f);
    }
  }
}

// The tile for MR = rows (1 .. kMR) left rows.
SYNQ_PANEL inline void micro_rows(int rows, const uint8_t* const* a, const uint8_t* bp,
                                  int64_t nq, const TileOut& o) {
  switch (rows) {
    case 8: return micro<8>(a, bp, nq, o);
    case 7: return micro<7>(a, bp, nq, o);
    case 6: return micro<6>(a, bp, nq, o);
    case 5: return micro<5>(a, bp, nq, o);
    case 4: return micro<4>(a, bp, nq, o);
    case 3: return micro<3>(a, bp, nq, o);
    case 2: return micro<2>(a, bp, nq, o);
    default: return micro<1>(a, bp, nq, o);
  }
}

// C[m, n] = sum_k a[m, k] b[n, k] for m in [m0, m1) and the columns of panels [p0, p1):
// A rows of bytes a + 128 (lda apart, at least 4 ceil(K / 4) of them), packed panels `bp`
// (kq quads each), column sums `sums`, C with N columns (float32 results there with `epi`).
SYNQ_PANEL inline void region(const uint8_t* A, int64_t lda, int64_t m0, int64_t m1,
                              const uint8_t* bp, const int32_t* sums, int64_t kq, int64_t p0,
                              int64_t p1, int64_t N, int32_t* C, const LinearEpilogue* epi) {
  const uint8_t* rows[kMR];
  for (int64_t q0 = 0; q0 < kq; q0 += kKQ) {
    const int64_t nq = std::min(kKQ, kq - q0);
    const bool first = q0 == 0, last = q0 + nq == kq;
    for (int64_t mb = m0; mb < m1; mb += kMC) {
      const int64_t me = std::min(m1, mb + kMC);
      for (int64_t p = p0; p < p1; ++p) {
        const uint8_t* panel = bp + (p * kq + q0) * kQuad;
        const int ncols = static_cast<int>(std::min(kCols, N - p * kCols));
        for (int64_t m = mb; m < me; m += kMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kMR, me - m));
          for (int r = 0; r < mr; ++r) rows[r] = A + (m + r) * lda + 4 * q0;
          const TileOut o{C + m * N + p * kCols, N, ncols, !first,
                          last ? sums + p * kCols : nullptr, epi, m, p * kCols};
          micro_rows(mr, rows, panel, nq, o);
        }
      }
    }
  }
}

#undef SYNQ_PANEL

}  // namespace panel
}  // namespace synq
#endif
