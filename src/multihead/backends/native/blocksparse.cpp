// Block-sparse attention on CPU: one pass per tile of queries, forward and backward, driven by a
// tile table built in Python from the pattern's plan (multihead/backends/native/tiles.py says what
// each array holds).
//
// A tile is a set of query rows (from anywhere in the sequence) and a list of key positions; query
// rows, keys, values and output rows are all read and written in place through their positions.
// Query heads that share a key head (GQA) and the same key list are stacked as rows of one tile, so
// keys are never repeated. A tile of eight rows or more puts its rows on the vector lanes (lane
// kernels: a key's logits for sixteen rows are one vector, the softmax is elementwise work across
// keys, two lane blocks share each pass over the keys in fp32); a smaller one runs a row at a time
// (row kernels). Logits: scale, the score (relative biases and a softcap), the mask; then the
// weights over all of the tile's keys at once (softmax, or sigmoid), dropout, and the product with
// the values. bfloat16 multiplies in bf16 pairs where the CPU has AVX-512 BF16; float16 is widened.
// Forward keeps the log-sum-exp of every row; backward recomputes each tile's weights from it
// (FlashAttention-2's scheme). Key and value gradients are accumulated without atomics: the tiles of
// one (batch, key head) are split into a few partitions, each with its own accumulator, summed at
// the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include <sys/mman.h>

namespace multihead_native {
// pool.cpp: an empty CPU tensor, its buffer kept for reuse when big; ``fresh``: new zero pages
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool* fresh);
int64_t release_pool();
int64_t pool_idle_bytes();
int64_t pool_limit_bytes();
}  // namespace multihead_native

namespace {

using at::BFloat16;
using multihead_native::pooled_empty;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// ---------------------------------------------------------------------------------------------
// Small vector helpers.
// ---------------------------------------------------------------------------------------------
inline void convert(const float* src, BFloat16* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}
inline void convert(const BFloat16* src, float* dst, int64_t n) { at::vec::convert(src, dst, n); }
inline void convert(const float* src, at::Half* dst, int64_t n) { at::vec::convert(src, dst, n); }
inline void convert(const at::Half* src, float* dst, int64_t n) { at::vec::convert(src, dst, n); }
// dst[0 .. n) = src[0 .. n) as D (a copy, or a conversion)
template <typename S, typename D>
inline void copy_as(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) std::memcpy(dst, src, n * sizeof(D));
  else convert(src, dst, n);
}

template <typename C>
using Vec = at::vec::Vectorized<C>;

// A tile's rows (``E`` wide, one pointer each) in the compute type: the rows themselves, or
// converted copies in ``buf`` (pointers in ``out``).
template <typename C, typename T>
const C* const* as_compute(const std::vector<const T*>& rows, int64_t E, std::vector<C>& buf,
                           std::vector<const C*>& out) {
  if constexpr (std::is_same_v<T, C>) {
    return rows.data();
  } else {
    const int64_t M = static_cast<int64_t>(rows.size());
    buf.resize(M * E), out.resize(M);
    for (int64_t i = 0; i < M; ++i) convert(rows[i], buf.data() + i * E, E), out[i] = buf.data() + i * E;
    return out.data();
  }
}

// x[i] = exp(x[i] - m), returns the sum
inline float exp_sum(float* x, int64_t n, float m) {
  using V = at::vec::Vectorized<float>;
  const V vm(m);
  V acc(0.f);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V e = (V::loadu(x + i) - vm).exp_u20();
    e.store(x + i);
    acc = acc + e;
  }
  float s = at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}
inline double exp_sum(double* x, int64_t n, double m) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}
template <typename C>
inline C row_max(const C* x, int64_t n) {
  using V = at::vec::Vectorized<C>;
  V acc(-std::numeric_limits<C>::infinity());
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) acc = at::vec::maximum(acc, V::loadu(x + i));
  C m = at::vec::vec_reduce_all<C>([](V& a, V& b) { return at::vec::maximum(a, b); }, acc);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// ---------------------------------------------------------------------------------------------
// The tile table and the call's parameters.
// ---------------------------------------------------------------------------------------------
struct Table {
  const int64_t* q_rows;   // (R,) frame row -> query index
  const int64_t* tile_q;   // (T + 1,) offsets into q_rows
  const int64_t* tile_k;   // (T + 1,) offsets into a slot's key list
  const int64_t* k_idx;    // (S, K) key positions, per layout slot
  const int64_t* tile_m;   // (T,) offset of the tile's (keys x rows) mask in a slot, -1: none
  const uint8_t* mask;     // (S, Mtot) 1 = allowed
  const int64_t* tile_w;   // (S, T) the tile's keys in a slot: its first tile_w ones; null: all listed
  const int64_t* tile_mk;  // (T,) the keys its mask covers: the last tile_mk (the rest allowed); null: all
  const int64_t* k_start;  // (S, T) the tile's keys are a run from here (k_idx unread); null: listed
  int64_t T, K, Mtot, lb, lh;
};

// An optional (T,) or (S, T) int64 array: its data, or null when empty
inline const int64_t* optional_array(const at::Tensor& a, int64_t n, const char* what) {
  TORCH_CHECK(a.scalar_type() == at::kLong && a.is_contiguous() && a.device().is_cpu(),
              "tile table: ", what, " must be a contiguous int64 CPU tensor");
  if (a.numel() == 0) return nullptr;
  TORCH_CHECK(a.numel() == n, "tile table: ", what, " needs ", n, " entries, not ", a.numel());
  return a.data_ptr<int64_t>();
}

Table table_of(const at::Tensor& q_rows, const at::Tensor& tile_q, const at::Tensor& tile_k,
               const at::Tensor& k_idx, const at::Tensor& tile_m, const at::Tensor& mask,
               const at::Tensor& tile_w, const at::Tensor& tile_mk, const at::Tensor& k_start, int64_t lb,
               int64_t lh) {
  for (const auto* t : {&q_rows, &tile_q, &tile_k, &k_idx, &tile_m})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "tile table: index arrays must be contiguous int64 CPU tensors");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous(), "tile table: the mask must be uint8");
  const int64_t T = tile_q.numel() - 1;
  TORCH_CHECK(T >= 0 && tile_k.numel() == T + 1 && tile_m.numel() == T,
              "tile table: inconsistent tile counts");
  TORCH_CHECK(k_idx.dim() == 2 && k_idx.size(0) == lb * lh && mask.dim() == 2 && mask.size(0) == lb * lh,
              "tile table: key and mask arrays need one row per layout slot");
  Table t{q_rows.data_ptr<int64_t>(), tile_q.data_ptr<int64_t>(), tile_k.data_ptr<int64_t>(),
          k_idx.data_ptr<int64_t>(), tile_m.data_ptr<int64_t>(),
          mask.data_ptr<uint8_t>(), optional_array(tile_w, lb * lh * T, "the per-slot widths"),
          optional_array(tile_mk, T, "the mask widths"), optional_array(k_start, lb * lh * T, "the key runs"), T,
          k_idx.size(1), mask.size(1), lb, lh};
  TORCH_CHECK(t.tile_q[0] == 0 && t.tile_q[T] <= q_rows.numel() && t.tile_k[0] == 0 &&
              (t.k_start || t.tile_k[T] <= t.K), "tile table: offsets out of range");
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(t.tile_q[i] <= t.tile_q[i + 1] && t.tile_k[i] <= t.tile_k[i + 1], "tile table: offsets decrease");
    const int64_t m = t.tile_m[i], W = t.tile_k[i + 1] - t.tile_k[i];
    const int64_t mk = t.tile_mk ? t.tile_mk[i] : W;
    TORCH_CHECK(mk >= 0 && mk <= W, "tile table: a mask width outside [0, the tile's keys]");
    TORCH_CHECK(m < 0 || m + (t.tile_q[i + 1] - t.tile_q[i]) * mk <= t.Mtot, "tile table: a mask runs past the end");
    for (int64_t s = 0; t.tile_w && s < lb * lh; ++s)
      TORCH_CHECK(t.tile_w[s * T + i] >= (m < 0 ? 0 : mk) && t.tile_w[s * T + i] <= W,
                  "tile table: a per-slot width outside [the mask's keys, the tile's keys]");
  }
  return t;
}

// Whether the tiles write every query row (once: check_keys), so outputs need no clearing first.
inline bool covers_every_row(const Table& tab, int64_t Lq) {
  bool covers = tab.tile_q[tab.T] == Lq;
  for (int64_t t = 0; covers && t < tab.T; ++t) covers = tab.tile_k[t + 1] > tab.tile_k[t];
  for (int64_t i = 0; covers && tab.tile_w && i < tab.lb * tab.lh * tab.T; ++i) covers = tab.tile_w[i] > 0;
  return covers;
}

struct Geometry {
  int64_t B, H, Hkv, Lq, Lk, D, Dv, gq, offset;
  bool stream = false;  // output rows written with streaming stores (``streams``)
  // the index of query row q of head h, batch b, in a (B, H, Lq, ...) tensor's rows
  int64_t row(int64_t b, int64_t h, int64_t q) const { return (b * H + h) * Lq + q; }
};

// Dropout of the weights, from a counter-based hash (no state: backward regenerates the forward's
// mask, whatever the tiling or the threads). The pair (b, h, q, k) keeps its weight, scaled by
// 1 / (1 - p), when hash(row(b, h, q), k) >= threshold = floor(p 2^32), with 32-bit arithmetic:
//   mix(x) = lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
//   row(b, h, q) = mix(mix(seed ^ (b H + h) 0x9e3779b9) ^ q 0x85ebca6b)
//   hash(r, k) = mix(r ^ k 0xc2b2ae35)
// (q: the query's index, k: the key's; ``multihead.backends.native.function.dropout_mask`` is
// the same in PyTorch).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct Dropout {
  bool on = false;
  uint32_t seed = 0, threshold = 0;
  float keep_scale = 1;  // 1 / (1 - p)
  uint32_t row(int64_t b, int64_t h, int64_t H, int64_t q) const {
    return mix32(mix32(seed ^ static_cast<uint32_t>(b * H + h) * 0x9e3779b9u) ^ static_cast<uint32_t>(q) * 0x85ebca6bu);
  }
  bool keep(uint32_t row, int64_t k) const {
    return mix32(row ^ static_cast<uint32_t>(k) * 0xc2b2ae35u) >= threshold;
  }
};

Dropout dropout_of(double p, int64_t seed) {
  Dropout d;
  TORCH_CHECK(p >= 0 && p < 1, "native kernel: dropout must be in [0, 1)");
  d.on = p > 0;
  d.seed = static_cast<uint32_t>(seed);
  d.threshold = static_cast<uint32_t>(std::min(std::floor(p * 4294967296.0), 4294967295.0));
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return d;
}

// pt[j][l] (keys x L lanes) times its keep factor (0 or 1 / (1 - p)), for lanes l < nl of rows
// ``rowkey`` and the keys kpos[j]
template <typename C>
void drop_lanes(const Dropout& dr, const uint32_t* rowkey, int64_t nl, const int64_t* kpos, int64_t W, C* pt) {
  constexpr int64_t L = Vec<C>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    alignas(64) uint32_t keys[16] = {};
    std::copy(rowkey, rowkey + nl, keys);
    const __m512i rk = _mm512_load_si512(keys), thr = _mm512_set1_epi32(static_cast<int>(dr.threshold));
    const __m512i m1 = _mm512_set1_epi32(0x7feb352d), m2 = _mm512_set1_epi32(static_cast<int>(0x846ca68bu));
    const __m512 f = _mm512_set1_ps(dr.keep_scale);
    for (int64_t j = 0; j < W; ++j) {
      __m512i x = _mm512_xor_si512(rk, _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(kpos[j]) * 0xc2b2ae35u)));
      x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
      x = _mm512_mullo_epi32(x, m1);
      x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
      x = _mm512_mullo_epi32(x, m2);
      x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
      const __mmask16 kept = _mm512_cmpge_epu32_mask(x, thr);
      _mm512_storeu_ps(pt + j * L, _mm512_maskz_mul_ps(kept, _mm512_loadu_ps(pt + j * L), f));
    }
    return;
  }
#endif
  const C f = static_cast<C>(dr.keep_scale);
  for (int64_t j = 0; j < W; ++j)
    for (int64_t l = 0; l < nl; ++l) pt[j * L + l] = dr.keep(rowkey[l], kpos[j]) ? pt[j * L + l] * f : C(0);
}

// Position codes of the queries and keys (``Score``): both tensors or neither; the extremes of the
// positions the score reads (without codes, the queries' Lk - Lq .. Lk - 1 and the keys' 0 .. Lk - 1)
struct Codes {
  at::Tensor q, k;
  int64_t qlo = 0, qhi = 0, klo = 0, khi = 0;
};

// Score: logit = post[h, c] + cap * tanh((scale q.k + pre[h, c]) / cap) (without a cap:
// scale q.k + pre + post) at the column c = qmax + k - q (q: the query's position in the key
// frame, row + Lk - Lq), or with position codes c = qmax + kcode[k] - qcode[row]: a 2-D bias's
// codes of the grid's positions, or the original positions of a permuted frame (Routing's), one
// array per (batch, head). ``vec`` arrays are (H, Lvec) or absent.
// The normaliser (softmax, or sigmoid(logit + bias) with ``sigmoid``) and the weights' dropout
// (``drop``) ride along: how a tile's products become its weights.
template <typename C>
struct Score {
  const C* pre = nullptr;
  const C* post = nullptr;
  const int64_t* qcode = nullptr;  // (Lq,), (B, H, Lq) (``qcode_rows``) or absent
  const int64_t* kcode = nullptr;  // (Lk,), (B, Hkv, Lk) (``kcode_slot`` = Lk apart) or absent
  bool qcode_rows = false;
  int64_t kcode_slot = 0, offset = 0;  // offset: Lk - Lq
  int64_t lvec = 0, qmax = 0;
  C cap = 0;
  bool sigmoid = false;
  C bias = 0;  // sigmoid's
  Dropout drop;
  // the position the score reads for query row q (at: its row in (B, H, Lq) tensors)
  int64_t query(int64_t at, int64_t q) const { return qcode ? qcode[qcode_rows ? at : q] : q + offset; }
  // the column of (query at position qpos, key k) is base(qpos) + key(k)
  int64_t base(int64_t qpos) const { return qmax - qpos; }
  int64_t key(int64_t k) const { return kcode ? kcode[k] : k; }
  // the score for the keys of one (batch, key head) slot
  Score at_keys(int64_t slot) const {
    Score s = *this;
    if (kcode) s.kcode += slot * kcode_slot;
    return s;
  }
};

template <typename C>
Score<C> score_of(const at::Tensor& pre, const at::Tensor& post, const Codes& codes, int64_t offset, double cap,
                  int64_t qmax, double dropout, int64_t seed, const c10::optional<double>& sigmoid) {
  Score<C> sc;
  sc.sigmoid = sigmoid.has_value(), sc.bias = static_cast<C>(sigmoid.value_or(0.0));
  sc.offset = offset;
  if (codes.q.defined()) {
    sc.qcode = codes.q.data_ptr<int64_t>(), sc.qcode_rows = codes.q.dim() == 3;
    sc.kcode = codes.k.data_ptr<int64_t>(), sc.kcode_slot = codes.k.dim() == 3 ? codes.k.size(2) : 0;
  }
  sc.drop = dropout_of(dropout, seed);
  if (pre.defined()) sc.pre = static_cast<C*>(pre.data_ptr()), sc.lvec = pre.size(1);
  if (post.defined()) sc.post = static_cast<C*>(post.data_ptr()), sc.lvec = post.size(1);
  sc.cap = static_cast<C>(cap);
  sc.qmax = qmax;
  return sc;
}

template <typename T>
struct Inputs {
  const T *q, *k, *v;
  Geometry g;
  Table tab;
  // the keys and values of key head hk, batch b
  const T* keys(int64_t b, int64_t hk) const { return k + (b * g.Hkv + hk) * g.Lk * g.D; }
  const T* values(int64_t b, int64_t hk) const { return v + (b * g.Hkv + hk) * g.Lk * g.Dv; }
};

// Per-thread scratch.
template <typename T, typename C>
struct Scratch {
  std::vector<const T*> qp, dop, orp;  // the tile's query, output-gradient and output rows, in place
  std::vector<T*> op;                   // its output rows
  std::vector<C*> dqp;                  // its rows of dQ
  std::vector<const C*> qc, doc;        // its query and output-gradient rows in the compute type
  std::vector<C> s, o, m, l, dq, dk, dv, dp, raw, b1, b2, b3, qf, dof;  // qf, dof: rows as C (bf16)
  std::vector<int64_t> qpos, heads, at;  // per tile row: the score's query position (Score::query), head,
                                         // row in (B, H, Lq) tensors
  std::vector<uint32_t> rowkey;  // the rows' dropout keys
  std::vector<uint8_t> seen_k, seen_v;  // backward: the key rows of dK and dV that hold a sum
  std::vector<int64_t> run, run_ahead;  // a tile's run of keys written out (``keys_of``), the next one's
};

// ---------------------------------------------------------------------------------------------
// Lane kernels, for tiles of 8 rows or more (runs of keys and gathered ones): the keys are read in place
// through their positions (no copy), and the rows of a tile are the vector lanes, so the softmax
// of a row is elementwise work across keys. ``AT`` below is a (depth x lanes) transposed block.
// ---------------------------------------------------------------------------------------------
inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

// sigmoid(x + b), exactly 0 where x is -inf (a masked pair)
template <typename C>
inline Vec<C> vsigmoid(const Vec<C>& x, C b) {
  using V = Vec<C>;
  const V p = V(C(1)) / (V(C(1)) + vexp(V(-b) - x));
  return V::blendv(p, V(C(0)), x == V(-std::numeric_limits<C>::infinity()));
}
template <typename C>
inline C sigmoid(C x, C b) {
  return x == -std::numeric_limits<C>::infinity() ? C(0) : C(1) / (C(1) + std::exp(-(x + b)));
}

