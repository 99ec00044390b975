// The activations a CPU kernel applies after its own arithmetic (BatchNorm in
// channel_stats.cpp, before the fake quantization in fake_quant.cpp), with torch's values:
// relu is clamp_min(0) (y < 0 becomes +0; -0 and NaN pass), relu6 is hardtanh(0, 6); and
// whether the gradient passes, judged on the output r as torch's backward does (ReLU's
// threshold_backward: not r <= 0, NaN passes; ReLU6: 0 < r < 6, NaN does not).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace synq {

constexpr int kNoAct = 0, kReLU = 1, kReLU6 = 2;  // the ops' `act` argument

template <int act>
__attribute__((always_inline)) inline float activate(float y) {
  if (act == kNoAct) return y;
  const float r = y < 0.f ? 0.f : y;
  return act == kReLU6 && r > 6.f ? 6.f : r;
}

template <int act>
__attribute__((always_inline)) inline float act_grad(float dy, float r) {
  if (act == kReLU) return r <= 0.f ? 0.f : dy;
  if (act == kReLU6) return r > 0.f && r < 6.f ? dy : 0.f;
  return dy;
}

inline void check_act(int64_t act, const char* who) {
  TORCH_CHECK(act == kNoAct || act == kReLU || act == kReLU6, who,
              "act must be 0 (none), 1 (ReLU) or 2 (ReLU6), got ", act);
}

}  // namespace synq
