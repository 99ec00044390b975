// Per-channel mean and biased variance of a (B, C, H, W) tensor over (B, H, W), and their
// backward: the BatchNorm statistics that BN-statistics synthesis matches at every layer.
//
// Forward: channel c's data are B rows of H*W contiguous floats (NCHW). Each row is read
// from memory once: its sum, then the sum of squared deviations from the row mean while the
// row is still in cache; rows are merged into the channel's mean and M2 in double with Chan's
// update (no E[x^2] - E[x]^2 cancellation). Channels are spread over threads.
// Channels-last input (B, H, W, C in memory) is read as it is: chunks of 256 pixels of a
// 64-channel slice take the place of the rows (sums as vectors along C).
// Backward: dx = g_mean[c] / N + g_var[c] * 2 / N * (x - mean[c]), one pass over x, in x's
// memory format.
// The sums use 16 float accumulators (two AVX2 vectors where the CPU has AVX2, chosen at run
// time; a portable loop otherwise) over blocks of kBlock elements, added into double per
// block.
//
// _batch_norm_stats: the same statistics of x together with eval-mode BatchNorm of x,
// y = x * alpha[c] + beta[c] (optionally followed by ReLU or ReLU6), written while each row /
// chunk is in cache; its backward is one pass, dx = dy * invstd[c] * w[c] + (the statistics'
// dx), dy masked by the activation's gradient. BN-statistics synthesis otherwise runs BatchNorm, ReLU, the
// statistics and their backwards as separate passes, plus the add of two gradients. Every
// value is rounded as ATen's CPU BatchNorm and ReLU and the separate _channel_stats ops
// round it (alpha = (1 / sqrt(var + eps)) * w in float, beta and y by fma; the backward's
// invstd in double), so synthesis gives the same bits fused or not (tested).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "activation.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SYNQ_STATS_X86 1
#include <immintrin.h>
#else
#define SYNQ_STATS_X86 0
#endif

namespace synq {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 512;

// sum of p[0..n) - shift, and of its squares when `squares` (then `shift` is the row mean)
template <bool squares>
double block_sums(const float* p, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    float acc[kLanes] = {};
    int64_t i = b0;
    for (; i + kLanes <= b1; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float d = p[i + j] - shift;
        acc[j] += squares ? d * d : d;
      }
    }
    float tail = 0.f;
    for (; i < b1; ++i) {
      const float d = p[i] - shift;
      tail += squares ? d * d : d;
    }
    double s = tail;
    for (int j = 0; j < kLanes; ++j) s += acc[j];
    total += s;
  }
  return total;
}

#if SYNQ_STATS_X86
template <bool squares>
__attribute__((target("avx2"))) double block_sums_avx2(const float* p, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = b0;
    for (; i + 16 <= b1; i += 16) {
      const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(p + i), s);
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(p + i + 8), s);
      a0 = _mm256_add_ps(a0, squares ? _mm256_mul_ps(d0, d0) : d0);
      a1 = _mm256_add_ps(a1, squares ? _mm256_mul_ps(d1, d1) : d1);
    }
    __m256 v = _mm256_add_ps(a0, a1);  // 8 lanes -> 1, in float (each holds <= 64 terms)
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float tail = 0.f;
    for (; i < b1; ++i) {
      const float d = p[i] - shift;
      tail += squares ? d * d : d;
    }
    total += static_cast<double>(_mm_cvtss_f32(h)) + tail;
  }
  return total;
}

__attribute__((target("avx2"))) void affine_row_avx2(const float* x, float* y, int64_t n,
                                                     float a, float mu, float b) {
  const __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(mu), vb = _mm256_set1_ps(b);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vm);
    _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_mul_ps(va, d), vb));
  }
  for (; i < n; ++i) y[i] = a * (x[i] - mu) + b;
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#else
bool have_avx2() { return false; }
#endif

