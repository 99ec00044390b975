// Dynamic 8-bit quantization on the CPU (synq.deploy._quantize_dynamic), per tensor or per
// row of a matrix (a linear layer's input), in two passes over x instead of the PyTorch ops
// of the Python path (the range, then div / round / add / clamp / to int8, each a dispatch and
// a pass; per row about 18 ops, which cost more than the linear layer at batch 1). Every
// step is the same float32 operation as there, so the results are the same bits:
//   lo = min(min(x), 0), hi = max(max(x), 0)
//   scale = max((hi - lo) / 255, eps)
//   zero = clamp(round(-lo / scale), 0, 255) - 128               (int8 domain)
//   q = clamp(round(x / scale) + zero, -128, 127)                 (round half to even)
// A tensor (or, per row, a row) holding NaN or +-inf takes the ATen ops of the Python path:
// an infinite end makes the scale or the zero point inf or NaN, and float -> int8 of NaN is
// not defined the same way by every path (ATen gives 0, a vector clamp -128).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SYNQ_QUANTIZE_X86 1
#include <immintrin.h>
#else
#define SYNQ_QUANTIZE_X86 0
#endif

namespace synq {
namespace {

struct Range {
  float lo, hi;
  bool nan;
  // whether the vector steps give the ATen ops' bits: no NaN, no infinite end
  bool finite() const { return !nan && std::isfinite(lo) && std::isfinite(hi); }
};

Range range_scalar(const float* x, int64_t n) {
  Range r{std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
          false};
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (std::isnan(v)) r.nan = true;
    r.lo = v < r.lo ? v : r.lo;
    r.hi = v > r.hi ? v : r.hi;
  }
  return r;
}

void quantize_scalar(const float* x, int64_t n, float scale, float zero, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    float t = std::nearbyint(x[i] / scale) + zero;
    t = std::min(std::max(t, -128.f), 127.f);
    q[i] = static_cast<int8_t>(t);
  }
}

#if SYNQ_QUANTIZE_X86
__attribute__((target("avx2"))) Range range_avx2(const float* x, int64_t n) {
  __m256 lo = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 hi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
  }
  alignas(32) float l[8], h[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(h, hi);
  Range r = range_scalar(x + i, n - i);
  r.nan = r.nan || _mm256_movemask_ps(nan) != 0;
  for (int k = 0; k < 8; ++k) {
    r.lo = std::min(r.lo, l[k]);
    r.hi = std::max(r.hi, h[k]);
  }
  return r;
}

__attribute__((target("avx2"))) void quantize_avx2(const float* x, int64_t n, float scale,
                                                   float zero, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
  const __m256 lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 t = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), s),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(t, z), lo), hi);
    const __m256i v = _mm256_cvtps_epi32(t);  // integer-valued: exact
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(w, w));
  }
  quantize_scalar(x + i, n - i, scale, zero, q + i);
}
#endif

Range range_of(const float* x, int64_t n) {
#if SYNQ_QUANTIZE_X86
  if (cpu_use_avx2()) return range_avx2(x, n);
#endif
  return range_scalar(x, n);
}

void quantize_span(const float* x, int64_t n, float scale, float zero, int8_t* q) {
#if SYNQ_QUANTIZE_X86
  if (cpu_use_avx2()) return quantize_avx2(x, n, scale, zero, q);
#endif
  quantize_scalar(x, n, scale, zero, q);
}

// The grid of a range (no NaN): scale and zero point (int8 domain, integer-valued).
struct Grid {
  float scale, zero;
};

Grid grid_of(const Range& r, double eps) {
  const float lo = std::min(r.lo, 0.f), hi = std::max(r.hi, 0.f);
  const float scale = std::max((hi - lo) / 255.0f, static_cast<float>(eps));
  return {scale, std::min(std::max(std::nearbyint(-lo / scale), 0.f), 255.f) - 128.f};
}

// The Python path's ATen ops, as they are, from x's range (lo, hi: keepdim-reduced): for
// inputs holding NaN or +-inf.
std::tuple<at::Tensor, at::Tensor, at::Tensor> aten_path(const at::Tensor& x, at::Tensor lo,
                                                         at::Tensor hi, double eps) {
  lo = lo.clamp_max(0.0);
  hi = hi.clamp_min(0.0);
  const auto scale = at::div(at::sub(hi, lo), 255.0).clamp_min(eps);
  const auto zero = at::sub(at::round(at::div(at::neg(lo), scale)).clamp_(0, 255), 128.0);
  auto t = at::div(x, scale);
  t.round_().add_(zero).clamp_(-128, 127);
  return {t.to(at::kChar), scale, zero.to(at::kInt)};
}