// Ask for a row (``width`` elements) to be brought into L1 (level 3) or L2 (level 2) while other work runs
template <int level, typename T>
inline void prefetch_row(const T* row, int64_t width) {
  for (int64_t c = 0; c < width * static_cast<int64_t>(sizeof(T)); c += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + c, 0, level);
}
template <typename T>
inline void prefetch_rows(const T* const* rows, int64_t n, int64_t width) {
  for (int64_t l = 0; l < n; ++l) prefetch_row<3>(rows[l], width);
}
// Key rows base + idx[j] * ld for j in [from, min(to, n)) into L1 (or L2, level 2): e.g. the next
// group of keys while one runs (the first lines of rows read in lockstep would otherwise stall the
// products)
template <int level = 3, typename T>
inline void prefetch_keys(const T* base, const int64_t* idx, int64_t from, int64_t to, int64_t n, int64_t ld,
                          int64_t width) {
  for (int64_t j = from; j < std::min(to, n); ++j) prefetch_row<level>(base + idx[j] * ld, width);
}

// ST[j][lane] = sum_d AT[d][lane] * B_j[d], B_j = base + idx[j] * ld (keys of type K: C or bf16),
// for NB lane blocks at once (block b: AT + b depth L, ST + b n L): a key's element, broadcast
// once, feeds NB products, and each key row is read once for NB x 16 rows.
template <int NB, typename C, typename K>
void lanes_dot(const C* AT, int64_t depth, const K* base, const int64_t* idx, int64_t n, int64_t ld, C* ST) {
  using V = Vec<C>;
  constexpr int64_t L = V::size();
  constexpr int64_t KB = 8;  // keys per pass: one load of AT feeds KB products
  int64_t j = 0;
  for (; j + KB <= n; j += KB) {
    prefetch_keys(base, idx, j + KB, j + 2 * KB, n, ld, depth);
    const K* b[KB];
    V acc[NB][KB];
#pragma GCC unroll 8
    for (int64_t t = 0; t < KB; ++t) {
      b[t] = base + idx[j + t] * ld;
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u][t] = V(C(0));
    }
    for (int64_t d = 0; d < depth; ++d) {
      V a[NB];
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) a[u] = V::loadu(AT + (u * depth + d) * L);
#pragma GCC unroll 8
      for (int64_t t = 0; t < KB; ++t) {
        const V bt(static_cast<C>(b[t][d]));
#pragma GCC unroll 2
        for (int u = 0; u < NB; ++u) acc[u][t] = at::vec::fmadd(a[u], bt, acc[u][t]);
      }
    }
#pragma GCC unroll 8
    for (int64_t t = 0; t < KB; ++t)
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u][t].store(ST + (u * n + j + t) * L);
  }
  for (; j < n; ++j) {
    const K* b0 = base + idx[j] * ld;
    V acc[NB];
#pragma GCC unroll 2
    for (int u = 0; u < NB; ++u) acc[u] = V(C(0));
    for (int64_t d = 0; d < depth; ++d) {
      const V bt(static_cast<C>(b0[d]));
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u] = at::vec::fmadd(V::loadu(AT + (u * depth + d) * L), bt, acc[u]);
    }
#pragma GCC unroll 2
    for (int u = 0; u < NB; ++u) acc[u].store(ST + (u * n + j) * L);
  }
}

// OT[d][lane] = sum_j PT[j][lane] * B_j[d], for d < width, NB lane blocks at once (block b:
// PT + b n L, OT + b width L)
template <int NB, typename C, typename K>
void lanes_combine(const C* PT, const K* base, const int64_t* idx, int64_t n, int64_t ld, int64_t width, C* OT) {
  using V = Vec<C>;
  constexpr int64_t L = V::size();
  constexpr int64_t DB = 8;
  int64_t d0 = 0;
  for (; d0 + DB <= width; d0 += DB) {
    V acc[NB][DB];
#pragma GCC unroll 8
    for (int64_t t = 0; t < DB; ++t)
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u][t] = V(C(0));
    for (int64_t j = 0; j < n; ++j) {
      V p[NB];
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) p[u] = V::loadu(PT + (u * n + j) * L);
      const K* b = base + idx[j] * ld + d0;
#pragma GCC unroll 8
      for (int64_t t = 0; t < DB; ++t) {
        const V bt(static_cast<C>(b[t]));
#pragma GCC unroll 2
        for (int u = 0; u < NB; ++u) acc[u][t] = at::vec::fmadd(p[u], bt, acc[u][t]);
      }
    }
#pragma GCC unroll 8
    for (int64_t t = 0; t < DB; ++t)
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u][t].store(OT + (u * width + d0 + t) * L);
  }
  for (; d0 < width; ++d0) {
    V acc[NB];
#pragma GCC unroll 2
    for (int u = 0; u < NB; ++u) acc[u] = V(C(0));
    for (int64_t j = 0; j < n; ++j) {
      const V bt(static_cast<C>(base[idx[j] * ld + d0]));
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u] = at::vec::fmadd(V::loadu(PT + (u * n + j) * L), bt, acc[u]);
    }
#pragma GCC unroll 2
    for (int u = 0; u < NB; ++u) acc[u].store(OT + (u * width + d0) * L);
  }
}

// A lane block's rows are read from and written to their places in the tensors, one pointer per
// row, and transposed on the way: XT (width x lanes) holds row l's element d at XT[d][l].
#if defined(CPU_CAPABILITY_AVX512)
// r[0..16) (16 rows of 16 floats) becomes its transpose
inline void transpose16(__m512* r) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88), t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88), t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88), r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(at::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(BFloat16* p, __m512 x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(x)); }
inline void store16(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16(at::Half* p, __m512 x, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store16(BFloat16* p, __m512 x, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, at::vec::cvtfp32_bf16(x)); }
// past the caches, to 16 x sizeof(T)-aligned p
inline void stream16(float* p, __m512 x) { _mm512_stream_ps(p, x); }
inline void stream16(at::Half* p, __m512 x) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void stream16(BFloat16* p, __m512 x) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(x)); }
inline __mmask16 first_n(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
// 16 values to p: under the mask ``last`` when ``ragged``, else past the caches with ``stream``
template <typename T>
inline void put16(T* p, __m512 x, bool ragged, __mmask16 last, bool stream) {
  if (ragged) store16(p, x, last);
  else if (stream) stream16(p, x);
  else store16(p, x);
}
#endif

// XT[d][l] = alpha rows[l][d] for l < nl (0 on the other lanes), d < width
template <typename C, typename T>
void rows_in(const T* const* rows, int64_t nl, int64_t width, C alpha, C* XT) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    const __m512 a = _mm512_set1_ps(alpha);
    for (int64_t c0 = 0; c0 < width; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, width - c0);
      const __mmask16 m = first_n(nc);
      __m512 r[16];
      if (nl == 16 && nc == 16) {
#pragma GCC unroll 16
        for (int64_t l = 0; l < 16; ++l) r[l] = load16(rows[l] + c0);
      } else {
#pragma GCC unroll 16
        for (int64_t l = 0; l < 16; ++l) r[l] = l < nl ? load16(rows[l] + c0, m) : _mm512_setzero_ps();
      }
      transpose16(r);
      if (nc == 16 && alpha == 1.f) {  // a constant count, stored from registers: the loop below
                                        // became a memcpy of the block spilled to the stack here
#pragma GCC unroll 16
        for (int64_t c = 0; c < 16; ++c) _mm512_storeu_ps(XT + (c0 + c) * 16, r[c]);
      } else {
        for (int64_t c = 0; c < nc; ++c) _mm512_storeu_ps(XT + (c0 + c) * 16, alpha == 1.f ? r[c] : _mm512_mul_ps(r[c], a));
      }
    }
    return;
  }
#endif
  constexpr int64_t L = Vec<C>::size();
  for (int64_t d = 0; d < width; ++d)
    for (int64_t l = 0; l < L; ++l) XT[d * L + l] = l < nl ? alpha * static_cast<C>(rows[l][d]) : C(0);
}

// rows[l][d] = XT[d][l] scale[l] for l < nl, d < width (scale: one entry per lane); with
// ``stream`` (rows aligned for it: ``streams``), written past the caches
template <typename C, typename T>
void rows_out(const C* XT, int64_t nl, int64_t width, const C* scale, T* const* rows, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    const __m512 f = _mm512_loadu_ps(scale);
    for (int64_t c0 = 0; c0 < width; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, width - c0);
      const __mmask16 m = first_n(nc);
      __m512 r[16];
#pragma GCC unroll 16
      for (int64_t c = 0; c < 16; ++c) r[c] = c < nc ? _mm512_mul_ps(_mm512_loadu_ps(XT + (c0 + c) * 16), f) : _mm512_setzero_ps();
      transpose16(r);
      if (nc == 16 && stream)
        for (int64_t l = 0; l < nl; ++l) stream16(rows[l] + c0, r[l]);
      else if (nc == 16)
        for (int64_t l = 0; l < nl; ++l) store16(rows[l] + c0, r[l]);
      else
        for (int64_t l = 0; l < nl; ++l) store16(rows[l] + c0, r[l], m);
    }
    return;
  }
#endif
  constexpr int64_t L = Vec<C>::size();
  for (int64_t l = 0; l < nl; ++l)
    for (int64_t d = 0; d < width; ++d) rows[l][d] = static_cast<T>(XT[d * L + l] * scale[l]);
}

// rows[i][d] = scale[i] sum_j P(j, i) B_j[d] for the n rows of up to two lane blocks, d < width:
// P(j, i) = PT[(i / L) W L + j L + i % L] (keys x lanes per block), B_j = base + idx[j] * ld,
// ``scale`` null for 1, rows written in place (``stream``: past the caches). In fp32 on AVX-512 the
// outputs of a few rows are accumulated in registers as rows (a weight broadcast times a key's row
// loaded as vectors) and stored as they are, with no transpose: one lane block's 16 rows a vector
// of d at a time, or, for two blocks, 6 rows and 64 d at a time. Otherwise through OT
// (lanes_combine) and rows_out.
#if defined(CPU_CAPABILITY_AVX512)
// R rows from i0 (stored: the first nr), DB vectors of d from d0 (the last under the mask
// ``last`` when ``ragged``)
template <int R, int DB, bool ragged, typename K, typename T>
inline void combine_rows_block(const float* PT, int64_t W, const K* base, const int64_t* idx, int64_t ld,
                               int64_t i0, int64_t nr, int64_t d0, __mmask16 last, const float* scale,
                               T* const* rows, bool stream) {
  __m512 acc[R][DB];
  const float* p[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    p[r] = PT + ((i0 + r) / 16) * W * 16 + (i0 + r) % 16;
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) acc[r][u] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < W; ++j) {
    const K* b = base + idx[j] * ld + d0;
    __m512 x[DB];
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) x[u] = ragged && u == DB - 1 ? load16(b + 16 * u, last) : load16(b + 16 * u);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 c = _mm512_set1_ps(p[r][j * 16]);
#pragma GCC unroll 4
      for (int u = 0; u < DB; ++u) acc[r][u] = _mm512_fmadd_ps(c, x[u], acc[r][u]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {  // acc indexed by constants only: it stays in registers
    if (r >= nr) break;
    const __m512 f = _mm512_set1_ps(scale ? scale[i0 + r] : 1.f);
    T* out = rows[i0 + r] + d0;
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) put16(out + 16 * u, _mm512_mul_ps(acc[r][u], f), ragged && u == DB - 1, last, stream);
  }
}

// R rows from i0 (the first nr stored), every d: DB vectors at a time, then single (ragged) ones
template <int R, int DB, typename K, typename T>
inline void combine_rows(const float* PT, int64_t W, const K* base, const int64_t* idx, int64_t ld, int64_t width,
                         int64_t i0, int64_t nr, const float* scale, T* const* rows, bool stream) {
  int64_t d0 = 0;
  for (; d0 + 16 * DB <= width; d0 += 16 * DB)
    combine_rows_block<R, DB, false>(PT, W, base, idx, ld, i0, nr, d0, 0xFFFF, scale, rows, stream);
  for (; d0 + 16 <= width; d0 += 16)
    combine_rows_block<R, 1, false>(PT, W, base, idx, ld, i0, nr, d0, 0xFFFF, scale, rows, stream);
  if (d0 < width)
    combine_rows_block<R, 1, true>(PT, W, base, idx, ld, i0, nr, d0, first_n(width - d0), scale, rows, stream);
}
#endif

template <typename C, typename K, typename T>
void lanes_combine_rows(const C* PT, int64_t W, const K* base, const int64_t* idx, int64_t ld, int64_t width,
                        int64_t n, const C* scale, T* const* rows, bool stream, C* OT) {
  constexpr int64_t L = Vec<C>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    if (n <= L) return combine_rows<16, 1>(PT, W, base, idx, ld, width, 0, n, scale, rows, stream);
    constexpr int R = 6;  // 24 accumulators: 6 rows of 64
    int64_t i0 = 0;
    for (; i0 + R <= n; i0 += R) combine_rows<R, 4>(PT, W, base, idx, ld, width, i0, R, scale, rows, stream);
    switch (n - i0) {
      case 5: return combine_rows<5, 4>(PT, W, base, idx, ld, width, i0, 5, scale, rows, stream);
      case 4: return combine_rows<4, 4>(PT, W, base, idx, ld, width, i0, 4, scale, rows, stream);
      case 3: return combine_rows<3, 4>(PT, W, base, idx, ld, width, i0, 3, scale, rows, stream);
      case 2: return combine_rows<2, 4>(PT, W, base, idx, ld, width, i0, 2, scale, rows, stream);
      case 1: return combine_rows<1, 4>(PT, W, base, idx, ld, width, i0, 1, scale, rows, stream);
      default: return;
    }
  }
#endif
  if (n > L) lanes_combine<2>(PT, base, idx, W, ld, width, OT);
  else lanes_combine<1>(PT, base, idx, W, ld, width, OT);
  C ones[L];
  std::fill(ones, ones + L, C(1));
  for (int64_t b = 0; b * L < n; ++b)
    rows_out(OT + b * width * L, std::min(L, n - b * L), width, scale ? scale + b * L : ones, rows + b * L, stream);
}

// A tile's mask: (keys x rows) bytes, 1 = allowed, for its keys from ``first`` on; earlier keys are
// allowed for every row. No bytes: no mask.
struct TileMask {
  const uint8_t* bytes = nullptr;
  int64_t first = 0;
  explicit operator bool() const { return bytes != nullptr; }
  bool allows(int64_t j, int64_t rows, int64_t r) const {
    return !bytes || j < first || bytes[(j - first) * rows + r];
  }
};

// Lanes l < nl of ``s`` whose byte m[l] is 0 become -inf (m: nl bytes).
template <typename C>
inline void mask_lanes(C* s, const uint8_t* m, int64_t nl) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    const __mmask16 lanes = first_n(nl);
    const __m128i bytes = _mm_maskz_loadu_epi8(lanes, m);  // no byte past m[nl - 1] is read
    const __mmask16 off = _mm_mask_testn_epi8_mask(lanes, bytes, bytes);
    _mm512_mask_storeu_ps(s, off, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
    return;
  }
#endif
  for (int64_t l = 0; l < nl; ++l) s[l] = m[l] ? s[l] : -std::numeric_limits<C>::infinity();
}

#if defined(CPU_CAPABILITY_AVX512)
// Each lane's first column in the score vectors (head lvec + base; 0 past nl), for a lane block
template <typename C>
inline void lane_columns(const Score<C>& sc, const int64_t* heads, const int64_t* qpos, int64_t first, int64_t nl,
                         int64_t* at) {
  for (int64_t l = 0; l < 16; ++l) at[l] = l < nl ? heads[first + l] * sc.lvec + sc.base(qpos[first + l]) : 0;
}

// Columns of the two halves (8 keys each) of a block of n keys from j0: a half's step is +1 (-1)
// when its columns ascend (descend) one by one (a window's keys, a grid row's, whose 2-D codes
// descend), else 0 (or fewer than 8 keys); low[h] its lowest column.
struct HalfRuns {
  int step[2] = {0, 0};
  int64_t low[2] = {0, 0};
  bool any() const { return step[0] || step[1]; }
};

template <typename C>
inline HalfRuns half_runs(const Score<C>& sc, const int64_t* kpos, int64_t j0, int64_t n) {
  HalfRuns r;
  for (int h = 0; h < 2; ++h) {
    const int64_t j = j0 + 8 * h;
    if (n < 8 * (h + 1)) break;
    const int64_t c0 = sc.key(kpos[j]), step = sc.key(kpos[j + 1]) - c0;
    bool run = step == 1 || step == -1;
    for (int64_t t = 2; run && t < 8; ++t) run = sc.key(kpos[j + t]) == c0 + t * step;
    if (run) r.step[h] = static_cast<int>(step), r.low[h] = step > 0 ? c0 : c0 - 7;
  }
  return r;
}

// x[0 .. 16) in the order of their halves' columns (a descending half reversed), and back
inline void in_column_order(const HalfRuns& r, __m512* x) {
  for (int h = 0; h < 2; ++h)
    if (r.step[h] < 0) std::reverse(x + 8 * h, x + 8 * h + 8);
}
#endif

