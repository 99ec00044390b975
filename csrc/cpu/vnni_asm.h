// The AVX-512 VNNI multiply-add as inline asm, accumulating in place:
//   dpbusd: acc += 4-byte dot products of x (unsigned bytes) and w (signed bytes)
//   dpwssd: see below
// GCC 12 compiles _mm512_dpbusd_epi32 (and _mm512_dpwssd_epi32) with a copy of the
// accumulator that is moved back every step once a kernel holds more than a few of them (32
// moves a step of int_gemm's 4 x 4 tile, and a spill). Take and return by value so the
// accumulators stay in registers (a reference operand pins them to the stack).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace synq {

#define SYNQ_VNNI_ASM \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline

SYNQ_VNNI_ASM __m512i dpbusd(__m512i acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "vm"(w));
  return acc;
}

//   dpwssd: acc += 2-element dot products of x and w (signed 16-bit)
SYNQ_VNNI_ASM __m512i dpwssd(__m512i acc, __m512i x, __m512i w) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "vm"(w));
  return acc;
}

#undef SYNQ_VNNI_ASM

}  // namespace synq
#endif
