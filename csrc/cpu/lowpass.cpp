// Gaussian low-pass filter on the CPU: y = A_H x A_W per image, in one pass over the data.
//
// A_N (the circulant of the 1-D Gaussian gain) commutes with the reflection k -> -k mod N,
// so even and odd vectors do not mix: folding x into its even part s[p] = x[p] + x[N-p] and
// odd part d[p] = x[p] - x[N-p] turns each N x N product into two of about N/2 x N/2, half
// the multiply-adds. Each image goes through fold W -> two row GEMMs -> fold H -> two
// column GEMMs -> unfold both dims, in two image-sized scratch buffers that stay in the L2
// cache; images are spread over threads. The small GEMMs run on an AVX2/FMA register-tiled
// micro-kernel (6 x 16 accumulators), chosen at run time, with a portable fallback.
// Matrices larger than 256 a side are not sent here (the FFT is cheaper there; see
// synq_kernels/ops/lowpass.py), but any size works.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SYNQ_LOWPASS_X86 1
#include <immintrin.h>
#else
#define SYNQ_LOWPASS_X86 0
#endif

namespace synq {
namespace {

constexpr int kMR = 6;   // rows of the micro-kernel tile
constexpr int kNR = 16;  // columns (two 8-float vectors)

// C[r, j] = sum_k A[r * lda + k] * B[k * ldb + j] for r < MR, j < ncols (1..16).
using MicroFn = void (*)(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc, int ncols);

template <int MR>
void micro_generic(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                   float* C, int64_t ldc, int ncols) {
  float acc[MR][kNR] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    for (int r = 0; r < MR; ++r) {
      const float a = A[r * lda + k];
      for (int j = 0; j < ncols; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < ncols; ++j) C[r * ldc + j] = acc[r][j];
}

#if SYNQ_LOWPASS_X86
alignas(32) const int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// Lanes [0, n) of an 8-lane mask, n in 0..8.
__attribute__((target("avx2,fma"))) inline __m256i lane_mask(int n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - n));
}

// Three variants (16, up to 8, 9..15 columns), each with its own accumulators: shared
// accumulator arrays across branches make GCC spill them to the stack on every k step.
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_16(int64_t K, const float* A, int64_t lda,
                                                       const float* B, int64_t ldb, float* C,
                                                       int64_t ldc) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + k * ldb + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc0[r] = _mm256_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(a, b1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * ldc, acc0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, acc1[r]);
  }
}