template <bool squares>
double row_sums(const float* p, int64_t n, float shift) {
#if SYNQ_STATS_X86
  if (have_avx2()) return block_sums_avx2<squares>(p, n, shift);
#endif
  return block_sums<squares>(p, n, shift);
}

void affine_row(const float* x, float* y, int64_t n, float a, float mu, float b) {
#if SYNQ_STATS_X86
  if (have_avx2()) return affine_row_avx2(x, y, n, a, mu, b);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = a * (x[i] - mu) + b;
}

void check_input(const at::Tensor& x, const char* who) {
  TORCH_CHECK(x.dim() == 4, who, "x must be (B, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat, who, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), who, "x must be a CPU tensor");
}


// ---- channels-last (NHWC) --------------------------------------------------------------------

constexpr int64_t kPixBlock = 256;  // pixels per chunk: a chunk of a slice is <= 64 KB
constexpr int64_t kChanSlice = 64;  // channels per work item (four 64-byte lines)

// For channels [c0, c0 + w) of a chunk of np pixels (pixel p at x + p * C):
// out[j] = sum_p x - shift[j] (squares = false) or sum_p (x - shift[j])^2 (squares = true),
// in float (np <= kPixBlock terms per channel).
template <bool squares>
__attribute__((always_inline)) inline void nhwc_sums_body(const float* __restrict x, int64_t np,
                                                          int64_t C, int64_t w,
                                                          const float* __restrict shift,
                                                          float* __restrict out) {
  float acc[kChanSlice], sh[kChanSlice];
  for (int64_t j = 0; j < kChanSlice; ++j) {
    acc[j] = 0.f;
    sh[j] = j < w ? shift[j] : 0.f;
  }
  // common widths get a fixed trip count, which the compiler turns into whole vectors
  auto fixed = [&](auto width) {
    constexpr int64_t W = decltype(width)::value;
    for (int64_t p = 0; p < np; ++p) {
      const float* __restrict px = x + p * C;
      for (int64_t j = 0; j < W; ++j) {
        const float d = px[j] - sh[j];
        acc[j] += squares ? d * d : d;
      }
    }
  };
  if (w == 64) {
    fixed(std::integral_constant<int64_t, 64>());
  } else if (w == 32) {
    fixed(std::integral_constant<int64_t, 32>());
  } else if (w == 16) {
    fixed(std::integral_constant<int64_t, 16>());
  } else {
    for (int64_t p = 0; p < np; ++p) {
      const float* __restrict px = x + p * C;
      for (int64_t j = 0; j < w; ++j) {
        const float d = px[j] - sh[j];
        acc[j] += squares ? d * d : d;
      }
    }
  }
  for (int64_t j = 0; j < w; ++j) out[j] = acc[j];
}

template <bool squares>
void nhwc_sums_plain(const float* x, int64_t np, int64_t C, int64_t w, const float* shift,
                     float* out) {
  nhwc_sums_body<squares>(x, np, C, w, shift, out);
}

// y = a[c] * (x - mu[c]) + b[c] over npix pixels of C channels
__attribute__((always_inline)) inline void nhwc_affine_body(const float* x, float* y,
                                                            int64_t npix, int64_t C,
                                                            const float* a, const float* mu,
                                                            const float* b) {
  for (int64_t p = 0; p < npix; ++p)
    for (int64_t c = 0; c < C; ++c) y[p * C + c] = a[c] * (x[p * C + c] - mu[c]) + b[c];
}

void nhwc_affine_plain(const float* x, float* y, int64_t npix, int64_t C, const float* a,
                       const float* mu, const float* b) {
  nhwc_affine_body(x, y, npix, C, a, mu, b);
}

#if SYNQ_STATS_X86
template <bool squares>
__attribute__((target("avx2"))) void nhwc_sums_avx2(const float* x, int64_t np, int64_t C,
                                                    int64_t w, const float* shift, float* out) {
  nhwc_sums_body<squares>(x, np, C, w, shift, out);
}

__attribute__((target("avx2"))) void nhwc_affine_avx2(const float* x, float* y, int64_t npix,
                                                      int64_t C, const float* a,
                                                      const float* mu, const float* b) {
  nhwc_affine_body(x, y, npix, C, a, mu, b);
}
#endif

template <bool squares>
void nhwc_sums(const float* x, int64_t np, int64_t C, int64_t w, const float* shift,
               float* out) {
#if SYNQ_STATS_X86
  if (have_avx2()) return nhwc_sums_avx2<squares>(x, np, C, w, shift, out);
#endif
  nhwc_sums_plain<squares>(x, np, C, w, shift, out);
}

void nhwc_affine(const float* x, float* y, int64_t npix, int64_t C, const float* a,
                 const float* mu, const float* b) {
#if SYNQ_STATS_X86
  if (have_avx2()) return nhwc_affine_avx2(x, y, npix, C, a, mu, b);
#endif
  nhwc_affine_plain(x, y, npix, C, a, mu, b);
}

// ---- eval-mode BatchNorm, fused with the statistics ---------------------------------------

// y = fma(x, alpha[c], beta[c]) over npix pixels of w channels (pixel stride C; alpha and beta
// start at the first of the w channels); ATen's CPU kernel rounds its x * alpha + beta once
// (a contracted fma), so this is an explicit one.
// C = 0 is an NCHW row: npix values of the one channel alpha[0], beta[0]. The activation
// `act` (kNoAct, kReLU, kReLU6) follows torch (activation.h).
template <int act>
__attribute__((always_inline)) inline float bn_out(float x, float a, float b) {
  return activate<act>(__builtin_fmaf(x, a, b));
}

template <int act>
__attribute__((always_inline)) inline void fma_affine_body(const float* __restrict x,
                                                           float* __restrict y, int64_t npix,
                                                           int64_t C, int64_t w,
                                                           const float* __restrict alpha,
                                                           const float* __restrict beta) {
  if (C == 0) {
    const float a = alpha[0], b = beta[0];
    for (int64_t p = 0; p < npix; ++p) y[p] = bn_out<act>(x[p], a, b);
    return;
  }
  for (int64_t p = 0; p < npix; ++p)
    for (int64_t j = 0; j < w; ++j) y[p * C + j] = bn_out<act>(x[p * C + j], alpha[j], beta[j]);
}

// dx = dy * invstd[c] * w[c] + (a[c] * (x - mu[c]) + b[c]): BatchNorm's eval backward (two
// products, in ATen's order) plus the statistics' backward, summed as autograd sums them.
// With an activation, dy is first zeroed where the output r says its gradient is 0
// (act_grad, activation.h). C = 0 is an NCHW row of the one channel given.
template <int act>
__attribute__((always_inline)) inline void bn_backward_body(
    const float* __restrict dy, const float* __restrict r, const float* __restrict x,
    float* __restrict dx, int64_t npix, int64_t C, const float* __restrict invstd,
    const float* __restrict wt, const float* __restrict a, const float* __restrict mu,
    const float* __restrict b) {
  if (C == 0) {
    const float s = invstd[0], t = wt[0], a0 = a[0], m0 = mu[0], b0 = b[0];
    for (int64_t p = 0; p < npix; ++p)
      dx[p] = act_grad<act>(dy[p], r[p]) * s * t + (a0 * (x[p] - m0) + b0);
    return;
  }
  for (int64_t p = 0; p < npix; ++p)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = p * C + c;
      dx[i] = act_grad<act>(dy[i], r[i]) * invstd[c] * wt[c] + (a[c] * (x[i] - mu[c]) + b[c]);
    }
}

