// Integer GEMM and convolution on the CPU: int8 or packed-int4 operands, exact int32
// accumulation, and a dequantizing epilogue (scales, zero-point correction from weight row
// sums, bias, ReLU, cast) applied as each output tile leaves the registers.
//
// Without AVX-512 VNNI the exact x86 multiply-add is vpmaddwd on int16 (vpmaddubsw would
// saturate its int16 pair sums), so both operands are widened to int16 before multiplying:
// the left operand (activations, small) once per call into a zero-padded int16 scratch, the
// right operand (weights, N x K rows) in registers as it streams (vpmovsxbw for int8; nibble
// split + sign fix + vpmovsxbw for int4, so the weights cost 4 bits of memory traffic). Each
// output element is a dot product along K kept as 8 int32 lanes and summed at the end, so
// both operands keep their natural K-contiguous row layout and no packing pass over the
// weights is needed. The micro-kernel computes a 3 x 3 tile (9 accumulators); K is blocked
// so that the left block stays in L2 and three weight rows in L1. A portable scalar kernel
// serves CPUs without AVX2. With AVX-512 VNNI both weight types run vpdpbusd on bytes, 64 K
// values a step in a 4 x 4 tile (int_gemm_quads.h): int8 weights as stored, int4 ones
// unpacked in registers. From a few dozen left rows on (use_panel), the weights are packed
// into 48-column panels first and an 8 x 48 tile broadcasts the left operand against them
// (int_gemm_panel.h), which needs far less L2 traffic per multiply-add. Convolution:
// int_conv.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "int_gemm_panel.h"
#include "int_gemm_quads.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SYNQ_INT_GEMM_X86 1
#include <immintrin.h>
#else
#define SYNQ_INT_GEMM_X86 0
#endif

