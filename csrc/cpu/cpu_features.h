// Which x86 vector paths the CPU kernels of int_gemm.cpp and int_conv.cpp take, decided once
// per process from the CPU and two switches (the tests use them to run every path on one
// machine): SYNQ_CPU_PORTABLE=1 forces the scalar code, SYNQ_CPU_NO_AVX512=1 keeps AVX2
// where AVX-512 VNNI is present.
#pragma once

#include <cstdlib>

namespace synq {

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

// AVX2 (vpmaddwd on int16), unless SYNQ_CPU_PORTABLE=1.
inline bool cpu_use_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && !env_flag("SYNQ_CPU_PORTABLE");
  return ok;
#else
  return false;
#endif
}

// AVX-512 VNNI (vpdpbusd: 16 lanes of 4-byte unsigned x signed dot products into int32),
// with BW and VL for the widening and the 256-bit tails; where AVX2 is used at all, unless
// SYNQ_CPU_NO_AVX512=1.
inline bool cpu_use_vnni() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok =
      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      !env_flag("SYNQ_CPU_NO_AVX512");
  return ok && cpu_use_avx2();
#else
  return false;
#endif
}

}  // namespace synq
