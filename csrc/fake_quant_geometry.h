// Shape bookkeeping shared by the CPU and CUDA fake-quant kernels: a contiguous tensor is
// seen as [outer, channels, inner], the quantization parameters indexed by channel.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace synq {

struct FakeQuantGeometry {
  int64_t outer = 1, channels = 1, inner = 1;
  int64_t numel() const { return outer * channels * inner; }
};

inline FakeQuantGeometry fake_quant_geometry(const at::Tensor& x, const at::Tensor& scale,
                                             const at::Tensor& zero_point, int64_t axis) {
  TORCH_CHECK(axis >= -1 && axis < x.dim(), "synq fake_quant: axis ", axis,
              " out of range for a tensor of ", x.dim(), " dims");
  FakeQuantGeometry g;
  if (axis < 0) {
    g.inner = x.numel();
    TORCH_CHECK(scale.numel() == 1 && zero_point.numel() == 1,
                "synq fake_quant: per-tensor scale and zero_point must hold one element");
    return g;
  }
  g.channels = x.size(axis);
  for (int64_t d = 0; d < axis; ++d) g.outer *= x.size(d);
  for (int64_t d = axis + 1; d < x.dim(); ++d) g.inner *= x.size(d);
  TORCH_CHECK(scale.numel() == g.channels && zero_point.numel() == g.channels,
              "synq fake_quant: scale and zero_point must hold x.size(axis) = ", g.channels,
              " elements");
  return g;
}

}  // namespace synq