namespace synq {
namespace {

constexpr int kMR = 3;            // rows of the left operand per micro-kernel call
constexpr int kNR = 3;            // weight rows per micro-kernel call
constexpr int64_t kChunk = 16;    // K values per vector step
constexpr int64_t kKC = 1024;     // K block (multiple of kChunk)
constexpr int64_t kL2 = 256 * 1024;  // bytes of left-operand block kept in L2

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Left rows as int16 (zero past K); steps of kChunk K values (int_gemm_quads.h).
using Tile = GemmTile<int16_t, kMR, kNR>;

// The two kernel families: int16 pairs (AVX2 vpmaddwd, scalar) for CPUs without AVX-512
// VNNI, and unsigned x signed byte quads (vpdpbusd, int_gemm_quads.h) with it. Left rows
// are stored as int16 or as bytes of a + 128; `kc` is the K block when the left block does
// not fit in L2.
struct Pairs {
  using A = int16_t;
  using Tile = synq::Tile;
  static constexpr int MR = kMR, NR = kNR;
  static constexpr int64_t step = kChunk, kc = kKC, l2 = kL2;
};
#if SYNQ_INT_GEMM_X86
struct Quads {
  using A = uint8_t;
  using Tile = quads::Tile;
  static constexpr int MR = quads::kMR, NR = quads::kNR;
  // Bytes take half the room of int16: a left block of 512 KB (half of a 1 MB L2) and K
  // blocks of 4096. On the AVX-512 EPYC at 256x4096^2: 12.2 ms against 14.3 with the int16
  // family's 256 KB and 2048 (13.0-13.6 with 1 MB or 768 KB; 16.1 with 1024).
  static constexpr int64_t step = quads::kStep, kc = 4096, l2 = 512 * 1024;
};
#endif

// A family's micro-kernels. full: an MR x NR tile; row: one left row (out[0]), for the rows
// left over.
template <class KT>
struct MicroT {
  void (*full)(const typename KT::Tile&, int32_t (*)[KT::NR]);
  void (*row)(const typename KT::Tile&, int32_t (*)[KT::NR]);
};

// Widens one chunk of weight bytes to 16 int16 values (portable path).
template <bool B4>
inline void widen_chunk_scalar(const uint8_t* p, int16_t v[kChunk]) {
  if constexpr (B4) {
    for (int i = 0; i < 8; ++i) {
      const int lo = p[i] & 0xF, hi = p[i] >> 4;
      v[2 * i] = static_cast<int16_t>(lo - ((lo & 8) << 1));
      v[2 * i + 1] = static_cast<int16_t>(hi - ((hi & 8) << 1));
    }
  } else {
    for (int i = 0; i < kChunk; ++i) v[i] = static_cast<int8_t>(p[i]);
  }
}

template <bool B4>
void micro_generic(const Tile& t, int32_t out[kMR][kNR]) {
  constexpr int64_t step = B4 ? 8 : 16;
  int32_t acc[kMR][kNR] = {};
  int16_t bv[kNR][kChunk];
  const int64_t nc = t.nfull + (t.tail ? 1 : 0);
  for (int64_t c = 0; c < nc; ++c) {
    for (int j = 0; j < kNR; ++j)
      widen_chunk_scalar<B4>(c < t.nfull ? t.b[j] + c * step : t.bt[j], bv[j]);
    for (int r = 0; r < kMR; ++r) {
      const int16_t* a = t.a[r] + c * kChunk;
      for (int j = 0; j < kNR; ++j) {
        int32_t s = 0;
        for (int i = 0; i < kChunk; ++i) s += static_cast<int32_t>(a[i]) * bv[j][i];
        acc[r][j] += s;
      }
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

#if SYNQ_INT_GEMM_X86
template <bool B4>
__attribute__((target("avx2"), always_inline)) inline __m256i widen_chunk(const uint8_t* p) {
  if constexpr (B4) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    // Element 2i is the low nibble of byte i: interleave, then sign-extend 4 -> 8 bits.
    __m128i x = _mm_unpacklo_epi8(lo, hi);
    const __m128i eight = _mm_set1_epi8(8);
    x = _mm_sub_epi8(_mm_xor_si128(x, eight), eight);
    return _mm256_cvtepi8_epi16(x);
  } else {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

__attribute__((target("avx2"), always_inline)) inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// acc[r][j] += madd(a_r, w_j) over r < 3, j < 3; 9 accumulators + 3 weights + 2 temporaries
// fit the 16 ymm registers (a 4 x 3 tile spills accumulators to the stack).
#define SYNQ_INT_GEMM_STEP(W0, W1, W2, OFF)                                              \
  do {                                                                                    \
    const __m256i w0_ = (W0), w1_ = (W1), w2_ = (W2);                                     \
    __m256i x_ = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + (OFF)));        \
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(x_, w0_));                              \
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(x_, w1_));                              \
    c02 = _mm256_add_epi32(c02, _mm256_madd_epi16(x_, w2_));                              \
    x_ = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a1 + (OFF)));                \
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(x_, w0_));                              \
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(x_, w1_));                              \
    c12 = _mm256_add_epi32(c12, _mm256_madd_epi16(x_, w2_));                              \
    x_ = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a2 + (OFF)));                \
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(x_, w0_));                              \
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(x_, w1_));                              \
    c22 = _mm256_add_epi32(c22, _mm256_madd_epi16(x_, w2_));                              \
  } while (0)

template <bool B4>
__attribute__((target("avx2"))) void micro_avx2(const Tile& t, int32_t out[kMR][kNR]) {
  constexpr int64_t step = B4 ? 8 : 16;
  const int16_t *a0 = t.a[0], *a1 = t.a[1], *a2 = t.a[2];
  const uint8_t *b0 = t.b[0], *b1 = t.b[1], *b2 = t.b[2];
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00,
          c20 = c00, c21 = c00, c22 = c00;
  const int64_t n = t.nfull;
  for (int64_t c = 0; c < n; ++c)
    SYNQ_INT_GEMM_STEP(widen_chunk<B4>(b0 + c * step), widen_chunk<B4>(b1 + c * step),
                       widen_chunk<B4>(b2 + c * step), c * kChunk);
  if (t.tail)
    SYNQ_INT_GEMM_STEP(widen_chunk<B4>(t.bt[0]), widen_chunk<B4>(t.bt[1]),
                       widen_chunk<B4>(t.bt[2]), n * kChunk);
  out[0][0] = hsum(c00); out[0][1] = hsum(c01); out[0][2] = hsum(c02);
  out[1][0] = hsum(c10); out[1][1] = hsum(c11); out[1][2] = hsum(c12);
  out[2][0] = hsum(c20); out[2][1] = hsum(c21); out[2][2] = hsum(c22);
}
#undef SYNQ_INT_GEMM_STEP

