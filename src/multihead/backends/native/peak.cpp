// The machine's limit for the kernel's products: the rate of this build's vector multiply-adds.
//
// Benchmarks measure the kernel's passes against it (``benchmarks/sparse_patterns.py``): every
// thread runs 16 independent chains of fused multiply-adds on registers, in the vector width the
// kernel is built for (AVX-512: 16 floats), with no loads, so that nothing but the multiply-add
// units bounds it. A pass's multiply-adds per second over this rate is how close it comes to the
// cores' limit.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <chrono>
#include <cstdint>
#include <vector>

namespace multihead_native {

double multiply_add_rate(int64_t steps) {
  TORCH_CHECK(steps > 0, "multiply_add_rate: steps must be positive, got ", steps);
  using V = at::vec::Vectorized<float>;
  constexpr int kChains = 16;  // independent chains: enough to cover the multiply-add's latency
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      V a[kChains];
      for (int i = 0; i < kChains; ++i) a[i] = V(1.0f + 1e-3f * i);
      const V x(0.999999f), y(1e-7f);
      for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 16
        for (int i = 0; i < kChains; ++i) a[i] = at::vec::fmadd(a[i], x, y);
      }
      V sum = a[0];
      for (int i = 1; i < kChains; ++i) sum = sum + a[i];
      float lanes[V::size()];
      sum.store(lanes);
      sink[t] = lanes[0];  // the chains' results are used: none of them is optimised away
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = 0;
  for (float s : sink) keep = keep + s;
  return 2.0 * kChains * V::size() * static_cast<double>(steps) * static_cast<double>(threads) / seconds / 1e9;
}

}  // namespace multihead_native