// x float32; returns (q int8 with x's sizes and memory layout, scale float32 and zero int32,
// both of shape (1,) * x.dim()).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_dynamic_cpu(const at::Tensor& x_,
                                                                     double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.numel() > 0,
              "synq quantize_dynamic (cpu backend): x must be a non-empty float32 tensor, got ",
              x_.scalar_type(), " ", x_.sizes());
  const auto x = x_.is_non_overlapping_and_dense() ? x_ : x_.contiguous();
  const std::vector<int64_t> one(x.dim(), 1);
  const int64_t n = x.numel();
  const float* xp = x.const_data_ptr<float>();
  // pass 1: the range (per thread chunk, then combined)
  const int64_t grain = 1 << 16;
  const int64_t chunks = (n + grain - 1) / grain;
  std::vector<Range> parts(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      parts[c] = range_of(xp + c * grain, std::min(grain, n - c * grain));
  });
  Range r = parts[0];
  for (int64_t c = 1; c < chunks; ++c) {
    r.nan = r.nan || parts[c].nan;
    r.lo = std::min(r.lo, parts[c].lo);
    r.hi = std::max(r.hi, parts[c].hi);
  }
  if (!r.finite()) {
    const auto mm = at::aminmax(x);
    return aten_path(x, std::get<0>(mm).reshape(one), std::get<1>(mm).reshape(one), eps);
  }
  const Grid gr = grid_of(r, eps);
  const float scale = gr.scale, zero = gr.zero;
  auto q = at::empty_like(x, x.options().dtype(at::kChar));  // x's layout (dense)
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      quantize_span(xp + c * grain, std::min(grain, n - c * grain), scale, zero,
                    qp + c * grain);
  });
  return {q, at::full(one, scale, x.options()),
          at::full(one, static_cast<int32_t>(zero), x.options().dtype(at::kInt))};
}

// x (M, K) float32 (any strides); each row on its own grid. Returns (q (M, K) int8
// contiguous, scale (M, 1) float32, zero (M, 1) int32): the Python path's keepdim shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_dynamic_rows_cpu(const at::Tensor& x_,
                                                                          double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.dim() == 2 && x_.numel() > 0,
              "synq quantize_dynamic_rows (cpu backend): x must be a non-empty 2-D float32 "
              "tensor, got ", x_.scalar_type(), " ", x_.sizes());
  const auto x = x_.stride(1) == 1 ? x_ : x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), ldx = x.stride(0);
  const float* xp = x.const_data_ptr<float>();
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M, 1}, x.options());
  auto zero = at::empty({M, 1}, x.options().dtype(at::kInt));
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  int32_t* zp = zero.mutable_data_ptr<int32_t>();
  std::vector<uint8_t> odd(M, 0);  // rows with NaN or +-inf
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const Range r = range_of(xp + m * ldx, K);
      if (!r.finite()) {
        odd[m] = 1;
        continue;
      }
      const Grid g = grid_of(r, eps);
      quantize_span(xp + m * ldx, K, g.scale, g.zero, qp + m * K);
      sp[m] = g.scale;
      zp[m] = static_cast<int32_t>(g.zero);
    }
  });
  if (std::find(odd.begin(), odd.end(), 1) != odd.end()) {
    auto [t, s, z] = aten_path(x, at::amin(x, {1}, true), at::amax(x, {1}, true), eps);
    return {t.contiguous(), s, z};
  }
  return {q, scale, zero};
}

// Static quantization on a given grid (synq.deploy._quantize_static), optionally after a
// per-channel affine map and an activation:
//   q = clamp(round(f(x * mul[c] + add[c]) / scale) + zero, lo, hi) as int8
// with the affine map skipped when no mul / add is given (an eval-mode BatchNorm that no conv
// could take: DenseNet's) and f the identity, Hardswish (x * clamp(x + 3, 0, 6) / 6) or ReLU.
// Each step is the float32 operation of the ATen ops (a multiply, then an add, never fused;
// F.hardswish's steps and order; max(x, 0) keeping NaN as torch.relu does): the same bits.
// One pass where the ATen ops make five to eight. NaN (also from inf + -inf with an infinite
// zero) gives 0, as ATen's float -> int8 conversion does; +-inf clamp to the ends; the
// conversion truncates, as ATen's does, for a fractional zero.
enum Act : int64_t { kNone = 0, kHardswish = 1, kRelu = 2 };