// One left row against kNR weight rows: the leftover rows of a tile and M < kMR (batch-1
// inference), where the 3 x 3 kernel would repeat a row and triple the work. Weight-bandwidth
// bound: each widened weight vector feeds a single multiply-add.
template <bool B4>
__attribute__((target("avx2"))) void micro_avx2_row(const Tile& t, int32_t out[kMR][kNR]) {
  constexpr int64_t step = B4 ? 8 : 16;
  const int16_t* a0 = t.a[0];
  const uint8_t *b0 = t.b[0], *b1 = t.b[1], *b2 = t.b[2];
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, d0 = c0, d1 = c0, d2 = c0;
  const int64_t n = t.nfull;
  int64_t c = 0;
  // Two chunks per iteration into separate accumulators: twice the loads in flight.
  for (; c + 2 <= n; c += 2) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + c * kChunk));
    const __m256i y =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + (c + 1) * kChunk));
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(x, widen_chunk<B4>(b0 + c * step)));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(x, widen_chunk<B4>(b1 + c * step)));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(x, widen_chunk<B4>(b2 + c * step)));
    d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(y, widen_chunk<B4>(b0 + (c + 1) * step)));
    d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(y, widen_chunk<B4>(b1 + (c + 1) * step)));
    d2 = _mm256_add_epi32(d2, _mm256_madd_epi16(y, widen_chunk<B4>(b2 + (c + 1) * step)));
  }
  for (; c < n; ++c) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + c * kChunk));
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(x, widen_chunk<B4>(b0 + c * step)));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(x, widen_chunk<B4>(b1 + c * step)));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(x, widen_chunk<B4>(b2 + c * step)));
  }
  if (t.tail) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a0 + n * kChunk));
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(x, widen_chunk<B4>(t.bt[0])));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(x, widen_chunk<B4>(t.bt[1])));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(x, widen_chunk<B4>(t.bt[2])));
  }
  out[0][0] = hsum(_mm256_add_epi32(c0, d0));
  out[0][1] = hsum(_mm256_add_epi32(c1, d1));
  out[0][2] = hsum(_mm256_add_epi32(c2, d2));
}

#endif

using PairsMicro = MicroT<Pairs>;

PairsMicro pick_micro(bool b_int4) {
#if SYNQ_INT_GEMM_X86
  if (cpu_use_avx2())
    return b_int4 ? PairsMicro{micro_avx2<true>, micro_avx2_row<true>}
                  : PairsMicro{micro_avx2<false>, micro_avx2_row<false>};
#endif
  return b_int4 ? PairsMicro{micro_generic<true>, micro_generic<true>}
                : PairsMicro{micro_generic<false>, micro_generic<false>};
}

// The right operand: N rows of K int8 values, or of ceil(K/2) bytes of packed signed int4.
struct BMat {
  const uint8_t* p;
  int64_t ld;  // bytes between rows
  int64_t K;
  bool int4;
  int64_t row_bytes() const { return int4 ? (K + 1) / 2 : K; }
};