// The score on a lane block's products ST (keys x lanes), a vector per key: each lane's column
// gathered from the score vectors (base and head per lane, the key's position added), or, for 8
// keys of consecutive columns (half_runs), 16 lanes' runs loaded and transposed; the softcap by
// vector tanh. ``raw`` (when not null) receives the pre-softcap values. False (nothing done) where
// the lanes are not 16 floats on AVX-512, or the vectors too long for 32-bit indices.
template <typename C>
inline bool lanes_score(const Score<C>& sc, const int64_t* kpos, int64_t W, int64_t nl, int64_t first,
                        const int64_t* heads, const int64_t* qpos, C* ST, C* raw) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    int64_t lanes_at[16];
    lane_columns(sc, heads, qpos, first, nl, lanes_at);
    const int64_t widest = sc.pre || sc.post ? (*std::max_element(heads + first, heads + first + nl) + 1) * sc.lvec : 0;
    if (widest >= (int64_t(1) << 31)) return false;
    alignas(64) int32_t at32[16];
    for (int l = 0; l < 16; ++l) at32[l] = static_cast<int32_t>(lanes_at[l]);
    const __m512i at = _mm512_load_si512(at32);
    const __mmask16 live = first_n(nl);
    const __m512 cap = _mm512_set1_ps(sc.cap), inv_cap = _mm512_set1_ps(sc.cap > 0 ? 1.f / sc.cap : 0.f);
    __m512 pre[16], post[16];  // the columns of 16 keys, a vector of lanes each
    // a vector's columns for keys j0 .. j0 + n: each lane's run transposed where the keys' columns
    // are consecutive, else gathered (lanes past nl read column 0, in range; their sums unused)
    auto columns = [&](const float* vec, int64_t j0, int64_t n, const HalfRuns& r, __m512* out) {
      if (r.any()) {  // each lane's two runs of 8 as a row, transposed (lanes past nl: zeros)
        for (int l = 0; l < 16; ++l) {
          if (l >= nl) {
            out[l] = _mm512_setzero_ps();
            continue;
          }
          const float* row = vec + lanes_at[l];
          const __m256 lo = r.step[0] ? _mm256_loadu_ps(row + r.low[0]) : _mm256_setzero_ps();
          const __m256 hi = r.step[1] ? _mm256_loadu_ps(row + r.low[1]) : _mm256_setzero_ps();
          out[l] = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
        }
        transpose16(out);
        in_column_order(r, out);
      }
      for (int64_t t = 0; t < n; ++t)
        if (!r.step[t / 8])
          out[t] = _mm512_i32gather_ps(
              _mm512_maskz_add_epi32(live, at, _mm512_set1_epi32(static_cast<int32_t>(sc.key(kpos[j0 + t])))), vec, 4);
    };
    for (int64_t j0 = 0; j0 < W; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, W - j0);
      const HalfRuns r = half_runs(sc, kpos, j0, n);
      if (sc.pre) columns(sc.pre, j0, n, r, pre);
      if (sc.post) columns(sc.post, j0, n, r, post);
      for (int64_t t = 0; t < n; ++t) {
        float* s = ST + (j0 + t) * 16;
        __m512 x = _mm512_loadu_ps(s);
        if (sc.pre) x = _mm512_add_ps(x, pre[t]);
        if (sc.cap > 0) {
          if (raw) _mm512_storeu_ps(raw + (j0 + t) * 16, x);
          x = _mm512_mul_ps(cap, at::vec::Vectorized<float>(_mm512_mul_ps(x, inv_cap)).tanh());
        }
        if (sc.post) x = _mm512_add_ps(x, post[t]);
        _mm512_storeu_ps(s, x);
      }
    }
    return true;
  }
#endif
  return false;
}

// Backward through a lane block's score (lanes_logits' terms): dS (DP, keys x lanes, unscaled)
// summed into the score vectors' gradients, dpost before the softcap's factor and dpre after it
// (this thread's, in double), and DP times the scale. On AVX-512, 16 keys at a time: where 8 of
// them have consecutive columns (half_runs) each lane's 8 sums are added to one run of a gradient
// (a transpose), else one by one; the softcap's tanh as vectors.
template <typename C>
void lanes_score_backward(const Score<C>& sc, C scale, const int64_t* kpos, int64_t W, int64_t nl, int64_t first,
                          const int64_t* heads, const int64_t* qpos, const C* raw, C* DP, double* dpre,
                          double* dpost) {
  constexpr int64_t L = Vec<C>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    int64_t at[16];
    lane_columns(sc, heads, qpos, first, nl, at);
    const __m512 inv_cap = _mm512_set1_ps(sc.cap > 0 ? 1.f / sc.cap : 0.f), one = _mm512_set1_ps(1.f);
    __m512 ds[16];
    auto add_to = [&](double* acc, int64_t j0, int64_t n, const HalfRuns& r) {
      if (r.any()) {
        __m512 t[16];  // after the transpose, lane l's keys in the order of their halves' columns
        std::copy(ds, ds + 16, t);
        in_column_order(r, t);
        transpose16(t);
        for (int64_t l = 0; l < nl; ++l)
          for (int h = 0; h < 2; ++h) {
            if (!r.step[h]) continue;
            double* d = acc + at[l] + r.low[h];
            const __m256 half = h ? _mm512_extractf32x8_ps(t[l], 1) : _mm512_castps512_ps256(t[l]);
            _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), _mm512_cvtps_pd(half)));
          }
      }
      alignas(64) float v[16];
      for (int64_t t = 0; t < n; ++t) {
        if (r.step[t / 8]) continue;
        _mm512_store_ps(v, ds[t]);
        const int64_t c = sc.key(kpos[j0 + t]);
        for (int64_t l = 0; l < nl; ++l) acc[at[l] + c] += v[l];
      }
    };
    for (int64_t j0 = 0; j0 < W; j0 += 16) {
      const int64_t n = std::min<int64_t>(16, W - j0);
      const HalfRuns r = half_runs(sc, kpos, j0, n);
      for (int64_t t = 0; t < 16; ++t) ds[t] = t < n ? _mm512_loadu_ps(DP + (j0 + t) * 16) : _mm512_setzero_ps();
      if (dpost) add_to(dpost, j0, n, r);
      if (sc.cap > 0)
        for (int64_t t = 0; t < n; ++t) {
          const __m512 th =
              at::vec::Vectorized<float>(_mm512_mul_ps(_mm512_loadu_ps(raw + (j0 + t) * 16), inv_cap)).tanh();
          ds[t] = _mm512_mul_ps(ds[t], _mm512_fnmadd_ps(th, th, one));
        }
      if (dpre) add_to(dpre, j0, n, r);
      for (int64_t t = 0; t < n; ++t) _mm512_storeu_ps(DP + (j0 + t) * 16, _mm512_mul_ps(ds[t], _mm512_set1_ps(scale)));
    }
    return;
  }
#endif
  for (int64_t l = 0; l < nl; ++l) {
    const int64_t i = first + l, base = sc.base(qpos[i]);
    for (int64_t j = 0; j < W; ++j) {
      C ds = DP[j * L + l];
      if (dpost) dpost[heads[i] * sc.lvec + base + sc.key(kpos[j])] += ds;
      if (sc.cap > 0) {
        const C th = std::tanh(raw[j * L + l] / sc.cap);
        ds *= C(1) - th * th;
      }
      if (dpre) dpre[heads[i] * sc.lvec + base + sc.key(kpos[j])] += ds;
      DP[j * L + l] = ds * scale;
    }
  }
}

// The score and the key-major mask on a lane block's products ST (keys x lanes).
// ``raw`` (when not null) receives the pre-softcap values.
template <typename C>
void lanes_logits(const Score<C>& sc, const int64_t* kpos, int64_t W, int64_t nl, int64_t first, int64_t rows,
                  const int64_t* heads, const int64_t* qpos, const TileMask& mask, C* ST, C* raw) {
  constexpr int64_t L = Vec<C>::size();
  if ((sc.pre || sc.post || sc.cap > 0) && !lanes_score(sc, kpos, W, nl, first, heads, qpos, ST, raw)) {
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t i = first + l, base = sc.base(qpos[i]);
      const C* pre = sc.pre ? sc.pre + heads[i] * sc.lvec + base : nullptr;
      const C* post = sc.post ? sc.post + heads[i] * sc.lvec + base : nullptr;
      for (int64_t j = 0; j < W; ++j) {
        C x = ST[j * L + l];
        if (pre) x += pre[sc.key(kpos[j])];
        if (sc.cap > 0) {
          if (raw) raw[j * L + l] = x;
          x = sc.cap * std::tanh(x / sc.cap);
        }
        if (post) x += post[sc.key(kpos[j])];
        ST[j * L + l] = x;
      }
    }
  }
  if (mask) {
    const int64_t r0 = first % rows;
    const uint8_t* m = mask.bytes + r0;  // key j's bytes: mask.bytes + (j - mask.first) rows
    if (r0 + nl <= rows) {  // the lanes are consecutive rows of one head: contiguous mask bytes
      for (int64_t j = mask.first; j < W; ++j, m += rows) mask_lanes(ST + j * L, m, nl);
    } else {  // the lanes wrap to the next head's rows: each lane's byte gathered
      int64_t at[L];
      for (int64_t l = 0; l < nl; ++l) at[l] = (first + l) % rows - r0;
      uint8_t lane_bytes[L];
      for (int64_t j = mask.first; j < W; ++j, m += rows) {
        for (int64_t l = 0; l < nl; ++l) lane_bytes[l] = m[at[l]];
        mask_lanes(ST + j * L, lane_bytes, nl);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bfloat16 products on AVX-512 BF16 (vdpbf16ps: two bf16 products summed into each fp32 lane,
// twice the products of an fp32 FMA per instruction). Pairs run along the depth for Q K^T (a lane
// block's queries as pairs of d on lanes, a key's pair of d broadcast) and along the keys for P V
// (two keys' weights per lane, the two keys' values at d broadcast as one pair).
// ---------------------------------------------------------------------------------------------
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
constexpr bool kBf16Pairs = true;
typedef uint32_t pair_t __attribute__((may_alias));  // two bf16, the first in the low half

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// QT2 (D/2 x 16, pairs): rows 0 .. nl (bf16, D wide; D even) with their d pairs on the lanes
inline void pairs_in(const BFloat16* const* rows, int64_t nl, int64_t D, pair_t* QT2) {
  const float* words[16];  // a pair is 32 bits: the float transpose moves them unchanged
  for (int64_t l = 0; l < nl; ++l) words[l] = reinterpret_cast<const float*>(rows[l]);
  rows_in<float, float>(words, nl, D / 2, 1.f, reinterpret_cast<float*>(QT2));
}

// ST[j][lane] = scale sum_p QT2[p][lane] . K_j[pair p] (keys read in place, rows ld apart), for NB
// lane blocks at once (block b: QT2 + b P 16, ST + b n 16): a key's pair, broadcast once, feeds NB
// products
template <int NB>
inline void lanes_dot_pairs(const pair_t* QT2, int64_t P, const BFloat16* base, const int64_t* idx, int64_t n,
                            int64_t ld, float scale, float* ST) {
  constexpr int64_t KB = 8;
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + KB <= n; j += KB) {
    prefetch_keys(base, idx, j + KB, j + 2 * KB, n, ld, 2 * P);
    const pair_t* b[KB];
    __m512 acc[NB][KB];
#pragma GCC unroll 8
    for (int64_t t = 0; t < KB; ++t) {
      b[t] = reinterpret_cast<const pair_t*>(base + idx[j + t] * ld);
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u][t] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < P; ++p) {
      __m512bh a[NB];
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) a[u] = as_bh(_mm512_loadu_si512(QT2 + (u * P + p) * 16));
#pragma GCC unroll 8
      for (int64_t t = 0; t < KB; ++t) {
        const __m512bh bt = as_bh(_mm512_set1_epi32(b[t][p]));
#pragma GCC unroll 2
        for (int u = 0; u < NB; ++u) acc[u][t] = _mm512_dpbf16_ps(acc[u][t], a[u], bt);
      }
    }
#pragma GCC unroll 8
    for (int64_t t = 0; t < KB; ++t)
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) _mm512_storeu_ps(ST + (u * n + j + t) * 16, _mm512_mul_ps(acc[u][t], vs));
  }
  for (; j < n; ++j) {
    const pair_t* b0 = reinterpret_cast<const pair_t*>(base + idx[j] * ld);
    __m512 acc[NB];
#pragma GCC unroll 2
    for (int u = 0; u < NB; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const __m512bh bt = as_bh(_mm512_set1_epi32(b0[p]));
#pragma GCC unroll 2
      for (int u = 0; u < NB; ++u) acc[u] = _mm512_dpbf16_ps(acc[u], as_bh(_mm512_loadu_si512(QT2 + (u * P + p) * 16)), bt);
    }
#pragma GCC unroll 2
    for (int u = 0; u < NB; ++u) _mm512_storeu_ps(ST + (u * n + j) * 16, _mm512_mul_ps(acc[u], vs));
  }
}

// The indices that interleave the first 16 16-bit elements of two vectors (a0, b0, a1, b1, ...)
// for _mm512_permutex2var_epi16: two rows' bf16 elements as pairs
inline __m512i pair_interleave() {
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  return _mm512_load_si512(kInterleave);
}

// Value pairs read in place: pair jp at d0 .. d0 + 15 is (V[idx[2 jp]][d], V[idx[2 jp + 1]][d]) for
// those 16 d, made from the two keys' rows by one permute where they are used (the second key 0 past
// n; ``last``: the d that exist when fewer than 16 remain). Packing a tile's pairs once instead, for
// its passes to share, was slower even for 64-row tiles (A/B at one thread, 16k bf16 forward:
// reading in place takes 0.92 of the time on 7 x 7, 0.95-0.97 on 13 x 13, Swin and axial, 0.99 on
// the window).
struct ValuePairs {
  const BFloat16* base;
  const int64_t* idx;
  int64_t n, ld;
  __m512i interleave;  // (a0, b0, a1, b1, ...) of a's and b's first 16 elements
  ValuePairs(const BFloat16* base, const int64_t* idx, int64_t n, int64_t ld)
      : base(base), idx(idx), n(n), ld(ld), interleave(pair_interleave()) {}
  template <bool ragged>
  __m512bh at(int64_t jp, int64_t d0, __mmask16 last) const {
    const BFloat16* r0 = base + idx[2 * jp] * ld + d0;
    const __m256i a = ragged ? _mm256_maskz_loadu_epi16(last, r0) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
    __m256i b = _mm256_setzero_si256();
    if (2 * jp + 1 < n) {
      const BFloat16* r1 = base + idx[2 * jp + 1] * ld + d0;
      b = ragged ? _mm256_maskz_loadu_epi16(last, r1) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1));
    }
    return as_bh(_mm512_permutex2var_epi16(_mm512_castsi256_si512(a), interleave, _mm512_castsi256_si512(b)));
  }
};

// PT2[jp][lane] = (P[2 jp][lane], P[2 jp + 1][lane]) in bf16, from P (n keys x 16 lanes, fp32)
inline void pack_weight_pairs(const float* PT, int64_t n, pair_t* PT2) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i il = _mm512_load_si512(kInterleave);
  for (int64_t jp = 0; 2 * jp < n; ++jp) {
    const __m512 p0 = _mm512_loadu_ps(PT + 2 * jp * 16);
    const __m512 p1 = 2 * jp + 1 < n ? _mm512_loadu_ps(PT + (2 * jp + 1) * 16) : _mm512_setzero_ps();
    const __m512bh both = _mm512_cvtne2ps_pbh(p1, p0);  // p0 in elements 0..15, p1 in 16..31
    _mm512_storeu_si512(PT2 + jp * 16, _mm512_permutexvar_epi16(il, reinterpret_cast<const __m512i&>(both)));
  }
}

// rows[l][d] = scale[l] sum_jp PT2[jp][l] . VP[jp][d] for the rows l < nl of a lane block, d < width:
// each row's outputs accumulated in a register, 16 d at a time (one vector of value pairs times a
// broadcast weight pair per row), and stored as they are (``stream``: past the caches). R: the rows
// computed (8 when a block is at most half full).
template <int R, bool ragged, typename O>
inline void combine_pairs_block(const pair_t* PT2, const ValuePairs& VP, int64_t np, int64_t nl, int64_t d0,
                                __mmask16 last, const float* scale, O* const* rows, bool stream) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < np; ++jp) {
    const __m512bh x = VP.at<ragged>(jp, d0, last);
    const pair_t* p = PT2 + jp * 16;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], as_bh(_mm512_set1_epi32(p[r])), x);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {  // acc indexed by constants only: it stays in registers
    if (r >= nl) break;
    put16(rows[r] + d0, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale[r])), ragged, last, stream);
  }
}

template <int R, typename O>
inline void combine_pairs_rows(const pair_t* PT2, const ValuePairs& VP, int64_t np, int64_t width, int64_t nl,
                               const float* scale, O* const* rows, bool stream) {
  int64_t d0 = 0;
  for (; d0 + 16 <= width; d0 += 16) combine_pairs_block<R, false>(PT2, VP, np, nl, d0, 0xFFFF, scale, rows, stream);
  if (d0 < width) combine_pairs_block<R, true>(PT2, VP, np, nl, d0, first_n(width - d0), scale, rows, stream);
}

// (rows of bf16 outputs, or of float32 ones: backward's dQ)
template <typename O>
inline void lanes_combine_pairs(const pair_t* PT2, const ValuePairs& VP, int64_t np, int64_t width, int64_t nl,
                                const float* scale, O* const* rows, bool stream) {
  if (nl <= 8) combine_pairs_rows<8>(PT2, VP, np, width, nl, scale, rows, stream);
  else combine_pairs_rows<16>(PT2, VP, np, width, nl, scale, rows, stream);
}
#else
constexpr bool kBf16Pairs = false;
#endif

// Whether a tile of T runs its products as bf16 pairs (bfloat16 on AVX-512 BF16, even widths).
template <typename T>
inline bool pair_products(const Geometry& g) {
  return kBf16Pairs && std::is_same_v<T, BFloat16> && g.D % 2 == 0 && g.Dv % 2 == 0;
}

