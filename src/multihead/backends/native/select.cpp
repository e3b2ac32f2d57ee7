// Top-k selection over rows of scores (``TopK``'s choice of keys): the indices of each row's ``keep``
// largest values, in ascending order, and whether each value is above -inf.
//
// torch.topk keeps a heap of k over the whole row. Here a threshold comes first: the row is cut
// into at least 2 k chunks, and the k-th largest chunk maximum T is reached by at least k values
// (one in each of k chunks), so only the values >= T are candidates (a few k on scores without
// order), gathered 16 at a time by register compresses in index order; the k largest candidates
// are then kept in that order (among equal values at the cut, the first ones). A row with fewer
// than k values above -inf keeps all of those and fills up with -inf ones (not valid). A row with
// a NaN is sorted whole, NaN above every number, as in torch.topk.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace multihead_native {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// a ranks above b: larger, NaN above every number
inline bool above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

// Per-thread buffers: chunk maxima, and candidates as values and positions
struct Buffers {
  std::vector<float> maxima, value;
  std::vector<int32_t> index;
};

// The maxima of at least ``want`` disjoint chunks of x[0 .. n) (want <= n) into b.maxima, NaN
// ignored; whether x holds a NaN. On AVX-512 a chunk is one lane of a run of vectors (vertical
// maxes, no reductions), and each value of the tail past the last whole vector is a chunk.
inline bool chunk_maxima(const float* x, int64_t n, int64_t want, Buffers& b) {
  b.maxima.clear();
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t vectors = n / 16, runs = std::min(vectors, (want + 15) / 16);
  if (runs > 0 && runs * 16 + (n - vectors * 16) >= want) {
    __mmask16 unordered = 0;
    alignas(64) float lanes[16];
    for (int64_t r = 0; r < runs; ++r) {
      __m512 m = _mm512_set1_ps(kNegInf);
      for (int64_t v = r * vectors / runs, end = (r + 1) * vectors / runs; v < end; ++v) {
        const __m512 xv = _mm512_loadu_ps(x + v * 16);
        unordered |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
        m = _mm512_max_ps(xv, m);  // a NaN in x keeps m
      }
      _mm512_store_ps(lanes, m);
      b.maxima.insert(b.maxima.end(), lanes, lanes + 16);
    }
    bool nan = unordered != 0;
    for (int64_t i = vectors * 16; i < n; ++i) nan |= std::isnan(x[i]), b.maxima.push_back(x[i]);
    return nan;
  }
#endif
  bool nan = false;
  const int64_t size = n / want;
  for (int64_t c = 0; c < want; ++c) {
    float m = kNegInf;
    for (int64_t j = c * size, end = c + 1 == want ? n : j + size; j < end; ++j) {
      nan |= std::isnan(x[j]);
      if (x[j] > m) m = x[j];
    }
    b.maxima.push_back(m);
  }
  return nan;
}

// The values x[i] >= t (> t when ``strict``), with their positions, in order, into b.value and
// b.index; returns their count
inline int64_t gather_from(const float* x, int64_t n, float t, bool strict, Buffers& b) {
  b.value.resize(n + 16), b.index.resize(n + 16);
  float* value = b.value.data();
  int32_t* index = b.index.data();
  int64_t count = 0, i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 m = strict ? _mm512_cmp_ps_mask(v, tv, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    // compress in registers, then a whole store (the buffers have 16 spare slots): a compress
    // straight to memory is microcoded on some CPUs (Zen 4), ten times slower
    _mm512_storeu_ps(value + count, _mm512_maskz_compress_ps(m, v));
    _mm512_storeu_si512(index + count,
                        _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(i)))));
    count += __builtin_popcount(m);
  }
#endif
  for (; i < n; ++i)
    if (strict ? x[i] > t : x[i] >= t) value[count] = x[i], index[count++] = static_cast<int32_t>(i);
  return count;
}

// A row with a NaN: torch.topk's order (NaN above every number), one sort of the row
void top_of_row_with_nan(const float* x, int64_t n, int64_t keep, int64_t* out, bool* valid) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [x](int64_t a, int64_t b) { return above(x[a], x[b]); });
  order.resize(keep);
  std::sort(order.begin(), order.end());
  for (int64_t j = 0; j < keep; ++j) out[j] = order[j], valid[j] = x[order[j]] > kNegInf;
}

void top_of_row(const float* x, int64_t n, int64_t keep, Buffers& b, int64_t* out, bool* valid) {
  if (keep >= n) {
    for (int64_t j = 0; j < keep; ++j) out[j] = j, valid[j] = x[j] > kNegInf;
    return;
  }
  if (chunk_maxima(x, n, std::min(n, 2 * keep), b)) return top_of_row_with_nan(x, n, keep, out, valid);
  std::nth_element(b.maxima.begin(), b.maxima.begin() + (keep - 1), b.maxima.end(), std::greater<float>());
  const float t = b.maxima[keep - 1];
  // at least keep candidates at or above t; when t is -inf, every value above it (maybe fewer)
  const int64_t count = t > kNegInf ? gather_from(x, n, t, false, b) : gather_from(x, n, kNegInf, true, b);
  if (count < keep) {  // all values above -inf, then as many -inf ones as fill the row, in order
    for (int64_t i = 0, kept = 0, fill = keep - count; i < n && kept < keep; ++i)
      if (x[i] > kNegInf || fill-- > 0) out[kept] = i, valid[kept++] = x[i] > kNegInf;
    return;
  }
  float cut = t;
  int64_t at_cut = keep;
  if (count > keep) {  // the keep largest candidates: a cut value, all above it, the first ones at it
    b.maxima.assign(b.value.begin(), b.value.begin() + count);
    std::nth_element(b.maxima.begin(), b.maxima.begin() + (keep - 1), b.maxima.end(), std::greater<float>());
    cut = b.maxima[keep - 1];
    int64_t over = 0;
    for (int64_t j = 0; j < count; ++j) over += b.value[j] > cut;
    at_cut = keep - over;
  }
  for (int64_t j = 0, kept = 0; j < count && kept < keep; ++j)
    if (b.value[j] > cut || (b.value[j] == cut && at_cut-- > 0)) out[kept] = b.index[j], valid[kept++] = true;
}

}  // namespace

std::vector<at::Tensor> top_keys(const at::Tensor& scores, int64_t keep) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2 &&
                  scores.is_contiguous(),
              "top_keys: a contiguous float32 (rows, keys) CPU tensor");
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(keep >= 1 && keep <= n, "top_keys: keep must be in [1, keys], got ", keep, " for ", n, " keys");
  auto indices = at::empty({rows, keep}, scores.options().dtype(at::kLong));
  auto valid = at::empty({rows, keep}, scores.options().dtype(at::kBool));
  const float* x = scores.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  bool* ok = valid.data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    Buffers b;
    for (int64_t r = r0; r < r1; ++r) top_of_row(x + r * n, n, keep, b, idx + r * keep, ok + r * keep);
  });
  return {indices, valid};
}

}  // namespace multihead_native
