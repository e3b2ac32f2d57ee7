// Routing's assignment of tokens to clusters: each point's nearest centroid by dot product, the
// largest score (the first among equal ones; a NaN above every number, as torch.argmax ranks
// it), without the (N, C) score tensor that torch.matmul writes and torch.argmax reads back (an
// argmax over a last dimension of 16 reads about one value a nanosecond: at 4k tokens, 8 heads and
// 16 clusters the product and the argmax took about 1 ms a call, four calls a Routing resolve).
//
// With ``sums``, a k-means step's other half comes along: each cluster's sum of its points and
// their count, added as each point is assigned (per unit of 256 points, then the units' partial
// sums in order: the same result whatever the threads), instead of index_add_ and bincount over
// the assignments (index_add_ of 16k rows of 64 into 16 clusters: 1.9 ms a call, 8 heads).
//
// The centroids of a (batch, head) are transposed once (depth x clusters, rounded up to whole
// vectors with zeros), so that a point's depth element, broadcast, multiplies a vector of
// centroids; eight points run at once (eight chains of multiply-adds). Scores are float32 sums in
// the depth's order, not MKL's: a point whose two best centroids differ by a rounding may go to the
// other one than the torch path sends it to.
//
// ``routing_points`` makes the points themselves: each token's unit query plus its key head's unit
// key, normalised again, in one pass over q and k (torch's form, a norm and a division per tensor
// and an add, read and wrote the 16k-token tensors nine times, and widened bf16 into a copy first).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace multihead_native {
namespace {

using V = at::vec::Vectorized<float>;
constexpr int kPoints = 8;

// The first index of the largest of s[0 .. C), a NaN above every number: the maximum without a
// branch per value (a running "larger than the best so far" branch mispredicts on random scores),
// then the first value equal to it
inline int64_t first_largest(const float* s, int64_t C) {
  float m = s[0];
  bool nan = std::isnan(s[0]);
  for (int64_t c = 1; c < C; ++c) m = s[c] > m ? s[c] : m, nan |= std::isnan(s[c]);
  int64_t c = 0;
  if (nan)
    while (!std::isnan(s[c])) ++c;
  else
    while (s[c] != m) ++c;
  return c;
}

// dst[0 .. n) += src[0 .. n)
inline void add_into(float* dst, const float* src, int64_t n) {
  at::vec::map2([](V a, V b) { return a + b; }, dst, dst, src, n);
}

// scores[p][c] = x_p . centroid c for P points (x_p = x + p ld) against the centroids on lanes
// (CT: D rows of Cp, zeros past the centroids), then each point's first largest into out
template <int P>
void nearest(const float* x, int64_t ld, const float* CT, int64_t D, int64_t C, int64_t Cp, float* scores,
             int64_t* out) {
  constexpr int64_t L = V::size();
  for (int64_t c0 = 0; c0 < Cp; c0 += L) {
    V acc[P];
    for (int p = 0; p < P; ++p) acc[p] = V(0.f);
    for (int64_t d = 0; d < D; ++d) {
      const V ct = V::loadu(CT + d * Cp + c0);
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) acc[p] = at::vec::fmadd(V(x[p * ld + d]), ct, acc[p]);
    }
    for (int p = 0; p < P; ++p) acc[p].store(scores + p * Cp + c0);
  }
  for (int p = 0; p < P; ++p) out[p] = first_largest(scores + p * Cp, C);
}

// The sum of squares of x[0 .. n) in float32, vectors then the tail
inline float squares(const float* x, int64_t n) {
  V acc(0.f);
  int64_t d = 0;
  for (; d + V::size() <= n; d += V::size()) {
    const V v = V::loadu(x + d);
    acc = at::vec::fmadd(v, v, acc);
  }
  float total = at::vec::vec_reduce_all<float>([](const V& a, const V& b) { return a + b; }, acc);
  for (; d < n; ++d) total += x[d] * x[d];
  return total;
}

// x's Euclidean norm, at least 1e-12 (F.normalize's floor)
inline float norm_of(const float* x, int64_t n) { return std::max(std::sqrt(squares(x, n)), 1e-12f); }

template <typename T>
void routing_points_impl(const at::Tensor& q, const at::Tensor& k, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H * N, 256, [&](int64_t r0, int64_t r1) {
    std::vector<float> qf(D), kf(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / N, i = r % N, b = g / H, h = g % H;
      const T* qr = qp + r * D;
      const T* kr = kp + ((b * Hkv + h / (H / Hkv)) * N + i) * D;
      for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<float>(qr[d]), kf[d] = static_cast<float>(kr[d]);
      const float qn = norm_of(qf.data(), D), kn = norm_of(kf.data(), D);
      float* o = op + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = qf[d] / qn + kf[d] / kn;
      const float on = norm_of(o, D);
      for (int64_t d = 0; d < D; ++d) o[d] /= on;
    }
  });
}

}  // namespace

