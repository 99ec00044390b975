// Fused fake quantization on the CPU: forward, and a backward that reads x and dy once and
// reduces the scale / zero-point gradients in the same pass. Optionally a ReLU or ReLU6 runs
// first, on each span while it is in cache (a quantized activation's act + fake-quant in
// one pass over memory, forward and backward).
//
// The inner loops work on float spans and are compiled twice (AVX2 and baseline x86-64,
// picked at load time) so GCC vectorizes the rounding, the division and the selects. Half and
// bfloat16 tensors go through the same float spans in small stack buffers.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "activation.h"
#include "fake_quant_geometry.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SYNQ_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define SYNQ_MULTIVERSION
#endif

namespace synq {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task
// Span length: half / bf16 conversion buffer, and the run of float partial sums before
// they are added into double accumulators.
constexpr int64_t kBuf = 512;

// Round half to even in the default rounding mode: adding and subtracting 2^23 leaves
// the nearest integer for |t| < 2^23 (above, every float is an integer already). Unlike a
// nearbyint call it vectorizes on every x86-64 target, not only with SSE4.1.
inline float round_half_even(float t) {
  const float big = 8388608.f;  // 2^23
  float a = std::fabs(t);
  float r = std::copysign((a + big) - big, t);  // computed unconditionally: a plain select
  return a < big ? r : t;
}

// The activation before the fake quantization (activation.h), into r.
SYNQ_MULTIVERSION void act_span(const float* x, float* r, int64_t n, int act) {
  if (act == kReLU) {
    for (int64_t i = 0; i < n; ++i) r[i] = activate<kReLU>(x[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) r[i] = activate<kReLU6>(x[i]);
}

// dx zeroed where the activation's gradient is 0, judged on its output r (activation.h).
// NaN entries get dx = 0 from the fake quantization whatever the mask says.
SYNQ_MULTIVERSION void act_grad_span(const float* r, float* d, int64_t n, int act) {
  if (act == kReLU) {
    for (int64_t i = 0; i < n; ++i) d[i] = act_grad<kReLU>(d[i], r[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) d[i] = act_grad<kReLU6>(d[i], r[i]);
}

// x's span with the activation applied (into buf), or x itself without one.
inline const float* activated(const float* x, float* buf, int64_t n, int act) {
  if (act == kNoAct) return x;
  act_span(x, buf, n, act);
  return buf;
}

// One channel's span: constant scale s and rounded zero point z.
SYNQ_MULTIVERSION void fwd_span(const float* x, float* y, int64_t n, float s, float z,
                                float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float q = round_half_even(x[i] / s) + z;
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    y[i] = (q - z) * s;
  }
}

// Channels along the last axis: scale and zero point vary per element of the row.
SYNQ_MULTIVERSION void fwd_row(const float* x, float* y, int64_t n, const float* s,
                               const float* z, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float q = round_half_even(x[i] / s[i]) + z[i];
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    y[i] = (q - z[i]) * s[i];
  }
}

SYNQ_MULTIVERSION void bwd_span_dx(const float* x, const float* dy, float* dx, int64_t n,
                                   float s, float z, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float q = round_half_even(x[i] / s) + z;
    dx[i] = (q >= qmin && q <= qmax) ? dy[i] : 0.f;
  }
}

SYNQ_MULTIVERSION void bwd_row_dx(const float* x, const float* dy, float* dx, int64_t n,
                                  const float* s, const float* z, float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float q = round_half_even(x[i] / s[i]) + z[i];
    dx[i] = (q >= qmin && q <= qmax) ? dy[i] : 0.f;
  }
}

// Sum of a span in 16 independent lanes: vectorizes without reassociating a float sum.
inline float lane_sum(const float* v, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += v[i + j];
  float total = 0.f;
  for (; i < n; ++i) total += v[i];
  for (int j = 0; j < 16; ++j) total += acc[j];
  return total;
}

// For a span of at most kBuf elements: dx, and through ds_out / dz_out the sums
// sum(dy * dq/ds) and sum(dy over clamped elements). The terms go through small stack
// arrays so that both loops vectorize.
SYNQ_MULTIVERSION void bwd_span(const float* x, const float* dy, float* dx, int64_t n, float s,
                                float z, float qmin, float qmax, float* ds_out,
                                float* dz_out) {
  float ts[kBuf], tz[kBuf];
  for (int64_t i = 0; i < n; ++i) {
    float t = x[i] / s;
    float r = round_half_even(t);
    float q = r + z;
    float g = dy[i];
    bool in = q >= qmin && q <= qmax;
    float qc = q < qmin ? qmin : (q > qmax ? qmax : q);
    dx[i] = in ? g : 0.f;
    ts[i] = g * (in ? (r - t) : (qc - z));
    tz[i] = in ? 0.f : g;
  }
  *ds_out = lane_sum(ts, n);
  *dz_out = lane_sum(tz, n);
}

SYNQ_MULTIVERSION void bwd_row(const float* x, const float* dy, float* dx, int64_t n,
                               const float* s, const float* z, float qmin, float qmax,
                               double* ds, double* dz) {
  for (int64_t i = 0; i < n; ++i) {
    float t = x[i] / s[i];
    float r = round_half_even(t);
    float q = r + z[i];
    float g = dy[i];
    bool in = q >= qmin && q <= qmax;
    float qc = q < qmin ? qmin : (q > qmax ? qmax : q);
    dx[i] = in ? g : 0.f;
    ds[i] += g * (in ? (r - t) : (qc - z[i]));
    dz[i] += in ? 0.f : g;
  }
}

// Load/store helpers that turn any supported dtype into float spans.
template <typename T>
struct FloatView {
  static const float* load(const T* p, float* buf, int64_t n) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
  static float* out(T*, float* buf) { return buf; }
  static void store(T* p, const float* buf, int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
};
template <>
struct FloatView<float> {
  static const float* load(const float* p, float*, int64_t) { return p; }
  static float* out(float* p, float*) { return p; }
  static void store(float*, const float*, int64_t) {}
};

struct QParams {
  std::vector<float> s, z;
  float qmin, qmax;
};

QParams qparams(const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                int64_t qmax) {
  QParams p;
  auto sc = scale.to(at::kFloat).contiguous();
  auto zc = zero_point.to(at::kFloat).contiguous();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.data_ptr<float>();
  p.qmin = static_cast<float>(qmin);
  p.qmax = static_cast<float>(qmax);
  p.s.assign(sp, sp + sc.numel());
  p.z.resize(zc.numel());
  for (int64_t i = 0; i < zc.numel(); ++i) {
    float z = std::nearbyint(zp[i]);
    p.z[i] = z < p.qmin ? p.qmin : (z > p.qmax ? p.qmax : z);
  }
  return p;
}

template <typename T>
void forward_impl(const T* x, T* y, const FakeQuantGeometry& g, const QParams& p, int act) {
  const int64_t n = g.numel();
  if (g.inner == 1 && g.channels > 1) {
    const int64_t C = g.channels;
    at::parallel_for(0, g.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      float bx[kBuf], by[kBuf], ba[kBuf];
      for (int64_t o = b; o < e; ++o)
        for (int64_t c0 = 0; c0 < C; c0 += kBuf) {
          int64_t m = std::min(kBuf, C - c0);
          const T* xs = x + o * C + c0;
          T* ys = y + o * C + c0;
          float* yo = FloatView<T>::out(ys, by);
          fwd_row(activated(FloatView<T>::load(xs, bx, m), ba, m, act), yo, m, &p.s[c0],
                  &p.z[c0], p.qmin, p.qmax);
          FloatView<T>::store(ys, yo, m);
        }
    });
    return;
  }
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    float bx[kBuf], by[kBuf], ba[kBuf];
    for (int64_t i = b; i < e;) {
      int64_t seg = i / g.inner;
      int64_t c = seg % g.channels;
      int64_t end = std::min(e, (seg + 1) * g.inner);
      for (int64_t m; i < end; i += m) {
        m = std::min(kBuf, end - i);
        float* yo = FloatView<T>::out(y + i, by);
        fwd_span(activated(FloatView<T>::load(x + i, bx, m), ba, m, act), yo, m, p.s[c], p.z[c],
                 p.qmin, p.qmax);
        FloatView<T>::store(y + i, yo, m);
      }
    }
  });
}

