// Fused fake quantization on CUDA: forward, and a backward that reads x and dy once, writes
// dx once and reduces the scale / zero-point gradients inside the kernel (no host sync, no
// full-size temporaries, so it can be captured in a CUDA graph). Same semantics as
// csrc/cpu/fake_quant.cpp; the forward is bit-exact with it.
//
// The contiguous tensor is seen as [outer, channels, inner]. Two mappings, both grid-stride:
//   - segments (inner > 1, and per-tensor): blockIdx.y picks a channel, blockIdx.x / .z and
//     the block's (x, y) threads split that channel's [outer, inner] slab; every thread
//     works on one channel at a time, so a plain block reduction ends in one atomicAdd per
//     block per channel.
//   - columns (inner == 1, channels on the last dim): x is a [outer, channels] matrix, each
//     thread owns a few adjacent channels of a column tile and walks down the rows, so its
//     partial sums stay in registers; the block sums them over its rows in shared memory
//     and adds one value per channel of the tile.
// 128-bit loads and stores where the pointers and the row / segment starts are aligned,
// scalar accesses otherwise.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "fake_quant_geometry.h"

namespace synq {
namespace {

constexpr int kThreads = 256;  // every block, whatever its (x, y) shape
constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocksPerSM = 4;  // caps registers at 64: half the SM's threads resident
constexpr int64_t kMaxGridYZ = 65535;

enum class Mode { kForward, kDx, kGrads };  // y; dx only; dx and the qparam gradients

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The clamps are written as the CPU kernel writes them (not fminf / fmaxf), so that a NaN
// propagates the same way.
__device__ __forceinline__ float clamp_q(float q, float qmin, float qmax) {
  return q < qmin ? qmin : (q > qmax ? qmax : q);
}

__device__ __forceinline__ float rounded_zero_point(const float* zero_point, int64_t c,
                                                    float qmin, float qmax) {
  return clamp_q(rintf(zero_point[c]), qmin, qmax);
}

// One element: returns y (forward) or dx (backward), and adds the element's terms of
// sum(dy * dq/ds) and sum(dy over clamped elements) to ds / dz. The _rn intrinsics keep the
// roundings those of the CPU kernel whatever the contraction flags.
// The activation before the fake quantization (act: 0 none, 1 ReLU, 2 ReLU6), as torch's
// relu (clamp_min: -0 and NaN pass) and relu6 (hardtanh(0, 6)); and whether its gradient
// passes, judged on its output r as torch's backward does (NaN entries are outside the
// fake quantization's range, so their dx is 0 either way). act is the same for every
// thread of a launch: the branches do not diverge.
constexpr int kNoAct = 0, kReLU = 1, kReLU6 = 2;

__device__ __forceinline__ float activate(float x, int act) {
  if (act == kNoAct) return x;
  const float v = x < 0.f ? 0.f : x;
  return act == kReLU6 && v > 6.f ? 6.f : v;
}

__device__ __forceinline__ bool act_passes(float r, int act) {
  if (act == kNoAct) return true;
  return act == kReLU ? !(r <= 0.f) : (r > 0.f && r < 6.f);
}

template <Mode M>
__device__ __forceinline__ float fake_quant_elem(float x_in, float g, float s, float z,
                                                 float qmin, float qmax, int act, float& ds,
                                                 float& dz) {
  const float x = activate(x_in, act);
  const float t = __fdiv_rn(x, s);
  const float r = rintf(t);  // round half to even, as nearbyint on the CPU
  const float q = __fadd_rn(r, z);
  const float qc = clamp_q(q, qmin, qmax);
  if constexpr (M == Mode::kForward) {
    return __fmul_rn(__fsub_rn(qc, z), s);
  } else {
    const bool in = q >= qmin && q <= qmax;
    if constexpr (M == Mode::kGrads) {
      ds += g * (in ? r - t : qc - z);
      dz += in ? 0.f : g;
    }
    return in && act_passes(x, act) ? g : 0.f;
  }
}

// VEC elements from index i (aligned to VEC elements when VEC > 1). NP = 1: all lanes share
// one channel (s[0], z[0], ds[0], dz[0]); NP = VEC: lane k has channel k's.
template <typename T, int VEC, int NP, Mode M>
__device__ __forceinline__ void fake_quant_pack(const T* __restrict__ x, const T* __restrict__ dy,
                                                T* __restrict__ out, int64_t i, const float* s,
                                                const float* z, float* ds, float* dz,
                                                float qmin, float qmax, int act) {
  using P = Pack<T, VEC>;
  const P xv = *reinterpret_cast<const P*>(x + i);
  // The forward has no dy (null): it reads nothing more, and fake_quant_elem ignores g.
  const P gv = M == Mode::kForward ? xv : *reinterpret_cast<const P*>(dy + i);
  P ov;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int p = NP == 1 ? 0 : k;
    ov.v[k] = static_cast<T>(fake_quant_elem<M>(static_cast<float>(xv.v[k]),
                                                static_cast<float>(gv.v[k]), s[p], z[p], qmin,
                                                qmax, act, ds[p], dz[p]));
  }
  *reinterpret_cast<P*>(out + i) = ov;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sums ds and dz over the block's kThreads threads (all must call it) and adds
// ds * fs and dz * fz to *out_s and *out_z: one atomicAdd each per call.
__device__ __forceinline__ void block_sum_add(float ds, float dz, float* out_s, float* out_z,
                                              float fs, float fz) {
  __shared__ float red[2][kWarps];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  ds = warp_sum(ds);
  dz = warp_sum(dz);
  if (lane == 0) {
    red[0][warp] = ds;
    red[1][warp] = dz;
  }
  __syncthreads();
  if (warp == 0) {
    ds = warp_sum(lane < kWarps ? red[0][lane] : 0.f);
    dz = warp_sum(lane < kWarps ? red[1][lane] : 0.f);
    if (lane == 0) {
      atomicAdd(out_s, ds * fs);
      atomicAdd(out_z, dz * fz);
    }
  }
  __syncthreads();  // red is reused by the next call
}

// Segments: channel c's elements are rows o in [0, outer) of inner contiguous elements at
// (o * channels + c) * inner. Each index is covered exactly once:
//   - channels: c = blockIdx.y + k * gridDim.y, one (blockIdx.y, k) per c;
//   - rows: o = (blockIdx.z * blockDim.y + threadIdx.y) + k * (gridDim.z * blockDim.y), the
//     first term taking each value of [0, gridDim.z * blockDim.y) once;
//   - within a row: vectors v in [0, inner / VEC) and then the tail elements
//     [inner / VEC * VEC, inner), both split the same way by (blockIdx.x, threadIdx.x).
// VEC > 1 only when every segment start is aligned (the host checks inner % VEC == 0, or a
// single segment, which then has a tail).
template <typename T, int VEC, Mode M>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    fake_quant_segments_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                               T* __restrict__ out, const float* __restrict__ scale,
                               const float* __restrict__ zero_point, float* __restrict__ dscale,
                               float* __restrict__ dzero, int64_t outer, int64_t channels,
                               int64_t inner, float qmin, float qmax, float grad_factor,
                               int act) {
  const int64_t nvec = inner / VEC;
  const int64_t col = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t col_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row0 = blockIdx.z * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  const int64_t row_stride = static_cast<int64_t>(gridDim.z) * blockDim.y;
  // The channel loop bound depends on blockIdx only, so block_sum_add is reached by all.
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const float s = scale[c];
    const float z = rounded_zero_point(zero_point, c, qmin, qmax);
    float ds = 0.f, dz = 0.f;
    for (int64_t o = row0; o < outer; o += row_stride) {
      const int64_t base = (o * channels + c) * inner;
      for (int64_t v = col; v < nvec; v += col_stride)
        fake_quant_pack<T, VEC, 1, M>(x, dy, out, base + v * VEC, &s, &z, &ds, &dz, qmin, qmax,
                                      act);
      for (int64_t j = nvec * VEC + col; j < inner; j += col_stride)
        fake_quant_pack<T, 1, 1, M>(x, dy, out, base + j, &s, &z, &ds, &dz, qmin, qmax, act);
    }
    if constexpr (M == Mode::kGrads)
      block_sum_add(ds, dz, dscale + c, dzero + c, grad_factor, -grad_factor * s);
  }
}

