// 2-D max pooling of int8 tensors on the CPU (synq_kernels.max_pool2d_int8): an exported
// ResNet's max-pool on its int8 activations. PyTorch's CPU max-pool refuses int8 inputs of
// more than 127 positions, and the float round trip synq.deploy took before (int8 -> float32,
// max_pool2d_with_indices, -> int8) cost 143 ms of an exported ResNet-18's 316 ms at batch 32
// on one thread of this project's CPU.
//
// The geometry (output size, ceil_mode, padding at most half the kernel) is resolved in
// Python (synq_kernels/reference/pool.py) and checked here only for what memory safety
// needs. Padding never wins (PyTorch pads with -inf): each window takes the maximum over its
// positions inside the input, and PyTorch's rules give every window at least one.
// - Channel stride 1 in and out (channels-last): one output pixel at a time, 32 channels per
//   AVX2 register, the window's positions loaded and max-ed in registers.
// - Otherwise (NCHW, strided views): one channel plane at a time, scalar.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SYNQ_POOL_X86 1
#include <immintrin.h>
#else
#define SYNQ_POOL_X86 0
#endif

namespace synq {
namespace {

const char* kWho = "synq max_pool2d_int8 (cpu backend): ";

struct Pool {
  int64_t B, C, H, W, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t sxb, sxc, sxh, sxw;  // input strides
  int64_t sob, soc, soh, sow;  // output strides
};

// The window's first and one-past-last tap index along one axis whose position
// o * s - p + k * d lies in [0, n).
inline void taps(int64_t o, int64_t s, int64_t p, int64_t d, int64_t k, int64_t n,
                 int64_t* k0, int64_t* k1) {
  const int64_t start = o * s - p;
  int64_t a = 0;
  while (a < k && start + a * d < 0) ++a;
  int64_t b = k;
  while (b > a && start + (b - 1) * d >= n) --b;
  *k0 = a;
  *k1 = b;
}

// The maximum over one window of one channel (xc: that channel of the image).
inline int8_t window_max(const Pool& g, const int8_t* xc, int64_t oy, int64_t ox, int64_t ky0,
                         int64_t ky1, int64_t kx0, int64_t kx1) {
  int8_t m = -128;
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const int8_t* row = xc + (oy * g.sh - g.ph + ky * g.dh) * g.sxh;
    for (int64_t kx = kx0; kx < kx1; ++kx)
      m = std::max(m, row[(ox * g.sw - g.pw + kx * g.dw) * g.sxw]);
  }
  return m;
}

#if SYNQ_POOL_X86
// Whole 32-channel groups of one output pixel (channel strides 1); returns the first channel
// left for the scalar code.
__attribute__((target("avx2"))) int64_t pixel_avx2(const Pool& g, const int8_t* xb,
                                                   int8_t* op, int64_t oy, int64_t ox,
                                                   int64_t ky0, int64_t ky1, int64_t kx0,
                                                   int64_t kx1) {
  const int8_t* base = xb + (oy * g.sh - g.ph) * g.sxh + (ox * g.sw - g.pw) * g.sxw;
  int64_t c = 0;
  for (; c + 32 <= g.C; c += 32) {
    __m256i m = _mm256_set1_epi8(-128);
    for (int64_t ky = ky0; ky < ky1; ++ky) {
      const int8_t* row = base + ky * g.dh * g.sxh + c;
      for (int64_t kx = kx0; kx < kx1; ++kx)
        m = _mm256_max_epi8(
            m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + kx * g.dw * g.sxw)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + c), m);
  }
  return c;
}
#endif

// Output rows r0 .. r1 (a row: one image b and one output row oy), pixel by pixel.
void rows_pixels(const Pool& g, const int8_t* x, int8_t* out, int64_t r0, int64_t r1,
                 bool vec) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / g.OH, oy = r % g.OH;
    int64_t ky0, ky1;
    taps(oy, g.sh, g.ph, g.dh, g.kh, g.H, &ky0, &ky1);
    const int8_t* xb = x + b * g.sxb;
    for (int64_t ox = 0; ox < g.OW; ++ox) {
      int64_t kx0, kx1;
      taps(ox, g.sw, g.pw, g.dw, g.kw, g.W, &kx0, &kx1);
      int8_t* op = out + b * g.sob + oy * g.soh + ox * g.sow;
      int64_t c0 = 0;
#if SYNQ_POOL_X86
      if (vec) c0 = pixel_avx2(g, xb, op, oy, ox, ky0, ky1, kx0, kx1);
#else
      (void)vec;
#endif
      for (int64_t c = c0; c < g.C; ++c)
        op[c * g.soc] = window_max(g, xb + c * g.sxc, oy, ox, ky0, ky1, kx0, kx1);
    }
  }
}

