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
//
// top_keys_of_products makes the scores too, q . k for a block of rows against every key, a block
// at a time per thread, and selects from them while they are in L2 (see choose below); long
// float32 rows are ranked by int8 or bf16 products first (screened_select).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace multihead_native {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// a ranks above b: larger, NaN above every number
inline bool above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

// Per-thread buffers: chunk maxima, candidates as values and positions, and order keys
struct Buffers {
  std::vector<float> maxima, value;
  std::vector<int32_t> index;
  std::vector<uint32_t> keys;
};

// The k-th largest of v[0 .. m) (no NaN; 1 <= k <= m), found bit by bit on keys whose unsigned
// order is the floats' order: the largest key with at least k keys at or above it, in counting
// passes of vector compares; std::nth_element's branchy partitions took two thirds of the
// selection. A trial that exactly k keys reach ends the search early (the k-th largest is then
// their minimum): on values without order a few passes past the bits they share.
inline float kth_largest(const float* v, int64_t m, int64_t k, std::vector<uint32_t>& keys) {
  keys.resize(m);
  uint32_t* u = keys.data();
  for (int64_t j = 0; j < m; ++j) {
    uint32_t bits;
    std::memcpy(&bits, v + j, 4);
    u[j] = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
  }
  auto at_least = [&](uint32_t t) {
    int64_t count = 0, j = 0;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512i tv = _mm512_set1_epi32(static_cast<int32_t>(t));
    for (; j + 16 <= m; j += 16) count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(u + j), tv));
#endif
    for (; j < m; ++j) count += u[j] >= t;
    return count;
  };
  uint32_t found = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t trial = found | (1u << bit);
    const int64_t count = at_least(trial);
    if (count < k) continue;
    found = trial;
    if (count == k) {  // the k largest are the keys >= trial: the least of them
      found = ~0u;
      for (int64_t j = 0; j < m; ++j)
        if (u[j] >= trial) found = std::min(found, u[j]);
      break;
    }
  }
  const uint32_t bits = found & 0x80000000u ? found & 0x7fffffffu : ~found;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

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
      // four chains of maxima, a vector of each in turn (one chain waits on every vmaxps)
      __m512 m[4] = {_mm512_set1_ps(kNegInf), _mm512_set1_ps(kNegInf), _mm512_set1_ps(kNegInf),
                     _mm512_set1_ps(kNegInf)};
      int64_t v = r * vectors / runs;
      const int64_t end = (r + 1) * vectors / runs;
      for (; v + 4 <= end; v += 4)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const __m512 xv = _mm512_loadu_ps(x + (v + u) * 16);
          unordered |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
          m[u] = _mm512_max_ps(xv, m[u]);  // a NaN in x keeps m
        }
      for (; v < end; ++v) {
        const __m512 xv = _mm512_loadu_ps(x + v * 16);
        unordered |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
        m[0] = _mm512_max_ps(xv, m[0]);
      }
      _mm512_store_ps(lanes, _mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
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

// t - margin rounded down to a float (no value above the exact difference is missed), and at
// least the lowest finite float (so that -inf, a masked key, is never a candidate)
inline float lowered(float t, double margin) {
  if (margin == 0.0) return t;
  const double exact = static_cast<double>(t) - margin;
  if (exact <= std::numeric_limits<float>::lowest()) return std::numeric_limits<float>::lowest();
  const float f = static_cast<float>(exact);  // above lowest: so is f, and its next float down
  return static_cast<double>(f) > exact ? std::nextafter(f, kNegInf) : f;
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
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __mmask16 m = strict ? _mm512_cmp_ps_mask(v, tv, _CMP_GT_OQ) : _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    // the positions alone, compressed in registers, then a whole store (the buffer has 16 spare
    // slots): a compress straight to memory is microcoded on some CPUs (Zen 4), ten times slower;
    // the few values are read back after
    _mm512_storeu_si512(index + count, _mm512_maskz_compress_epi32(m, at));
    count += __builtin_popcount(m);
  }
#endif
  for (; i < n; ++i)
    if (strict ? x[i] > t : x[i] >= t) index[count++] = static_cast<int32_t>(i);
  for (int64_t j = 0; j < count; ++j) value[j] = x[index[j]];
  return count;
}

// Keeps b's candidates [0, count) whose value is >= t, in order, in place; returns their count
inline int64_t keep_at_least(float t, int64_t count, Buffers& b) {
  float* value = b.value.data();
  int32_t* index = b.index.data();
  int64_t kept = 0, j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (const __m512 tv = _mm512_set1_ps(t); j + 16 <= count; j += 16) {  // writes stay at or behind the reads
    const __m512 v = _mm512_loadu_ps(value + j);
    const __m512i i = _mm512_loadu_si512(index + j);
    const __mmask16 m = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
    _mm512_storeu_ps(value + kept, _mm512_maskz_compress_ps(m, v));
    _mm512_storeu_si512(index + kept, _mm512_maskz_compress_epi32(m, i));
    kept += __builtin_popcount(m);
  }
#endif
  for (; j < count; ++j)
    if (value[j] >= t) value[kept] = value[j], index[kept++] = index[j];
  return kept;
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

#if defined(CPU_CAPABILITY_AVX512)
inline __mmask8 low_lanes(int n) { return static_cast<__mmask8>((1u << n) - 1); }  // lanes [0, n), n <= 8
#endif

// The keep largest of b's count >= keep candidates (values above -inf, in index order), in that
// order: a cut value, all above it, the first ones at it. On AVX-512 sixteen candidates a step, the
// kept ones' positions compressed out (whether one is kept is a coin toss on random scores: a
// branch per candidate mispredicts half the time).
void keep_largest(int64_t count, int64_t keep, Buffers& b, int64_t* out, bool* valid) {
  const float* value = b.value.data();
  const int32_t* index = b.index.data();
  const float cut = count > keep ? kth_largest(value, count, keep, b.keys) : kNegInf;
  int64_t at_cut = keep, j = 0, kept = 0;  // at_cut: how many values equal to the cut are kept
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 cv = _mm512_set1_ps(cut);
  if (count > keep)
    for (; j + 16 <= count; j += 16)
      at_cut -= __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(value + j), cv, _CMP_GT_OQ));