// C[m, n] = sum_k A[m, k] B[n, k] for m in [m0, m1), n in [n0, n1); each finished element
// goes to store(m, n, value). A: rows with stride lda (>= round_up(K, KT::step), padded past
// K). K is blocked by KT::kc; partial sums of all but the last block wait in `acc`. With
// `bsum` (Quads only), the full tiles' sums are raw, sum (a + 128) b, and are corrected here
// by 128 bsum[n]; the row kernel corrects its own. Sums wrap in uint32 (see int_gemm_quads.h).
template <class KT, class Store>
void gemm_region(const MicroT<KT>& micro, const typename KT::A* A, int64_t lda, int64_t m0,
                 int64_t m1, const BMat& B, int64_t n0, int64_t n1, const int32_t* bsum,
                 Store&& store) {
  constexpr int MR = KT::MR, NR = KT::NR;
  constexpr int64_t step = KT::step, abytes = sizeof(typename KT::A);
  const int64_t K = B.K;
  const int64_t kp = round_up(K, step);
  const int64_t rows = m1 - m0, cols = n1 - n0;
  const int64_t bstep = B.int4 ? step / 2 : step;  // weight bytes a step
  // No K blocking when the whole left block fits in L2 (small M): the weight rows then
  // stream start to end, which the hardware prefetchers follow far better than 1 KB pieces.
  const int64_t kc = rows * kp * abytes <= KT::l2 ? std::max<int64_t>(kp, step) : KT::kc;
  const int64_t nkb = (kp + kc - 1) / kc;
  if (nkb == 0) {  // K = 0: empty sums
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = n0; n < n1; ++n) store(m, n, 0);
    return;
  }
  std::vector<uint32_t> acc(nkb > 1 ? rows * cols : 0, 0);
  const int64_t kc_eff = std::min(kc, kp);
  const int64_t mc = std::max<int64_t>(MR, (KT::l2 / (abytes * kc_eff)) / MR * MR);
  alignas(64) uint8_t tailbuf[NR][64];
  alignas(16) int32_t out[MR][NR];
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t k0 = kb * kc;
    const int64_t k1 = std::min(kp, k0 + kc);  // in padded K
    const bool last = kb == nkb - 1;
    // Whole steps read straight from B; a ragged last step comes from a padded copy.
    const int64_t kvalid = std::min(K, k1) - k0;
    const int64_t nfull = kvalid / step;
    const bool tail = kvalid % step != 0;
    const int64_t boff = k0 / step * bstep;
    for (int64_t mb = m0; mb < m1; mb += mc) {
      const int64_t me = std::min(m1, mb + mc);
      for (int64_t n = n0; n < n1; n += NR) {
        typename KT::Tile t;
        t.nfull = nfull;
        t.tail = tail;
        // the next tile's weight rows, prefetched by the first left tile that meets these: at
        // a few rows the weights stream from memory, and each row tile is only K bytes long,
        // too short for the hardware prefetchers to get ahead
        const int64_t pf = n + NR < n1 ? NR * B.ld : 0;
        for (int j = 0; j < NR; ++j) {
          const int64_t nn = std::min(n + j, n1 - 1);
          t.b[j] = B.p + nn * B.ld + boff;
          t.bt[j] = tailbuf[j];
          if (tail) {
            std::memset(tailbuf[j], 0, bstep);
            const int64_t done = boff + nfull * bstep;
            std::memcpy(tailbuf[j], B.p + nn * B.ld + done, B.row_bytes() - done);
          }
        }
        const int nn_valid = static_cast<int>(std::min<int64_t>(NR, n1 - n));
        for (int64_t m = mb; m < me; m += MR) {
          const int mm_valid = static_cast<int>(std::min<int64_t>(MR, me - m));
          for (int r = 0; r < MR; ++r) t.a[r] = A + std::min(m + r, me - 1) * lda + k0;
          const bool fix = bsum != nullptr && mm_valid == MR;
          t.pf = m == mb ? pf : 0;
          if (mm_valid == MR) {
            micro.full(t, out);
          } else {
            for (int r = mm_valid - 1; r >= 0; --r) {  // row r's result lands in out[r]
              t.a[0] = A + (m + r) * lda + k0;
              micro.row(t, out);
              t.pf = 0;
              for (int j = 0; j < NR; ++j) out[r][j] = out[0][j];
            }
          }
          for (int r = 0; r < mm_valid; ++r)
            for (int j = 0; j < nn_valid; ++j) {
              const int64_t idx = (m + r - m0) * cols + (n + j - n0);
              uint32_t v = static_cast<uint32_t>(out[r][j]);
              if (!last) {
                acc[idx] += v;
                continue;
              }
              if (nkb > 1) v += acc[idx];
              if (fix) v -= static_cast<uint32_t>(bsum[n + j]) << 7;
              store(m + r, n + j, static_cast<int32_t>(v));
            }
        }
      }
    }
  }
}