template <int act>
void fma_affine_plain(const float* x, float* y, int64_t npix, int64_t C, int64_t w,
                      const float* alpha, const float* beta) {
  fma_affine_body<act>(x, y, npix, C, w, alpha, beta);
}

template <int act>
void bn_backward_plain(const float* dy, const float* r, const float* x, float* dx, int64_t npix,
                       int64_t C, const float* invstd, const float* wt, const float* a,
                       const float* mu, const float* b) {
  bn_backward_body<act>(dy, r, x, dx, npix, C, invstd, wt, a, mu, b);
}

#if SYNQ_STATS_X86
template <int act>
__attribute__((target("avx2,fma"))) void fma_affine_avx2(const float* x, float* y,
                                                         int64_t npix, int64_t C, int64_t w,
                                                         const float* alpha,
                                                         const float* beta) {
  fma_affine_body<act>(x, y, npix, C, w, alpha, beta);
}

template <int act>
__attribute__((target("avx2"))) void bn_backward_avx2(const float* dy, const float* r,
                                                      const float* x, float* dx, int64_t npix,
                                                      int64_t C, const float* invstd,
                                                      const float* wt, const float* a,
                                                      const float* mu, const float* b) {
  bn_backward_body<act>(dy, r, x, dx, npix, C, invstd, wt, a, mu, b);
}