// Columns: x is [rows, channels] (inner == 1). A tile holds blockDim.x * VEC adjacent
// channels, thread x owning VEC of them; tiles c0 = blockIdx.x * tile + k * gridDim.x * tile
// cover every channel once, and rows are split by (blockIdx.y, threadIdx.y) as in the
// segments kernel. VEC > 1 only when channels % VEC == 0, so a thread's VEC channels are
// all valid or all past the end, and every row start is aligned.
template <typename T, int VEC, Mode M>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    fake_quant_columns_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                              T* __restrict__ out, const float* __restrict__ scale,
                              const float* __restrict__ zero_point, float* __restrict__ dscale,
                              float* __restrict__ dzero, int64_t rows, int64_t channels,
                              float qmin, float qmax, float grad_factor, int act) {
  const int64_t tile = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t row0 = blockIdx.y * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t c0 = blockIdx.x * tile; c0 < channels; c0 += gridDim.x * tile) {
    const int64_t c = c0 + threadIdx.x * VEC;
    float s[VEC], z[VEC], ds[VEC], dz[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s[k] = c < channels ? scale[c + k] : 1.f;
      z[k] = c < channels ? rounded_zero_point(zero_point, c + k, qmin, qmax) : 0.f;
      ds[k] = dz[k] = 0.f;
    }
    if (c < channels)
      for (int64_t o = row0; o < rows; o += row_stride)
        fake_quant_pack<T, VEC, VEC, M>(x, dy, out, o * channels + c, s, z, ds, dz, qmin, qmax,
                                        act);
    if constexpr (M == Mode::kGrads) {
      // Partial sums laid out [threadIdx.y][column of the tile]: thread (tx, ty) lane k is
      // column tx * VEC + k, at ty * tile + tx * VEC + k.
      __shared__ float red[2][kThreads * VEC];
      const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        red[0][tid * VEC + k] = ds[k];
        red[1][tid * VEC + k] = dz[k];
      }
      __syncthreads();
      for (int64_t j = tid; j < tile && c0 + j < channels; j += kThreads) {
        float sum_s = 0.f, sum_z = 0.f;
        for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
          sum_s += red[0][y * tile + j];
          sum_z += red[1][y * tile + j];
        }
        atomicAdd(dscale + c0 + j, sum_s * grad_factor);
        atomicAdd(dzero + c0 + j, sum_z * -grad_factor * scale[c0 + j]);
      }
      __syncthreads();  // red is reused by the next tile
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