// Rows [m0, m1) of a (int8, or packed int4 of `a_signed`ness) into rows of kp values: int16
// (Pairs) or bytes of a + 128 (Quads); zero past K (128 for Quads, the image of 0). With
// `split`, every 64 values are reordered even k first, then odd k (int4 weights' nibbles).
template <typename AT>
void widen_rows(const uint8_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t K, bool packed,
                bool a_signed, AT* out, int64_t kp, bool split = false) {
  constexpr int bias = std::is_same_v<AT, uint8_t> ? 128 : 0;
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* src = a + m * lda;
    AT* dst = out + m * kp;
    if (!packed) {
      const int8_t* s = reinterpret_cast<const int8_t*>(src);
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<AT>(s[k] + bias);
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const int v = (src[k >> 1] >> ((k & 1) * 4)) & 0xF;
        dst[k] = static_cast<AT>((a_signed ? v - ((v & 8) << 1) : v) + bias);
      }
    }
    std::fill(dst + K, dst + kp, static_cast<AT>(bias));
    if (split) {
      AT tmp[64];
      for (int64_t k0 = 0; k0 < kp; k0 += 64) {
        for (int j = 0; j < 32; ++j) {
          tmp[j] = dst[k0 + 2 * j];
          tmp[32 + j] = dst[k0 + 2 * j + 1];
        }
        std::memcpy(dst + k0, tmp, sizeof(tmp));
      }
    }
  }
}

// Splits an (M x N) product into tasks for at::parallel_for: N in chunks of whole micro
// tiles first (the weights are the large operand), M too when N alone gives too few.
struct Split {
  int64_t mchunks, nchunks;
};

Split split_work(int64_t M, int64_t N, int64_t kp, int MR, int NR) {
  const int64_t nth = at::get_num_threads();
  if (nth <= 1 || M * N * kp < (int64_t{1} << 18)) return {1, 1};
  const int64_t ntiles = (N + NR - 1) / NR;
  const int64_t nch = std::min(ntiles, 4 * nth);
  const int64_t mtiles = (M + MR - 1) / MR;
  const int64_t mch = std::max<int64_t>(1, std::min(mtiles, (4 * nth + nch - 1) / nch));
  return {mch, nch};
}

inline std::pair<int64_t, int64_t> chunk_range(int64_t i, int64_t chunks, int64_t tiles,
                                               int64_t tile, int64_t total) {
  const int64_t t0 = tiles * i / chunks, t1 = tiles * (i + 1) / chunks;
  return {std::min(total, t0 * tile), std::min(total, t1 * tile)};
}

template <class KT, class Store>
void gemm_parallel(const MicroT<KT>& micro, const typename KT::A* A, int64_t lda, int64_t M,
                   const BMat& B, int64_t N, const int32_t* bsum, Store store) {
  const Split s = split_work(M, N, lda, KT::MR, KT::NR);
  const int64_t mtiles = (M + KT::MR - 1) / KT::MR, ntiles = (N + KT::NR - 1) / KT::NR;
  at::parallel_for(0, s.mchunks * s.nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const auto [m0, m1] = chunk_range(t / s.nchunks, s.mchunks, mtiles, KT::MR, M);
      const auto [n0, n1] = chunk_range(t % s.nchunks, s.nchunks, ntiles, KT::NR, N);
      if (m0 < m1 && n0 < n1) gemm_region(micro, A, lda, m0, m1, B, n0, n1, bsum, store);
    }
  });
}