#endif
  if (count > keep)
    for (; j < count; ++j) at_cut -= value[j] > cut;
  j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; j + 16 <= count && kept < keep; j += 16) {
    const __m512 v = _mm512_loadu_ps(value + j);
    __mmask16 take = _mm512_cmp_ps_mask(v, cv, _CMP_GT_OQ);
    for (uint32_t tie = _mm512_cmp_ps_mask(v, cv, _CMP_EQ_OQ); tie && at_cut > 0; tie &= tie - 1, --at_cut)
      take |= static_cast<__mmask16>(tie & -tie);  // the first ties
    // the kept positions in order, widened to int64 (kept + their count <= keep: masked stores)
    const __m512i at = _mm512_maskz_compress_epi32(take, _mm512_loadu_si512(index + j));
    const int n = __builtin_popcount(take);
    const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(at));
    _mm512_mask_storeu_epi64(out + kept, low_lanes(std::min(n, 8)), low);
    if (n > 8) {
      const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(at, 1));
      _mm512_mask_storeu_epi64(out + kept + 8, low_lanes(n - 8), high);
    }
    kept += n;
  }
#endif
  for (; j < count && kept < keep; ++j)
    if (value[j] > cut || (value[j] == cut && at_cut-- > 0)) out[kept++] = index[j];
  std::fill(valid, valid + keep, true);
}

// A row of at most keep values, or with fewer than keep above -inf: all values above -inf, then as
// many -inf ones as fill the row, in order (no value is compared with another)
void keep_all_above_inf(const float* x, int64_t n, int64_t keep, int64_t above, int64_t* out, bool* valid) {
  for (int64_t i = 0, kept = 0, fill = keep - above; i < n && kept < keep; ++i)
    if (x[i] > kNegInf || fill-- > 0) out[kept] = i, valid[kept++] = x[i] > kNegInf;
}

// The candidates of a row: at least keep values at or above a threshold t, in index order, into b
// (t is the keep-th largest of the maxima of 2 keep chunks, reached by one value in each of keep
// chunks), or, when t is -inf, every value above it (maybe fewer than keep); ``margin`` widens the
// threshold to t - margin. Returns the count, or -1 for a row with a NaN (not gathered).
int64_t candidates(const float* x, int64_t n, int64_t keep, double margin, Buffers& b) {
  if (chunk_maxima(x, n, std::min(n, 2 * keep), b)) return -1;
  const float t = kth_largest(b.maxima.data(), static_cast<int64_t>(b.maxima.size()), keep, b.keys);
  return t > kNegInf ? gather_from(x, n, lowered(t, margin), false, b) : gather_from(x, n, kNegInf, true, b);
}

void top_of_row(const float* x, int64_t n, int64_t keep, Buffers& b, int64_t* out, bool* valid) {
  if (keep >= n) {
    int64_t above = 0;
    for (int64_t i = 0; i < n; ++i) above += x[i] > kNegInf;
    return keep_all_above_inf(x, n, keep, above, out, valid);
  }
  const int64_t count = candidates(x, n, keep, 0.0, b);
  if (count < 0) return top_of_row_with_nan(x, n, keep, out, valid);
  if (count < keep) return keep_all_above_inf(x, n, keep, count, out, valid);
  keep_largest(count, keep, b, out, valid);
}

// Sets x[0 .. n) outside the union of the intervals [start[i] - from, end[i] - from) (clamped to
// [0, n)) to -inf: x holds the keys from ``from`` on
void mask_outside(float* x, int64_t n, int64_t from, const int64_t* start, const int64_t* end, int64_t intervals,
                  std::vector<std::pair<int64_t, int64_t>>& sorted) {
  sorted.clear();
  for (int64_t i = 0; i < intervals; ++i) {
    const int64_t a = std::clamp<int64_t>(start[i] - from, 0, n), b = std::clamp<int64_t>(end[i] - from, 0, n);
    if (b > a) sorted.emplace_back(a, b);
  }
  std::sort(sorted.begin(), sorted.end());
  int64_t at = 0;
  for (const auto& [a, b] : sorted) {
    if (a > at) std::fill(x + at, x + a, kNegInf);
    at = std::max(at, b);
  }
  std::fill(x + at, x + n, kNegInf);
}

// Keys in panels of 32, transposed: panel p holds key 32 p + j's element e at [e][j] (zero past the
// last key), so that one depth step of the product reads 32 keys as whole vectors. bfloat16 keys
// with AVX-512 BF16 are packed in pairs of elements instead ([e / 2][j], two bf16 in 32 bits), for
// pair products; other types are widened to float32.
constexpr int64_t kPanel = 32;
using VecF = at::vec::Vectorized<float>;
constexpr int kPanelVecs = kPanel / VecF::size();

template <typename T>
void pack_panels(const T* keys, int64_t ld, int64_t n, int64_t d, float* out) {
  for (int64_t p = 0; p * kPanel < n; ++p, out += d * kPanel)
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t key = p * kPanel + j;
      for (int64_t e = 0; e < d; ++e) out[e * kPanel + j] = key < n ? static_cast<float>(keys[key * ld + e]) : 0.0f;
    }
}