// The forward's two products on up to ``blocks`` lane blocks (rows first .. first + nl), in the
// compute type: the blocks' query rows transposed in (times the scale) for Q K^T, the keys and
// values read in place. Block b's logits and weights are at ST + b W L, its output at OT + b Dv L.
template <typename T, typename C>
struct LaneProducts {
  static constexpr int64_t blocks = 2;
  const Geometry& g;
  const T *kbase, *vbase;
  const int64_t* kpos;
  int64_t W;
  C scale;
  const T* const* q;  // the tile's query rows, in place
  C* QT;              // (blocks x D x lanes) scratch
  void logits(int64_t first, int64_t nl, C* ST) const {
    constexpr int64_t L = Vec<C>::size();
    for (int64_t b = 0; b * L < nl; ++b) rows_in(q + first + b * L, std::min(L, nl - b * L), g.D, scale, QT + b * g.D * L);
    if (nl > L) lanes_dot<2>(QT, g.D, kbase, kpos, W, g.D, ST);
    else lanes_dot<1>(QT, g.D, kbase, kpos, W, g.D, ST);
  }
  // rows[i] = scale[i] sum_j PT(j, i) V_j for the pass's n rows (OT: blocks x Dv x lanes scratch)
  void combine(int64_t n, const C* PT, const C* scale, T* const* rows, bool stream, C* OT) const {
    lanes_combine_rows(PT, W, vbase, kpos, g.Dv, g.Dv, n, scale, rows, stream, OT);
  }
};

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The same products as bf16 pairs: the tile's values in key pairs read in place (``VP``); Q K^T
// on two lane blocks at once, the weighted values one block at a time.
struct PairProducts {
  static constexpr int64_t blocks = 2;
  const Geometry& g;
  const BFloat16* kbase;
  const int64_t* kpos;
  int64_t W;
  float scale;
  const BFloat16* const* q;  // the tile's query rows, in place
  pair_t* QT2;               // (blocks x D / 2 x 16)
  ValuePairs VP;
  pair_t* PT2;
  void logits(int64_t first, int64_t nl, float* ST) const {
    const int64_t P = g.D / 2;
    for (int64_t b = 0; b * 16 < nl; ++b) pairs_in(q + first + b * 16, std::min<int64_t>(16, nl - b * 16), g.D, QT2 + b * P * 16);
    if (nl > 16) lanes_dot_pairs<2>(QT2, P, kbase, kpos, W, g.D, scale, ST);
    else lanes_dot_pairs<1>(QT2, P, kbase, kpos, W, g.D, scale, ST);
  }
  void combine(int64_t n, const float* PT, const float* scale, BFloat16* const* rows, bool stream, float* OT) const {
    for (int64_t b = 0; b * 16 < n; ++b) {
      pack_weight_pairs(PT + b * W * 16, W, PT2);
      lanes_combine_pairs(PT2, VP, (W + 1) / 2, g.Dv, std::min<int64_t>(16, n - b * 16), scale + b * 16,
                          rows + b * 16, stream);
    }
  }
};
#endif

// The lane blocks of a tile with ``products``: logits, the score and mask, the weights (softmax,
// dropout after its sum; or sigmoid), the weighted values; the output into the rows w.op, lse (M,).
template <typename T, typename C, typename Products>
void lanes_attention(const Geometry& g, const Score<C>& sc, Scratch<T, C>& w, const Products& products, int64_t M,
                   int64_t rows, const int64_t* kpos, int64_t W, const TileMask& mask, C* ST, C* OT, C* lse) {
  using V = Vec<C>;
  constexpr int64_t L = V::size();
  const C ninf = -std::numeric_limits<C>::infinity();
  constexpr int64_t step = Products::blocks * L;
  for (int64_t first = 0; first < M; first += step) {
    const int64_t n = std::min(step, M - first);  // rows of this pass
    products.logits(first, n, ST);
    if (first + step < M) prefetch_rows(products.q + first + step, std::min(step, M - first - step), g.D);
    C ms[Products::blocks][L], ss[Products::blocks][L];
    for (int64_t b = 0; b * L < n; ++b) {
      const int64_t f = first + b * L, nl = std::min(L, n - b * L);
      C* S = ST + b * W * L;
      lanes_logits(sc, kpos, W, nl, f, rows, w.heads.data(), w.qpos.data(), mask, S, static_cast<C*>(nullptr));
      if (sc.sigmoid) {  // no sum to divide by: lse 0 + log 1
        for (int64_t j = 0; j < W; ++j) vsigmoid(V::loadu(S + j * L), sc.bias).store(S + j * L);
        V(C(0)).store(ms[b]), V(C(1)).store(ss[b]);
      } else {
        // four running maxima and two sums, so that each pass is not one chain of dependent adds
        V m[4] = {V(ninf), V(ninf), V(ninf), V(ninf)};
        int64_t j = 0;
        for (; j + 4 <= W; j += 4)
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) m[u] = at::vec::maximum(m[u], V::loadu(S + (j + u) * L));
        for (; j < W; ++j) m[0] = at::vec::maximum(m[0], V::loadu(S + j * L));
        m[0] = at::vec::maximum(at::vec::maximum(m[0], m[1]), at::vec::maximum(m[2], m[3]));
        // rows that see no key: exp against 0 gives 0 weights everywhere (-inf logits)
        const V safe = V::blendv(m[0], V(C(0)), m[0] == V(ninf));
        V sum[2] = {V(C(0)), V(C(0))};  // indexed by constants only: they stay in registers
        for (j = 0; j < W; j += 2)
#pragma GCC unroll 2
          for (int u = 0; u < 2; ++u)
            if (u == 0 || j + 1 < W) {
              const V e = vexp(V::loadu(S + (j + u) * L) - safe);
              e.store(S + (j + u) * L);
              sum[u] = sum[u] + e;
            }
        safe.store(ms[b]), (sum[0] + sum[1]).store(ss[b]);
      }
      if (sc.drop.on) drop_lanes(sc.drop, w.rowkey.data() + f, nl, kpos, W, S);  // after the sum
    }
    C inv[Products::blocks][L];
    for (int64_t b = 0; b * L < n; ++b) {
      const int64_t f = first + b * L, nl = std::min(L, n - b * L);
      for (int64_t l = 0; l < L; ++l) inv[b][l] = ss[b][l] > C(0) ? C(1) / ss[b][l] : C(0);
      for (int64_t l = 0; l < nl; ++l)
        lse[f + l] = ss[b][l] > C(0) ? ms[b][l] + std::log(ss[b][l]) : std::numeric_limits<C>::infinity();
    }
    products.combine(n, ST, inv[0], w.op.data() + first, g.stream, OT);
  }
}

// Forward of one tile on lanes (query rows w.qp, output rows w.op): the products in the compute type, or as bf16
// pairs (``pair_products``).
template <typename T, typename C>
void lanes_forward(const Geometry& g, const Score<C>& sc, C scale, Scratch<T, C>& w, int64_t M, int64_t rows,
                   const T* kbase, const T* vbase, const int64_t* kpos, int64_t W, const TileMask& mask, C* lse) {
  constexpr int64_t L = Vec<C>::size(), NB = LaneProducts<T, C>::blocks;
  w.dq.resize(NB * g.D * L), w.s.resize(NB * W * L), w.dk.resize(NB * g.Dv * L);
  C *QT = w.dq.data(), *ST = w.s.data(), *OT = w.dk.data();
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (pair_products<T>(g)) {  // QT holds the query pairs; w.dv the weight pairs
      w.dv.resize((W + 1) / 2 * 16);
      const PairProducts products{g, kbase, kpos, W, scale, w.qp.data(), reinterpret_cast<pair_t*>(QT),
                                  ValuePairs(vbase, kpos, W, g.Dv), reinterpret_cast<pair_t*>(w.dv.data())};
      return lanes_attention(g, sc, w, products, M, rows, kpos, W, mask, ST, OT, lse);
    }
  }
#endif
  const LaneProducts<T, C> products{g, kbase, vbase, kpos, W, scale, w.qp.data(), QT};
  lanes_attention(g, sc, w, products, M, rows, kpos, W, mask, ST, OT, lse);
}


// A key head's gradient accumulator (dK or dV: one row of ``width`` per key) whose rows are
// cleared on first use instead of all before backward: ``seen[j]`` once row j holds a sum. Rows
// no tile touched are cleared at the end (``finish``).
template <typename C>
struct KeyGrads {
  C* base;
  int64_t width;
  uint8_t* seen;
  C* row(int64_t j) const { return base + j * width; }
  bool first_use(int64_t j) {  // whether row j holds no sum yet; from now on it does
    const bool first = !seen[j];
    seen[j] = 1;
    return first;
  }
  C* cleared(int64_t j) {  // row j, zero if this is its first use
    if (first_use(j)) std::fill(row(j), row(j) + width, C(0));
    return row(j);
  }
  void finish(int64_t keys) {
    for (int64_t j = 0; j < keys; ++j)
      if (!seen[j]) std::fill(row(j), row(j) + width, C(0));
  }
};

// dst[t][d] += sum_i coeff(t, i) * rows[i][d] for KB keys t and DB vectors of d from d0, over n
// rows i in lane blocks of L: coeff(t, i) = coeffT[(i / L) cstride + t L + i % L]; a key with
// ``first[t]`` starts from 0 instead of dst. The keys' rows stay in registers while the rows
// stream by.
template <typename C, int KB, int DB>
inline void scatter_block(C* const* dst, const bool* first, const C* coeffT, int64_t cstride, const C* const* rows,
                          int64_t n, int64_t d0) {
  using V = Vec<C>;
  constexpr int64_t L = V::size();
  V acc[KB][DB];
#pragma GCC unroll 4
  for (int t = 0; t < KB; ++t)
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) acc[t][u] = first[t] ? V(C(0)) : V::loadu(dst[t] + d0 + u * L);
  for (int64_t b = 0; b * L < n; ++b) {
    const C* coeff = coeffT + b * cstride;
    const C* const* rb = rows + b * L;
    for (int64_t l = 0, nl = std::min(L, n - b * L); l < nl; ++l) {
      V r[DB];
#pragma GCC unroll 4
      for (int u = 0; u < DB; ++u) r[u] = V::loadu(rb[l] + d0 + u * L);
#pragma GCC unroll 4
      for (int t = 0; t < KB; ++t) {
        const V c(coeff[t * L + l]);
#pragma GCC unroll 4
        for (int u = 0; u < DB; ++u) acc[t][u] = at::vec::fmadd(c, r[u], acc[t][u]);
      }
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < KB; ++t)
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) acc[t][u].store(dst[t] + d0 + u * L);
}

template <typename C, int KB>
inline void scatter_keys(C* const* dst, const bool* first, const C* coeffT, int64_t cstride, const C* const* rows,
                         int64_t n, int64_t width) {
  constexpr int64_t L = Vec<C>::size();
  int64_t d0 = 0;
  for (; d0 + 4 * L <= width; d0 += 4 * L) scatter_block<C, KB, 4>(dst, first, coeffT, cstride, rows, n, d0);
  for (; d0 + L <= width; d0 += L) scatter_block<C, KB, 1>(dst, first, coeffT, cstride, rows, n, d0);
  for (; d0 < width; ++d0)
    for (int t = 0; t < KB; ++t) {
      C a = first[t] ? C(0) : dst[t][d0];
      for (int64_t i = 0; i < n; ++i) a += coeffT[(i / L) * cstride + t * L + i % L] * rows[i][d0];
      dst[t][d0] = a;
    }
}

// For the W keys of a tile, ``keys(dst, first, j, KB)`` on four distinct keys j.. at a time (KB:
// std::integral_constant 4), else one (1): dst their rows of ``acc``, first whether each is
// used for the first time (its sum then stored, not added). A padded key list may name one key
// twice: those keys go one at a time, so that each update sees the last.
template <typename C, typename F>
void for_key_groups(KeyGrads<C>& acc, const int64_t* kpos, int64_t W, const F& keys) {
  const int64_t width = acc.width;
  int64_t j = 0;
  for (; j + 4 <= W; j += 4) {
    prefetch_keys(acc.base, kpos, j + 4, j + 8, W, width, width);
    const int64_t* k = kpos + j;
    C* dst[4] = {acc.row(k[0]), acc.row(k[1]), acc.row(k[2]), acc.row(k[3])};
    const bool distinct = k[0] != k[1] && k[0] != k[2] && k[0] != k[3] && k[1] != k[2] && k[1] != k[3] &&
                          k[2] != k[3];
    if (distinct) {
      const bool first[4] = {acc.first_use(k[0]), acc.first_use(k[1]), acc.first_use(k[2]),
                             acc.first_use(k[3])};
      keys(dst, first, j, std::integral_constant<int, 4>());
    } else {
      for (int t = 0; t < 4; ++t) {
        const bool first = acc.first_use(k[t]);
        keys(dst + t, &first, j + t, std::integral_constant<int, 1>());
      }
    }
  }
  for (; j < W; ++j) {
    C* dst[1] = {acc.row(kpos[j])};
    const bool first = acc.first_use(kpos[j]);
    keys(dst, &first, j, std::integral_constant<int, 1>());
  }
}

// Key rows acc.row(kpos[j]) += sum_i coeff(j, i) * rows[i] for the W keys of up to two lane blocks
// (n rows; block b's coefficients at coeffT + b W L, keys x lanes): dK from dS and the queries, dV
// from P and dO.
template <typename C>
void lanes_scatter(KeyGrads<C>& acc, const int64_t* kpos, int64_t W, const C* coeffT, const C* const* rows,
                   int64_t n) {
  constexpr int64_t L = Vec<C>::size();
  for_key_groups(acc, kpos, W, [&](C* const* dst, const bool* first, int64_t j, auto KB) {
    scatter_keys<C, decltype(KB)::value>(dst, first, coeffT + j * L, W * L, rows, n, acc.width);
  });
}

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// A tile's n bf16 rows (width a multiple of 16) as pairs of rows: RP[p U + u] holds rows 2p and
// 2p + 1 interleaved over d in [16u, 16u + 16), U = width / 16 (a missing last row: zeros).
inline void pack_row_pairs(const BFloat16* const* rows, int64_t n, int64_t width, __m512i* RP) {
  const __m512i il = pair_interleave();
  const int64_t U = width / 16;
  for (int64_t p = 0; 2 * p < n; ++p)
    for (int64_t u = 0; u < U; ++u) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * p] + 16 * u));
      const __m256i b = 2 * p + 1 < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[2 * p + 1] + 16 * u))
                                      : _mm256_setzero_si256();
      _mm512_storeu_si512(RP + p * U + u,
                          _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), il, _mm512_castsi256_si512(b)));
    }
}

// scatter_block as bf16 pair products: dst[t][d] += sum_p CP[t][p] . RP[p][d] over the np row pairs,
// for KB keys and DB vectors of d from vector u0 (CP: each key's coefficients of rows 2p and 2p + 1
// as a bf16 pair)
template <int KB, int DB>
inline void scatter_pairs_block(float* const* dst, const bool* first, const pair_t (*CP)[16], const __m512i* RP,
                                int64_t np, int64_t U, int64_t u0) {
  __m512 acc[KB][DB];
#pragma GCC unroll 4
  for (int t = 0; t < KB; ++t)
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) acc[t][u] = first[t] ? _mm512_setzero_ps() : _mm512_loadu_ps(dst[t] + (u0 + u) * 16);
  for (int64_t p = 0; p < np; ++p) {
    __m512bh x[DB];
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) x[u] = as_bh(_mm512_loadu_si512(RP + p * U + u0 + u));
#pragma GCC unroll 4
    for (int t = 0; t < KB; ++t) {
      const __m512bh c = as_bh(_mm512_set1_epi32(CP[t][p]));
#pragma GCC unroll 4
      for (int u = 0; u < DB; ++u) acc[t][u] = _mm512_dpbf16_ps(acc[t][u], c, x[u]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < KB; ++t)
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) _mm512_storeu_ps(dst[t] + (u0 + u) * 16, acc[t][u]);
}

// lanes_scatter as bf16 pair products, for rows packed by pack_row_pairs (n rows, up to two lane
// blocks, width a multiple of 16): each key's coefficients rounded to bf16 pairs of adjacent lanes
// (rows), as the forward rounds its weights for P V.
inline void lanes_scatter_pairs(KeyGrads<float>& acc, const int64_t* kpos, int64_t W, const float* coeffT,
                                const __m512i* RP, int64_t n) {
  const int64_t np = (n + 1) / 2, U = acc.width / 16;
  for_key_groups(acc, kpos, W, [&](float* const* dst, const bool* first, int64_t j, auto KB) {
    constexpr int kb = decltype(KB)::value;
    pair_t CP[kb][16];
    for (int t = 0; t < kb; ++t)
      for (int64_t b = 0; b * 16 < n; ++b) {  // lanes past n hold 0
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(coeffT + b * W * 16 + (j + t) * 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(CP[t] + b * 8), reinterpret_cast<const __m256i&>(h));
      }
    int64_t u0 = 0;
    for (; u0 + 4 <= U; u0 += 4) scatter_pairs_block<kb, 4>(dst, first, CP, RP, np, U, u0);
    for (; u0 < U; ++u0) scatter_pairs_block<kb, 1>(dst, first, CP, RP, np, U, u0);
  });
}
#endif

// Backward's dK and dV scatters for the pass's n rows from ``first``: as bf16 pair products from the
// tile's bf16 rows in place (w.qp, w.dop) where ``pair_products`` and the widths are multiples of
// 16, else in the compute type from qf and dob.
template <typename T, typename C>
inline void backward_scatters(const Geometry& g, Scratch<T, C>& w, int64_t first, int64_t n, const int64_t* kpos,
                              int64_t W, const C* PT, const C* DST, const C* const* qf, const C* const* dob,
                              KeyGrads<C>& dk_acc, KeyGrads<C>& dv_acc) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (pair_products<T>(g) && g.D % 16 == 0 && g.Dv % 16 == 0) {
      w.dk.resize((n + 1) / 2 * std::max(g.D, g.Dv));  // floats: (n + 1) / 2 x width / 16 vectors of 64 bytes
      __m512i* RP = reinterpret_cast<__m512i*>(w.dk.data());
      pack_row_pairs(w.dop.data() + first, n, g.Dv, RP);
      lanes_scatter_pairs(dv_acc, kpos, W, PT, RP, n);
      pack_row_pairs(w.qp.data() + first, n, g.D, RP);
      lanes_scatter_pairs(dk_acc, kpos, W, DST, RP, n);
      return;
    }
  }