template <typename AT>
std::vector<AT> widen_parallel(const at::Tensor& a, int64_t K, bool packed, bool a_signed,
                               int64_t kp, bool split = false) {
  const int64_t M = a.size(0);
  std::vector<AT> out(M * kp);
  const uint8_t* ap = static_cast<const uint8_t*>(a.const_data_ptr());
  const int64_t lda = a.stride(0);
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / kp), [&](int64_t b, int64_t e) {
    widen_rows(ap, lda, b, e, K, packed, a_signed, out.data(), kp, split);
  });
  return out;
}

// Rows from which the Quads path sums the weights in one pass first (their correction term)
// rather than in every full tile (one more vpdpbusd per weight vector, 4 per 16).
constexpr int64_t kPresumRows = 64;

// Whether the panel kernel (int_gemm_panel.h) takes an M-row product from the Quads tiles. Its
// packing pass over the weights costs as much as a few rows of the product while the weights
// fit in cache, and about 1.8 ms for 16 MB of them from memory. Crossovers measured on the
// AVX-512 EPYC with 1 and 2 threads (benchmarks/results/cpu_2026-11-28c/): int8 weights at
// M = 16-32 for 512^2 and 1000 x 2048, between 128 (a tie) and 256 for 4096^2; packed int4
// ones (whose Quads tiles unpack in registers) at M = 16 and 64.
inline bool use_panel(int64_t M, int64_t N, int64_t K, bool int4) {
  const bool big = N * K > (int64_t{8} << 20);
  return M >= (int4 ? (big ? 64 : 16) : (big ? 160 : 24));
}

#if SYNQ_INT_GEMM_X86
// The panel kernel: sums into C (M x N int32; float32 results there with `epi`), or into a
// scratch handed to store() when C is null.
template <class Store>
void run_panel(const at::Tensor& a, int64_t K, bool a_packed, bool a_signed, const BMat& B,
               int64_t N, int32_t* C, const panel::LinearEpilogue* epi, Store& store) {
  const int64_t M = a.size(0);
  // Rows one cache line longer than a whole number of 64-byte steps: with K = 4096 the eight
  // rows of a tile would otherwise sit 4 KB apart, in the same cache sets.
  const int64_t kp = round_up(std::max<int64_t>(K, 1), Quads::step) + 64;
  const auto A8 = widen_parallel<uint8_t>(a, K, a_packed, a_signed, kp);
  const int64_t kq = (K + 3) / 4, np = (N + panel::kCols - 1) / panel::kCols;
  const auto packed = at::empty({np * kq * panel::kQuad}, a.options().dtype(at::kByte));
  uint8_t* bp = packed.mutable_data_ptr<uint8_t>();
  std::vector<int32_t> sums(np * panel::kCols);
  at::parallel_for(0, np, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      panel::pack(B.p, B.ld, N, K, B.int4, p, bp + p * kq * panel::kQuad,
                  sums.data() + p * panel::kCols);
  });
  // (every element is written by its first K block: no need to clear it)
  const auto scratch = at::empty({C ? 0 : M * N}, a.options().dtype(at::kInt));
  int32_t* out = C ? C : scratch.mutable_data_ptr<int32_t>();
  const Split s = split_work(M, np * panel::kCols, kp, panel::kMR, panel::kCols);
  const int64_t mtiles = (M + panel::kMR - 1) / panel::kMR;
  at::parallel_for(0, s.mchunks * s.nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const auto [m0, m1] = chunk_range(t / s.nchunks, s.mchunks, mtiles, panel::kMR, M);
      const auto [p0, p1] = chunk_range(t % s.nchunks, s.nchunks, np, 1, np);
      if (m0 < m1 && p0 < p1)
        panel::region(A8.data(), kp, m0, m1, bp, sums.data(), kq, p0, p1, N, out,
                      C ? epi : nullptr);
    }
  });
  if (C) return;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t n = 0; n < N; ++n) store(m, n, out[m * N + n]);
  });
}
#endif