// out[r][0 .. 32) = q_r . (a panel's 32 keys) for R rows (float32): R x 32 accumulators in
// registers, each q element broadcast once for 32 keys
template <int R>
void rows_dot_panel(const float* q, int64_t ldq, const float* panel, int64_t d, float* out, int64_t ldo) {
  VecF acc[R][kPanelVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = VecF(0.0f);
  for (int64_t e = 0; e < d; ++e) {
    VecF keys[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) keys[v] = VecF::loadu(panel + e * kPanel + v * VecF::size());
    for (int r = 0; r < R; ++r) {
      const VecF qe(q[r * ldq + e]);
      for (int v = 0; v < kPanelVecs; ++v) acc[r][v] = at::vec::fmadd(qe, keys[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kPanelVecs; ++v) acc[r][v].store(out + r * ldo + v * VecF::size());
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
inline uint16_t bf16_bits(at::BFloat16 x) { return x.x; }
inline uint16_t bf16_bits(float x) { return at::BFloat16(x).x; }  // rounded to nearest, ties to even

template <typename T>
inline uint32_t pair_of(const T* x, int64_t e, int64_t d) {  // (x[e], x[e + 1] or 0) as bf16
  return bf16_bits(x[e]) | (e + 1 < d ? static_cast<uint32_t>(bf16_bits(x[e + 1])) << 16 : 0u);
}

template <typename T>
void pack_pair_panels(const T* keys, int64_t ld, int64_t n, int64_t d, uint32_t* out) {
  const int64_t pairs = (d + 1) / 2;
  for (int64_t p = 0; p * kPanel < n; ++p, out += pairs * kPanel)
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t key = p * kPanel + j;
      for (int64_t e = 0; e < pairs; ++e) out[e * kPanel + j] = key < n ? pair_of(keys + key * ld, 2 * e, d) : 0u;
    }
}

// The same for bfloat16 rows: a pair of q's elements, broadcast, times 16 keys' pairs per vdpbf16ps
template <int R>
void rows_dot_pair_panel(const at::BFloat16* q, int64_t ldq, const uint32_t* panel, int64_t d, float* out,
                         int64_t ldo) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t e = 0; 2 * e < d; ++e) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(panel + e * kPanel);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(panel + e * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh qe = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair_of(q + r * ldq, 2 * e, d)));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qe, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qe, k1);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r][0]), _mm512_storeu_ps(out + r * ldo + 16, acc[r][1]);
}
#endif

// dot(std::integral_constant<int, R>, r, p): rows r .. r + R against panel p, for the panels
// [p0, p1) and the rows [0, rows) 8 at a time; each panel, read once into L1, serves every row
template <typename Dot>
void for_row_groups(int64_t rows, int64_t p0, int64_t p1, const Dot& dot) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t r = 0;
    for (; r + 8 <= rows; r += 8) dot(std::integral_constant<int, 8>{}, r, p);
    switch (rows - r) {
      case 7: dot(std::integral_constant<int, 7>{}, r, p); break;
      case 6: dot(std::integral_constant<int, 6>{}, r, p); break;
      case 5: dot(std::integral_constant<int, 5>{}, r, p); break;
      case 4: dot(std::integral_constant<int, 4>{}, r, p); break;
      case 3: dot(std::integral_constant<int, 3>{}, r, p); break;
      case 2: dot(std::integral_constant<int, 2>{}, r, p); break;
      case 1: dot(std::integral_constant<int, 1>{}, r, p); break;
      default: break;
    }
  }
}

}  // namespace

// Logits held per thread at once (1 MiB, up to 64 rows): they stay in L2 between the product that
// writes them and the selection that reads them
constexpr int64_t kLogitsPerThread = 1 << 18;

namespace {

// One call's tensors and sizes
struct Choice {
  const at::Tensor &q, &k, &indices, &valid;
  int64_t keep, intervals;
  const int64_t *start, *end;  // (B, H, rows, intervals) or null
  int64_t batch, heads, rows, d, n, kv_heads;
};

// The keys [lo, hi) spanning the intervals' union of the rows [row0, row1) (indices into the
// (B, H, rows) rows), clamped to the keys; every key without intervals; hi <= lo: none
inline std::pair<int64_t, int64_t> keys_seen(const Choice& c, int64_t row0, int64_t row1) {
  if (!c.start) return {0, c.n};
  int64_t lo = c.n, hi = 0;
  for (int64_t i = row0 * c.intervals; i < row1 * c.intervals; ++i) {
    const int64_t a = std::clamp<int64_t>(c.start[i], 0, c.n), b = std::clamp<int64_t>(c.end[i], 0, c.n);
    if (b > a) lo = std::min(lo, a), hi = std::max(hi, b);
  }
  return {lo, hi};
}

// The panels [p0, p1) that hold every key the rows [r0, r1) of (batch, head) row ``bh`` may see:
// a causal or local choice makes and selects from those alone
inline std::pair<int64_t, int64_t> panels_seen(const Choice& c, int64_t bh, int64_t r0, int64_t r1) {
  const auto [lo, hi] = keys_seen(c, bh * c.rows + r0, bh * c.rows + r1);
  return hi > lo ? std::make_pair(lo / kPanel, (hi + kPanel - 1) / kPanel) : std::make_pair(int64_t(0), int64_t(0));
}

// The plain selection of a row of logits x (keys [from, from + n)): top_of_row
inline auto plain_select(const Choice& c) {
  return [&c](int64_t, int64_t, int64_t, const float* x, int64_t, int64_t n, Buffers& b, int64_t* out, bool* valid) {
    top_of_row(x, n, c.keep, b, out, valid);
  };
}

// packed_keys: each (batch, key head)'s keys packed into panels of P, ``width`` per key
// (pack(b, kv head, out)). choose_from: a block of rows at a time per thread, their logits made
// over the panels they may see (products(b, h, r0, r1, panels, p0, p1, logits, ldo)), masked and
// selected from while they are in L2 (select(b, h, r, x, from, n, buffers, out, valid): the row's
// logits x of the keys [from, from + n); plain_select: top_of_row). choose: both.
template <typename P, typename Pack>
std::unique_ptr<P[]> packed_keys(const Choice& c, int64_t width, const Pack& pack) {
  const int64_t packed = (c.n + kPanel - 1) / kPanel * kPanel * width;
  // every element written by pack (zeros past the last key): no clearing first
  std::unique_ptr<P[]> panels(new P[c.batch * c.kv_heads * packed]);
  at::parallel_for(0, c.batch * c.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) pack(t / c.kv_heads, t % c.kv_heads, panels.get() + t * packed);
  });
  return panels;
}