struct StaticGrid {
  float scale, zero, lo, hi;
  int64_t act;
};

inline float hardswish(float v) { return v * std::min(std::max(v + 3.f, 0.f), 6.f) / 6.f; }

// x[i] for i < n; mul / add: nullptr (no affine map), one value each (per_elem false: a
// plane of one channel) or n values (per_elem true: a row of channels, channels-last).
void quantize_static_scalar(const float* x, int64_t n, const float* mul, const float* add,
                            bool per_elem, const StaticGrid& g, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i];
    if (mul != nullptr) {
      const float m = mul[per_elem ? i : 0], a = add[per_elem ? i : 0];
      volatile float prod = v * m;  // rounded on its own, as ATen's mul (no fused multiply-add)
      v = prod + a;
    }
    if (g.act == kHardswish) v = hardswish(v);
    else if (g.act == kRelu) v = v < 0.f ? 0.f : v;  // NaN stays NaN
    const float t = std::nearbyint(v / g.scale) + g.zero;
    q[i] = std::isnan(t) ? 0 : static_cast<int8_t>(std::min(std::max(t, g.lo), g.hi));
  }
}

#if SYNQ_QUANTIZE_X86
__attribute__((target("avx2"))) void quantize_static_avx2(const float* x, int64_t n,
                                                          const float* mul, const float* add,
                                                          bool per_elem, const StaticGrid& g,
                                                          int8_t* q) {
  const __m256 s = _mm256_set1_ps(g.scale), z = _mm256_set1_ps(g.zero);
  const __m256 vlo = _mm256_set1_ps(g.lo), vhi = _mm256_set1_ps(g.hi);
  const __m256 three = _mm256_set1_ps(3.f), six = _mm256_set1_ps(6.f);
  const __m256 zero_v = _mm256_setzero_ps();
  const bool affine = mul != nullptr;
  const __m256 m1 = affine ? _mm256_set1_ps(mul[0]) : zero_v;
  const __m256 a1 = affine ? _mm256_set1_ps(add[0]) : zero_v;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (affine)  // (no FMA: this function's target has none)
      v = _mm256_add_ps(_mm256_mul_ps(v, per_elem ? _mm256_loadu_ps(mul + i) : m1),
                        per_elem ? _mm256_loadu_ps(add + i) : a1);
    if (g.act == kHardswish)  // a NaN sum meets max's second operand (0): v * 0 is NaN again
      v = _mm256_div_ps(
          _mm256_mul_ps(v, _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, three), zero_v), six)),
          six);
    else if (g.act == kRelu)
      v = _mm256_max_ps(zero_v, v);  // max_ps returns its second operand for NaN: NaN stays
    __m256 t = _mm256_round_ps(_mm256_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t = _mm256_add_ps(t, z);
    const __m256 nan = _mm256_cmp_ps(t, t, _CMP_UNORD_Q);  // (inf + -inf too)
    t = _mm256_andnot_ps(nan, _mm256_min_ps(_mm256_max_ps(t, vlo), vhi));
    const __m256i w = _mm256_cvttps_epi32(t);  // truncating, as float -> int8 (a zero may
                                               // be fractional)
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(h, h));
  }
  quantize_static_scalar(x + i, n - i, affine ? mul + (per_elem ? i : 0) : nullptr,
                         affine ? add + (per_elem ? i : 0) : nullptr, per_elem, g, q + i);
}
#endif

void quantize_static_span(const float* x, int64_t n, const float* mul, const float* add,
                          bool per_elem, const StaticGrid& g, int8_t* q) {
#if SYNQ_QUANTIZE_X86
  if (cpu_use_avx2()) return quantize_static_avx2(x, n, mul, add, per_elem, g, q);
#endif
  quantize_static_scalar(x, n, mul, add, per_elem, g, q);
}

float one_value(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(),
              "synq quantize_static (cpu backend): ", what, " must be one CPU value, got ",
              t.sizes(), " on ", t.device());
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>()[0];
  if (t.scalar_type() == at::kInt) return static_cast<float>(t.const_data_ptr<int32_t>()[0]);
  return t.to(at::kFloat).item<float>();
}