// store(m, n, sum_k a[m, k] b[n, k]) for every m < M (a's rows) and n < N, on the fastest
// kernel family for this CPU and weight type. The panel kernel writes straight to `direct`
// (M x N) where given: the int32 sums, or with `epi` what store() would write (float32).
template <class Store>
void run_gemm(const at::Tensor& a, int64_t K, bool a_packed, bool a_signed, const BMat& B,
              int64_t N, Store store, int32_t* direct = nullptr,
              const panel::LinearEpilogue* epi = nullptr) {
  const int64_t M = a.size(0);
#if SYNQ_INT_GEMM_X86
  if (cpu_use_vnni() && K > 0 && use_panel(M, N, K, B.int4)) {
    run_panel(a, K, a_packed, a_signed, B, N, direct, epi, store);
    return;
  }
  if (cpu_use_vnni() && B.int4) {
    // Weight sums in every tile: the unpacking costs more than they do, and an odd K's
    // padding nibble then cancels (at padded k, a + 128 = 128 meets 128 x its sum).
    const int64_t kp = round_up(std::max<int64_t>(K, 1), Quads::step);
    const auto A8 = widen_parallel<uint8_t>(a, K, a_packed, a_signed, kp, true);
    const MicroT<Quads> micro{quads::micro<true, true>, quads::micro_row<true>};
    gemm_parallel(micro, A8.data(), kp, M, B, N, nullptr, store);
    return;
  }
  if (cpu_use_vnni()) {
    const int64_t kp = round_up(std::max<int64_t>(K, 1), Quads::step);
    const auto A8 = widen_parallel<uint8_t>(a, K, a_packed, a_signed, kp);
    std::vector<int32_t> bsum(M >= kPresumRows ? N : 0);
    if (!bsum.empty())
      at::parallel_for(0, N, std::max<int64_t>(1, 65536 / kp), [&](int64_t b, int64_t e) {
        quads::row_sums(B.p, B.ld, K, b, e, bsum.data());
      });
    const MicroT<Quads> micro{bsum.empty() ? quads::micro<true, false>
                                           : quads::micro<false, false>,
                              quads::micro_row<false>};
    gemm_parallel(micro, A8.data(), kp, M, B, N, bsum.empty() ? nullptr : bsum.data(), store);
    return;
  }
#endif
  const int64_t kp = round_up(std::max<int64_t>(K, 1), kChunk);
  const auto A16 = widen_parallel<int16_t>(a, K, a_packed, a_signed, kp);
  gemm_parallel(pick_micro(B.int4), A16.data(), kp, M, B, N, nullptr, store);
}

void check_operand(const at::Tensor& t, const char* name, bool packed, int64_t K) {
  TORCH_CHECK(t.dim() == 2, "synq int gemm (cpu backend): ", name, " must be 2-D, got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == (packed ? at::kByte : at::kChar), "synq int gemm (cpu backend): ",
              name, " must be ", packed ? "uint8 (packed int4)" : "int8", ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(1) == (packed ? (K + 1) / 2 : K), "synq int gemm (cpu backend): ", name,
              " has ", t.size(1), " columns, K = ", K, " needs ", packed ? (K + 1) / 2 : K);
}

at::Tensor int_mm_cpu(const at::Tensor& a_, const at::Tensor& b_, int64_t K, bool a_packed,
                      bool a_signed, bool b_packed) {
  check_operand(a_, "a", a_packed, K);
  check_operand(b_, "b", b_packed, K);
  const auto a = a_.contiguous(), b = b_.contiguous();
  const int64_t M = a.size(0), N = b.size(0);
  auto out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const BMat B{static_cast<const uint8_t*>(b.const_data_ptr()), b.stride(0), K, b_packed};
  int32_t* o = out.mutable_data_ptr<int32_t>();
  run_gemm(
      a, K, a_packed, a_signed, B, N, [o, N](int64_t m, int64_t n, int32_t v) { o[m * N + n] = v; },
      o);
  return out;
}