// Fixed chunking (independent of the thread count) keeps the reduction order, and so the
// gradients, reproducible run to run.
template <typename T>
void backward_impl(const T* dy, const T* x, T* dx, const FakeQuantGeometry& g, const QParams& p,
                   bool qparam_grads, int act, double* ds_total, double* dz_total) {
  const int64_t n = g.numel();
  const int64_t C = g.channels;
  if (!qparam_grads) {
    if (g.inner == 1 && C > 1) {
      at::parallel_for(0, g.outer, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
        float bx[kBuf], bg[kBuf], bd[kBuf], ba[kBuf];
        for (int64_t o = b; o < e; ++o)
          for (int64_t c0 = 0; c0 < C; c0 += kBuf) {
            int64_t m = std::min(kBuf, C - c0);
            const int64_t off = o * C + c0;
            float* d = FloatView<T>::out(dx + off, bd);
            const float* r = activated(FloatView<T>::load(x + off, bx, m), ba, m, act);
            bwd_row_dx(r, FloatView<T>::load(dy + off, bg, m), d, m, &p.s[c0], &p.z[c0],
                       p.qmin, p.qmax);
            if (act != kNoAct) act_grad_span(r, d, m, act);
            FloatView<T>::store(dx + off, d, m);
          }
      });
      return;
    }
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      float bx[kBuf], bg[kBuf], bd[kBuf], ba[kBuf];
      for (int64_t i = b; i < e;) {
        int64_t seg = i / g.inner;
        int64_t c = seg % C;
        int64_t end = std::min(e, (seg + 1) * g.inner);
        for (int64_t m; i < end; i += m) {
          m = std::min(kBuf, end - i);
          float* d = FloatView<T>::out(dx + i, bd);
          const float* r = activated(FloatView<T>::load(x + i, bx, m), ba, m, act);
          bwd_span_dx(r, FloatView<T>::load(dy + i, bg, m), d, m, p.s[c], p.z[c], p.qmin,
                      p.qmax);
          if (act != kNoAct) act_grad_span(r, d, m, act);
          FloatView<T>::store(dx + i, d, m);
        }
      }
    });
    return;
  }
  const bool rows = g.inner == 1 && C > 1;
  const int64_t units = rows ? g.outer : n;            // rows, or elements
  const int64_t unit_size = rows ? C : 1;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(
      64, (units * unit_size + kGrain - 1) / kGrain));
  chunks = std::min(chunks, units);
  std::vector<double> ds(chunks * C, 0.0), dz(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    float bx[kBuf], bg[kBuf], bd[kBuf], ba[kBuf];
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t b = units * k / chunks, e = units * (k + 1) / chunks;
      double* dsk = &ds[k * C];
      double* dzk = &dz[k * C];
      if (rows) {
        for (int64_t o = b; o < e; ++o)
          for (int64_t c0 = 0; c0 < C; c0 += kBuf) {
            int64_t m = std::min(kBuf, C - c0);
            const int64_t off = o * C + c0;
            float* d = FloatView<T>::out(dx + off, bd);
            const float* r = activated(FloatView<T>::load(x + off, bx, m), ba, m, act);
            bwd_row(r, FloatView<T>::load(dy + off, bg, m), d, m, &p.s[c0], &p.z[c0], p.qmin,
                    p.qmax, dsk + c0, dzk + c0);
            if (act != kNoAct) act_grad_span(r, d, m, act);
            FloatView<T>::store(dx + off, d, m);
          }
        continue;
      }
      for (int64_t i = b; i < e;) {
        int64_t seg = i / g.inner;
        int64_t c = seg % C;
        int64_t end = std::min(e, (seg + 1) * g.inner);
        for (int64_t m; i < end; i += m) {
          m = std::min(kBuf, end - i);
          float s_part, z_part;
          float* d = FloatView<T>::out(dx + i, bd);
          const float* r = activated(FloatView<T>::load(x + i, bx, m), ba, m, act);
          bwd_span(r, FloatView<T>::load(dy + i, bg, m), d, m, p.s[c], p.z[c], p.qmin, p.qmax,
                   &s_part, &z_part);
          if (act != kNoAct) act_grad_span(r, d, m, act);
          FloatView<T>::store(dx + i, d, m);
          dsk[c] += s_part;
          dzk[c] += z_part;
        }
      }
    }
  });
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t c = 0; c < C; ++c) {
      ds_total[c] += ds[k * C + c];
      dz_total[c] += dz[k * C + c];
    }
}