#endif
  lanes_scatter(dv_acc, kpos, W, PT, dob + first, n);
  lanes_scatter(dk_acc, kpos, W, DST, qf + first, n);
}

// Backward's scores (times the scale) and dO V^T for the pass's n rows from ``first`` as bf16 pair
// products (``pair_products``), from the tile's bf16 query and output-gradient rows in place (w.qp,
// w.dop) into ST and DPT, QT2 scratch (two lane blocks of D / 2 pairs); false (nothing done) for
// other dtypes or CPUs, whose products run in the compute type.
template <typename T, typename C>
inline bool backward_pair_dots(const Geometry& g, const Scratch<T, C>& w, int64_t first, int64_t n, const T* kbase,
                               const T* vbase, const int64_t* kpos, int64_t W, C scale, C* QT2, C* ST, C* DPT) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (!pair_products<T>(g)) return false;
    pair_t* pairs = reinterpret_cast<pair_t*>(QT2);
    auto dots = [&](const BFloat16* const* rows, int64_t depth, const BFloat16* base, float s, float* out) {
      const int64_t P = depth / 2;
      for (int64_t b = 0; b * 16 < n; ++b)
        pairs_in(rows + first + b * 16, std::min<int64_t>(16, n - b * 16), depth, pairs + b * P * 16);
      if (n > 16) lanes_dot_pairs<2>(pairs, P, base, kpos, W, depth, s, out);
      else lanes_dot_pairs<1>(pairs, P, base, kpos, W, depth, s, out);
    };
    dots(w.qp.data(), g.D, kbase, scale, ST);
    dots(w.dop.data(), g.Dv, vbase, 1.f, DPT);
    return true;
  }
#endif
  return false;
}

// Backward's dQ = dS K for the pass's n rows as bf16 pair products (``pair_products``): dS (DPT,
// times the scale) rounded to bf16 pairs of keys, as the forward rounds its weights for P V; the
// keys read in place in pairs. False (nothing done) for other dtypes or CPUs.
template <typename T, typename C>
inline bool backward_pair_dq(const Geometry& g, Scratch<T, C>& w, int64_t n, const T* kbase, const int64_t* kpos,
                             int64_t W, const C* DPT, C* const* dq) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (!pair_products<T>(g)) return false;
    w.b3.resize((W + 1) / 2 * 16);
    pair_t* PT2 = reinterpret_cast<pair_t*>(w.b3.data());
    const ValuePairs keys(kbase, kpos, W, g.D);
    static const float ones[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    for (int64_t b = 0; b * 16 < n; ++b) {
      pack_weight_pairs(DPT + b * W * 16, W, PT2);
      lanes_combine_pairs(PT2, keys, (W + 1) / 2, g.D, std::min<int64_t>(16, n - b * 16), ones, dq + b * 16, g.stream);
    }
    return true;
  }
#endif
  return false;
}

// Backward of one tile on lanes, two lane blocks per pass over the keys: the rows ``dq`` get dQ;
// dK and dV rows are accumulated in place. ``qf`` and ``dob``: the tile's query and
// output-gradient rows in the compute type. Block b's logits / weights are at ST + b W L, its dS at
// DPT + b W L.
template <typename T, typename C>
void lanes_backward(const Geometry& g, const Score<C>& sc, C scale, Scratch<T, C>& w, const C* const* qf, int64_t M,
                    int64_t rows, const T* kbase, const T* vbase, const int64_t* kpos, int64_t W,
                    const TileMask& mask, const C* const* dob, C* const* dq, KeyGrads<C>& dk_acc,
                    KeyGrads<C>& dv_acc, double* dpre, double* dpost) {
  using V = Vec<C>;
  constexpr int64_t L = V::size(), NB = 2;
  w.b1.resize(NB * g.D * L), w.b2.resize(NB * g.Dv * L), w.s.resize(NB * W * L), w.dp.resize(NB * W * L);
  w.o.resize(NB * g.D * L);
  if (sc.cap > 0) w.raw.resize(NB * W * L);
  if (sc.drop.on) w.b3.resize(W * L);
  C *QT = w.b1.data(), *DOT = w.b2.data(), *ST = w.s.data(), *DPT = w.dp.data(), *DQT = w.o.data();
  for (int64_t first = 0; first < M; first += NB * L) {
    const int64_t n = std::min(NB * L, M - first);  // rows of this pass
    if (!backward_pair_dots(g, w, first, n, kbase, vbase, kpos, W, scale, QT, ST, DPT)) {
      for (int64_t b = 0; b * L < n; ++b) {
        const int64_t nl = std::min(L, n - b * L);
        rows_in(qf + first + b * L, nl, g.D, scale, QT + b * g.D * L);
        rows_in(dob + first + b * L, nl, g.Dv, C(1), DOT + b * g.Dv * L);
      }
      if (n > L) {
        lanes_dot<2>(QT, g.D, kbase, kpos, W, g.D, ST);
        lanes_dot<2>(DOT, g.Dv, vbase, kpos, W, g.Dv, DPT);  // dO V^T
      } else {
        lanes_dot<1>(QT, g.D, kbase, kpos, W, g.D, ST);
        lanes_dot<1>(DOT, g.Dv, vbase, kpos, W, g.Dv, DPT);
      }
    }
    for (int64_t b = 0; b * L < n; ++b) {
      const int64_t f = first + b * L, nl = std::min(L, n - b * L);
      C *S = ST + b * W * L, *DP = DPT + b * W * L, *raw = sc.cap > 0 ? w.raw.data() + b * W * L : nullptr;
      lanes_logits(sc, kpos, W, nl, f, rows, w.heads.data(), w.qpos.data(), mask, S, raw);
      C lse_l[L], delta_l[L];
      for (int64_t l = 0; l < L; ++l) {
        lse_l[l] = l < nl ? w.m[f + l] : std::numeric_limits<C>::infinity();
        delta_l[l] = l < nl ? w.l[f + l] : C(0);
      }
      // rows with lse = +inf (no key) get P = 0: subtract a finite value and zero them after
      const V lse = V::loadu(lse_l), delta = V::loadu(delta_l);
      const V empty = lse == V(std::numeric_limits<C>::infinity());
      const V lse_safe = V::blendv(lse, V(C(0)), empty);
      // with dropout's factor z (0 or 1 / (1 - p)): dV_j += sum_lanes z P dO, and dS = P (z dO.V -
      // delta) (softmax) or z dO.V P (1 - P) (sigmoid)
      C* ZT = nullptr;
      if (sc.drop.on) {
        ZT = w.b3.data();
        std::fill(ZT, ZT + W * L, C(1));
        drop_lanes(sc.drop, w.rowkey.data() + f, nl, kpos, W, ZT);
      }
      // dS times the scale (for dQ and dK), here or, through a score, after it
      const bool through_score = dpre || dpost || sc.cap > 0;
      const V ds_scale(through_score ? C(1) : scale);
      for (int64_t j = 0; j < W; ++j) {
        const V s = V::loadu(S + j * L);
        const V p = sc.sigmoid ? vsigmoid(s, sc.bias) : V::blendv(vexp(s - lse_safe), V(C(0)), empty);
        const V pz = ZT ? p * V::loadu(ZT + j * L) : p, dp = V::loadu(DP + j * L);
        ((sc.sigmoid ? pz * (V(C(1)) - p) * dp : pz * dp - p * delta) * ds_scale).store(DP + j * L);
        pz.store(S + j * L);
      }
      if (through_score)
        lanes_score_backward(sc, scale, kpos, W, nl, f, w.heads.data(), w.qpos.data(), raw, DP, dpre, dpost);
    }
    // dV_j += sum_i z P[j][i] dO_i; dK_j += scale sum_i dS[j][i] q_i; dQ = scale dS K
    backward_scatters(g, w, first, n, kpos, W, ST, DPT, qf, dob, dk_acc, dv_acc);
    if (!backward_pair_dq(g, w, n, kbase, kpos, W, DPT, dq + first))
      lanes_combine_rows(DPT, W, kbase, kpos, g.D, g.D, n, static_cast<const C*>(nullptr), dq + first, g.stream, DQT);
  }
}


// ---------------------------------------------------------------------------------------------
// Row kernels, for tiles of a few rows (a key list: one query and its own keys; few rows of a
// run): one row at a time, its products with its keys read in place, sixteen keys at a time.
// ---------------------------------------------------------------------------------------------
// One vector of C from as many elements of T (bf16 and fp16 widened)
template <typename C, typename T>
inline Vec<C> load_as(const T* p) {
  if constexpr (std::is_same_v<T, C>) {
    return Vec<C>::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, at::Half>)
      return Vec<float>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec<float>(_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
#else
    float buf[Vec<float>::size()];
    for (int64_t i = 0; i < Vec<float>::size(); ++i) buf[i] = static_cast<float>(p[i]);
    return Vec<float>::loadu(buf);
#endif
  }
}

// sum_d a[d] b[d] in C (a and b: C or bf16)
template <typename C, typename A, typename T>
inline C dot(const A* a, const T* b, int64_t n) {
  using V = Vec<C>;
  V acc(C(0));
  int64_t d = 0;
  for (; d + V::size() <= n; d += V::size()) acc = at::vec::fmadd(load_as<C>(a + d), load_as<C>(b + d), acc);
  C s = at::vec::vec_reduce_all<C>([](V& x, V& y) { return x + y; }, acc);
  for (; d < n; ++d) s += static_cast<C>(a[d]) * static_cast<C>(b[d]);
  return s;
}

template <typename C, typename T>
inline void axpy(C alpha, const T* x, C* y, int64_t n) {  // y += alpha x
  using V = Vec<C>;
  const V va(alpha);
  int64_t d = 0;
  for (; d + V::size() <= n; d += V::size()) at::vec::fmadd(va, load_as<C>(x + d), V::loadu(y + d)).store(y + d);
  for (; d < n; ++d) y[d] += alpha * static_cast<C>(x[d]);
}

#if defined(CPU_CAPABILITY_AVX512)
// The sums of the lanes of a[0] .. a[15], as the lanes of one vector.
inline __m512 lane_sums16(const __m512* a) {
  __m512 w[8], x[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0 + a2, b0 + b2, a1 + a3, b1 + b3)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the lane's sum of four vectors
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  const __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x44), _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
  const __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x44), _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88), _mm512_shuffle_f32x4(z01, z23, 0xDD));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen dot products as the lanes of one vector: lane t is q[t / (16 / G)] . rows[t], over
// ``depth`` (a multiple of 16) elements; G query vectors, each against 16 / G rows.
template <int G, typename T>
inline __m512 dots16(const float* const* q, const T* const* rows, int64_t depth) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < depth; d += 16) {
    __m512 qv[G];
#pragma GCC unroll 2
    for (int i = 0; i < G; ++i) qv[i] = _mm512_loadu_ps(q[i] + d);
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_fmadd_ps(qv[t / (16 / G)], load_as<float>(rows[t] + d), acc[t]);
  }
  return lane_sums16(acc);
}
#endif

// s[j] = a . B_j for j < n, B_j = base + idx[j] * ld (T): sixteen keys at a time on AVX-512 float
template <typename C, typename T>
void row_dots(const C* a, int64_t depth, const T* base, const int64_t* idx, int64_t n, int64_t ld, C* s) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    if (depth % 16 == 0) {
      for (; j + 16 <= n; j += 16) {
        const T* b[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t) b[t] = base + idx[j + t] * ld;
        _mm512_storeu_ps(s + j, dots16<1>(&a, b, depth));
      }
    }
  }
#endif
  for (; j < n; ++j) s[j] = dot<C>(a, base + idx[j] * ld, depth);
}

// row_dots of a bf16 row against bf16 key rows as pair products (AVX-512 BF16, ``pair_products``,
// depth a multiple of 32): sixteen keys at a time, each key's 16 lanes of pair sums reduced
// together (lane_sums16), the products exact and summed in float32. False (nothing done) for other
// dtypes, depths or CPUs, whose rows widen to float32 (row_dots).
template <typename T, typename C>
inline bool row_dots_pairs(const Geometry& g, const T* a, int64_t depth, const T* base, const int64_t* idx, int64_t n,
                           int64_t ld, C* s) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, BFloat16> && std::is_same_v<C, float>) {
    if (!pair_products<T>(g) || depth % 32) return false;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t d = 0; d < depth; d += 32) {
        const __m512bh q = as_bh(_mm512_loadu_si512(a + d));
#pragma GCC unroll 16
        for (int t = 0; t < 16; ++t)
          acc[t] = _mm512_dpbf16_ps(acc[t], q, as_bh(_mm512_loadu_si512(base + idx[j + t] * ld + d)));
      }
      _mm512_storeu_ps(s + j, lane_sums16(acc));
    }
    for (; j < n; ++j) s[j] = dot<float>(a, base + idx[j] * ld, depth);
    return true;
  }
#endif
  return false;
}

// row_dots of two rows against the same keys' rows in two tensors (rows of ``depth``): s[j] =
// a . A_j and t[j] = b . B_j. On AVX-512 float eight keys of each a step, reduced together by one
// lane_sums16, so that the two gathers are in flight at once (backward's scores and dO V^T).
template <typename C, typename T>
void row_dots2(const C* a, const T* abase, const C* b, const T* bbase, const int64_t* idx, int64_t n, int64_t depth,
               C* s, C* t) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<C, float>) {
    if (depth % 16 == 0) {
      const float* q[2] = {a, b};
      for (; j + 8 <= n; j += 8) {
        const T* r[16];
#pragma GCC unroll 8
        for (int u = 0; u < 8; ++u) r[u] = abase + idx[j + u] * depth, r[8 + u] = bbase + idx[j + u] * depth;
        const __m512 sums = dots16<2>(q, r, depth);
        _mm256_storeu_ps(s + j, _mm512_castps512_ps256(sums));
        _mm256_storeu_ps(t + j, _mm512_extractf32x8_ps(sums, 1));
      }
    }
  }
#endif
  row_dots(a, depth, abase, idx + j, n - j, depth, s + j);
  row_dots(b, depth, bbase, idx + j, n - j, depth, t + j);
}

// o[d] = sum_j p[j] B_j[d] for d < width (B_j = base + idx[j] * ld, T), four vectors of o held in
// registers while the keys stream by, two keys at a time into two sets (eight chains of adds, not
// four: a key list's row waits on the additions, not the loads); pairs of keys with p = 0 skipped
template <typename C, typename T>
void row_combine(const C* p, const T* base, const int64_t* idx, int64_t n, int64_t ld, int64_t width, C* o) {
  using V = Vec<C>;
  constexpr int64_t L = V::size();
  int64_t d0 = 0;
  for (; d0 + 4 * L <= width; d0 += 4 * L) {
    V acc[2][4] = {{V(C(0)), V(C(0)), V(C(0)), V(C(0))}, {V(C(0)), V(C(0)), V(C(0)), V(C(0))}};
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      if (p[j] == C(0) && p[j + 1] == C(0)) continue;
#pragma GCC unroll 2
      for (int t = 0; t < 2; ++t) {
        const V c(p[j + t]);
        const T* b = base + idx[j + t] * ld + d0;
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) acc[t][u] = at::vec::fmadd(c, load_as<C>(b + u * L), acc[t][u]);
      }
    }
    if (j < n && p[j] != C(0)) {
      const V c(p[j]);
      const T* b = base + idx[j] * ld + d0;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[0][u] = at::vec::fmadd(c, load_as<C>(b + u * L), acc[0][u]);
    }
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) (acc[0][u] + acc[1][u]).store(o + d0 + u * L);
  }
  for (; d0 + L <= width; d0 += L) {
    V acc(C(0));
    for (int64_t j = 0; j < n; ++j)
      if (p[j] != C(0)) acc = at::vec::fmadd(V(p[j]), load_as<C>(base + idx[j] * ld + d0), acc);
    acc.store(o + d0);
  }
  for (; d0 < width; ++d0) {
    C acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += p[j] * static_cast<C>(base[idx[j] * ld + d0]);
    o[d0] = acc;
  }
}

// A row's logits from its products s (W keys): scale, the score; ``raw`` gets the pre-softcap values.
template <typename C>
void row_logits(const Score<C>& sc, C scale, const int64_t* kpos, int64_t W, int64_t head, int64_t qpos, C* s,
                C* raw) {
  if (!sc.pre && !sc.post && !(sc.cap > 0)) {  // scale alone
    using V = Vec<C>;
    const V vs(scale);
    int64_t j = 0;
    for (; j + V::size() <= W; j += V::size()) (vs * V::loadu(s + j)).store(s + j);
    for (; j < W; ++j) s[j] *= scale;
    return;
  }
  const int64_t base = sc.base(qpos);
  const C* pre = sc.pre ? sc.pre + head * sc.lvec + base : nullptr;
  const C* post = sc.post ? sc.post + head * sc.lvec + base : nullptr;
  for (int64_t j = 0; j < W; ++j) s[j] = scale * s[j] + (pre ? pre[sc.key(kpos[j])] : C(0));
  if (sc.cap > 0) {  // the softcap as vectors
    using V = Vec<C>;
    const V vcap(sc.cap), inv(C(1) / sc.cap);
    int64_t j = 0;
    for (; j + V::size() <= W; j += V::size()) {
      const V x = V::loadu(s + j);
      if (raw) x.store(raw + j);
      (vcap * (x * inv).tanh()).store(s + j);
    }
    for (; j < W; ++j) {
      if (raw) raw[j] = s[j];
      s[j] = sc.cap * std::tanh(s[j] * (C(1) / sc.cap));
    }
  }
  if (post)
    for (int64_t j = 0; j < W; ++j) s[j] += post[sc.key(kpos[j])];
}

