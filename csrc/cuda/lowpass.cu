// Gaussian low-pass filter on CUDA: y = A_H x A_W per image in one fused kernel that reads x
// once and writes y once.
//
// A block owns kBM = 32 output rows of one image, the whole (padded) row width Wp <= 256:
//   stage 1  T = A_H[rows, :] x      k-steps of 8 rows of x staged in shared memory,
//   stage 2  y[rows, :] = T A_W      T kept in shared memory, k-steps of 8 rows of A_W,
// both on TF32 tensor cores (wmma m16n16k8, float32 accumulation; an error of about 1e-3 of
// max|x|). Each of the 4 warps keeps one 16-row tile and up to 8 16-column tiles of the
// result in accumulator fragments. Padding rows and columns are staged as zeros, so they add
// nothing; y goes out through shared memory for coalesced, bounds-checked stores. The row
// blocks of one image are neighbours in the grid, so x and the matrices come from L2.
//
// Images wider than 256 (after padding to 16) and GPUs before sm_80 take the cuBLAS path:
// two at::matmul calls through a float32 temporary (three passes over the data).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <mma.h>

#include <cstdint>
#include <limits>

namespace synq {
namespace {

constexpr int kBM = 32;      // output rows per block
constexpr int kKC = 8;       // contraction rows per step (the k of one wmma tf32 step)
constexpr int kMaxWp = 256;  // widest padded row held in shared memory
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Row padding of the shared tiles: keeps every 16 x 16 tile 32-byte aligned (wmma needs it)
// and staggers the rows across banks.
constexpr int kLdA = kKC + 8;       // 16
constexpr int kLdB = kMaxWp + 8;    // 264
constexpr int kTilesPerWarp = (kBM / 16) * (kMaxWp / 16) / kWarps;  // 8

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lowpass_gaussian_kernel(const T* __restrict__ x, T* __restrict__ y,
                            const float* __restrict__ a_h, const float* __restrict__ a_w,
                            int H, int W, int Wp, int64_t n_mblocks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) float As[kBM * kLdA];  // A_H[rows, k step]
  __shared__ __align__(32) float Bs[kKC * kLdB];  // k step rows of x (stage 1) or A_W (2)
  __shared__ __align__(32) float Ts[kBM * kLdB];  // T, then y

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t mb = blockIdx.x % n_mblocks;
  const int64_t img = blockIdx.x / n_mblocks;
  const int64_t base = img * H * W;
  const int row0 = static_cast<int>(mb) * kBM;
  const int rt = warp % 2;   // this warp's 16-row tile
  const int ct0 = warp / 2;  // its column tiles: ct0, ct0 + 2, ct0 + 4, ...
  const int nct = Wp / 16;

  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[kTilesPerWarp];
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) wmma::fill_fragment(acc[i], 0.f);