template <typename P, typename Products, typename Select>
void choose_from(const Choice& c, int64_t width, const P* panels, const Products& products, const Select& select) {
  const int64_t ldo = (c.n + kPanel - 1) / kPanel * kPanel, packed = ldo * width;
  const int64_t block = std::clamp<int64_t>(kLogitsPerThread / ldo, 1, 64), blocks = (c.rows + block - 1) / block;
  int64_t* ip = c.indices.data_ptr<int64_t>();
  bool* vp = c.valid.data_ptr<bool>();
  at::parallel_for(0, c.batch * c.heads * blocks, 1, [&](int64_t t0, int64_t t1) {
    Buffers b;
    std::vector<float> logits(block * ldo);
    std::vector<std::pair<int64_t, int64_t>> sorted;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / blocks, r0 = t % blocks * block, r1 = std::min(c.rows, r0 + block);
      const int64_t bi = bh / c.heads, h = bh % c.heads;
      const auto [p0, p1] = panels_seen(c, bh, r0, r1);
      products(bi, h, r0, r1, panels + (bi * c.kv_heads + h / (c.heads / c.kv_heads)) * packed, p0, p1,
               logits.data(), ldo);
      // the selection's keys [from, to): those of the panels made, or every key where they are
      // fewer than keep (the others are outside every interval, masked)
      int64_t from = p0 * kPanel, to = std::min(c.n, p1 * kPanel);
      if (to - from < c.keep) from = 0, to = c.n;
      for (int64_t r = r0; r < r1; ++r) {
        float* x = logits.data() + (r - r0) * ldo + from;
        if (c.start) {
          const int64_t at = (bh * c.rows + r) * c.intervals;
          mask_outside(x, to - from, from, c.start + at, c.end + at, c.intervals, sorted);
        }
        int64_t* out = ip + bi * c.indices.stride(0) + h * c.indices.stride(1) + r * c.indices.stride(2);
        select(bi, h, r, x, from, to - from, b, out,
               vp + bi * c.valid.stride(0) + h * c.valid.stride(1) + r * c.valid.stride(2));
        if (from != 0)
          for (int64_t j = 0; j < c.keep; ++j) out[j] += from;
      }
    }
  });
}

template <typename P, typename Pack, typename Products, typename Select>
void choose(const Choice& c, int64_t width, const Pack& pack, const Products& products, const Select& select) {
  choose_from(c, width, packed_keys<P>(c, width, pack).get(), products, select);
}

// Rows [0, count) of x (row stride ld) as U: x itself when it is U, else converted into buf (row
// stride d). float32 to bfloat16 rounds to nearest, ties to even.
template <typename U, typename T>
std::pair<const U*, int64_t> rows_as(const T* x, int64_t ld, int64_t count, int64_t d, std::vector<U>& buf) {
  if constexpr (std::is_same_v<T, U>) {
    return {x, ld};
  } else {
    buf.resize(count * d);
    for (int64_t r = 0; r < count; ++r)
      for (int64_t e = 0; e < d; ++e) buf[r * d + e] = static_cast<U>(static_cast<float>(x[r * ld + e]));
    return {buf.data(), d};
  }
}

// The choice over float32 panels: float32 rows as they are, others widened a block at a time
template <typename T>
void choose_widened(const Choice& c) {
  const T* qp = c.q.data_ptr<T>();
  const T* kp = c.k.data_ptr<T>();
  const int64_t d = c.d;
  auto pack = [&](int64_t b, int64_t g, float* out) {
    pack_panels(kp + b * c.k.stride(0) + g * c.k.stride(1), c.k.stride(2), c.n, d, out);
  };
  std::vector<std::vector<float>> widened(at::get_num_threads());
  auto products = [&](int64_t b, int64_t h, int64_t r0, int64_t r1, const float* panels, int64_t p0, int64_t p1,
                      float* logits, int64_t ldo) {
    const auto [q, ldq] = rows_as<float>(qp + b * c.q.stride(0) + h * c.q.stride(1) + r0 * c.q.stride(2),
                                         c.q.stride(2), r1 - r0, d, widened[at::get_thread_num()]);
    for_row_groups(r1 - r0, p0, p1, [&](auto R, int64_t r, int64_t p) {
      rows_dot_panel<decltype(R)::value>(q + r * ldq, ldq, panels + p * d * kPanel, d, logits + r * ldo + p * kPanel, ldo);
    });
  };
  choose<float>(c, d, pack, products, plain_select(c));
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The choice over bfloat16 pair panels: bfloat16 rows as they are, float32 ones rounded to
// bfloat16 a block at a time (the screen below)
template <typename T, typename Select>
void choose_in_pairs(const Choice& c, const Select& select) {
  const T* qp = c.q.data_ptr<T>();
  const T* kp = c.k.data_ptr<T>();
  const int64_t pairs = (c.d + 1) / 2;
  auto pack = [&](int64_t b, int64_t g, uint32_t* out) {
    pack_pair_panels(kp + b * c.k.stride(0) + g * c.k.stride(1), c.k.stride(2), c.n, c.d, out);
  };
  std::vector<std::vector<at::BFloat16>> rounded(at::get_num_threads());
  auto products = [&](int64_t b, int64_t h, int64_t r0, int64_t r1, const uint32_t* panels, int64_t p0, int64_t p1,
                      float* logits, int64_t ldo) {
    const auto [q, ldq] = rows_as<at::BFloat16>(qp + b * c.q.stride(0) + h * c.q.stride(1) + r0 * c.q.stride(2),
                                                c.q.stride(2), r1 - r0, c.d, rounded[at::get_thread_num()]);
    for_row_groups(r1 - r0, p0, p1, [&](auto R, int64_t r, int64_t p) {
      rows_dot_pair_panel<decltype(R)::value>(q + r * ldq, ldq, panels + p * pairs * kPanel, c.d,
                                              logits + r * ldo + p * kPanel, ldo);
    });
  };
  choose<uint32_t>(c, pairs, pack, products, select);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// a[0 .. 16), rows of 16 floats, transposed in registers: a[j] then holds element j of every row
inline void transpose_16x16(__m512 a[16]) {
  __m512 u[16];
  for (int p = 0; p < 8; ++p)  // per 128-bit lane L: rows 2p, 2p + 1 interleaved at elements 4L, 4L + 1 (2L + 2, 3)
    u[2 * p] = _mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), u[2 * p + 1] = _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]);
  __m512 v[16];
  for (int g = 0; g < 4; ++g) {  // v[4 g + c], lane L: element 4 L + c of rows 4 g .. 4 g + 3
    const __m512d lo0 = _mm512_castps_pd(u[4 * g]), lo1 = _mm512_castps_pd(u[4 * g + 2]);
    const __m512d hi0 = _mm512_castps_pd(u[4 * g + 1]), hi1 = _mm512_castps_pd(u[4 * g + 3]);
    v[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));
    v[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));
    v[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));
    v[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes: a[4 L + c] lane g = v[4 g + c] lane L
    const __m512 w0 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0x44), w1 = _mm512_shuffle_f32x4(v[c], v[4 + c], 0xEE);
    const __m512 w2 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0x44), w3 = _mm512_shuffle_f32x4(v[8 + c], v[12 + c], 0xEE);
    a[c] = _mm512_shuffle_f32x4(w0, w2, 0x88), a[4 + c] = _mm512_shuffle_f32x4(w0, w2, 0xDD);
    a[8 + c] = _mm512_shuffle_f32x4(w1, w3, 0x88), a[12 + c] = _mm512_shuffle_f32x4(w1, w3, 0xDD);
  }
}

