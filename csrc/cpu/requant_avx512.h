// The epilogue arithmetic of the CPU convs on AVX-512, in the float32 order the reference
// fixes (synq_kernels.reference.int_gemm.quantized_conv2d_packed), for every kernel that
// runs it on 16 output channels: int_conv.cpp's EpiVec and dw_rows.h's depthwise kernel.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace synq::requant {

#define SYNQ_REQUANT_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline

// y = float32(acc) * scale + bias (a multiply, then an add)
SYNQ_REQUANT_INLINE __m512 scale_bias(__m512i acc, __m512 scale, __m512 bias) {
  return _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale), bias);
}

// q = clamp(y * inv, lo, hi) rounded to nearest-even, + zero (lo, hi: qmin / qmax - zero)
SYNQ_REQUANT_INLINE __m512i quantize(__m512 y, __m512 inv, __m512 lo, __m512 hi,
                                      __m512i zero) {
  const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(y, inv), lo), hi);
  return _mm512_add_epi32(_mm512_cvtps_epi32(t), zero);
}

// F.hardswish's float32 steps: y * min(max(y + 3, 0), 6) / 6
SYNQ_REQUANT_INLINE __m512 hardswish(__m512 y) {
  const __m512 three = _mm512_set1_ps(3.f), six = _mm512_set1_ps(6.f);
  return _mm512_div_ps(
      _mm512_mul_ps(y, _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(y, three),
                                                   _mm512_setzero_ps()), six)), six);
}

#undef SYNQ_REQUANT_INLINE

}  // namespace synq::requant
#endif