bool have_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <int act>
void fma_affine(const float* x, float* y, int64_t npix, int64_t C, int64_t w,
                const float* alpha, const float* beta) {
#if SYNQ_STATS_X86
  if (have_fma()) return fma_affine_avx2<act>(x, y, npix, C, w, alpha, beta);
#endif
  fma_affine_plain<act>(x, y, npix, C, w, alpha, beta);
}

template <int act>
void bn_backward(const float* dy, const float* r, const float* x, float* dx, int64_t npix,
                 int64_t C, const float* invstd, const float* wt, const float* a,
                 const float* mu, const float* b) {
#if SYNQ_STATS_X86
  if (have_avx2()) return bn_backward_avx2<act>(dy, r, x, dx, npix, C, invstd, wt, a, mu, b);
#endif
  bn_backward_plain<act>(dy, r, x, dx, npix, C, invstd, wt, a, mu, b);
}

// Chunks of kPixBlock pixels of a 64-channel slice play the part of the NCHW rows: each is
// read from memory once (its sums, then its squared deviations from cache; then `epi` on the
// chunk while it is still there). Chunks are independent, so threads split them; their float
// sums are then merged per channel in chunk order into (count, mean, M2) in double. That is
// the order of a serial loop, so the result does not depend on the number of threads.
// epi(first pixel, pixels, first channel, channels).
template <class Epi>
void channel_stats_nhwc(const float* xp, int64_t B, int64_t C, int64_t HW, float* mp,
                        float* vp, const Epi& epi) {
  const int64_t slices = (C + kChanSlice - 1) / kChanSlice;
  const int64_t per_b = (HW + kPixBlock - 1) / kPixBlock, chunks = B * per_b;
  std::vector<float> sums(chunks * C), sqs(chunks * C);
  at::parallel_for(0, chunks * slices, 1, [&](int64_t i0, int64_t i1) {
    const float zero[kChanSlice] = {};
    float rmf[kChanSlice];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t chunk = i / slices, c0 = (i % slices) * kChanSlice;
      const int64_t w = std::min(C, c0 + kChanSlice) - c0;
      const int64_t p0 = (chunk / per_b) * HW + (chunk % per_b) * kPixBlock;
      const int64_t np = std::min(kPixBlock, HW - (chunk % per_b) * kPixBlock);
      const float* xc = xp + p0 * C + c0;
      float* sum = sums.data() + chunk * C + c0;
      nhwc_sums<false>(xc, np, C, w, zero, sum);
      for (int64_t j = 0; j < w; ++j) rmf[j] = sum[j] / static_cast<float>(np);
      nhwc_sums<true>(xc, np, C, w, rmf, sqs.data() + chunk * C + c0);
      epi(p0, np, c0, w);
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double n = 0.0, m = 0.0, m2 = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t np = std::min(kPixBlock, HW - (chunk % per_b) * kPixBlock);
        const float sum = sums[chunk * C + c], sq = sqs[chunk * C + c];
        const float rmf = sum / static_cast<float>(np);
        // the chunk's mean in double, and its M2 shifted from float(mean) to it
        const double cnt = static_cast<double>(np), nn = n + cnt;
        const double rm = static_cast<double>(sum) / cnt;
        const double off = static_cast<double>(rmf) - rm;
        const double chunk_m2 = std::max(0.0, static_cast<double>(sq) - cnt * off * off);
        const double delta = rm - m;
        m += delta * cnt / nn;
        m2 += chunk_m2 + delta * delta * n * cnt / nn;
        n = nn;
      }
      mp[c] = static_cast<float>(m);
      vp[c] = static_cast<float>(m2 / n);
    }
  });
}