// Scores of m keys (positions idx[0 .. m) in ``keys``, rows of stride ld) against one float32
// query row q (d), 16 keys at a time, their rows transposed 16 elements at a time: each lane sums
// q[e] * k[e] by fused multiply-adds in e's order from 0, as rows_dot_panel does, so that the
// scores are the plain float32 choice's to the bit
void exact_scores(const float* q, const float* keys, int64_t ld, int64_t d, const int32_t* idx, int64_t m,
                  float* out) {
  for (int64_t i = 0; i < m; i += 16) {
    const int64_t lanes = std::min<int64_t>(16, m - i);
    const float* row[16];
    for (int l = 0; l < 16; ++l) row[l] = keys + static_cast<int64_t>(idx[i + (l < lanes ? l : 0)]) * ld;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t e0 = 0; e0 < d; e0 += 16) {
      const int64_t width = std::min<int64_t>(16, d - e0);
      const __mmask16 part = width == 16 ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
      __m512 a[16];
      for (int l = 0; l < 16; ++l) a[l] = _mm512_maskz_loadu_ps(part, row[l] + e0);
      transpose_16x16(a);
      for (int64_t e = 0; e < width; ++e) acc = _mm512_fmadd_ps(_mm512_set1_ps(q[e0 + e]), a[e], acc);
    }
    _mm512_mask_storeu_ps(out + i, lanes == 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1), acc);
  }
}

// The square root of a float64 sum of squares, rounded up: 1 + 1e-12 covers the roundings of up to
// about 9000 additions of nonnegative terms (2^-53 each) and the root's own
inline double sqrt_above(double sum_of_squares) { return std::sqrt(sum_of_squares * (1 + 1e-12)); }

// sqrt(x . x) for x[0 .. d), in float64 (each square exact), rounded up: at least the norm
inline double norm_above(const float* x, int64_t d) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= d; e += 8)
    for (int j = 0; j < 8; ++j) acc[j] = std::fma(double(x[e + j]), double(x[e + j]), acc[j]);
  for (; e < d; ++e) acc[0] = std::fma(double(x[e]), double(x[e]), acc[0]);
  double sum = 0;
  for (double a : acc) sum += a;
  return sqrt_above(sum);
}

// The float32 choice screened: every row's scores first come from a cheaper product (int8 or
// bfloat16 roundings of q and k) whose error against the float32 product the plain path makes has
// a bound E per row. Every key among the row's keep largest float32 scores then has a screen score
// within 2 E of the keep-th largest screen score (k keys reach that one, so their float32 scores
// are at least it - E); those candidates (about keep and a few dozen more on random data) are
// scored again as the float32 path scores them (exact_scores) and chosen from as it chooses: the
// same keys, to the bit.
//
// Both bounds are built from norms computed in float64 and rounded up (u: the screen's rounding,
// gamma = d 2^-24 / (1 - d 2^-24): a float32 sum of d products):
// - bf16 (vdpbf16ps: 32 multiply-adds where a float32 fma does 16): ||q|| max ||k|| times
//   (2u + u^2) + gamma ((1 + u)^2 + 1), u = 2^-8, for the two roundings and both sums;
// - int8 (vpdpbusd: 64 multiply-adds, exact in int32): q ~ s_q q8 with s_q = max |q| / 127 and the
//   same for each key; then q . k - (s_q q8) . (s_k k8) = e_q . k + (s_q q8) . e_k, so
//   ||e_q|| max ||k|| + ||s_q q8|| max ||e_k||, plus the float32 sum's gamma ||q|| max ||k||, plus
//   2^-23 ||s_q q8|| max ||s_k k8|| for the two float32 products that scale the exact integer sum.
// An absolute term covers subnormals (flushed by vdpbf16ps, or results of the scaling).
struct Screen {
  std::vector<double> q_norm, k_max;  // ||q|| per row, max ||k|| per (batch, key head)
  bool finite = true;                 // every norm finite and products far from float32's range
};