// One row's weights from its products s (W keys; row r of a tile of ``rows``): the logits, the
// mask, softmax (or sigmoid) and dropout, in place. Returns false for a row that sees no key;
// else m and sum such that the output is (sum_j s[j] V_j) / sum and lse = m + log(sum).
template <typename C>
bool row_weights(const Score<C>& sc, C scale, const int64_t* kpos, int64_t W, const TileMask& mask, int64_t rows,
                 int64_t r, int64_t head, int64_t qpos, uint32_t rowkey, C* s, C& m, C& sum) {
  row_logits(sc, scale, kpos, W, head, qpos, s, static_cast<C*>(nullptr));
  if (mask)  // key-major: row r of a (keys x rows) block, stride rows
    for (int64_t j = mask.first; j < W; ++j)
      if (!mask.allows(j, rows, r)) s[j] = -std::numeric_limits<C>::infinity();
  m = 0, sum = 1;  // sigmoid: lse 0 + log 1, no sum to divide by
  if (sc.sigmoid) {
    using V = Vec<C>;
    int64_t j = 0;
    for (; j + V::size() <= W; j += V::size()) vsigmoid(V::loadu(s + j), sc.bias).store(s + j);
    for (; j < W; ++j) s[j] = sigmoid(s[j], sc.bias);
  } else {
    m = row_max(s, W);
    if (m == -std::numeric_limits<C>::infinity()) return false;
    sum = exp_sum(s, W, m);
  }
  if (sc.drop.on)
    for (int64_t j = 0; j < W; ++j) s[j] = sc.drop.keep(rowkey, kpos[j]) ? s[j] * sc.drop.keep_scale : C(0);
  return true;
}

// o_r[d] = sum_j p_r[j] V_r[idx_r[j]][d] for R rows at once (DB vectors of d from d0), each with
// its own weights, values (rows ld apart) and keys, all of count n: a key of every row a step, so
// that the rows' loads and chains of additions interleave (one key list alone waits on them)
template <int R, int DB, typename C, typename T>
void rows_combine_block(const C* const* p, const T* const* values, const int64_t* const* idx, int64_t n, int64_t ld,
                        int64_t d0, C* const* o) {
  using V = Vec<C>;
  constexpr int64_t L = V::size();
  const C* pr[R];
  const T* vr[R];
  const int64_t* ir[R];
  V acc[R][DB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    pr[r] = p[r], vr[r] = values[r] + d0, ir[r] = idx[r];
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) acc[r][u] = V(C(0));
  }
  for (int64_t j = 0; j < n; ++j) {
    V c[R];
    const T* b[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) c[r] = V(pr[r][j]), b[r] = vr[r] + ir[r][j] * ld;
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][u] = at::vec::fmadd(c[r], load_as<C>(b[r] + u * L), acc[r][u]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < DB; ++u) acc[r][u].store(o[r] + d0 + u * L);
}

// rows_combine_block over every d < width: four vectors at a time, then one, the last few d of
// each row alone
template <int R, typename C, typename T>
void rows_combine(const C* const* p, const T* const* values, const int64_t* const* idx, int64_t n, int64_t ld,
                  int64_t width, C* const* o) {
  constexpr int64_t L = Vec<C>::size();
  int64_t d0 = 0;
  for (; d0 + 4 * L <= width; d0 += 4 * L) rows_combine_block<R, 4>(p, values, idx, n, ld, d0, o);
  for (; d0 + L <= width; d0 += L) rows_combine_block<R, 1>(p, values, idx, n, ld, d0, o);
  for (int r = 0; d0 < width && r < R; ++r) row_combine(p[r], values[r] + d0, idx[r], n, ld, width - d0, o[r] + d0);
}

// Forward of one tile a row at a time: query rows ``qf`` in the compute type, outputs to w.o (M x Dv)
template <typename T, typename C>
void rows_forward(const Geometry& g, const Score<C>& sc, C scale, Scratch<T, C>& w, const C* const* qf, int64_t M,
                  int64_t rows, const T* kbase, const T* vbase, const int64_t* kpos, int64_t W, const TileMask& mask,
                  C* lse) {
  w.o.resize(M * g.Dv);
  w.s.resize(W);
  C* s = w.s.data();
  for (int64_t i = 0; i < M; ++i) {
    if (!row_dots_pairs(g, w.qp[i], g.D, kbase, kpos, W, g.D, s)) row_dots(qf[i], g.D, kbase, kpos, W, g.D, s);
    C m, sum;
    C* o = w.o.data() + i * g.Dv;
    if (!row_weights(sc, scale, kpos, W, mask, rows, i % rows, w.heads[i], w.qpos[i],
                     sc.drop.on ? w.rowkey[i] : 0u, s, m, sum)) {  // a row that sees no key: 0
      std::fill(o, o + g.Dv, C(0));
      lse[i] = std::numeric_limits<C>::infinity();
      continue;
    }
    row_combine(s, vbase, kpos, W, g.Dv, g.Dv, o);
    const C inv = C(1) / sum;
    for (int64_t d = 0; d < g.Dv; ++d) o[d] *= inv;
    lse[i] = m + std::log(sum);
  }
}

// One row's backward coefficients against its W keys: a[j] = p z (dV_j += a[j] dO) and b[j] =
// dS scale (dQ += b[j] K_j, dK_j += b[j] q), 0 for a masked pair; the score's bias gradients
// (dpre, dpost) summed on the way. ``qrow`` and ``d_o`` in the compute type; lse and delta =
// rowsum(dO * O) the row's; row r of a tile of ``rows`` (its mask's column).
template <typename T, typename C>
void row_coefficients(const Geometry& g, const Score<C>& sc, C scale, Scratch<T, C>& w, const C* qrow, const C* d_o,
                      C lse, C delta, int64_t head, int64_t qpos, uint32_t rowkey, const T* kbase,
                      const T* vbase, const int64_t* kpos, int64_t W, const TileMask& mask, int64_t rows, int64_t r,
                      double* dpre, double* dpost, C* a, C* b) {
  w.s.resize(W), w.dp.resize(W);
  if (sc.cap > 0) w.raw.resize(W);
  C *s = w.s.data(), *dp = w.dp.data();
  if (g.D == g.Dv) {
    row_dots2(qrow, kbase, d_o, vbase, kpos, W, g.D, s, dp);
  } else {
    row_dots(qrow, g.D, kbase, kpos, W, g.D, s);
    row_dots(d_o, g.Dv, vbase, kpos, W, g.Dv, dp);
  }
  row_logits(sc, scale, kpos, W, head, qpos, s, sc.cap > 0 ? w.raw.data() : nullptr);
  int64_t j = 0;
  const int64_t base = head * sc.lvec + sc.base(qpos);
  auto column = [&](int64_t i) { return base + sc.key(kpos[i]); };  // pair i's in the score vectors
  if (!sc.sigmoid && !sc.drop.on) {  // softmax without dropout: vectors
    using V = Vec<C>;
    constexpr int64_t L = V::size();
    if (mask)  // a masked pair's logit -inf: its p, and both coefficients, 0
      for (int64_t i = mask.first; i < W; ++i)
        if (!mask.allows(i, rows, r)) s[i] = -std::numeric_limits<C>::infinity();
    const V vlse(lse), vdelta(delta), vscale(scale), one(C(1)), inv_cap(sc.cap > 0 ? C(1) / sc.cap : C(0));
    const bool through_score = dpre || dpost || sc.cap > 0;
    // the score's gradients: dS of each pair added at its column, before (dpost) or after (dpre)
    // the softcap's factor (a masked pair's dS is 0)
    auto add_at_columns = [&](double* grad, const C* ds) {
      for (int64_t t = 0; t < L; ++t) grad[column(j + t)] += ds[t];
    };
    for (; j + L <= W; j += L) {
      const V p = vexp(V::loadu(s + j) - vlse);
      p.store(a + j);
      V ds = p * (V::loadu(dp + j) - vdelta);
      if (through_score) {
        ds.store(b + j);
        if (dpost) add_at_columns(dpost, b + j);
        if (sc.cap > 0) {
          const V th = (V::loadu(w.raw.data() + j) * inv_cap).tanh();
          ds = ds * (one - th * th);
          ds.store(b + j);
        }
        if (dpre) add_at_columns(dpre, b + j);
      }
      (ds * vscale).store(b + j);
    }
  }
  for (; j < W; ++j) {
    if (!mask.allows(j, rows, r)) {
      a[j] = b[j] = C(0);
      continue;
    }
    const C p = sc.sigmoid ? sigmoid(s[j], sc.bias) : std::exp(s[j] - lse);
    const C z = !sc.drop.on ? C(1) : sc.drop.keep(rowkey, kpos[j]) ? C(sc.drop.keep_scale) : C(0);
    C ds = sc.sigmoid ? z * dp[j] * p * (C(1) - p) : p * (z * dp[j] - delta);
    if (dpost) dpost[column(j)] += ds;
    if (sc.cap > 0) {
      const C th = std::tanh(w.raw[j] * (C(1) / sc.cap));
      ds *= C(1) - th * th;
    }
    if (dpre) dpre[column(j)] += ds;
    a[j] = p * z, b[j] = ds * scale;
  }
}

// Backward of one tile a row at a time (arguments as lanes_backward's)
template <typename T, typename C>
void rows_backward(const Geometry& g, const Score<C>& sc, C scale, Scratch<T, C>& w, const C* const* qf, int64_t M,
                   int64_t rows, const T* kbase, const T* vbase, const int64_t* kpos, int64_t W, const TileMask& mask,
                   const C* const* dob, C* const* dqr, KeyGrads<C>& dk_acc, KeyGrads<C>& dv_acc, double* dpre,
                   double* dpost) {
  w.b1.resize(W), w.b2.resize(W);
  C *a = w.b1.data(), *b = w.b2.data();
  for (int64_t i = 0; i < M; ++i) {
    if (w.m[i] == std::numeric_limits<C>::infinity()) {  // a row that sees no key
      std::fill(dqr[i], dqr[i] + g.D, C(0));
      continue;
    }
    const uint32_t rowkey = sc.drop.on ? w.rowkey[i] : 0u;
    row_coefficients(g, sc, scale, w, qf[i], dob[i], w.m[i], w.l[i], w.heads[i], w.qpos[i], rowkey, kbase, vbase, kpos,
                     W, mask, rows, i % rows, dpre, dpost, a, b);
    row_combine(b, kbase, kpos, W, g.D, g.D, dqr[i]);
    for (int64_t j = 0; j < W; ++j) {
      if (!mask.allows(j, rows, i % rows)) continue;
      if (a[j] != C(0)) axpy(a[j], dob[i], dv_acc.cleared(kpos[j]), g.Dv);
      axpy(b[j], qf[i], dk_acc.cleared(kpos[j]), g.D);
    }
  }
}

// Rows on lanes when a tile fills at least half the lanes, else one row at a time.
template <typename T>
inline bool use_lanes(int64_t M) {
  return 2 * M >= Vec<typename Acc<T>::type>::size();
}

// Pointers to a tile's rows of x (B, H, Lq, E), from their row indices ``at`` (Scratch::at)
template <typename P>
void row_pointers(P* x, int64_t E, const std::vector<int64_t>& at, std::vector<P*>& out) {
  out.resize(at.size());
  for (size_t i = 0; i < at.size(); ++i) out[i] = x + at[i] * E;
}

// Units of work: (batch, key head, head set, tile). A head set is the gq query heads of a key
// head stacked (layouts shared by all heads), or one query head (per-head layouts).
struct Units {
  int64_t sets, per_set;
  int64_t count(const Geometry& g, int64_t T) const { return g.B * g.Hkv * sets * T; }
};
inline Units units_of(const Geometry& g, const Table& t) {
  return t.lh == 1 ? Units{1, g.gq} : Units{g.gq, 1};
}
inline int64_t slot_of(const Table& t, int64_t b, int64_t h) {
  return (t.lb > 1 ? b : 0) * t.lh + (t.lh > 1 ? h : 0);
}

// One tile seen from one head set: its rows, keys and mask in the table.
struct Tile {
  int64_t h0, nh, rows, W, M;
  const int64_t* qrows;
  const int64_t* kpos;  // null: the run kstart, kstart + 1, ... (``keys_of``)
  int64_t kstart;
  TileMask mask;
};
inline Tile tile_of(const Table& tab, const Geometry& g, const Units& u, int64_t b, int64_t hk, int64_t set,
                    int64_t t) {
  Tile x;
  x.h0 = hk * g.gq + set * u.per_set, x.nh = u.per_set;
  const int64_t slot = slot_of(tab, b, x.h0), listed = tab.tile_k[t + 1] - tab.tile_k[t];
  x.rows = tab.tile_q[t + 1] - tab.tile_q[t], x.W = tab.tile_w ? tab.tile_w[slot * tab.T + t] : listed;
  x.M = x.nh * x.rows;
  x.qrows = tab.q_rows + tab.tile_q[t];
  x.kpos = tab.k_start ? nullptr : tab.k_idx + slot * tab.K + tab.tile_k[t];
  x.kstart = tab.k_start ? tab.k_start[slot * tab.T + t] : 0;
  if (tab.tile_m[t] >= 0) x.mask = {tab.mask + slot * tab.Mtot + tab.tile_m[t], x.W - (tab.tile_mk ? tab.tile_mk[t] : listed)};
  return x;
}

// The key positions of tile x: its listed ones, or its run written out into ``buf``
inline const int64_t* keys_of(const Tile& x, std::vector<int64_t>& buf) {
  if (x.kpos) return x.kpos;
  buf.resize(x.W);
  std::iota(buf.begin(), buf.end(), x.kstart);
  return buf.data();
}

// A tile's M rows, head by head (row i: query qrows[i % rows] of head h0 + i / rows): their heads,
// row indices and the score's query positions into w, without a division per row; and with
// dropout, their keys.
template <typename T, typename C>
void tile_rows(const Score<C>& sc, const Geometry& g, const Tile& x, int64_t b, Scratch<T, C>& w) {
  w.qpos.resize(x.M), w.heads.resize(x.M), w.at.resize(x.M);
  if (sc.drop.on) w.rowkey.resize(x.M);
  for (int64_t h = 0, i = 0; h < x.nh; ++h)
    for (int64_t r = 0; r < x.rows; ++r, ++i) {
      const int64_t q = x.qrows[r];
      w.heads[i] = x.h0 + h, w.at[i] = g.row(b, x.h0 + h, q), w.qpos[i] = sc.query(w.at[i], q);
      if (sc.drop.on) w.rowkey[i] = sc.drop.row(b, x.h0 + h, g.H, q);
    }
}

// Map a fresh tensor's pages in one call per thread (MADV_POPULATE_WRITE) instead of a fault per page
inline void populate(const at::Tensor& t) {
#ifdef MADV_POPULATE_WRITE
  const uintptr_t page = 4096, lo = (reinterpret_cast<uintptr_t>(t.data_ptr()) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) / page * page;
  if (hi <= lo + (1u << 20)) return;
  const int64_t pages = (hi - lo) / page;
  at::parallel_for(0, pages, 256, [&](int64_t p0, int64_t p1) {
    madvise(reinterpret_cast<void*>(lo + p0 * page), (p1 - p0) * page, MADV_POPULATE_WRITE);
  });
#endif
}

// An uninitialised tensor from the kept buffers (pooled_empty), made ready: a new one's pages
// mapped in one go (zeros already), a reused one cleared when ``clear``
inline at::Tensor kept_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool clear = false) {
  bool fresh;
  at::Tensor t = pooled_empty(sizes, options, &fresh);
  if (fresh) populate(t);
  else if (clear) t.zero_();
  return t;
}

// ``x`` in ``dtype``, in a kept buffer: x itself when it has that dtype, else converted into one.
// A fresh tensor's page faults cost more than the conversion: through ``Tensor.to`` each bf16
// gradient of a 16k-token, 8-head Swin step took 3.7 ms in a profiled process that mapped them
// afresh (1.3 ms kept); where glibc's heap already held that size, no difference.
inline at::Tensor kept_as(const at::Tensor& x, at::ScalarType dtype) {
  return x.scalar_type() == dtype ? x : kept_empty(x.sizes(), x.options().dtype(dtype)).copy_(x);
}

// The sum of per-part accumulators (parts, ...) over the parts, in a kept buffer
inline at::Tensor kept_sum(const at::Tensor& acc) {
  if (acc.size(0) == 1) return acc[0];
  at::Tensor y = kept_empty(acc.sizes().slice(1), acc.options());
  return at::sum_out(y, acc, 0);
}

// Outputs of this many bytes or more are written with streaming stores (when their rows align
// with the vectors: ``streams``): half the last-level cache. Such an output would leave the cache
// before it is read, and a streaming store skips reading each line before writing it.
inline int64_t stream_bytes() {
  static const int64_t llc = [] {  // sysfs's "32768K" (glibc's sysconf can be far off in a VM)
    int64_t kib = 0;
    if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      if (std::fscanf(f, "%" SCNd64 "K", &kib) != 1) kib = 0;
      std::fclose(f);
    }
    return kib > 0 ? kib << 10 : int64_t(32) << 20;
  }();
  return llc / 2;
}
inline bool streams(const at::Tensor& t) {  // every row starts on a 16-element boundary
  const int64_t vec = 16 * t.element_size();
  return static_cast<int64_t>(t.nbytes()) >= stream_bytes() && t.size(-1) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % vec == 0;
}