void check_inputs(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                  int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && scale.device().is_cpu() && zero_point.device().is_cpu(),
              "synq fake_quant (cpu backend): all tensors must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "synq fake_quant: x must be floating point");
  check_act(act, "synq fake_quant: ");
}

at::Tensor fake_quant_fwd_cpu(const at::Tensor& x_, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                              int64_t axis, int64_t act) {
  check_inputs(x_, scale, zero_point, act);
  auto x = x_.contiguous();
  auto g = fake_quant_geometry(x, scale, zero_point, axis);
  auto y = at::empty_like(x);
  if (x.numel() == 0) return y;
  auto p = qparams(scale, zero_point, qmin, qmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_fwd", [&] {
    forward_impl<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, p,
                           static_cast<int>(act));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_bwd_cpu(
    const at::Tensor& dy_, const at::Tensor& x_, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis, double grad_factor,
    bool qparam_grads, int64_t act) {
  check_inputs(x_, scale, zero_point, act);
  TORCH_CHECK(dy_.sizes() == x_.sizes(), "synq fake_quant backward: dy and x differ in shape");
  auto x = x_.contiguous();
  auto dy = dy_.to(x.scalar_type()).contiguous();
  auto g = fake_quant_geometry(x, scale, zero_point, axis);
  auto dx = at::empty_like(x);
  auto opts = scale.options().dtype(at::kFloat);
  auto dscale = at::zeros(scale.sizes(), opts);
  auto dzero = at::zeros(zero_point.sizes(), opts);
  if (x.numel() == 0) return {dx, dscale, dzero};
  auto p = qparams(scale, zero_point, qmin, qmax);
  std::vector<double> ds(g.channels, 0.0), dz(g.channels, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_bwd", [&] {
    backward_impl<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), g, p, qparam_grads,
                            static_cast<int>(act), ds.data(), dz.data());
  });
  if (qparam_grads) {
    float* dsp = dscale.mutable_data_ptr<float>();
    float* dzp = dzero.mutable_data_ptr<float>();
    for (int64_t c = 0; c < g.channels; ++c) {
      dsp[c] = static_cast<float>(grad_factor * ds[c]);
      dzp[c] = static_cast<float>(-grad_factor * p.s[c] * dz[c]);
    }
  }
  return {dx, dscale, dzero};
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) {
  m.impl("_fake_quant_fwd", &fake_quant_fwd_cpu);
  m.impl("_fake_quant_bwd", &fake_quant_bwd_cpu);
}

}  // namespace synq
