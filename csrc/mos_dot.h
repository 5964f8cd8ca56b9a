// A dot product the compiler vectorises: kLanes independent partial sums (a plain loop is a
// serial chain of adds, which -O3 may not reorder), summed in a fixed order. Shared by the CPU
// kernels and the router's CPU loops; internal to each file that includes it.
#pragma once

#include <cstdint>

namespace mos {
namespace {

constexpr int64_t kLanes = 8;

template <typename acc_t, typename a_t, typename b_t>
__attribute__((target_clones("avx2,fma", "default")))
acc_t dot(const a_t* __restrict__ a, const b_t* __restrict__ b, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j)
      lanes[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  acc_t total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  for (; k < n; ++k) total += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return total;
}

}  // namespace
}  // namespace mos