void routing_points(const at::Tensor& q, const at::Tensor& k, at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && out.device().is_cpu(), "routing_points: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
              q.size(3) == k.size(3) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "routing_points: q (batch, heads, n, dim) and k (batch, kv_heads, n, dim), heads a multiple of "
              "kv_heads; got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "routing_points: q and k of one dtype");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == q.sizes(),
              "routing_points: out must be a contiguous float32 tensor of q's shape");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  switch (q.scalar_type()) {
    case at::kFloat: return routing_points_impl<float>(qc, kc, out);
    case at::kDouble: return routing_points_impl<double>(qc, kc, out);
    case at::kBFloat16: return routing_points_impl<c10::BFloat16>(qc, kc, out);
    case at::kHalf: return routing_points_impl<c10::Half>(qc, kc, out);
    default: TORCH_CHECK(false, "routing_points: float32, float64, bfloat16 or float16 tensors, got ", q.scalar_type());
  }
}

std::vector<at::Tensor> nearest_centroids(const at::Tensor& points, const at::Tensor& centroids, bool sums) {
  TORCH_CHECK(points.device().is_cpu() && centroids.device().is_cpu(), "nearest_centroids: CPU tensors only");
  TORCH_CHECK(points.scalar_type() == at::kFloat && centroids.scalar_type() == at::kFloat,
              "nearest_centroids: float32 points and centroids");
  TORCH_CHECK(points.dim() == 4 && centroids.dim() == 4, "nearest_centroids: (batch, heads, n, dim) points and "
              "(batch, heads, clusters, dim) centroids");
  const int64_t B = points.size(0), H = points.size(1), N = points.size(2), D = points.size(3);
  const int64_t C = centroids.size(2);
  TORCH_CHECK(centroids.size(0) == B && centroids.size(1) == H && centroids.size(3) == D && C >= 1,
              "nearest_centroids: centroids ", centroids.sizes(), " do not match points ", points.sizes());
  const at::Tensor x = points.contiguous(), cent = centroids.contiguous();
  const int64_t L = V::size(), Cp = (C + L - 1) / L * L;
  // every (batch, head)'s centroids transposed, depth x Cp
  std::vector<float> CT(B * H * D * Cp, 0.f);
  const float* cp = cent.data_ptr<float>();
  for (int64_t g = 0; g < B * H; ++g)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t d = 0; d < D; ++d) CT[(g * D + d) * Cp + c] = cp[(g * C + c) * D + d];
  auto out = at::empty({B, H, N}, points.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t chunk = 256, chunks = (N + chunk - 1) / chunk;  // points a unit of work
  // with sums: each unit's partial sums (C x D) and counts (C), summed per (batch, head) after
  std::vector<float> part_sums(sums ? B * H * chunks * C * D : 0, 0.f);
  std::vector<int64_t> part_counts(sums ? B * H * chunks * C : 0, 0);
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(kPoints * Cp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / chunks, i0 = t % chunks * chunk, i1 = std::min(N, i0 + chunk);
      const float* ct = CT.data() + g * D * Cp;
      int64_t i = i0;
      for (; i + kPoints <= i1; i += kPoints)
        nearest<kPoints>(xp + (g * N + i) * D, D, ct, D, C, Cp, scores.data(), op + g * N + i);
      for (; i < i1; ++i) nearest<1>(xp + (g * N + i) * D, D, ct, D, C, Cp, scores.data(), op + g * N + i);
      if (!sums) continue;
      float* su = part_sums.data() + t * C * D;
      int64_t* co = part_counts.data() + t * C;
      for (i = i0; i < i1; ++i) {
        const int64_t c = op[g * N + i];
        add_into(su + c * D, xp + (g * N + i) * D, D);
        ++co[c];
      }
    }
  });
  if (!sums) return {out};
  auto sum = at::zeros({B, H, C, D}, points.options());
  auto count = at::zeros({B, H, C}, points.options().dtype(at::kLong));
  float* sp = sum.data_ptr<float>();
  int64_t* np = count.data_ptr<int64_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t u = 0; u < chunks; ++u) {  // the units in order
        const float* su = part_sums.data() + (g * chunks + u) * C * D;
        add_into(sp + g * C * D, su, C * D);
        for (int64_t c = 0; c < C; ++c) np[g * C + c] += part_counts[(g * chunks + u) * C + c];
      }
  });
  return {out, sum, count};
}

}  // namespace multihead_native