inline const float* q_row(const Choice& c, int64_t row) {  // row of the (B, H, rows) rows
  return c.q.data_ptr<float>() + row / (c.heads * c.rows) * c.q.stride(0) + row / c.rows % c.heads * c.q.stride(1) +
         row % c.rows * c.q.stride(2);
}
inline const float* k_row(const Choice& c, int64_t group, int64_t j) {  // key j of (batch, key head) group
  return c.k.data_ptr<float>() + group / c.kv_heads * c.k.stride(0) + group % c.kv_heads * c.k.stride(1) +
         j * c.k.stride(2);
}
inline int64_t group_of(const Choice& c, int64_t bi, int64_t h) { return bi * c.kv_heads + h / (c.heads / c.kv_heads); }

Screen screen_of(const Choice& c) {
  Screen s;
  s.q_norm.resize(c.batch * c.heads * c.rows), s.k_max.assign(c.batch * c.kv_heads, 0.0);
  at::parallel_for(0, c.batch * c.heads * c.rows, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) s.q_norm[t] = norm_above(q_row(c, t), c.d);
  });
  at::parallel_for(0, c.batch * c.kv_heads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < c.n; ++j) {  // a NaN norm makes the maximum NaN
        const double norm = norm_above(k_row(c, t, j), c.d);
        s.k_max[t] = std::isnan(norm) || std::isnan(s.k_max[t]) ? norm : std::max(s.k_max[t], norm);
      }
  });
  for (double x : s.q_norm) s.finite = s.finite && std::isfinite(x);
  for (double x : s.k_max) s.finite = s.finite && std::isfinite(x);
  if (s.finite)
    s.finite = *std::max_element(s.q_norm.begin(), s.q_norm.end()) * *std::max_element(s.k_max.begin(), s.k_max.end()) < 1e37;
  return s;
}

inline double gamma_of(int64_t d) {
  const double x = static_cast<double>(d) * std::ldexp(1.0, -24);
  return x / (1 - x);
}
// The absolute part of both bounds: subnormal products and sums
inline double tiny_term(const Choice& c, double qn, double kn) {
  const double d = static_cast<double>(c.d);
  return std::ldexp(1.0, -125) * (std::sqrt(d) * (qn + kn) + d) + std::ldexp(1.0, -149) * (127.0 * 127.0 * d + 1);
}
// E for a row against bf16 products
inline double bf16_bound(const Choice& c, double qn, double kn) {
  const double u = std::ldexp(1.0, -8), gamma = gamma_of(c.d);
  return ((2 * u + u * u) + gamma * ((1 + u) * (1 + u) + 1)) * (1 + 1e-6) * qn * kn + tiny_term(c, qn, kn);
}

// The screened selection of a row x (screen scores of the keys [from, from + n)): the candidates
// within margin(row, group) of the cut, scored again in float32, then chosen from
template <typename Margin>
auto screened_select(const Choice& c, const Margin& margin_of) {
  return [&c, margin_of](int64_t bi, int64_t h, int64_t r, const float* x, int64_t from, int64_t n, Buffers& b,
                         int64_t* out, bool* valid) {
    if (c.keep >= n) return top_of_row(x, n, c.keep, b, out, valid);  // no value compared with another
    const int64_t row = (bi * c.heads + h) * c.rows + r, group = group_of(c, bi, h);
    const double margin = margin_of(row, group);
    int64_t count = candidates(x, n, c.keep, margin, b);
    TORCH_CHECK(count >= 0, "top_keys_of_products: a NaN among screened products of finite rows");
    if (count < c.keep) return keep_all_above_inf(x, n, c.keep, count, out, valid);
    if (count > c.keep) {  // the candidates within the margin of the keep-th largest screen score
      count = keep_at_least(lowered(kth_largest(b.value.data(), count, c.keep, b.keys), margin), count, b);
      exact_scores(q_row(c, row), k_row(c, group, from), c.k.stride(2), c.d, b.index.data(), count, b.value.data());
    }
    keep_largest(count, c.keep, b, out, valid);
  };
}
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
void choose_screened_bf16(const Choice& c, const Screen& s) {
  choose_in_pairs<float>(c, screened_select(c, [&](int64_t row, int64_t group) {
    return 2 * bf16_bound(c, s.q_norm[row], s.k_max[group]);
  }));
}
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512VNNI__)
constexpr int64_t kInt8Depth = 1024;  // d * 127^2 below 2^24: the integer sums are exact in float32
// int8 screens where their bounds average at most this many times the bf16 ones (1.8 on Gaussian rows,
// whose int8 screen leaves about 150 candidates of 16k for 105): the products cost
// 0.42 x (measured: 64 multiply-adds per vpdpbusd at 3.2 G/s a core, 32 per vdpbf16ps at 2.6 G/s)
constexpr double kInt8Worse = 3.0;

// x[0 .. d) in steps of s = max |x| / 127 (float32): x ~ s q, q[e] in [-127, 127] (d rounded up to
// whole quads of int8, zeros past d, into q); ||x - s q|| and ||s q|| in float64, rounded up
struct Rounded {
  float scale;
  double error, norm;
  int32_t sum;  // of q
};
inline Rounded round_to_int8(const float* x, int64_t d, int8_t* q) {
  float top = 0;
  for (int64_t e = 0; e < d; ++e) top = std::max(top, std::fabs(x[e]));
  const float scale = top / 127.0f;
  double error = 0, norm = 0;
  int32_t sum = 0;
  for (int64_t e = 0; e < (d + 3) / 4 * 4; ++e) {
    int32_t v = 0;
    if (e < d && scale > 0) v = static_cast<int32_t>(std::clamp(std::nearbyint(x[e] / scale), -127.0f, 127.0f));
    q[e] = static_cast<int8_t>(v), sum += v;
    if (e >= d) continue;
    const double kept = static_cast<double>(scale) * v, lost = static_cast<double>(x[e]) - kept;  // kept exact
    error = std::fma(lost, lost, error), norm = std::fma(kept, kept, norm);
  }
  return {scale, sqrt_above(error), sqrt_above(norm), sum};
}