// The most key and value bytes of a row-kernel unit (a key list) that ``ahead`` asks into L2: on
// a Zen 5 core, fp32 lists of 64 keys (32 KiB) ran 0.88-0.93 x as long without the prefetch, fp32
// lists of 32 keys (16 KiB) 0.99-1.05 x, bf16 lists of 64 (16 KiB) 1.11-1.20 x and lists of 16
// keys in a window 1.14-1.53 x (A/B builds in one process, interleaved rounds).
constexpr int64_t ROW_PREFETCH_BYTES = 16 << 10;

// Key lists (TopK's: a tile of one query row, its own keys) run this many tiles at a time, their
// products with the values interleaved (``rows_combine``): one list alone waits on its loads and
// its chains of additions. Against one at a time (A/B builds in one process, 31 interleaved rounds,
// forward of the resolved lists, Zen 5): fp32 TopK(64) 0.935 at 4k and 0.92 at 16k, TopK(32)
// 0.955, TopK(16) 0.98, TopK(16) in a window 0.81 and 0.97; bf16 0.77-0.89. Over the same cases in
// earlier rounds two at a time read 0.87-1.01, four 0.77-1.0.
constexpr int LIST_ROWS = 4;

// Dynamic scheduling: each thread pulls units from a shared counter one ahead, so that
// ``ahead(next)`` can ask for the next unit's data before ``f(current)`` runs; ``batch`` units a
// pull, so that small units (a key list's row: about a microsecond) do not each pass the counter's
// cache line between the cores.
template <typename F, typename A>
void for_each_unit(int64_t n, const F& f, const A& ahead, int64_t batch = 1) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t i = next.fetch_add(batch), end = std::min(i + batch, n);
    while (i < n) {
      int64_t j = i + 1;
      if (j == end) j = next.fetch_add(batch), end = std::min(j + batch, n);
      if (j < n) ahead(j);
      f(i);
      i = j;
    }
#if defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();  // streaming stores seen before the threads join
#endif
  });
}
// Units a pull: up to 16, while leaving each thread 32 pulls or more to balance the load
inline int64_t claim_size(int64_t units) {
  return std::max<int64_t>(1, std::min<int64_t>(16, units / (32 * std::max(1, at::get_num_threads()))));
}
template <typename F>
void for_each_unit(int64_t n, const F& f) {
  for_each_unit(n, f, [](int64_t) {});
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const Table& tab, double scale_d, const at::Tensor& pre,
                                     const at::Tensor& post, const Codes& codes, double cap, int64_t qmax, double dropout,
                                     int64_t seed, const c10::optional<double>& sigmoid) {
  using C = typename Acc<T>::type;
  Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
             q.size(1) / k.size(1), k.size(2) - q.size(2)};
  // every query row written by some tile: no need to clear the output first (nor when its pages
  // are new: zeros)
  const bool covers = covers_every_row(tab, g.Lq);
  const auto lopt = q.options().dtype(c10::CppTypeToScalarType<C>::value);
  auto out = kept_empty({g.B, g.H, g.Lq, g.Dv}, q.options(), !covers);
  g.stream = streams(out);
  auto lse = covers ? at::empty({g.B, g.H, g.Lq}, lopt)
                    : at::full({g.B, g.H, g.Lq}, std::numeric_limits<double>::infinity(), lopt);
  Inputs<T> in{static_cast<T*>(q.data_ptr()), static_cast<T*>(k.data_ptr()), static_cast<T*>(v.data_ptr()), g, tab};
  const Score<C> sc = score_of<C>(pre, post, codes, g.offset, cap, qmax, dropout, seed, sigmoid);
  const C scale = static_cast<C>(scale_d);
  T* out_p = static_cast<T*>(out.data_ptr());
  C* lse_p = static_cast<C*>(lse.data_ptr());
  const Units u = units_of(g, tab);
  const int64_t n_units = u.count(g, tab.T);

  auto locate = [&](int64_t unit, int64_t& b, int64_t& hk) {
    const int64_t t = unit % tab.T, rest = unit / tab.T;
    const int64_t set = rest % u.sets, bk = rest / u.sets;
    b = bk / g.Hkv, hk = bk % g.Hkv;
    return tile_of(tab, g, u, b, hk, set, t);
  };
  std::vector<Scratch<T, C>> scratch(std::max(1, at::get_num_threads()));
  // the next unit's keys, values and first lane block of queries into L2; not the rows of a
  // row-kernel unit past ROW_PREFETCH_BYTES (its own loads, sixteen rows in lockstep, keep enough
  // lines in flight, and the burst of prefetches costs more than it hides)
  auto ahead = [&](int64_t unit) {
    int64_t b, hk;
    const Tile x = locate(unit, b, hk);
    if (!use_lanes<T>(x.M) && x.W * (g.D + g.Dv) * static_cast<int64_t>(sizeof(T)) > ROW_PREFETCH_BYTES) return;
    const int64_t* kpos = keys_of(x, scratch[at::get_thread_num()].run_ahead);
    prefetch_keys<2>(in.keys(b, hk), kpos, 0, x.W, x.W, g.D, g.D);
    prefetch_keys<2>(in.values(b, hk), kpos, 0, x.W, x.W, g.Dv, g.Dv);
    for (int64_t h = 0, i = 0; h < x.nh && i < Vec<C>::size(); ++h)
      for (int64_t r = 0; r < x.rows && i < Vec<C>::size(); ++r, ++i)
        prefetch_row<2>(in.q + g.row(b, x.h0 + h, x.qrows[r]) * g.D, g.D);
  };
  // key lists (every tile one query row of one head, its keys listed: TopK's): LIST_ROWS units at
  // a time, whose weighted values are summed together (rows_combine)
  if (tab.tile_q[tab.T] == tab.T && u.per_set == 1 && !tab.k_start) {
    constexpr int R = LIST_ROWS;
    const int64_t groups = (n_units + R - 1) / R;
    int64_t widest = 0;
    for (int64_t t = 0; t < tab.T; ++t) widest = std::max(widest, tab.tile_k[t + 1] - tab.tile_k[t]);
    for_each_unit(groups, [&](int64_t group) {
      Scratch<T, C>& w = scratch[at::get_thread_num()];
      const int64_t first = group * R, count = std::min<int64_t>(R, n_units - first);
      w.s.resize(R * widest), w.o.resize(R * g.Dv), w.qf.resize(R * g.D);
      const C* p[R];
      const T* values[R];
      const int64_t* keys[R];
      C* o[R];
      int64_t W[R], at_row[R];
      C m[R], sum[R];
      bool live[R];  // a row that sees a key
      for (int64_t e = 0; e < count; ++e) {
        int64_t b, hk;
        const Tile x = locate(first + e, b, hk);
        const Score<C> su = sc.at_keys(b * g.Hkv + hk);
        live[e] = x.rows > 0 && x.W > 0;
        if (!live[e]) continue;  // its output row and lse were cleared
        const int64_t q = x.qrows[0];
        C* s = w.s.data() + e * widest;
        W[e] = x.W, keys[e] = x.kpos, values[e] = in.values(b, hk), at_row[e] = g.row(b, x.h0, q);
        p[e] = s, o[e] = w.o.data() + e * g.Dv;
        const T* qrow = in.q + at_row[e] * g.D;
        if (!row_dots_pairs(g, qrow, g.D, in.keys(b, hk), x.kpos, x.W, g.D, s)) {
          const C* qc = reinterpret_cast<const C*>(qrow);
          if constexpr (!std::is_same_v<T, C>) convert(qrow, w.qf.data() + e * g.D, g.D), qc = w.qf.data() + e * g.D;
          row_dots(qc, g.D, in.keys(b, hk), x.kpos, x.W, g.D, s);
        }
        const uint32_t rowkey = sc.drop.on ? sc.drop.row(b, x.h0, g.H, q) : 0u;
        live[e] = row_weights(su, scale, x.kpos, x.W, x.mask, 1, 0, x.h0, su.query(at_row[e], q), rowkey, s, m[e],
                              sum[e]);
        if (!live[e]) {  // its keys all masked
          std::fill(out_p + at_row[e] * g.Dv, out_p + (at_row[e] + 1) * g.Dv, T(0));
          lse_p[at_row[e]] = std::numeric_limits<C>::infinity();
        }
      }
      const bool together = count == R && std::all_of(live, live + R, [](bool l) { return l; }) &&
                            std::all_of(W, W + R, [&](int64_t n) { return n == W[0]; });
      if (together) rows_combine<R>(p, values, keys, W[0], g.Dv, g.Dv, o);
      for (int64_t e = 0; e < count; ++e) {
        if (!live[e]) continue;
        if (!together) row_combine(p[e], values[e], keys[e], W[e], g.Dv, g.Dv, o[e]);
        const C inv = C(1) / sum[e];
        for (int64_t d = 0; d < g.Dv; ++d) o[e][d] *= inv;
        copy_as(o[e], out_p + at_row[e] * g.Dv, g.Dv);
        lse_p[at_row[e]] = m[e] + std::log(sum[e]);
      }
    }, [&](int64_t group) {
      for (int64_t e = group * R; e < std::min(n_units, (group + 1) * R); ++e) ahead(e);
    }, claim_size(groups));
    return {out, lse};
  }
  for_each_unit(n_units, [&](int64_t unit) {
    Scratch<T, C>& w = scratch[at::get_thread_num()];
    int64_t b, hk;
    const Tile x = locate(unit, b, hk);
    const int64_t rows = x.rows, W = x.W, M = x.M;
    const int64_t* kpos = keys_of(x, w.run);
    const TileMask& mask = x.mask;
    if (rows == 0 || W == 0) return;
    const Score<C> su = sc.at_keys(b * g.Hkv + hk);
    tile_rows(su, g, x, b, w);
    row_pointers(in.q, g.D, w.at, w.qp);
    row_pointers(out_p, g.Dv, w.at, w.op);
    const T *kbase = in.keys(b, hk), *vbase = in.values(b, hk);
    // keys read in place; rows on the vector lanes, read and written in place (or, few rows, one
    // at a time)
    w.m.resize(M);
    if (use_lanes<T>(M)) {
      lanes_forward(g, su, scale, w, M, rows, kbase, vbase, kpos, W, mask, w.m.data());
    } else {
      rows_forward(g, su, scale, w, as_compute(w.qp, g.D, w.qf, w.qc), M, rows, kbase, vbase, kpos, W, mask,
                   w.m.data());
      for (int64_t i = 0; i < M; ++i) copy_as(w.o.data() + i * g.Dv, w.op[i], g.Dv);
    }
    for (int64_t i = 0; i < M; ++i) lse_p[w.at[i]] = w.m[i];
  }, ahead, claim_size(n_units));
  return {out, lse};
}

// The width W of a table of key lists of one width (TopK's: tile t is query row t alone, over its
// W listed keys), or 0 for any other table.
inline int64_t list_width(const Table& tab) {
  if (tab.k_start || tab.tile_w || tab.T == 0) return 0;
  const int64_t W = tab.tile_k[1] - tab.tile_k[0];
  for (int64_t t = 0; t <= tab.T; ++t)
    if (tab.tile_q[t] != t || tab.tile_k[t] != t * W) return 0;
  return W;
}

// Backward of key lists (``list_width``), one key head at a time with every thread on it, in three
// passes: over the rows, counting each key's pairs; over the rows again, dQ and each pair's
// coefficients (``row_coefficients``), each pair's written to its key's next slot (a counting
// sort: the pairs of a key in order of rows); over the keys, each key's dK and dV rows summed in
// registers from its pairs' query and output-gradient rows (``row_combine``) and written once. A
// row at a time (the other tables' form), every pair is added into the dK and dV rows of a random
// key: two read-modify-writes of rows scattered over the head's gradients, which at 16k tokens,
// with each thread on its own head, no longer fit the last-level cache beside the keys and values.
template <typename T, typename C>
void lists_backward(const Geometry& g, const Score<C>& sc, C scale, const Inputs<T>& in, const Table& tab,
                    const Units& u, int64_t W, const T* do_p, const T* out_p, const C* lse_p, C* dq_p, C* dk_p,
                    C* dv_p, std::vector<Scratch<T, C>>& scratch, double* dpre, double* dpost, int64_t lvec) {
  const int64_t threads = static_cast<int64_t>(scratch.size()), n = u.sets * tab.T;
  std::vector<int64_t> rows_at(n), next(threads * g.Lk), off(g.Lk + 1);  // rows_at: into (B, H, Lq) tensors
  // the pairs sorted by key: their rows and coefficients (kept buffers: 16 MiB at 16k tokens)
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<C>::value);
  at::Tensor rows_t = kept_empty({n * W}, opt.dtype(at::kLong)), a_t = kept_empty({n * W}, opt),
             b_t = kept_empty({n * W}, opt);
  int64_t* by_key = rows_t.data_ptr<int64_t>();
  C *a_by_key = static_cast<C*>(a_t.data_ptr()), *b_by_key = static_cast<C*>(b_t.data_ptr());
  auto chunk = [&](int64_t c) { return std::make_pair(c * n / threads, (c + 1) * n / threads); };
  auto each_chunk = [&](const auto& f) {  // f(chunk, its first row, its end)
    at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) f(c, chunk(c).first, chunk(c).second);
    });
  };
  const C dead = std::numeric_limits<C>::infinity();  // the lse of a row that sees no key
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t hk = 0; hk < g.Hkv; ++hk) {
      const T *kbase = in.keys(b, hk), *vbase = in.values(b, hk);
      const Score<C> su = sc.at_keys(b * g.Hkv + hk);
      std::fill(next.begin(), next.end(), 0);
      each_chunk([&](int64_t c, int64_t r0, int64_t r1) {
        int64_t* count = next.data() + c * g.Lk;
        for (int64_t r = r0; r < r1; ++r) {
          const Tile x = tile_of(tab, g, u, b, hk, r / tab.T, r % tab.T);
          rows_at[r] = g.row(b, x.h0, x.qrows[0]);
          if (lse_p[rows_at[r]] == dead) continue;
          for (int64_t j = 0; j < W; ++j) count[x.kpos[j]] += x.mask.allows(j, 1, 0);
        }
      });
      int64_t total = 0;  // each chunk's first slot for each key: keys in order, chunks in order
      for (int64_t k = 0; k < g.Lk; ++k) {
        off[k] = total;
        for (int64_t c = 0; c < threads; ++c) {
          const int64_t count = next[c * g.Lk + k];
          next[c * g.Lk + k] = total, total += count;
        }
      }
      off[g.Lk] = total;
      each_chunk([&](int64_t c, int64_t r0, int64_t r1) {
        Scratch<T, C>& w = scratch[at::get_thread_num()];
        double* dpre_t = dpre ? dpre + at::get_thread_num() * g.H * lvec : nullptr;
        double* dpost_t = dpost ? dpost + at::get_thread_num() * g.H * lvec : nullptr;
        int64_t* slot = next.data() + c * g.Lk;
        w.qf.resize(g.D), w.dof.resize(g.Dv), w.b1.resize(W), w.b2.resize(W);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t at = rows_at[r];
          C* dq = dq_p + at * g.D;
          if (lse_p[at] == dead) {
            std::fill(dq, dq + g.D, C(0));
            continue;
          }
          const Tile x = tile_of(tab, g, u, b, hk, r / tab.T, r % tab.T);
          const int64_t q = x.qrows[0];
          const T *qrow = in.q + at * g.D, *d_o = do_p + at * g.Dv;
          const C* qc = reinterpret_cast<const C*>(qrow);
          const C* dc = reinterpret_cast<const C*>(d_o);
          if constexpr (!std::is_same_v<T, C>) {
            convert(qrow, w.qf.data(), g.D), convert(d_o, w.dof.data(), g.Dv);
            qc = w.qf.data(), dc = w.dof.data();
          }
          const uint32_t rowkey = sc.drop.on ? sc.drop.row(b, x.h0, g.H, q) : 0u;
          row_coefficients(g, su, scale, w, qc, dc, lse_p[at], dot<C>(out_p + at * g.Dv, d_o, g.Dv), x.h0,
                           su.query(at, q), rowkey, kbase, vbase, x.kpos, W, x.mask, 1, 0, dpre_t, dpost_t,
                           w.b1.data(), w.b2.data());
          row_combine(w.b2.data(), kbase, x.kpos, W, g.D, g.D, dq);
          for (int64_t j = 0; j < W; ++j) {
            if (!x.mask.allows(j, 1, 0)) continue;
            const int64_t i = slot[x.kpos[j]]++;
            by_key[i] = at, a_by_key[i] = w.b1[j], b_by_key[i] = w.b2[j];
          }
        }
      });
      C* dk_head = dk_p + (b * g.Hkv + hk) * g.Lk * g.D;
      C* dv_head = dv_p + (b * g.Hkv + hk) * g.Lk * g.Dv;
      at::parallel_for(0, g.Lk, 64, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t i = off[k], count = off[k + 1] - i;
          row_combine(a_by_key + i, do_p, by_key + i, count, g.Dv, g.Dv, dv_head + k * g.Dv);
          row_combine(b_by_key + i, in.q, by_key + i, count, g.D, g.D, dk_head + k * g.D);
        }
      });
    }
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& dout, const at::Tensor& lse,
                                      const Table& tab, double scale_d, const at::Tensor& pre,
                                      const at::Tensor& post, const Codes& codes, double cap, int64_t qmax, double dropout,
                                      int64_t seed, const c10::optional<double>& sigmoid, int64_t parts, bool want_pre,
                                      bool want_post) {
  using C = typename Acc<T>::type;
  Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3),
             q.size(1) / k.size(1), k.size(2) - q.size(2)};
  const auto copt = q.options().dtype(c10::CppTypeToScalarType<C>::value);
  const bool covers = covers_every_row(tab, g.Lq);  // every row's dq written by its tile
  const Units u = units_of(g, tab);
  const int64_t list_w = u.per_set == 1 ? list_width(tab) : 0;
  const bool lists = list_w > 0;
  if (lists) parts = 1;  // each key's dK and dV rows written once, by one thread
  auto dq = kept_empty({g.B, g.H, g.Lq, g.D}, copt, !covers);
  // dk, dv: their rows cleared on first use (KeyGrads)
  auto dk = kept_empty({parts, g.B, g.Hkv, g.Lk, g.D}, copt), dv = kept_empty({parts, g.B, g.Hkv, g.Lk, g.Dv}, copt);
  g.stream = streams(dq);
  const int64_t threads = std::max(1, at::get_num_threads());
  want_pre = want_pre && pre.defined(), want_post = want_post && post.defined();
  const int64_t lvec = pre.defined() ? pre.size(1) : (post.defined() ? post.size(1) : 0);
  // the bias gradients sum dS over every pair at one relative position: accumulated in double
  const auto dopt = q.options().dtype(at::kDouble);
  auto dpre = at::zeros({want_pre ? threads : 0, g.H, lvec}, dopt);
  auto dpost = at::zeros({want_post ? threads : 0, g.H, lvec}, dopt);
  Inputs<T> in{static_cast<T*>(q.data_ptr()), static_cast<T*>(k.data_ptr()), static_cast<T*>(v.data_ptr()), g, tab};
  const Score<C> sc = score_of<C>(pre, post, codes, g.offset, cap, qmax, dropout, seed, sigmoid);
  const C scale = static_cast<C>(scale_d);
  const T* do_p = static_cast<T*>(dout.data_ptr());
  const C* lse_p = static_cast<C*>(lse.data_ptr());
  const T* out_p = static_cast<T*>(out.data_ptr());
  C *dq_p = static_cast<C*>(dq.data_ptr()), *dk_p = static_cast<C*>(dk.data_ptr()), *dv_p = static_cast<C*>(dv.data_ptr());
  const int64_t per_part = (tab.T + parts - 1) / parts;
  const int64_t n_units = g.B * g.Hkv * parts;

  std::vector<Scratch<T, C>> scratch(threads);
  if (lists) {
    lists_backward(g, sc, scale, in, tab, u, list_w, do_p, out_p, lse_p, dq_p, dk_p, dv_p, scratch,
                   want_pre ? static_cast<double*>(dpre.data_ptr()) : nullptr,
                   want_post ? static_cast<double*>(dpost.data_ptr()) : nullptr, lvec);
  } else {
    for_each_unit(n_units, [&](int64_t unit) {
      Scratch<T, C>& w = scratch[at::get_thread_num()];
      const int64_t part = unit % parts, bk = unit / parts;
      const int64_t b = bk / g.Hkv, hk = bk % g.Hkv;
      w.seen_k.assign(g.Lk, 0), w.seen_v.assign(g.Lk, 0);
      KeyGrads<C> dk_acc{dk_p + ((part * g.B + b) * g.Hkv + hk) * g.Lk * g.D, g.D, w.seen_k.data()};
      KeyGrads<C> dv_acc{dv_p + ((part * g.B + b) * g.Hkv + hk) * g.Lk * g.Dv, g.Dv, w.seen_v.data()};
      const int64_t bias_at = at::get_thread_num() * g.H * lvec;
      double* dpre_t = want_pre ? static_cast<double*>(dpre.data_ptr()) + bias_at : nullptr;
      double* dpost_t = want_post ? static_cast<double*>(dpost.data_ptr()) + bias_at : nullptr;
      const T *kbase = in.keys(b, hk), *vbase = in.values(b, hk);
      const Score<C> su = sc.at_keys(b * g.Hkv + hk);
      const int64_t t_end = std::min(tab.T, (part + 1) * per_part);
      for (int64_t t = part * per_part; t < t_end; ++t)
        for (int64_t set = 0; set < u.sets; ++set) {
          const Tile x = tile_of(tab, g, u, b, hk, set, t);
          const int64_t rows = x.rows, W = x.W, M = x.M;
          const int64_t* kpos = keys_of(x, w.run);
          const TileMask& mask = x.mask;
          if (rows == 0 || W == 0) continue;
          w.m.resize(M), w.l.resize(M);
          tile_rows(su, g, x, b, w);
          row_pointers(in.q, g.D, w.at, w.qp);
          row_pointers(do_p, g.Dv, w.at, w.dop);
          row_pointers(out_p, g.Dv, w.at, w.orp);
          row_pointers(dq_p, g.D, w.at, w.dqp);
          for (int64_t i = 0; i < M; ++i) {  // lse, and delta = rowsum(dO * O)
            w.m[i] = lse_p[w.at[i]];
            w.l[i] = dot<C>(w.orp[i], w.dop[i], g.Dv);
          }
          const C* const* qc = as_compute(w.qp, g.D, w.qf, w.qc);
          const C* const* dc = as_compute(w.dop, g.Dv, w.dof, w.doc);
          if (use_lanes<T>(M))
            lanes_backward(g, su, scale, w, qc, M, rows, kbase, vbase, kpos, W, mask, dc, w.dqp.data(), dk_acc,
                           dv_acc, dpre_t, dpost_t);
          else
            rows_backward(g, su, scale, w, qc, M, rows, kbase, vbase, kpos, W, mask, dc, w.dqp.data(), dk_acc,
                          dv_acc, dpre_t, dpost_t);
        }
      dk_acc.finish(g.Lk), dv_acc.finish(g.Lk);
    });
  }
  const auto acc = c10::CppTypeToScalarType<C>::value, dtype = q.scalar_type();
  return {kept_as(dq, dtype), kept_as(kept_sum(dk), dtype), kept_as(kept_sum(dv), dtype),
          want_pre ? dpre.sum(0).to(acc) : at::Tensor(), want_post ? dpost.sum(0).to(acc) : at::Tensor()};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "native kernel: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "native kernel: (batch, heads, tokens, dim) tensors");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "native kernel: contiguous tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "native kernel: one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) &&
              q.size(1) % k.size(1) == 0 && k.size(2) == v.size(2) && k.size(3) == q.size(3),
              "native kernel: inconsistent shapes");
}