struct Args {
  const void* x;
  const void* dy;  // null in the forward
  void* out;       // y or dx
  const float* scale;
  const float* zero_point;
  float* dscale;  // null unless Mode::kGrads
  float* dzero;
  float qmin, qmax, grad_factor;
  int act;  // kNoAct, kReLU, kReLU6
};

// As many blocks as fit on the device at once (the loops stride over the rest); computed
// once per kernel, without synchronising.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  return static_cast<int64_t>(std::max(per_sm, 1)) *
         at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

template <typename T, int VEC, Mode M>
void launch_segments(const Args& a, int64_t outer, int64_t channels, int64_t inner,
                     cudaStream_t stream) {
  static const int64_t target_blocks = resident_blocks(fake_quant_segments_kernel<T, VEC, M>);
  const int64_t nvec = std::max<int64_t>(inner / VEC, 1);
  const int bx = pow2_at_least(nvec, kThreads), by = kThreads / bx;
  const int64_t gy = std::min(channels, kMaxGridYZ);
  const int64_t per_channel = std::max<int64_t>(target_blocks / gy, 1);
  const int64_t gx = std::min(ceil_div(nvec, bx), per_channel);
  const int64_t gz =
      std::min({ceil_div(outer, by), std::max<int64_t>(per_channel / gx, 1), kMaxGridYZ});
  fake_quant_segments_kernel<T, VEC, M>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)),
         dim3(bx, by), 0, stream>>>(
          static_cast<const T*>(a.x), static_cast<const T*>(a.dy), static_cast<T*>(a.out),
          a.scale, a.zero_point, a.dscale, a.dzero, outer, channels, inner, a.qmin, a.qmax,
          a.grad_factor, a.act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, Mode M>
void launch_columns(const Args& a, int64_t rows, int64_t channels, cudaStream_t stream) {
  static const int64_t target_blocks = resident_blocks(fake_quant_columns_kernel<T, VEC, M>);
  // Narrow tiles (a warp's worth of channels, wider only when there are few rows) make many
  // column blocks and few row blocks: atomics per channel = row blocks.
  const int bx = std::min(std::max(32, kThreads / pow2_at_least(rows, kThreads)),
                          pow2_at_least(ceil_div(channels, VEC), kThreads));
  const int by = kThreads / bx;
  const int64_t gx = std::min(ceil_div(channels, static_cast<int64_t>(bx) * VEC), target_blocks);
  const int64_t gy = std::clamp<int64_t>(target_blocks / gx, 1,
                                         std::min(ceil_div(rows, by), kMaxGridYZ));
  fake_quant_columns_kernel<T, VEC, M>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(bx, by), 0, stream>>>(
          static_cast<const T*>(a.x), static_cast<const T*>(a.dy), static_cast<T*>(a.out),
          a.scale, a.zero_point, a.dscale, a.dzero, rows, channels, a.qmin, a.qmax,
          a.grad_factor, a.act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, Mode M>
void launch(const Args& a, const FakeQuantGeometry& geo) {
  constexpr int kVec = 16 / sizeof(T);
  int64_t outer = geo.outer, channels = geo.channels, inner = geo.inner;
  if (channels == 1) {  // one scale for everything: a single segment
    inner = geo.numel();
    outer = 1;
  }
  const bool ptrs_aligned = aligned16(a.x) && aligned16(a.out) &&
                            (M == Mode::kForward || aligned16(a.dy));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (inner == 1) {
    if (ptrs_aligned && channels % kVec == 0)
      launch_columns<T, kVec, M>(a, outer, channels, stream);
    else
      launch_columns<T, 1, M>(a, outer, channels, stream);
  } else {
    if (ptrs_aligned && (inner % kVec == 0 || outer * channels == 1))
      launch_segments<T, kVec, M>(a, outer, channels, inner, stream);
    else
      launch_segments<T, 1, M>(a, outer, channels, inner, stream);
  }
}

template <Mode M>
void dispatch(at::ScalarType dtype, const Args& a, const FakeQuantGeometry& geo) {
  AT_DISPATCH_SWITCH(dtype, "synq_fake_quant_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch<scalar_t, M>(a, geo); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch<scalar_t, M>(a, geo); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch<scalar_t, M>(a, geo); }));
}

void check_inputs(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                  int64_t act) {
  TORCH_CHECK(act == kNoAct || act == kReLU || act == kReLU6,
              "synq fake_quant: act must be 0 (none), 1 (ReLU) or 2 (ReLU6), got ", act);
  TORCH_CHECK(x.is_cuda(), "synq fake_quant (cuda backend): x must be a CUDA tensor, got ",
              x.device());
  TORCH_CHECK(scale.device() == x.device() && zero_point.device() == x.device(),
              "synq fake_quant (cuda backend): scale (on ", scale.device(), ") and zero_point (on ",
              zero_point.device(), ") must be on x's device ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "synq fake_quant (cuda backend): x must be float32, float16 or bfloat16, got ", t);
}

// Quantization parameters as the kernels read them: float32, contiguous, on x's device.
at::Tensor as_float(const at::Tensor& p) { return p.to(at::kFloat).contiguous(); }

at::Tensor fake_quant_fwd_cuda(const at::Tensor& x_, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                               int64_t axis, int64_t act) {
  check_inputs(x_, scale, zero_point, act);
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto geo = fake_quant_geometry(x, scale, zero_point, axis);
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  auto s = as_float(scale), z = as_float(zero_point);
  const Args a{x.const_data_ptr(), nullptr, y.mutable_data_ptr(), s.const_data_ptr<float>(),
               z.const_data_ptr<float>(), nullptr, nullptr, static_cast<float>(qmin),
               static_cast<float>(qmax), 0.f, static_cast<int>(act)};
  dispatch<Mode::kForward>(x.scalar_type(), a, geo);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cuda(
    const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis, double grad_factor,
    bool qparam_grads, int64_t act) {
  check_inputs(x_, scale, zero_point, act);
  TORCH_CHECK(dy_.sizes() == x_.sizes(), "synq fake_quant backward: dy and x differ in shape");
  TORCH_CHECK(dy_.device() == x_.device(), "synq fake_quant backward: dy (on ", dy_.device(),
              ") must be on x's device ", x_.device());
  const c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  auto dy = dy_.to(x.scalar_type()).contiguous();
  auto geo = fake_quant_geometry(x, scale, zero_point, axis);
  auto dx = at::empty_like(x);
  // The kernels add into these (zeroed on the current stream, so graph capture works).
  auto opts = scale.options().dtype(at::kFloat);
  auto dscale = at::zeros(scale.sizes(), opts);
  auto dzero = at::zeros(zero_point.sizes(), opts);
  if (x.numel() == 0) return {dx, dscale, dzero};
  auto s = as_float(scale), z = as_float(zero_point);
  const Args a{x.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(),
               s.const_data_ptr<float>(), z.const_data_ptr<float>(),
               qparam_grads ? dscale.mutable_data_ptr<float>() : nullptr,
               qparam_grads ? dzero.mutable_data_ptr<float>() : nullptr,
               static_cast<float>(qmin), static_cast<float>(qmax),
               static_cast<float>(grad_factor), static_cast<int>(act)};
  if (qparam_grads)
    dispatch<Mode::kGrads>(x.scalar_type(), a, geo);
  else
    dispatch<Mode::kDx>(x.scalar_type(), a, geo);
  return {dx, dscale, dzero};
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CUDA, m) {
  m.impl("_fake_quant_fwd", &fake_quant_fwd_cuda);
  m.impl("_fake_quant_bwd", &fake_quant_bwd_cuda);
}

}  // namespace synq