// Masked lanes are neither read nor written, so B and C need no padding.
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_8(int64_t K, const float* A, int64_t lda,
                                                      const float* B, int64_t ldb, float* C,
                                                      int64_t ldc, int ncols) {
  const __m256i m0 = lane_mask(ncols);
  __m256 acc0[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc0[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_maskload_ps(B + k * ldb, m0);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      acc0[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(A + r * lda + k), b0, acc0[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) _mm256_maskstore_ps(C + r * ldc, m0, acc0[r]);
}

template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2_tail(int64_t K, const float* A,
                                                         int64_t lda, const float* B,
                                                         int64_t ldb, float* C, int64_t ldc,
                                                         int ncols) {
  const __m256i m1 = lane_mask(ncols - 8);
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb);
    const __m256 b1 = _mm256_maskload_ps(B + k * ldb + 8, m1);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc0[r] = _mm256_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(a, b1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(C + r * ldc, acc0[r]);
    _mm256_maskstore_ps(C + r * ldc + 8, m1, acc1[r]);
  }
}

template <int MR>
void micro_avx2(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                int64_t ldc, int ncols) {
  if (ncols == kNR)
    micro_avx2_16<MR>(K, A, lda, B, ldb, C, ldc);
  else if (ncols <= 8)
    micro_avx2_8<MR>(K, A, lda, B, ldb, C, ldc, ncols);
  else
    micro_avx2_tail<MR>(K, A, lda, B, ldb, C, ldc, ncols);
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

struct MicroKernels {
  MicroFn fn[kMR + 1];  // fn[m] handles m rows
};

MicroKernels pick_kernels() {
#if SYNQ_LOWPASS_X86
  if (cpu_has_avx2_fma())
    return {{nullptr, micro_avx2<1>, micro_avx2<2>, micro_avx2<3>, micro_avx2<4>,
             micro_avx2<5>, micro_avx2<6>}};
#endif
  return {{nullptr, micro_generic<1>, micro_generic<2>, micro_generic<3>, micro_generic<4>,
           micro_generic<5>, micro_generic<6>}};
}

// C (M x N, ldc) = A (M x K, lda) * B (K x N, ldb), all row-major float.
void gemm(const MicroKernels& mk, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  for (int64_t j0 = 0; j0 < N; j0 += kNR) {
    const int nc = static_cast<int>(std::min<int64_t>(kNR, N - j0));
    int64_t i0 = 0;
    for (; i0 + kMR <= M; i0 += kMR)
      mk.fn[kMR](K, A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, nc);
    if (i0 < M) mk.fn[M - i0](K, A + i0 * lda, lda, B + j0, ldb, C + i0 * ldc + j0, ldc, nc);
  }
}

// Parity split of an N x N operator M that commutes with the reflection (M y for a column
// vector y): E (ne x ne, ne = N/2 + 1) acts on s, O (no x no, no = (N-1)/2) on d, with
//   E[r][0] = M[r][0], E[r][p] = (M[r][p] + M[r][N-p]) / 2, E[r][N/2] = M[r][N/2] (N even),
//   O[r-1][q-1] = (M[r][q] - M[r][N-q]) / 2            for r, p, q in 1..(N-1)/2.
// Built from float64 and rounded once to float.
struct Folded {
  int64_t n = 0, ne = 0, no = 0;
  std::vector<float> e, o;  // row-major
};

Folded fold_operator(const double* m, int64_t n) {
  Folded f;
  f.n = n;
  f.ne = n / 2 + 1;
  f.no = (n - 1) / 2;
  f.e.resize(f.ne * f.ne);
  f.o.resize(f.no * f.no);
  for (int64_t r = 0; r < f.ne; ++r)
    for (int64_t p = 0; p < f.ne; ++p) {
      const bool self = p == 0 || 2 * p == n;
      f.e[r * f.ne + p] = static_cast<float>(
          self ? m[r * n + p] : 0.5 * (m[r * n + p] + m[r * n + (n - p)]));
    }
  for (int64_t r = 1; r <= f.no; ++r)
    for (int64_t q = 1; q <= f.no; ++q)
      f.o[(r - 1) * f.no + (q - 1)] =
          static_cast<float>(0.5 * (m[r * n + q] - m[r * n + (n - q)]));
  return f;
}

void transpose_in_place(std::vector<float>& a, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) std::swap(a[i * n + j], a[j * n + i]);
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__attribute__((always_inline)) inline void filter_image_body(
    const MicroKernels& mk, const T* x, T* y, int64_t H, int64_t W, const Folded& col,
    const Folded& row, float* buf1, float* buf2, float* line) {
  const int64_t we = row.ne, wo = row.no, he = col.ne, ho = col.no;
  const bool w_even = W % 2 == 0, h_even = H % 2 == 0;
  // 1) fold along W: S (H x we) then D (H x wo) in buf1.
  float* S = buf1;
  float* D = buf1 + H * we;
  constexpr int64_t kAhead = 4;  // rows; x comes from DRAM, in rows too short for the prefetcher
  for (int64_t i = 0; i < H; ++i) {
    const T* xr = x + i * W;
    if (i + kAhead < H) {
      const char* next = reinterpret_cast<const char*>(xr + kAhead * W);
      for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(T)); b += 64)
        __builtin_prefetch(next + b, 0, 0);
    }
    float* s = S + i * we;
    float* d = D + i * wo;
    s[0] = to_float(xr[0]);
    for (int64_t p = 1; p <= wo; ++p) {
      const float a = to_float(xr[p]), b = to_float(xr[W - p]);
      s[p] = a + b;
      d[p - 1] = a - b;
    }
    if (w_even && W > 1) s[W / 2] = to_float(xr[W / 2]);
  }
  // 2) row pass: T = [S E_W^T | D O_W^T] (H x W) in buf2; `row` holds those transposes.
  float* Tm = buf2;
  gemm(mk, H, we, we, S, we, row.e.data(), we, Tm, W);
  gemm(mk, H, wo, wo, D, wo, row.o.data(), wo, Tm + we, W);
  // 3) fold along H: SH (he x W) then DH (ho x W) in buf1.
  float* SH = buf1;
  float* DH = buf1 + he * W;
  std::copy(Tm, Tm + W, SH);
  for (int64_t p = 1; p <= ho; ++p) {
    const float* a = Tm + p * W;
    const float* b = Tm + (H - p) * W;
    float* s = SH + p * W;
    float* d = DH + (p - 1) * W;
    for (int64_t j = 0; j < W; ++j) {
      s[j] = a[j] + b[j];
      d[j] = a[j] - b[j];
    }
  }
  if (h_even && H > 1) std::copy(Tm + (H / 2) * W, Tm + (H / 2 + 1) * W, SH + (H / 2) * W);
  // 4) column pass: Ye = E_H SH (he x W), Yo = O_H DH (ho x W) in buf2.
  float* Ye = buf2;
  float* Yo = buf2 + he * W;
  gemm(mk, he, W, he, col.e.data(), he, SH, W, Ye, W);
  gemm(mk, ho, W, ho, col.o.data(), ho, DH, W, Yo, W);
  // 5) unfold rows (Ye +- Yo) into `line`, then columns ([e | o] halves) into y.
  for (int64_t i = 0; i < H; ++i) {
    const float* r;
    if (i == 0 || (h_even && 2 * i == H)) {
      r = Ye + i * W;
    } else {
      const int64_t p = i <= ho ? i : H - i;
      const float sign = i <= ho ? 1.f : -1.f;
      const float* a = Ye + p * W;
      const float* b = Yo + (p - 1) * W;
      for (int64_t j = 0; j < W; ++j) line[j] = a[j] + sign * b[j];
      r = line;
    }
    T* yr = y + i * W;
    yr[0] = static_cast<T>(r[0]);
    for (int64_t q = 1; q <= wo; ++q) {
      const float e = r[q], o = r[we + q - 1];
      yr[q] = static_cast<T>(e + o);
      yr[W - q] = static_cast<T>(e - o);
    }
    if (w_even && W > 1) yr[W / 2] = static_cast<T>(r[W / 2]);
  }
}

// The folds and unfolds (a quarter of the time at 224 x 224) compiled twice, for AVX2 and
// for baseline x86-64, like the GEMM micro-kernels.
template <typename T>
void filter_image_generic(const MicroKernels& mk, const T* x, T* y, int64_t H, int64_t W,
                          const Folded& col, const Folded& row, float* buf1, float* buf2,
                          float* line) {
  filter_image_body<T>(mk, x, y, H, W, col, row, buf1, buf2, line);
}

#if SYNQ_LOWPASS_X86
template <typename T>
__attribute__((target("avx2,fma"))) void filter_image_avx2(
    const MicroKernels& mk, const T* x, T* y, int64_t H, int64_t W, const Folded& col,
    const Folded& row, float* buf1, float* buf2, float* line) {
  filter_image_body<T>(mk, x, y, H, W, col, row, buf1, buf2, line);
}
#endif

template <typename T>
void filter_image(const MicroKernels& mk, const T* x, T* y, int64_t H, int64_t W,
                  const Folded& col, const Folded& row, float* buf1, float* buf2,
                  float* line) {
#if SYNQ_LOWPASS_X86
  if (cpu_has_avx2_fma()) return filter_image_avx2<T>(mk, x, y, H, W, col, row, buf1, buf2, line);
#endif
  filter_image_generic<T>(mk, x, y, H, W, col, row, buf1, buf2, line);
}

Folded fold_checked(const at::Tensor& a, int64_t n, const char* name, bool transpose) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == n && a.size(1) == n, "synq lowpass (cpu): ", name,
              " must be ", n, " x ", n, ", got ", a.sizes());
  TORCH_CHECK(a.device().is_cpu(), "synq lowpass (cpu): ", name, " must be on the CPU");
  auto m = a.to(at::kDouble);
  if (transpose) m = m.t();
  m = m.contiguous();
  return fold_operator(m.const_data_ptr<double>(), n);
}