// Every listed key and run of keys inside [0, Lk), every query row inside [0, Lq) and in one tile
// at most. Key lists (a TopK's: B H Lq k entries) are checked by all threads, without a branch per
// entry.
void check_keys(const Table& t, int64_t Lk, int64_t Lq) {
  if (!t.k_start) {
    std::atomic<bool> outside{false};
    at::parallel_for(0, t.lb * t.lh * t.K, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
      bool any = false;  // a negative index is a huge unsigned one
      for (int64_t i = i0; i < i1; ++i) any |= static_cast<uint64_t>(t.k_idx[i]) >= static_cast<uint64_t>(Lk);
      if (any) outside = true;
    });
    TORCH_CHECK(!outside, "tile table: key index out of range");
  }
  for (int64_t i = 0; t.k_start && i < t.lb * t.lh * t.T; ++i) {
    const int64_t W = t.tile_w ? t.tile_w[i] : t.tile_k[i % t.T + 1] - t.tile_k[i % t.T];
    TORCH_CHECK(t.k_start[i] >= 0 && t.k_start[i] + W <= Lk, "tile table: key run out of range");
  }
  std::vector<bool> seen(Lq, false);  // each query row in one tile at most (outputs are written once)
  for (int64_t i = 0; i < t.tile_q[t.T]; ++i) {
    TORCH_CHECK(t.q_rows[i] >= 0 && t.q_rows[i] < Lq, "tile table: query row out of range");
    TORCH_CHECK(!seen[t.q_rows[i]], "tile table: a query row appears twice");
    seen[t.q_rows[i]] = true;
  }
}

// Position codes, checked: both or neither, contiguous int64, the queries' (Lq,) or (B, H, Lq),
// the keys' (Lk,) or (B, Hkv, Lk).
Codes codes_of(const c10::optional<at::Tensor>& qcode, const c10::optional<at::Tensor>& kcode, const at::Tensor& q,
               const at::Tensor& k) {
  const int64_t Lq = q.size(2), Lk = k.size(2);
  Codes c{qcode.value_or(at::Tensor()), kcode.value_or(at::Tensor()), Lk - Lq, Lk - 1, 0, Lk - 1};
  TORCH_CHECK(c.q.defined() == c.k.defined(), "native kernel: position codes for both queries and keys, or neither");
  if (!c.q.defined()) return c;
  auto check = [](const at::Tensor& t, const at::Tensor& x, const char* what) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() &&
                    ((t.dim() == 1 && t.size(0) == x.size(2)) ||
                     (t.dim() == 3 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.size(2) == x.size(2))),
                "native kernel: ", what, " position codes must be a contiguous int64 (tokens,) or (batch, heads, "
                "tokens) tensor of their tensor's sizes");
  };
  check(c.q, q, "query"), check(c.k, k, "key");
  auto range = [](const at::Tensor& t, int64_t& lo, int64_t& hi) {
    const int64_t* v = t.data_ptr<int64_t>();
    const auto [mn, mx] = std::minmax_element(v, v + t.numel());
    lo = *mn, hi = *mx;
  };
  range(c.q, c.qlo, c.qhi), range(c.k, c.klo, c.khi);
  return c;
}

// A score vector: (heads, Lvec) of the compute dtype, long enough for every column a (query, key)
// pair reaches: qmax + key position - query position (``Score``).
void check_score(const at::Tensor& vec, const Codes& codes, const at::Tensor& q, int64_t qmax, at::ScalarType acc) {
  if (!vec.defined()) return;
  TORCH_CHECK(vec.scalar_type() == acc && vec.is_contiguous() && vec.dim() == 2 && vec.size(0) == q.size(1),
              "native kernel: a score vector must be a contiguous (heads, columns) tensor of the compute dtype");
  TORCH_CHECK(qmax + codes.klo - codes.qhi >= 0 && qmax + codes.khi - codes.qlo < vec.size(1),
              "native kernel: relative bias too short for these lengths");
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// f(T()) with T the element type of ``t``
template <typename F>
std::vector<at::Tensor> by_dtype(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(float());
    case at::kDouble: return f(double());
    case at::kBFloat16: return f(BFloat16());
    case at::kHalf: return f(at::Half());
    default: TORCH_CHECK(false, "native kernel: float32, float64, bfloat16 or float16, not ", t);
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& q_rows, const at::Tensor& tile_q, const at::Tensor& tile_k,
                                const at::Tensor& k_idx, const at::Tensor& tile_m,
                                const at::Tensor& mask, const at::Tensor& tile_w, const at::Tensor& tile_mk,
                                const at::Tensor& k_start, int64_t lb, int64_t lh, double scale,
                                const c10::optional<at::Tensor>& pre, const c10::optional<at::Tensor>& post,
                                const c10::optional<at::Tensor>& qcode, const c10::optional<at::Tensor>& kcode, double cap,
                                int64_t qmax, double dropout, int64_t seed,
                                const c10::optional<double>& sigmoid) {
  check_inputs(q, k, v);
  Table tab = table_of(q_rows, tile_q, tile_k, k_idx, tile_m, mask, tile_w, tile_mk, k_start, lb, lh);
  check_keys(tab, k.size(2), q.size(2));
  TORCH_CHECK(lh == 1 || lh == q.size(1), "tile table: layout heads must be 1 or the query heads");
  TORCH_CHECK(lb == 1 || lb == q.size(0), "tile table: layout batch must be 1 or the batch");
  at::Tensor pr = pre.value_or(at::Tensor()), po = post.value_or(at::Tensor());
  const Codes cd = codes_of(qcode, kcode, q, k);
  check_score(pr, cd, q, qmax, acc_of(q.scalar_type()));
  check_score(po, cd, q, qmax, acc_of(q.scalar_type()));
  return by_dtype(q.scalar_type(), [&](auto x) {
    return forward_impl<decltype(x)>(q, k, v, tab, scale, pr, po, cd, cap, qmax, dropout, seed, sigmoid);
  });
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& out, const at::Tensor& dout, const at::Tensor& lse,
                                 const at::Tensor& q_rows, const at::Tensor& tile_q, const at::Tensor& tile_k,
                                 const at::Tensor& k_idx, const at::Tensor& tile_m,
                                 const at::Tensor& mask, const at::Tensor& tile_w, const at::Tensor& tile_mk,
                                 const at::Tensor& k_start, int64_t lb, int64_t lh, double scale,
                                 const c10::optional<at::Tensor>& pre, const c10::optional<at::Tensor>& post,
                                 const c10::optional<at::Tensor>& qcode, const c10::optional<at::Tensor>& kcode, double cap,
                                int64_t qmax, double dropout, int64_t seed,
                                 const c10::optional<double>& sigmoid, int64_t parts, bool want_pre, bool want_post) {
  check_inputs(q, k, v);
  Table tab = table_of(q_rows, tile_q, tile_k, k_idx, tile_m, mask, tile_w, tile_mk, k_start, lb, lh);
  check_keys(tab, k.size(2), q.size(2));
  const auto acc = acc_of(q.scalar_type());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dout.is_contiguous() && dout.dim() == 4 &&
              dout.size(0) == q.size(0) && dout.size(1) == q.size(1) && dout.size(2) == q.size(2) &&
              dout.size(3) == v.size(3), "native kernel: dout must be a contiguous (B, H, Lq, Dv) tensor");
  TORCH_CHECK(lse.scalar_type() == acc && lse.is_contiguous() && lse.numel() == q.size(0) * q.size(1) * q.size(2),
              "native kernel: lse must be a (B, H, Lq) tensor of the compute dtype");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.is_contiguous() && out.sizes() == dout.sizes(),
              "native kernel: out must be the forward's (B, H, Lq, Dv) output");
  TORCH_CHECK(parts >= 1, "native kernel: parts >= 1");
  at::Tensor pr = pre.value_or(at::Tensor()), po = post.value_or(at::Tensor());
  const Codes cd = codes_of(qcode, kcode, q, k);
  check_score(pr, cd, q, qmax, acc);
  check_score(po, cd, q, qmax, acc);
  return by_dtype(q.scalar_type(), [&](auto x) {
    return backward_impl<decltype(x)>(q, k, v, out, dout, lse, tab, scale, pr, po, cd, cap, qmax, dropout, seed,
                                      sigmoid, parts, want_pre, want_post);
  });
}

}  // namespace

namespace multihead_native {
std::vector<at::Tensor> top_keys(const at::Tensor& scores, int64_t keep);  // select.cpp
std::tuple<int64_t, std::string> top_keys_of_products(const at::Tensor& q, const at::Tensor& k, int64_t keep,
                                                     const at::Tensor& span_start, const at::Tensor& span_end,
                                                     const at::Tensor& indices, const at::Tensor& valid,
                                                     int64_t screen_keys, const std::string& screen_by);  // select.cpp
std::vector<std::string> screens();  // select.cpp
std::vector<at::Tensor> nearest_centroids(const at::Tensor& points, const at::Tensor& centroids,
                                          bool sums);  // cluster.cpp
void routing_points(const at::Tensor& q, const at::Tensor& k, at::Tensor& out);  // cluster.cpp
double multiply_add_rate(int64_t steps);  // peak.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("top_keys", &multihead_native::top_keys,
        "top-k selection: (indices of each row's keep largest scores, ascending; whether each is above -inf)");
  m.def("top_keys_of_products", &multihead_native::top_keys_of_products,
        "TopK's choice fused with its q . k: writes each row's keep largest keys and their validity; float32 "
        "rows that see screen_keys keys or more on average (-1: none) are screened by int8 or bf16 products "
        "(screen_by: 'auto', 'int8', 'bf16') where the CPU has them; returns (rows screened, by what)");
  m.def("screens", &multihead_native::screens,
        "the products this build can screen a float32 choice with ('int8': AVX-512 VNNI, 'bf16': AVX-512 BF16)");
  m.def("nearest_centroids", &multihead_native::nearest_centroids,
        "Routing's assignment: [each point's nearest centroid by dot product (first of equals, NaN highest), "
        "(batch, heads, n) int64]; with sums, also each cluster's sum of points (batch, heads, clusters, dim) and "
        "count (batch, heads, clusters)", py::arg("points"), py::arg("centroids"), py::arg("sums") = false);
  m.def("multiply_add_rate", &multihead_native::multiply_add_rate,
        "GFLOP/s of this build's vector multiply-adds over all threads (16 chains each on registers for ``steps`` "
        "steps): the cores' limit for the kernel's products", py::arg("steps"));
  m.def("routing_points", &multihead_native::routing_points,
        "Routing's points into out (float32, q's shape): normalize(normalize(q) + normalize(k of q's key head)) "
        "per token, norms floored at 1e-12", py::arg("q"), py::arg("k"), py::arg("out"));
  m.def("forward", &forward, "block-sparse attention forward: (out, lse)");
  m.def("backward", &backward, "block-sparse attention backward: (dq, dk, dv, dpre, dpost); dq, dk, dv in the inputs' dtype");
  m.def("stream_bytes", &stream_bytes, "outputs of this many bytes or more are written past the caches");
  m.def("bf16_pairs", [] { return kBf16Pairs; }, "whether bfloat16 tiles multiply in pairs (AVX-512 BF16)");
  m.def("empty", [](const std::vector<int64_t>& sizes, at::ScalarType dtype) {
          bool fresh;
          return multihead_native::pooled_empty(sizes, at::TensorOptions().dtype(dtype), &fresh);
        }, "an uninitialised CPU tensor, from the kept output buffers when 1 MiB or more");
  m.def("release_pool", &multihead_native::release_pool, "unmap the idle output buffers kept for reuse; their bytes");
  m.def("pool_idle_bytes", &multihead_native::pool_idle_bytes, "bytes of output buffers kept for reuse, idle");
  m.def("pool_limit_bytes", &multihead_native::pool_limit_bytes, "the most idle bytes kept (0: no reuse)");
}