// Contiguous (NCHW): channel c's rows are B runs of HW floats; threads take channels.
// epi(row pointer offset, channel) runs on each row after its sums, while it is in cache.
template <class Epi>
void channel_stats_nchw(const float* xp, int64_t B, int64_t C, int64_t HW, float* mp,
                        float* vp, const Epi& epi) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(B * HW, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double n = 0.0, m = 0.0, m2 = 0.0;
      for (int64_t b = 0; b < B; ++b) {
        const float* row = xp + (b * C + c) * HW;
        const double rm = row_sums<false>(row, HW, 0.f) / static_cast<double>(HW);
        const double rm2 = row_sums<true>(row, HW, static_cast<float>(rm));
        // the row's deviations were taken from float(rm); shift its M2 to rm exactly
        const double off = static_cast<double>(static_cast<float>(rm)) - rm;
        const double row_m2 = std::max(0.0, rm2 - static_cast<double>(HW) * off * off);
        const double nn = n + static_cast<double>(HW);
        const double delta = rm - m;
        m += delta * static_cast<double>(HW) / nn;
        m2 += row_m2 + delta * delta * n * static_cast<double>(HW) / nn;
        n = nn;
        epi((b * C + c) * HW, c);
      }
      mp[c] = static_cast<float>(m);
      vp[c] = static_cast<float>(m2 / n);
    }
  });
}

bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x_) {
  check_input(x_, "synq channel_stats (cpu): ");
  const bool nhwc = is_channels_last(x_);
  const auto x = nhwc ? x_ : x_.contiguous();
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto mean = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  if (B * HW == 0) {  // as torch.var_mean: no samples, no statistics
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  const float* xp = x.const_data_ptr<float>();
  float* mp = mean.mutable_data_ptr<float>();
  float* vp = var.mutable_data_ptr<float>();
  if (nhwc) {
    channel_stats_nhwc(xp, B, C, HW, mp, vp, [](int64_t, int64_t, int64_t, int64_t) {});
  } else {
    channel_stats_nchw(xp, B, C, HW, mp, vp, [](int64_t, int64_t) {});
  }
  return {mean, var};
}

at::Tensor channel_stats_backward_cpu(const at::Tensor& g_mean_, const at::Tensor& g_var_,
                                      const at::Tensor& x_, const at::Tensor& mean_) {
  const char* who = "synq channel_stats backward (cpu): ";
  check_input(x_, who);
  const int64_t B = x_.size(0), C = x_.size(1), HW = x_.size(2) * x_.size(3);
  for (const auto* t : {&g_mean_, &g_var_, &mean_}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->scalar_type() == at::kFloat &&
                    t->device().is_cpu(),
                who, "g_mean, g_var and mean must be float32 CPU tensors of shape (", C, ")");
  }
  const bool nhwc = is_channels_last(x_);
  const auto x = nhwc ? x_ : x_.contiguous();
  const auto gm = g_mean_.contiguous(), gv = g_var_.contiguous(), mean = mean_.contiguous();
  auto dx = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return dx;
  const double N = static_cast<double>(B * HW);
  const float* xp = x.const_data_ptr<float>();
  const float* gmp = gm.const_data_ptr<float>();
  const float* gvp = gv.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  float* dp = dx.mutable_data_ptr<float>();
  if (nhwc) {
    std::vector<float> a(C), b(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = static_cast<float>(2.0 * gvp[c] / N);
      b[c] = static_cast<float>(gmp[c] / N);
    }
    const int64_t pgrain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(C, 1));
    at::parallel_for(0, B * HW, pgrain, [&](int64_t p0, int64_t p1) {
      nhwc_affine(xp + p0 * C, dp + p0 * C, p1 - p0, C, a.data(), mp, b.data());
    });
    return dx;
  }
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(HW, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % C;
      const float a = static_cast<float>(2.0 * gvp[c] / N);
      const float b = static_cast<float>(gmp[c] / N);
      const float mu = mp[c];
      affine_row(xp + r * HW, dp + r * HW, HW, a, mu, b);
    }
  });
  return dx;
}