// y[..., :, :] = a_h @ x[..., :, :] @ a_w for square a_h (H x H) and a_w (W x W) that commute
// with the reflection k -> -k mod N (symmetric circulants, as the Gaussian filter's are).
at::Tensor lowpass_gaussian_cpu(const at::Tensor& x_, const at::Tensor& a_h,
                                const at::Tensor& a_w) {
  TORCH_CHECK(x_.device().is_cpu(), "synq lowpass (cpu backend): x must be on the CPU");
  TORCH_CHECK(x_.dim() >= 2, "synq lowpass: x must have at least 2 dims, got ", x_.dim());
  const auto st = x_.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "synq lowpass (cpu backend): x must be float32, float16 or bfloat16, got ", st);
  const int64_t H = x_.size(-2), W = x_.size(-1);
  Folded col = fold_checked(a_h, H, "a_h", false);
  // The row pass computes x A_W, i.e. applies A_W^T to each row; its GEMMs take the
  // transposes of the parity blocks as their right operands.
  Folded row = fold_checked(a_w, W, "a_w", true);
  transpose_in_place(row.e, row.ne);
  transpose_in_place(row.o, row.no);

  auto x = x_.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  const int64_t images = x.numel() / (H * W);
  const MicroKernels mk = pick_kernels();
  const int64_t grain = std::max<int64_t>(1, 16384 / (H * W));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "lowpass_gaussian_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, images, grain, [&](int64_t b, int64_t e) {
      std::vector<float> scratch(2 * H * W + W);
      float* buf1 = scratch.data();
      float* buf2 = buf1 + H * W;
      float* line = buf2 + H * W;
      for (int64_t n = b; n < e; ++n)
        filter_image<scalar_t>(mk, xp + n * H * W, yp + n * H * W, H, W, col, row, buf1, buf2,
                               line);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) {
  m.impl("_lowpass_gaussian", &lowpass_gaussian_cpu);
}

}  // namespace synq