  // Stage 1: T = A_H[row0 : row0 + 32, :] x.
  for (int k0 = 0; k0 < H; k0 += kKC) {
    for (int i = tid; i < kBM * kKC; i += kThreads) {
      const int r = i / kKC, c = i % kKC;
      const int gr = row0 + r, gc = k0 + c;
      As[r * kLdA + c] = (gr < H && gc < H) ? a_h[static_cast<int64_t>(gr) * H + gc] : 0.f;
    }
    for (int i = tid; i < kKC * Wp; i += kThreads) {
      const int r = i / Wp, c = i % Wp;
      const int gr = k0 + r;
      Bs[r * kLdB + c] =
          (gr < H && c < W) ? static_cast<float>(x[base + static_cast<int64_t>(gr) * W + c]) : 0.f;
    }
    __syncthreads();
    FragA fa;
    wmma::load_matrix_sync(fa, As + rt * 16 * kLdA, kLdA);
#pragma unroll
    for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
#pragma unroll
    for (int i = 0; i < kTilesPerWarp; ++i) {
      const int ct = ct0 + 2 * i;
      if (ct < nct) {
        FragB fb;
        wmma::load_matrix_sync(fb, Bs + ct * 16, kLdB);
#pragma unroll
        for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
        wmma::mma_sync(acc[i], fa, fb, acc[i]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int ct = ct0 + 2 * i;
    if (ct < nct)
      wmma::store_matrix_sync(Ts + rt * 16 * kLdB + ct * 16, acc[i], kLdB, wmma::mem_row_major);
    wmma::fill_fragment(acc[i], 0.f);
  }
  __syncthreads();

  // Stage 2: y[rows, :] = T A_W. T's columns from W on are zero (x was staged with zeros
  // there), so the contraction stops at W (rounded up to the step).
  for (int k0 = 0; k0 < W; k0 += kKC) {
    for (int i = tid; i < kKC * Wp; i += kThreads) {
      const int r = i / Wp, c = i % Wp;
      const int gr = k0 + r;
      Bs[r * kLdB + c] = (gr < W && c < W) ? a_w[static_cast<int64_t>(gr) * W + c] : 0.f;
    }
    __syncthreads();
    FragA fa;
    wmma::load_matrix_sync(fa, Ts + rt * 16 * kLdB + k0, kLdB);
#pragma unroll
    for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
#pragma unroll
    for (int i = 0; i < kTilesPerWarp; ++i) {
      const int ct = ct0 + 2 * i;
      if (ct < nct) {
        FragB fb;
        wmma::load_matrix_sync(fb, Bs + ct * 16, kLdB);
#pragma unroll
        for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
        wmma::mma_sync(acc[i], fa, fb, acc[i]);
      }
    }
    __syncthreads();  // also: every warp is done reading T before y overwrites it below
  }
#pragma unroll
  for (int i = 0; i < kTilesPerWarp; ++i) {
    const int ct = ct0 + 2 * i;
    if (ct < nct)
      wmma::store_matrix_sync(Ts + rt * 16 * kLdB + ct * 16, acc[i], kLdB, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = tid; i < kBM * Wp; i += kThreads) {
    const int r = i / Wp, c = i % Wp;
    const int gr = row0 + r;
    if (gr < H && c < W)
      y[base + static_cast<int64_t>(gr) * W + c] = static_cast<T>(Ts[r * kLdB + c]);
  }
#endif
}

at::Tensor check_matrix(const at::Tensor& a, int64_t n, const char* name, const at::Tensor& x) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == n && a.size(1) == n, "synq lowpass (cuda): ", name,
              " must be ", n, " x ", n, ", got ", a.sizes());
  TORCH_CHECK(a.device() == x.device(), "synq lowpass (cuda): ", name, " is on ", a.device(),
              ", x on ", x.device());
  return a.to(at::kFloat).contiguous();
}

// y[..., :, :] = a_h @ x[..., :, :] @ a_w.
at::Tensor lowpass_gaussian_cuda(const at::Tensor& x_, const at::Tensor& a_h_,
                                 const at::Tensor& a_w_) {
  TORCH_CHECK(x_.is_cuda(), "synq lowpass (cuda backend): x must be a CUDA tensor");
  TORCH_CHECK(x_.dim() >= 2, "synq lowpass: x must have at least 2 dims, got ", x_.dim());
  const auto st = x_.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "synq lowpass (cuda backend): x must be float32, float16 or bfloat16, got ", st);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t H = x_.size(-2), W = x_.size(-1);
  auto a_h = check_matrix(a_h_, H, "a_h", x_);
  auto a_w = check_matrix(a_w_, W, "a_w", x_);
  auto x = x_.contiguous();
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t Wp = (W + 15) / 16 * 16;
  const int64_t images = x.numel() / (H * W);
  const int64_t n_mblocks = (H + kBM - 1) / kBM;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  if (Wp > kMaxWp || props->major < 8 || H > std::numeric_limits<int>::max() / 2 ||
      images * n_mblocks > std::numeric_limits<int>::max()) {
    return at::matmul(at::matmul(a_h, x.to(at::kFloat)), a_w).to(st).contiguous();
  }
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "lowpass_gaussian_cuda", [&] {
    lowpass_gaussian_kernel<scalar_t>
        <<<static_cast<unsigned>(images * n_mblocks), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
            a_h.const_data_ptr<float>(), a_w.const_data_ptr<float>(), static_cast<int>(H),
            static_cast<int>(W), static_cast<int>(Wp), n_mblocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CUDA, m) {
  m.impl("_lowpass_gaussian", &lowpass_gaussian_cuda);
}

}  // namespace synq