// out = relu?(float(acc - xz * rowsum[n]) * (xs * ws[n]) + bias[n]) cast to scalar_t, with
// the ReLU and the bias decided at compile time: as run-time branches, the compiler tested
// the sign of y before the ReLU flag, a data-dependent branch that mispredicted about half
// the time (quantized_linear took 1.5x int8_matmul's time at 256x4096^2).
template <typename scalar_t, bool RELU, bool BIAS>
inline scalar_t dequant(int32_t acc, int32_t xz, float xs, int32_t rowsum, float ws,
                        const float* bias, int64_t n) {
  float y = static_cast<float>(acc - xz * rowsum) * (xs * ws);
  if constexpr (BIAS) y += bias[n];
  if constexpr (RELU) y = std::max(y, 0.f);  // y < 0 ? 0 : y (NaN stays NaN)
  return static_cast<scalar_t>(y);
}

void check_epilogue(const at::Tensor& t, const char* name, at::ScalarType st, int64_t n) {
  TORCH_CHECK(t.scalar_type() == st && t.is_contiguous() && t.numel() == n,
              "synq int gemm (cpu backend): ", name, " must be a contiguous ", st, " tensor of ",
              n, " elements, got ", t.scalar_type(), " ", t.sizes());
}

at::Tensor quantized_linear_cpu(const at::Tensor& x_, const at::Tensor& x_scale,
                                const at::Tensor& x_zero, const at::Tensor& w_,
                                const at::Tensor& w_scale, const at::Tensor& w_rowsum,
                                const std::optional<at::Tensor>& bias, bool relu,
                                at::ScalarType out_dtype, bool w_packed) {
  TORCH_CHECK(x_.dim() == 2, "synq quantized_linear (cpu backend): x must be 2-D");
  const int64_t K = x_.size(1);
  check_operand(x_, "x", false, K);
  check_operand(w_, "w", w_packed, K);
  const auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t M = x.size(0), N = w.size(0);
  check_epilogue(x_scale, "x_scale", at::kFloat, M);
  check_epilogue(x_zero, "x_zero", at::kInt, M);
  check_epilogue(w_scale, "w_scale", at::kFloat, N);
  check_epilogue(w_rowsum, "w_rowsum", at::kInt, N);
  if (bias) check_epilogue(*bias, "bias", at::kFloat, N);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "synq quantized_linear (cpu backend): out_dtype must be float32, float16 or "
              "bfloat16, got ", out_dtype);
  auto out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const BMat B{static_cast<const uint8_t*>(w.const_data_ptr()), w.stride(0), K, w_packed};
  const float* xs = x_scale.const_data_ptr<float>();
  const int32_t* xz = x_zero.const_data_ptr<int32_t>();
  const float* ws = w_scale.const_data_ptr<float>();
  const int32_t* rs = w_rowsum.const_data_ptr<int32_t>();
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "quantized_linear_cpu",
                                  [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // float32 out: the panel kernel applies the same epilogue in its tiles, writing the
    // output directly (its memory holds the int32 partial sums until the last K block)
    const panel::LinearEpilogue epi{xs, xz, ws, rs, bp, relu};
    const bool f32 = std::is_same_v<scalar_t, float>;
    auto run = [&](auto relu_c, auto bias_c) {
      constexpr bool R = decltype(relu_c)::value, Bi = decltype(bias_c)::value;
      run_gemm(
          x, K, false, true, B, N,
          [=](int64_t m, int64_t n, int32_t v) {
            o[m * N + n] = dequant<scalar_t, R, Bi>(v, xz[m], xs[m], rs[n], ws[n], bp, n);
          },
          f32 ? reinterpret_cast<int32_t*>(o) : nullptr, f32 ? &epi : nullptr);
    };
    using T = std::true_type;
    using F = std::false_type;
    if (relu)
      bp ? run(T{}, T{}) : run(T{}, F{});
    else
      bp ? run(F{}, T{}) : run(F{}, F{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) {
  m.impl("_int_mm", &int_mm_cpu);
  m.impl("_quantized_linear", &quantized_linear_cpu);
}

}  // namespace synq