// Keys in int8 quad panels: key 32 p + j's elements 4 e .. 4 e + 3 (each k8 + 128, unsigned bytes)
// at [e][j] of panel p, and its scale at scales[32 p + j] (0 past the last key)
struct Int8Keys {
  std::vector<float> scales;   // (groups, ldo)
  std::vector<double> error, norm;  // max ||e_k|| and max ||s_k k8|| per group
};
void pack_int8_panels(const Choice& c, int64_t group, int64_t ldo, uint32_t* out, Int8Keys& keys) {
  const int64_t quads = (c.d + 3) / 4;
  std::vector<int8_t> q(quads * 4);
  float* scales = keys.scales.data() + group * ldo;
  double error = 0, norm = 0;
  for (int64_t key = 0; key < ldo; ++key) {
    uint32_t* at = out + key / kPanel * quads * kPanel + key % kPanel;
    if (key >= c.n) {
      scales[key] = 0;
      for (int64_t e = 0; e < quads; ++e) at[e * kPanel] = 0x80808080u;
      continue;
    }
    const Rounded r = round_to_int8(k_row(c, group, key), c.d, q.data());
    scales[key] = r.scale, error = std::max(error, r.error), norm = std::max(norm, r.norm);
    for (int64_t e = 0; e < quads; ++e) {
      uint32_t quad;
      std::memcpy(&quad, q.data() + 4 * e, 4);
      at[e * kPanel] = quad ^ 0x80808080u;  // each byte plus 128
    }
  }
  keys.error[group] = error, keys.norm[group] = norm;
}

// out[r][0 .. 32) = s_q[r] s_k[j] (q8_r . k8_j) for R rows against a panel's 32 keys: the keys'
// bytes (k8 + 128) times a broadcast quad of q8 (vpdpbusd), summed from -128 sum(q8): exact in
// int32, then scaled in float32 (two roundings)
template <int R>
void rows_dot_int8_panel(const uint32_t* q, int64_t ldq, const int32_t* offset, const float* q_scale,
                         const uint32_t* panel, const float* k_scale, int64_t quads, float* out, int64_t ldo) {
  __m512i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_set1_epi32(-offset[r]);
  for (int64_t e = 0; e < quads; ++e) {
    const __m512i k0 = _mm512_loadu_si512(panel + e * kPanel), k1 = _mm512_loadu_si512(panel + e * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512i qe = _mm512_set1_epi32(static_cast<int32_t>(q[r * ldq + e]));
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], k0, qe);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], k1, qe);
    }
  }
  const __m512 s0 = _mm512_loadu_ps(k_scale), s1 = _mm512_loadu_ps(k_scale + 16);
  for (int r = 0; r < R; ++r) {
    const __m512 sq = _mm512_set1_ps(q_scale[r]);
    _mm512_storeu_ps(out + r * ldo, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_mul_ps(sq, s0)));
    _mm512_storeu_ps(out + r * ldo + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_mul_ps(sq, s1)));
  }
}

// Every row rounded to int8 quads (all rows at once: 4 d bytes each), with its bound's terms
struct Int8Rows {
  std::vector<uint32_t> quads;
  std::vector<int32_t> offset;  // 128 sum(q8)
  std::vector<float> scale;
  std::vector<double> error, norm;
};
Int8Rows int8_rows(const Choice& c) {
  const int64_t rows = c.batch * c.heads * c.rows, quads = (c.d + 3) / 4;
  Int8Rows q{std::vector<uint32_t>(rows * quads), std::vector<int32_t>(rows), std::vector<float>(rows),
             std::vector<double>(rows), std::vector<double>(rows)};
  at::parallel_for(0, rows, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Rounded r = round_to_int8(q_row(c, t), c.d, reinterpret_cast<int8_t*>(q.quads.data() + t * quads));
      q.offset[t] = 128 * r.sum, q.scale[t] = r.scale, q.error[t] = r.error, q.norm[t] = r.norm;
    }
  });
  return q;
}

// E for a row against int8 products (keys: its group's maxima)
inline double int8_bound(const Choice& c, double qn, double kn, double q_error, double q_norm, double k_error,
                         double k_norm) {
  return (q_error * kn + q_norm * k_error + gamma_of(c.d) * qn * kn + std::ldexp(1.0, -23) * q_norm * k_norm) *
             (1 + 1e-6) + tiny_term(c, qn, kn);
}