at::Tensor max_pool2d_int8_cpu(const at::Tensor& x, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, at::IntArrayRef out_size) {
  TORCH_CHECK(x.scalar_type() == at::kChar && x.dim() == 4, kWho,
              "x must be an int8 (B, C, H, W) tensor, got ", x.scalar_type(), " ", x.sizes());
  for (auto a : {kernel, stride, padding, dilation, out_size})
    TORCH_CHECK(a.size() == 2, kWho, "kernel, stride, padding, dilation and output size "
                "must have two values each");
  TORCH_CHECK(std::min({kernel[0], kernel[1], stride[0], stride[1], dilation[0], dilation[1],
                        out_size[0], out_size[1]}) >= 1 &&
                  std::min(padding[0], padding[1]) >= 0,
              kWho, "kernel, stride, dilation and output size must be positive, padding "
              "non-negative");
  Pool g;
  g.B = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.OH = out_size[0], g.OW = out_size[1];
  g.kh = kernel[0], g.kw = kernel[1], g.sh = stride[0], g.sw = stride[1];
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  // every window must start inside the input or its padding, and end past its start
  TORCH_CHECK((g.OH - 1) * g.sh - g.ph < g.H && (g.OW - 1) * g.sw - g.pw < g.W &&
                  g.ph < g.kh && g.pw < g.kw,
              kWho, "output size ", out_size, " and padding ", padding, " leave windows "
              "outside an input of ", g.H, "x", g.W);
  // the output's layout: channels-last for a channels-last input that is not also plain
  // contiguous (synq_kernels.reference.int_gemm.conv_memory_format)
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  auto out = at::empty({g.B, g.C, g.OH, g.OW}, x.options(),
                       cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  g.sxb = x.stride(0), g.sxc = x.stride(1), g.sxh = x.stride(2), g.sxw = x.stride(3);
  g.sob = out.stride(0), g.soc = out.stride(1), g.soh = out.stride(2), g.sow = out.stride(3);
  const int8_t* xp = x.const_data_ptr<int8_t>();
  int8_t* op = out.mutable_data_ptr<int8_t>();
  const int64_t window = g.kh * g.kw;
  // units per task: about 32K window reads
  auto grain = [](int64_t cost) {
    return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, cost));
  };
  if (g.sxc == 1 && g.soc == 1 && g.C > 1) {  // channels-last
    const bool vec = cpu_use_avx2() && g.C >= 32;
    at::parallel_for(0, g.B * g.OH, grain(g.OW * g.C * window), [&](int64_t r0, int64_t r1) {
      rows_pixels(g, xp, op, r0, r1, vec);
    });
    return out;
  }
  // one (b, c) plane at a time
  at::parallel_for(0, g.B * g.C, grain(g.OH * g.OW * window), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / g.C, c = p % g.C;
      const int8_t* xb = xp + b * g.sxb + c * g.sxc;
      int8_t* ob = op + b * g.sob + c * g.soc;
      for (int64_t oy = 0; oy < g.OH; ++oy) {
        int64_t ky0, ky1;
        taps(oy, g.sh, g.ph, g.dh, g.kh, g.H, &ky0, &ky1);
        for (int64_t ox = 0; ox < g.OW; ++ox) {
          int64_t kx0, kx1;
          taps(ox, g.sw, g.pw, g.dw, g.kw, g.W, &kx0, &kx1);
          ob[oy * g.soh + ox * g.sow] = window_max(g, xb, oy, ox, ky0, ky1, kx0, kx1);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) { m.impl("_max_pool2d_int8", &max_pool2d_int8_cpu); }

}  // namespace synq