void check_channel_vector(const at::Tensor& t, int64_t C, const char* who, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.scalar_type() == at::kFloat &&
                  t.device().is_cpu(),
              who, name, " must be a float32 CPU tensor of shape (", C, "), got ",
              t.scalar_type(), " ", t.sizes());
}

// y = BatchNorm(x) in eval mode (running statistics), and x's own channel mean and variance.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_stats_cpu(
    const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& bias_,
    const at::Tensor& rmean_, const at::Tensor& rvar_, double eps, int64_t act) {
  const char* who = "synq batch_norm_stats (cpu): ";
  check_input(x_, who);
  const int64_t B = x_.size(0), C = x_.size(1), HW = x_.size(2) * x_.size(3);
  check_channel_vector(weight_, C, who, "weight");
  check_channel_vector(bias_, C, who, "bias");
  check_channel_vector(rmean_, C, who, "running_mean");
  check_channel_vector(rvar_, C, who, "running_var");
  const bool nhwc = is_channels_last(x_);
  const auto x = nhwc ? x_ : x_.contiguous();
  auto y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  auto mean = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  const auto w = weight_.contiguous(), bi = bias_.contiguous();
  const auto rm = rmean_.contiguous(), rv = rvar_.contiguous();
  // ATen's eval-mode terms: alpha = (1 / sqrt(var + eps)) * w in float, beta = bias - mean * alpha
  // rounded once (contracted to an fma there)
  std::vector<float> alpha(C), beta(C);
  const float *wp = w.const_data_ptr<float>(), *bp = bi.const_data_ptr<float>();
  const float *rmp = rm.const_data_ptr<float>(), *rvp = rv.const_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = 1.0f / std::sqrt(rvp[c] + static_cast<float>(eps));
    alpha[c] = invstd * wp[c];
    beta[c] = std::fma(-rmp[c], alpha[c], bp[c]);
  }
  if (B * HW == 0) {
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, var};
  }
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  float* mp = mean.mutable_data_ptr<float>();
  float* vp = var.mutable_data_ptr<float>();
  check_act(act, who);
  auto affine = act == kReLU6 ? &fma_affine<kReLU6>
                              : (act == kReLU ? &fma_affine<kReLU> : &fma_affine<kNoAct>);
  if (nhwc) {
    channel_stats_nhwc(xp, B, C, HW, mp, vp, [&](int64_t p0, int64_t np, int64_t c0, int64_t cw) {
      affine(xp + p0 * C + c0, yp + p0 * C + c0, np, C, cw, alpha.data() + c0,
             beta.data() + c0);
    });
  } else {
    channel_stats_nchw(xp, B, C, HW, mp, vp, [&](int64_t off, int64_t c) {
      affine(xp + off, yp + off, HW, 0, 1, alpha.data() + c, beta.data() + c);
    });
  }
  return {y, mean, var};
}