// The choice screened by int8 products, where their bounds are within ``worse`` x the bf16 ones
// on average over rows (outlying elements widen an int8 step: then false, nothing written)
bool choose_screened_int8(const Choice& c, const Screen& s, double worse) {
  const Int8Rows q = int8_rows(c);
  const int64_t quads = (c.d + 3) / 4, ldo = (c.n + kPanel - 1) / kPanel * kPanel, groups = c.batch * c.kv_heads;
  Int8Keys keys{std::vector<float>(groups * ldo), std::vector<double>(groups), std::vector<double>(groups)};
  // the keys' maxima (for every row's bound) are known once every group is packed
  const auto panels = packed_keys<uint32_t>(c, quads, [&](int64_t b, int64_t g, uint32_t* out) {
    pack_int8_panels(c, b * c.kv_heads + g, ldo, out, keys);
  });
  std::vector<double> bound(c.batch * c.heads * c.rows);  // E per row
  double int8 = 0, bf16 = 0;
  for (int64_t row = 0; row < static_cast<int64_t>(bound.size()); ++row) {
    const int64_t group = group_of(c, row / (c.heads * c.rows), row / c.rows % c.heads);
    bound[row] = int8_bound(c, s.q_norm[row], s.k_max[group], q.error[row], q.norm[row], keys.error[group],
                            keys.norm[group]);
    int8 += bound[row], bf16 += bf16_bound(c, s.q_norm[row], s.k_max[group]);
  }
  if (!(int8 <= worse * bf16)) return false;
  auto products = [&](int64_t b, int64_t h, int64_t r0, int64_t r1, const uint32_t* panels, int64_t p0, int64_t p1,
                      float* logits, int64_t ldo_) {
    const int64_t row0 = (b * c.heads + h) * c.rows + r0;
    const float* k_scale = keys.scales.data() + group_of(c, b, h) * ldo_;
    for_row_groups(r1 - r0, p0, p1, [&](auto R, int64_t r, int64_t p) {
      rows_dot_int8_panel<decltype(R)::value>(q.quads.data() + (row0 + r) * quads, quads, q.offset.data() + row0 + r,
                                              q.scale.data() + row0 + r, panels + p * quads * kPanel,
                                              k_scale + p * kPanel, quads, logits + r * ldo_ + p * kPanel, ldo_);
    });
  };
  choose_from(c, quads, panels.get(), products,
              screened_select(c, [&](int64_t row, int64_t) { return 2 * bound[row]; }));
  return true;
}
#endif

// The keys a row may see, on average over rows: the span of its intervals' union (all keys without)
double mean_keys_seen(const Choice& c) {
  if (!c.start) return static_cast<double>(c.n);
  double sum = 0;
  for (int64_t row = 0; row < c.batch * c.heads * c.rows; ++row) {
    const auto [lo, hi] = keys_seen(c, row, row + 1);
    sum += static_cast<double>(std::max<int64_t>(hi - lo, 0));
  }
  return sum / static_cast<double>(std::max<int64_t>(1, c.batch * c.heads * c.rows));
}

}  // namespace

std::tuple<int64_t, std::string> top_keys_of_products(const at::Tensor& q, const at::Tensor& k, int64_t keep,
                                                     const at::Tensor& span_start, const at::Tensor& span_end,
                                                     const at::Tensor& indices, const at::Tensor& valid,
                                                     int64_t screen_keys, const std::string& screen_by) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(3) == k.size(3) &&
                  k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "top_keys_of_products: q (B, H, rows, d) and k (B, H_kv, keys, d) with H a multiple of H_kv");
  const auto type = q.scalar_type();
  TORCH_CHECK((type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) && k.scalar_type() == type &&
                  q.device().is_cpu() && k.device().is_cpu() && q.stride(3) == 1 && k.stride(3) == 1,
              "top_keys_of_products: float32, bfloat16 or float16 CPU q and k of one type, with contiguous rows");
  const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), n = k.size(2);
  TORCH_CHECK(keep >= 1 && keep <= n, "top_keys_of_products: keep must be in [1, keys], got ", keep, " for ", n);
  TORCH_CHECK(indices.scalar_type() == at::kLong && valid.scalar_type() == at::kBool &&
                  indices.sizes() == valid.sizes() && indices.dim() == 4 && indices.size(0) == batch &&
                  indices.size(1) == heads && indices.size(2) == rows && indices.size(3) == keep &&
                  indices.stride(3) == 1 && valid.stride(3) == 1,
              "top_keys_of_products: indices (int64) and valid (bool) of shape (B, H, rows, keep)");
  TORCH_CHECK(screen_by == "auto" || screen_by == "int8" || screen_by == "bf16",
              "top_keys_of_products: screen_by must be 'auto', 'int8' or 'bf16', got '", screen_by, "'");
  const bool masked = span_start.numel() > 0;
  if (masked)
    TORCH_CHECK(span_start.scalar_type() == at::kLong && span_end.scalar_type() == at::kLong &&
                    span_start.is_contiguous() && span_end.is_contiguous() && span_start.sizes() == span_end.sizes() &&
                    span_start.dim() == 4 && span_start.size(0) == batch && span_start.size(1) == heads &&
                    span_start.size(2) == rows,
                "top_keys_of_products: contiguous int64 span starts and ends (B, H, rows, intervals)");
  const Choice c{q, k, indices, valid, keep, masked ? span_start.size(3) : 0,
                 masked ? span_start.data_ptr<int64_t>() : nullptr, masked ? span_end.data_ptr<int64_t>() : nullptr,
                 batch, heads, rows, q.size(3), n, k.size(1)};
  if (type == at::kFloat) {
#if defined(CPU_CAPABILITY_AVX512)
    if (screen_keys >= 0 && mean_keys_seen(c) >= static_cast<double>(screen_keys)) {
      const Screen s = screen_of(c);
      const int64_t all = batch * heads * rows;
#if defined(__AVX512VNNI__)
      if (s.finite && screen_by != "bf16" && c.d <= kInt8Depth &&
          choose_screened_int8(c, s, screen_by == "int8" ? std::numeric_limits<double>::infinity() : kInt8Worse))
        return {all, "int8"};
#endif
#if defined(__AVX512BF16__)
      if (s.finite && screen_by != "int8") {
        choose_screened_bf16(c, s);
        return {all, "bf16"};
      }
#endif
    }
#endif
    choose_widened<float>(c);
  } else if (type == at::kHalf) {
    choose_widened<at::Half>(c);
  } else {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    choose_in_pairs<at::BFloat16>(c, plain_select(c));
#else
    choose_widened<at::BFloat16>(c);
#endif
  }
  return {0, ""};
}

// The screens this build has, in the order "auto" tries them
std::vector<std::string> screens() {
  std::vector<std::string> out;
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512VNNI__)
  out.push_back("int8");
#endif
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  out.push_back("bf16");
#endif
  return out;
}

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