// x float32 (dense layouts kept); scale, zero: one value each (zero in the int8 domain);
// -128 <= lo <= hi <= 127; act: 0 none, 1 Hardswish, 2 ReLU; mul, add: both or neither,
// float32 (C,) for x's dim 1 (C), applied first. Returns int8 like x.
at::Tensor quantize_static_cpu(const at::Tensor& x_, const at::Tensor& scale_,
                               const at::Tensor& zero_, int64_t lo, int64_t hi, int64_t act,
                               const std::optional<at::Tensor>& mul_,
                               const std::optional<at::Tensor>& add_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat,
              "synq quantize_static (cpu backend): x must be float32, got ", x_.scalar_type());
  TORCH_CHECK(-128 <= lo && lo <= hi && hi <= 127,
              "synq quantize_static: need -128 <= lo <= hi <= 127, got ", lo, ", ", hi);
  TORCH_CHECK(act == kNone || act == kHardswish || act == kRelu,
              "synq quantize_static: act must be 0 (none), 1 (Hardswish) or 2 (ReLU), got ", act);
  TORCH_CHECK(mul_.has_value() == add_.has_value(),
              "synq quantize_static: give mul and add together, or neither");
  const bool affine = mul_.has_value();
  at::Tensor mul, add;
  if (affine) {
    TORCH_CHECK(x_.dim() >= 2, "synq quantize_static: a per-channel mul / add needs x with a "
                "channel dim (dim 1), got x of shape ", x_.sizes());
    const int64_t C = x_.size(1);
    for (const auto* t : {&*mul_, &*add_})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == C &&
                      t->device().is_cpu(),
                  "synq quantize_static: mul and add must be float32 CPU tensors of shape (",
                  C, ",) (x's channels), got ", t->scalar_type(), " ", t->sizes());
    mul = mul_->contiguous();
    add = add_->contiguous();
  }
  const StaticGrid g{one_value(scale_, "scale"), one_value(zero_, "zero"),
                     static_cast<float>(lo), static_cast<float>(hi), act};
  // a non-dense x (a channel slice) in its suggested layout, as empty_like and ATen give it
  auto x = x_.is_non_overlapping_and_dense() ? x_ : x_.contiguous(x_.suggest_memory_format());
  // with the affine map the kernel walks planes of one channel (contiguous) or rows of
  // channels (channels-last, or (N, C)); any other layout is computed contiguous and copied
  // into x's layout
  bool rows = false;
  at::Tensor like;  // the result's layout, where x had to be made contiguous
  if (affine) {
    if (x.is_contiguous()) {
      rows = x.dim() == 2;
    } else if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      rows = true;
    } else {
      like = x;
      x = x.contiguous();
      rows = x.dim() == 2;
    }
  }
  auto q = at::empty_like(x, x.options().dtype(at::kChar));
  const int64_t n = x.numel();
  if (n == 0) return q;
  const float* xp = x.const_data_ptr<float>();
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  if (!affine) {
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      quantize_static_span(xp + b, e - b, nullptr, nullptr, false, g, qp + b);
    });
    return q;
  }
  const float* mp = mul.const_data_ptr<float>();
  const float* ap = add.const_data_ptr<float>();
  const int64_t C = x.size(1);
  if (rows) {
    const int64_t rows_n = n / C;
    at::parallel_for(0, rows_n, std::max<int64_t>(1, (1 << 16) / C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        quantize_static_span(xp + r * C, C, mp, ap, true, g, qp + r * C);
    });
  } else {  // planes of one channel, `plane` elements each
    const int64_t plane = n / (x.size(0) * C);
    at::parallel_for(0, n / plane, std::max<int64_t>(1, (1 << 16) / plane),
                     [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p)
        quantize_static_span(xp + p * plane, plane, mp + p % C, ap + p % C, false, g,
                             qp + p * plane);
    });
  }
  if (like.defined()) return at::empty_like(like, q.options()).copy_(q);
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(synq, CPU, m) {
  m.impl("_quantize_dynamic", &quantize_dynamic_cpu);
  m.impl("_quantize_dynamic_rows", &quantize_dynamic_rows_cpu);
  m.impl("_quantize_static", &quantize_static_cpu);
}

}  // namespace synq