// dx of a loss of (y, mean, var) = batch_norm_stats(x, ...), given its gradients.
// With an activation, y is the op's output (the mask of its backward); else it is not read.
at::Tensor batch_norm_stats_backward_cpu(const at::Tensor& g_y_, const at::Tensor& g_mean_,
                                         const at::Tensor& g_var_, const at::Tensor& x_,
                                         const at::Tensor& y_, const at::Tensor& mean_,
                                         const at::Tensor& weight_, const at::Tensor& rvar_,
                                         double eps, int64_t act) {
  const char* who = "synq batch_norm_stats backward (cpu): ";
  check_input(x_, who);
  const int64_t B = x_.size(0), C = x_.size(1), HW = x_.size(2) * x_.size(3);
  TORCH_CHECK(g_y_.sizes() == x_.sizes() && g_y_.scalar_type() == at::kFloat &&
                  g_y_.device().is_cpu(),
              who, "g_y must be a float32 CPU tensor of x's shape ", x_.sizes(), ", got ",
              g_y_.scalar_type(), " ", g_y_.sizes());
  check_act(act, who);
  const bool masked = act != kNoAct;
  TORCH_CHECK(!masked || (y_.sizes() == x_.sizes() && y_.scalar_type() == at::kFloat &&
                          y_.device().is_cpu()),
              who, "y must be a float32 CPU tensor of x's shape ", x_.sizes());
  check_channel_vector(g_mean_, C, who, "g_mean");
  check_channel_vector(g_var_, C, who, "g_var");
  check_channel_vector(mean_, C, who, "mean");
  check_channel_vector(weight_, C, who, "weight");
  check_channel_vector(rvar_, C, who, "running_var");
  const bool nhwc = is_channels_last(x_);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto x = x_.contiguous(fmt), gy = g_y_.contiguous(fmt);
  const auto y = masked ? y_.contiguous(fmt) : x;  // y is read only with an activation
  auto dx = at::empty_like(x, fmt);
  if (x.numel() == 0) return dx;
  const double N = static_cast<double>(B * HW);
  // BatchNorm's backward takes invstd in double (ATen: float var + double eps); the
  // statistics' terms are _channel_stats_backward's
  std::vector<float> invstd(C), a(C), b(C);
  {
    // the contiguous copies stay alive while their pointers are read
    const auto rv = rvar_.contiguous(), gm = g_mean_.contiguous(), gv = g_var_.contiguous();
    const float *rvp = rv.const_data_ptr<float>(), *gmp = gm.const_data_ptr<float>(),
                *gvp = gv.const_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rvp[c]) + eps));
      a[c] = static_cast<float>(2.0 * gvp[c] / N);
      b[c] = static_cast<float>(gmp[c] / N);
    }
  }
  const auto wt = weight_.contiguous(), mean = mean_.contiguous();
  const float* wp = wt.const_data_ptr<float>();
  const float* mp = mean.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* gp = gy.const_data_ptr<float>();
  const float* rp = y.const_data_ptr<float>();
  float* dp = dx.mutable_data_ptr<float>();
  auto bwd = act == kReLU6 ? &bn_backward<kReLU6>
                           : (act == kReLU ? &bn_backward<kReLU> : &bn_backward<kNoAct>);
  if (nhwc) {
    const int64_t pgrain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(C, 1));
    at::parallel_for(0, B * HW, pgrain, [&](int64_t p0, int64_t p1) {
      bwd(gp + p0 * C, rp + p0 * C, xp + p0 * C, dp + p0 * C, p1 - p0, C, invstd.data(), wp,
          a.data(), mp, b.data());
    });
    return dx;
  }
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(HW, 1));
  at::parallel_for(0, B * C, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % C;
      bwd(gp + r * HW, rp + r * HW, xp + r * HW, dp + r * HW, HW, 0, invstd.data() + c, wp + c,
          a.data() + c, mp + c, b.data() + c);
    }
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) {
  m.impl("_channel_stats", &channel_stats_cpu);
  m.impl("_channel_stats_backward", &channel_stats_backward_cpu);
  m.impl("_batch_norm_stats", &batch_norm_stats_cpu);
  m.impl("_batch_norm_stats_backward", &batch_norm_stats_backward_cpu);
}

}  // namespace synq
