// The paged KV pool on CPU: writing a step's keys and values into their slots, and attention, where each
// query token attends over its sequence's blocks where they lie in the pool, so no step gathers the cache
// into a padded copy or builds a mask (one op replaces two gathers, the mask and SDPA).
//
// NOTE: every query row, decode or prompt, gets the same operations in the same order over its own keys,
// whether alone or in a tile with its prompt's next rows: a row's result is the same bits whether its prompt
// was prefilled whole, in chunks, after a cached prefix or again after preemption, and whatever else shares
// the step; a decode row split across threads (attend_split) keeps them.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

using namespace tokenmill;

constexpr float kHalfMax = 65504.f;  // float16's largest finite value

// A step's keys and values come from DRAM past a few hundred tokens (a SmolLM2 layer's float16 KV is 1.5 MB at
// 2,000 tokens, 30 layers a step), from blocks scattered through the pool, a head's rows kv_heads rows apart:
// the hardware prefetchers do not run ahead of that. Each loop asks for the row kAhead keys on, so the loads
// overlap the math. Decode attention, 30 layers' caches in turn: 1 row over 2,000 float16 keys 0.53x the time
// without it, 16 rows over 1,000 0.60x (int8 KV 0.61x, float32 0.77x: at DRAM's rate); 16 keys ahead was
// 0.57-0.77x, 64 no better than 32.
constexpr int64_t kAhead = 32;

// x86 computes with a subnormal float (below 1.2e-38) through a microcode assist of about a hundred cycles.
// Softmax weights reach 1e-38 (the exponent is clamped at -87), and one times an int8 value's scale, or a value
// summed into an accumulator still near zero, is subnormal: with scores about a hundred apart the whole op ran 33x
// slower (16 rows over 1,000 int8 keys, 1 thread: 25.3 ms against 0.77). While this lives, the thread that made it
// (each task's) flushes them to zero (MXCSR's FTZ and DAZ); each term it drops is under 1e-38 of the largest,
// which weighs 1. The mode is restored after, so the thread's other work (torch's own ops) keeps IEEE subnormals.
// Other CPUs (aarch64's FPCR.FZ is the same switch) keep their default mode: not measured there.
class FlushSubnormals {
 public:
#if defined(__x86_64__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | _MM_FLUSH_ZERO_ON | _MM_DENORMALS_ZERO_ON); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  const unsigned saved_;
#endif
};

// Asks for a D-element K or V row's cache lines.
template <int64_t D, typename KV>
inline void prefetch_row(const KV* row) {
  for (int64_t off = 0; off < D * int64_t(sizeof(KV)); off += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + off);
}

// The horizontal sums of 16 vectors (16 x 16 floats): out[j] is the sum of vector j. Every sum takes the
// same tree (lanes l and l + 8, then + 4, + 2, + 1) whatever the other vectors hold, so a key's score does
// not depend on the keys beside it or on zeros padding the last 16. 46 shuffles and adds against 128 for
// 16 reductions.
inline void sums16(const float* vectors, float* out) {
#if defined(__AVX512F__)
  f32x16 a[16], b[8], c[4], d[2];
  for (int j = 0; j < 16; ++j) a[j] = load(vectors + j * kLanes);
  for (int j = 0; j < 8; ++j)  // lanes 0-7: a[2j]'s 8 partial sums; 8-15: a[2j + 1]'s
    b[j] = __builtin_shufflevector(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)  // 4 partials each of vectors 4j, 4j + 2, 4j + 1, 4j + 3
    c[j] = __builtin_shufflevector(b[2 * j], b[2 * j + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * j], b[2 * j + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)  // 2 partials each of vectors 8j + {0, 4, 2, 6, 1, 5, 3, 7}
    d[j] = __builtin_shufflevector(c[2 * j], c[2 * j + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * j], c[2 * j + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  // The sums of vectors {0, 4, 2, 6, 1, 5, 3, 7, 8, 12, 10, 14, 9, 13, 11, 15}, put back in order.
  const f32x16 e = __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                   __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  store(out, __builtin_shufflevector(e, e, 0, 4, 2, 6, 1, 5, 3, 7, 8, 12, 10, 14, 9, 13, 11, 15));
#elif defined(__AVX2__)
  // The same tree on 8-lane registers: + 8 lanes is the sum of a vector's halves, + 4 swaps 128-bit lanes,
  // + 2 and + 1 stay within them.
  __m256 h[16], c[8], d[4];
  for (int j = 0; j < 16; ++j) h[j] = _mm256_add_ps(_mm256_loadu_ps(vectors + j * kLanes), _mm256_loadu_ps(vectors + j * kLanes + 8));
  for (int j = 0; j < 8; ++j)  // lanes 0-3: vector 2j's 4 partials; 4-7: vector 2j + 1's
    c[j] = _mm256_add_ps(_mm256_permute2f128_ps(h[2 * j], h[2 * j + 1], 0x20), _mm256_permute2f128_ps(h[2 * j], h[2 * j + 1], 0x31));
  for (int j = 0; j < 4; ++j) {  // 2 partials each of vectors 4j, 4j + 2 (low 128 bits) and 4j + 1, 4j + 3 (high)
    const __m256d x = _mm256_castps_pd(c[2 * j]), y = _mm256_castps_pd(c[2 * j + 1]);
    d[j] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  for (int m = 0; m < 2; ++m) {  // sums of vectors 8m + {0, 2, 4, 6} (low 128 bits) and 8m + {1, 3, 5, 7} (high)
    alignas(32) float e[8];
    _mm256_store_ps(e, _mm256_add_ps(_mm256_shuffle_ps(d[2 * m], d[2 * m + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm256_shuffle_ps(d[2 * m], d[2 * m + 1], _MM_SHUFFLE(3, 1, 3, 1))));
    for (int i = 0; i < 4; ++i) out[8 * m + 2 * i] = e[i], out[8 * m + 2 * i + 1] = e[4 + i];
  }
#else
  // The same tree a lane at a time.
  for (int j = 0; j < 16; ++j) {
    float h[8];
    for (int l = 0; l < 8; ++l) h[l] = vectors[j * kLanes + l] + vectors[j * kLanes + l + 8];
    for (int l = 0; l < 4; ++l) h[l] += h[l + 4];
    out[j] = (h[0] + h[2]) + (h[1] + h[3]);
  }
#endif
}

// The two sums of attention, per lane: a query head's dot products with each key, and a head's values
// weighted over all keys. Both take a chunk of G heads of one KV head's group at once: each key or value
// row is loaded (and widened) once for all of them, and the G heads' independent sums keep both FMA pipes
// busy where one head's chain waited on its latency (one layer of a 512-token SmolLM2 prompt: 3.7 against
// 1.9 ms on AVX-512). Every head's sums take the same operations in the same order whatever G is, so a
// row's result does not depend on the model's group size or on the chunking.
// NOTE: where 16 lanes are two 256-bit registers (AVX2) the sums are written on the two halves: GCC kept a
// loop-carried 16-lane vector on the stack and moved it through general registers, and the op ran 8x
// slower than on AVX-512. Results go to memory rather than being returned: a returned 16-lane vector was
// stored lane by lane there too.

// Each of G query heads' 16-lane partial dot products with up to 16 keys (at[0..n)), for R query rows of one
// sequence (q: rows q_stride apart, heads D apart): each key row is loaded and widened once for all R. parts:
// [R, p_stride apart][G][16 keys][16 lanes], keys past n zeroed (as sums16 expects).
template <int V, int G, int R, typename KV>
inline void dots(const float* q, int64_t q_stride, const KV* keys, const int64_t* at, int64_t n, float* parts,
                 int64_t p_stride) {
  constexpr int64_t D = V * kLanes;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // 16 registers: the queries are read from memory (L1) rather than held, and one row is taken at a time.
  static_assert(R == 1);
  for (int64_t j = 0; j < kLanes; ++j) {
    if (j + kAhead < n) prefetch_row<D>(keys + at[j + kAhead] * D);
    __m256 low[G], high[G];
    for (int g = 0; g < G; ++g) low[g] = high[g] = _mm256_setzero_ps();
    if (j < n) {
      const KV* key = keys + at[j] * D;
      for (int c = 0; c < V; ++c) {
        const f32x16 k = load(key + c * kLanes);
        const __m256 k_low = half_of(k, 0), k_high = half_of(k, 1);
        for (int g = 0; g < G; ++g) {
          low[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c * kLanes), k_low, low[g]);
          high[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c * kLanes + 8), k_high, high[g]);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_ps(parts + (g * kLanes + j) * kLanes, low[g]);
      _mm256_storeu_ps(parts + (g * kLanes + j) * kLanes + 8, high[g]);
    }
  }
#else
  // One row's queries stay in registers where they fit beside the sums and a key vector; else they are read
  // from L1.
  constexpr bool kHeld = R == 1 && G * V <= 16;
  f32x16 qv[kHeld ? G : 1][kHeld ? V : 1];
  if constexpr (kHeld)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < V; ++c) qv[g][c] = load(q + g * D + c * kLanes);
  for (int64_t j = 0; j < kLanes; ++j) {
    if (j + kAhead < n) prefetch_row<D>(keys + at[j + kAhead] * D);
    f32x16 dot[R][G] = {};
    if (j < n) {
      const KV* key = keys + at[j] * D;
      for (int c = 0; c < V; ++c) {
        const f32x16 k = load(key + c * kLanes);
        for (int r = 0; r < R; ++r)
          for (int g = 0; g < G; ++g) {
            if constexpr (kHeld) dot[r][g] += qv[g][c] * k;
            else dot[r][g] += load(q + r * q_stride + g * D + c * kLanes) * k;
          }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) store(parts + r * p_stride + (g * kLanes + j) * kLanes, dot[r][g]);
  }
#endif
}

// For each of R query rows of one sequence (lens[r] keys, not fewer than row 0's) and G heads: the sum over
// t < lens[r] of weight(r, g, t) * values[at[t]], D = 16 V lanes, one accumulator per vector, head and row.
// Each value row is loaded and widened once for all R. Value rows hold S >= V vectors (the sums may take some
// of a row's lanes). out: rows out_stride apart, heads 16 S lanes apart.
template <int V, int G, int R, int S = V, typename KV, typename Weight>
inline void weighted_sums(const int64_t* lens, const Weight& weight, const KV* values, const int64_t* at, float* out,
                          int64_t out_stride) {
  constexpr int64_t D = V * kLanes, row = S * kLanes;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // 2 V accumulators a head fill the 16 registers: one head and row at a time (G and R are 1 here).
  static_assert(G == 1 && R == 1);
  const int64_t len = lens[0];
  __m256 acc[2 * V];
  for (int c = 0; c < 2 * V; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    if (t + kAhead < len) prefetch_row<D>(values + at[t + kAhead] * row);
    const __m256 w = _mm256_set1_ps(weight(0, 0, t));
    for (int c = 0; c < V; ++c) {
      const f32x16 x = load(values + at[t] * row + c * kLanes);
      acc[2 * c] = _mm256_fmadd_ps(w, half_of(x, 0), acc[2 * c]);
      acc[2 * c + 1] = _mm256_fmadd_ps(w, half_of(x, 1), acc[2 * c + 1]);
    }
  }
  for (int c = 0; c < 2 * V; ++c) _mm256_storeu_ps(out + c * 8, acc[c]);
#else
  f32x16 acc[R][G][V] = {};
  const int64_t len = lens[R - 1];
  // Every row takes value t while t < lens[0]; past it (a tile's last few values) only the rows that see it.
  auto add = [&](int64_t t, auto checked) {
    if (t + kAhead < len) prefetch_row<D>(values + at[t + kAhead] * row);
    float w[R][G];
    for (int r = 0; r < R; ++r)
      for (int g = 0; g < G; ++g) w[r][g] = !checked || t < lens[r] ? weight(r, g, t) : 0.f;
    for (int c = 0; c < V; ++c) {
      const f32x16 x = load(values + at[t] * row + c * kLanes);
      for (int r = 0; r < R; ++r)
        if (!checked || t < lens[r])
          for (int g = 0; g < G; ++g) acc[r][g][c] += w[r][g] * x;
    }
  };
  int64_t t = 0;
  for (; t < lens[0]; ++t) add(t, std::false_type{});
  for (; t < len; ++t) add(t, std::true_type{});
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < V; ++c) store(out + r * out_stride + g * row + c * kLanes, acc[r][g][c]);
#endif
}

// The largest of s[0..len): exact in any order. A lane at a time it cost as much as the scores' dot products.
inline float maximum(const float* s, int64_t len) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  if (len >= 8) {
    __m256 m = _mm256_loadu_ps(s);
    for (t = 8; t + 8 <= len; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float x : lanes) top = std::max(top, x);
  }
#else
  if (len >= kLanes) {
    f32x16 m = load(s);
    for (t = kLanes; t + kLanes <= len; t += kLanes) {
      const f32x16 x = load(s + t);
      m = m > x ? m : x;
    }
    for (int l = 0; l < kLanes; ++l) top = std::max(top, m[l]);
  }
#endif
  for (; t < len; ++t) top = std::max(top, s[t]);
  return top;
}

// s[0..len) becomes e^(s - max s), and the sum of those is returned: 16 at a time, then one by one.
inline float softmax_numerators(float* s, int64_t len) {
  const float top = maximum(s, len);
  float total = 0.f;
  int64_t t = 0;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // The same operations on halves: a 16-lane vector joined from two went through the stack a lane at a time.
  const __m256 m = _mm256_set1_ps(top);
  for (; t + kLanes <= len; t += kLanes) {
    const __m256 low = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
    const __m256 high = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t + 8), m));
    _mm256_storeu_ps(s + t, low);
    _mm256_storeu_ps(s + t + 8, high);
    total += sum(low, high);
  }
#else
  for (; t + kLanes <= len; t += kLanes) {
    const f32x16 e = tokenmill::exp(load(s + t) - top);
    store(s + t, e);
    total += sum(e);
  }
#endif
  for (; t < len; ++t) { s[t] = std::exp(s[t] - top); total += s[t]; }
  return total;
}

// Runs f(G) for a chunk of G = n heads as a compile-time constant, n from 1 to kMax (at most 4).
template <int kMax, typename F>
inline void with_chunk(int64_t n, F&& f) {
  if constexpr (kMax >= 4) if (n == 4) return f(std::integral_constant<int, 4>{});
  if constexpr (kMax >= 3) if (n == 3) return f(std::integral_constant<int, 3>{});
  if constexpr (kMax >= 2) if (n == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// Query heads of a group in chunks whose accumulators (and for the scores, where they fit, queries) stay in
// registers beside a key or value row. AVX-512: 4 heads' scores (with head_dim 256 the queries come from L1:
// 2.9 against 3.3 ms for a Gemma 3 layer of a 512-token prompt; with head_dim 128 two held heads beat four
// read) and 16 / V heads' sums. AVX2 reads the queries from memory and has room for one head's sums.
// A prompt's consecutive rows see the same keys (each one more): on AVX-512 they go kRows at a time, so each
// value row is widened once for kSumRows of them (whose accumulators then fill the registers with kPairChunk
// heads) and each key row once for kDotRows (head_dim 64 keeps one: its queries held in registers beat 4 rows
// sharing the widening, 1.08x the time). 512 prompt rows, float16 KV, against one row at a time: head_dim 64
// 0.84-0.90 the time, 256 0.94-0.97, 32 0.67; with head_dim 128 neither 4 nor 2 rows were faster, so it keeps one.
template <int V>
struct Tiling {
#if defined(__AVX2__) && !defined(__AVX512F__)
  static constexpr int kScoreChunk = 4, kSumChunk = 1, kRows = 1, kSumRows = 1, kPairChunk = 1, kDotRows = 1;
#else
  static constexpr int kScoreChunk = V == 8 ? 2 : 4, kSumChunk = V >= 16 ? 1 : V >= 8 ? 2 : 4;
  static constexpr int kDotRows = V == 4 ? 1 : 4;
  static constexpr int kRows = V == 8 ? 1 : 4, kSumRows = V <= 4 ? 2 : 1;
  static constexpr int kPairChunk = V <= 2 ? 4 : V <= 4 ? 3 : kSumChunk;
#endif
};

// The op's inputs as raw pointers and sizes. q: [rows, heads, D], heads side by side (a token's row may hold
// more, as in the fused QKV output); out: [rows, heads, D]; caches: [blocks, block_size, kv_heads, D]; tables:
// [rows, width], each row's sequence's table; lens: [rows], each row's position + 1: it sees the keys before
// that, or with a window > 0 only the last `window` of them (sliding-window attention). The caches may hold a
// narrower type (KV) than the queries (T): keys and values are widened as they are read. int8 caches come with
// float16 scales [blocks, block_size, kv_heads], applied to each key's dot product and each value's weight
// rather than to every element. D = 16 V: V vectors a head.
template <typename T, typename KV>
struct Inputs {
  const T* q;
  int64_t q_stride;
  T* out;
  const KV *k, *v;
  const at::Half *k_scales, *v_scales;
  const int64_t *tables, *lens;
  int64_t rows, heads, kv_heads, group, width, block_size, window;
  float scale;

  // The first key row b reads: 0, or under a sliding window the window's first.
  int64_t first_key(int64_t b) const { return window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0; }

  // Rows b .. b + R's query heads of KV head h, times the scale, into qf: [R, group, D].
  void scaled_queries(int64_t b, int R, int64_t h, int64_t D, float* qf) const {
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < group * D; ++j) qf[r * group * D + j] = float(q[(b + r) * q_stride + h * group * D + j]) * scale;
  }

  // Each key from..to of row b (counted from its first key) as its token-head index into the caches for KV head h.
  // Keys are walked block by block: dividing each position by the block size cost as much as the math.
  void key_rows(int64_t b, int64_t h, int64_t from, int64_t to, int64_t* at) const {
    const int64_t* table = tables + b * width;
    const int64_t start = first_key(b) + from;
    for (int64_t t = from, block = start / block_size, slot = start % block_size; t < to; ++t) {
      at[t] = (table[block] * block_size + slot) * kv_heads + h;
      if (++slot == block_size) slot = 0, ++block;
    }
  }
};

// R rows' scores (queries qf: [R, group, D]) with keys t0 .. t0 + 16, those before n (the row's keys, or the end
// of a split's range), into s ([R * group] rows padded apart). int8: each key's dot product times its scale, and
// the values' scales widened into v_at[t0 ..). parts: [R, group, 16, 16] of scratch.
template <int V, int R, typename T, typename KV>
inline void score_keys(const Inputs<T, KV>& in, const float* qf, const int64_t* at, int64_t t0, int64_t n,
                       float* v_at, float* parts, float* s, int64_t padded) {
  constexpr int64_t D = V * kLanes;
  constexpr int DR = R == 1 ? 1 : Tiling<V>::kDotRows, kChunk = Tiling<V>::kScoreChunk;
  const int64_t group = in.group;
  float k_step[kLanes];
  if constexpr (std::is_same_v<KV, int8_t>) {  // the 16 keys' and values' scales gathered, then widened at once
    at::Half kh[kLanes] = {}, vh[kLanes] = {};
    for (int64_t j = 0; j < kLanes && t0 + j < n; ++j) kh[j] = in.k_scales[at[t0 + j]], vh[j] = in.v_scales[at[t0 + j]];
    store(k_step, load(kh));
    store(v_at + t0, load(vh));
  }
  for (int r0 = 0; r0 < R; r0 += DR)
    for (int64_t g0 = 0; g0 < group; g0 += kChunk)
      with_chunk<kChunk>(std::min<int64_t>(kChunk, group - g0), [&](auto chunk) {
        dots<V, chunk.value, DR>(qf + (r0 * group + g0) * D, group * D, in.k, at + t0, n - t0,
                                 parts + (r0 * group + g0) * kLanes * kLanes, group * kLanes * kLanes);
      });
  for (int64_t rg = 0; rg < R * group; ++rg) {
    float* row = s + rg * padded + t0;
    sums16(parts + rg * kLanes * kLanes, row);
    if constexpr (std::is_same_v<KV, int8_t>)
      for (int64_t j = 0; j < kLanes && t0 + j < n; ++j) row[j] *= k_step[j];
  }
}

// Heads g0 .. g0 + G of one row (its softmax numerators in s, [G] rows padded apart) over its len values:
// the sums of lanes [16 c0, 16 (c0 + P)) of each, divided by each head's total, into out (heads D apart).
template <int V, int P, int G, typename KV, typename T>
inline void weigh_values(const KV* values, const int64_t* at, int64_t len, const float* s, int64_t padded,
                         const float* v_at, const float* total, int c0, float* sums, T* out) {
  constexpr int64_t D = V * kLanes;
  auto weight = [&](int, int g, int64_t t) {
    const float w = s[g * padded + t];
    return std::is_same_v<KV, int8_t> ? w * v_at[t] : w;
  };
  weighted_sums<P, G, 1, V>(&len, weight, values + c0 * kLanes, at, sums, 0);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < P; ++c) store(out + g * D + (c0 + c) * kLanes, load(sums + g * D + c * kLanes) / total[g]);
}

// Rows in tiles of kRows rows of one sequence at consecutive positions (same table, each length one more), or of
// one row; one task per (tile, KV head): the K and V rows it reads serve its rows' whole query groups. Every
// row's result is the same bits in either: its sums take the same operations in the same order.
template <int V, typename T, typename KV>
void attend_tiles(const Inputs<T, KV>& in) {
  constexpr int64_t D = V * kLanes;
  using Tune = Tiling<V>;
  constexpr int kRows = Tune::kRows;
  const int64_t rows = in.rows, group = in.group, kv_heads = in.kv_heads, width = in.width;
  std::vector<int64_t> tiles;  // each tile's first row; a tile ends where the next begins
  for (int64_t b = 0; b < rows;) {
    tiles.push_back(b);
    // Under a sliding window only while every row still sees all its keys: then they all start at key 0.
    bool run = kRows > 1 && b + kRows <= rows && (in.window == 0 || in.lens[b + kRows - 1] <= in.window);
    for (int64_t r = 1; run && r < kRows; ++r)
      run = in.lens[b + r] == in.lens[b] + r &&
            std::equal(in.tables + b * width,
                       in.tables + b * width + (in.lens[b + kRows - 1] + in.block_size - 1) / in.block_size,
                       in.tables + (b + r) * width);
    b += run ? kRows : 1;
  }
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  tiles.push_back(rows);
  // A prompt's rows see 1 to n keys, and threads take contiguous ranges of tasks, so tasks alternate between the
  // first and the last tiles: each range then holds short and long rows alike.
  const int64_t most = num_tiles < rows ? kRows : 1;  // rows in the largest tile: what the buffers must hold
  at::parallel_for(0, num_tiles * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<float> scores, qf(most * group * D), total(most * group);
    std::vector<int64_t> at;  // each key's token-head index into the caches
    std::vector<float> v_at;  // int8: each value's scale, widened once for the whole group
    std::vector<float> parts(most * group * kLanes * kLanes), sums(most * group * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / kv_heads, tile = i % 2 ? num_tiles - 1 - i / 2 : i / 2, h = task % kv_heads;
      const int64_t b = tiles[tile];
      auto run_rows = [&](auto rows_c) {
        constexpr int R = rows_c.value;
        // Row r sees keys first .. first + len[r]; in a tile of several rows first is 0.
        const int64_t first = in.first_key(b);
        int64_t len[R];
        for (int r = 0; r < R; ++r) len[r] = in.lens[b + r] - first;
        const int64_t n = len[R - 1], padded = (n + kLanes - 1) / kLanes * kLanes;
        in.scaled_queries(b, R, h, D, qf.data());
        at.resize(n);
        in.key_rows(b, h, 0, n, at.data());
        v_at.resize(padded);
        scores.resize(R * group * padded);
        for (int64_t t0 = 0; t0 < n; t0 += kLanes)
          score_keys<V, R>(in, qf.data(), at.data(), t0, n, v_at.data(), parts.data(), scores.data(), padded);
        for (int r = 0; r < R; ++r)
          for (int64_t g = 0; g < group; ++g) total[r * group + g] = softmax_numerators(scores.data() + (r * group + g) * padded, len[r]);
        constexpr int RS = R == 1 ? 1 : Tune::kSumRows, kChunk = RS == 1 ? Tune::kSumChunk : Tune::kPairChunk;
        for (int r0 = 0; r0 < R; r0 += RS)
          for (int64_t g0 = 0; g0 < group; g0 += kChunk) {
            const float* s = scores.data() + (r0 * group + g0) * padded;
            auto weight = [&](int r, int g, int64_t t) {
              const float w = s[(r * group + g) * padded + t];
              return std::is_same_v<KV, int8_t> ? w * v_at[t] : w;
            };
            with_chunk<kChunk>(std::min<int64_t>(kChunk, group - g0), [&](auto chunk) {
              weighted_sums<V, chunk.value, RS>(len + r0, weight, in.v, at.data(), sums.data() + (r0 * group + g0) * D, group * D);
            });
          }
        for (int r = 0; r < R; ++r)
          for (int64_t g = 0; g < group; ++g)
            for (int c = 0; c < V; ++c)
              store(in.out + ((b + r) * in.heads + h * group + g) * D + c * kLanes,
                    load(sums.data() + (r * group + g) * D + c * kLanes) / total[r * group + g]);
      };
      if (kRows > 1 && tiles[tile + 1] - b == kRows) run_rows(std::integral_constant<int, kRows>{});
      else run_rows(std::integral_constant<int, 1>{});
    }
  });
}

// Whether `tasks` tasks of one size keep `threads` threads busy to the end, or within a quarter of a task.
inline bool fills(int64_t tasks, int64_t threads) { return tasks % threads == 0 || tasks >= 4 * threads; }

// A few rows over many keys (decode at a long context), where one task per (row, KV head) would leave at least
// half the threads idle: Gemma 3 has one KV head. Here the scores split over ranges of keys, and the weighted sums
// over chunks of heads (and halves of the lanes where those are too few): two parallel loops where attend_tiles
// has one. Each score, weight and sum takes the same operations in the same order as there, so a row's result is
// the same bits on either path. A Gemma 3 layer's attention for one row, float16 KV, 2 threads, against one task:
// 0.74-0.89 the time over 2,000 keys, 0.62-0.73 over 8,000, 0.82-0.95 over 512 (its sliding window). SmolLM2's
// three KV heads on 2 threads keep one thread idle a third of the time, yet split they took 1.04-1.05x the time
// over 2,000 keys and 1.18-1.25x over 600: the second loop and each range's first keys, fetched without prefetch,
// cost more.
template <int V, typename T, typename KV>
void attend_split(const Inputs<T, KV>& in, int64_t threads) {
  constexpr int64_t D = V * kLanes;
  constexpr int kSumChunk = Tiling<V>::kSumChunk;
  const int64_t group = in.group, kv_heads = in.kv_heads, pairs = in.rows * kv_heads;  // pair: (row, KV head)
  // Each pair's keys, and where its key rows, value scales (both padded to 16 keys) and scores begin.
  std::vector<int64_t> len(pairs), start(pairs + 1, 0);
  int64_t longest = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t b = p / kv_heads;
    len[p] = in.lens[b] - in.first_key(b);
    start[p + 1] = start[p] + (len[p] + kLanes - 1) / kLanes * kLanes;
    longest = std::max(longest, len[p]);
  }
  std::vector<int64_t> at(start[pairs]);
  std::vector<float> v_at(start[pairs]), scores(start[pairs] * group), total(pairs * group);
  // Score tasks of `chunk` keys (a multiple of 16): about 4 a thread, so that they divide evenly enough.
  const int64_t per_pair = (4 * threads + pairs - 1) / pairs;
  const int64_t chunk = ((longest + per_pair - 1) / per_pair + kLanes - 1) / kLanes * kLanes;
  std::vector<int64_t> first_task(pairs + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) first_task[p + 1] = first_task[p] + (len[p] + chunk - 1) / chunk;
  // The task that scores a pair's last range also takes its softmax.
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[pairs]);
  for (int64_t p = 0; p < pairs; ++p) left[p].store(first_task[p + 1] - first_task[p]);
  at::parallel_for(0, first_task[pairs], 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<float> qf(group * D), parts(group * kLanes * kLanes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t b = p / kv_heads, h = p % kv_heads, n = len[p], padded = start[p + 1] - start[p];
      const int64_t from = (task - first_task[p]) * chunk, to = std::min(n, from + chunk);
      int64_t* keys = at.data() + start[p];
      float* s = scores.data() + start[p] * group;
      in.scaled_queries(b, 1, h, D, qf.data());
      in.key_rows(b, h, from, to, keys);
      for (int64_t t0 = from; t0 < to; t0 += kLanes)
        score_keys<V, 1>(in, qf.data(), keys, t0, to, v_at.data() + start[p], parts.data(), s, padded);
      if (left[p].fetch_sub(1, std::memory_order_acq_rel) == 1)
        for (int64_t g = 0; g < group; ++g) total[p * group + g] = softmax_numerators(s + g * padded, n);
    }
  });
  // Sum tasks: (pair, chunk of heads, half of the lanes), halves only where the chunks alone leave threads idle.
  const int64_t chunks = (group + kSumChunk - 1) / kSumChunk;
  const int64_t halves = fills(pairs * chunks, threads) ? 1 : 2;
  at::parallel_for(0, pairs * chunks * halves, 1, [&](int64_t begin, int64_t end) {
    const FlushSubnormals flush;
    std::vector<float> sums(kSumChunk * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / (chunks * halves), g0 = task / halves % chunks * kSumChunk, half = task % halves;
      const int64_t b = p / kv_heads, h = p % kv_heads, padded = start[p + 1] - start[p];
      const float* s = scores.data() + start[p] * group + g0 * padded;
      T* out = in.out + (b * in.heads + h * group + g0) * D;
      auto sum = [&](auto g, auto lanes) {  // lanes: the vectors of each head this task sums
        weigh_values<V, lanes.value, g.value>(in.v, at.data() + start[p], len[p], s, padded, v_at.data() + start[p],
                                              total.data() + p * group + g0, half * lanes.value, sums.data(), out);
      };
      with_chunk<kSumChunk>(std::min<int64_t>(kSumChunk, group - g0), [&](auto g) {
        if (halves == 2) sum(g, std::integral_constant<int, V / 2>{});
        else sum(g, std::integral_constant<int, V>{});
      });
    }
  });
}

// Where half the threads would idle, the rows split (attend_split) if the longest sees this many keys or more:
// below it the second parallel loop costs more than it saves. A Gemma 3 row split on 2 threads against one task:
// 1.59x the time over 128 keys, 1.34x over 256, 0.88x over 384.
constexpr int64_t kSplitKeys = 384;

template <typename T, typename KV, int V>
void attend(const Inputs<T, KV>& in) {
  const int64_t threads = at::get_num_threads();
  int64_t longest = 0;
  for (int64_t b = 0; b < in.rows; ++b) longest = std::max(longest, in.lens[b] - in.first_key(b));
  if (2 * in.rows * in.kv_heads <= threads && longest >= kSplitKeys) attend_split<V>(in, threads);
  else attend_tiles<V>(in);
}

// The scales of an int8 cache, checked against it: [blocks, block_size, kv_heads] float16; null otherwise.
at::Half* scales_of(const at::Tensor& cache, const std::optional<at::Tensor>& scales) {
  if (cache.scalar_type() != at::kChar) return nullptr;
  TORCH_CHECK(scales.has_value() && scales->is_contiguous() && scales->scalar_type() == at::kHalf &&
              scales->numel() * cache.size(-1) == cache.numel(), "an int8 KV cache needs float16 scales per token and head");
  return scales->data_ptr<at::Half>();
}

// Token i's row of src ([kv_heads, D]) to slot slots[i] of cache, converted to the cache's type where it
// differs. Into int8, each head's D values get the scale max|x| / 127 in float16 (as llama.cpp's q8_0 keeps
// it: 2 bytes a head, not 4), rounded up so that no level passes 127 (a small scale loses precision in
// float16), and levels round(x / scale) from the rounded scale: the same float operations as the PyTorch
// path (layers/attention.py), so both store the same levels. Past float16's largest scale, levels clamp.
template <typename T, typename KV>
void store_rows(const at::Tensor& src, at::Tensor& cache, at::Half* scales, const int64_t* slots, int64_t tokens) {
  const int64_t heads = src.size(1), D = src.size(2), row = heads * D;
  const T* sp = src.data_ptr<T>();
  KV* cp = cache.data_ptr<KV>();
  for (int64_t i = 0; i < tokens; ++i) {
    const T* from = sp + i * src.stride(0);
    KV* to = cp + slots[i] * row;
    if constexpr (std::is_same_v<T, KV>) {
      std::memcpy(to, from, row * sizeof(T));
    } else if constexpr (std::is_same_v<KV, int8_t>) {
      for (int64_t h = 0; h < heads; ++h) {
        float amax = 0.f;
        for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(float(from[h * D + d])));
        const float exact = std::min(amax / 127.f, kHalfMax);
        at::Half step = exact;
        if (float(step) < exact) step = at::Half(step.x + 1, at::Half::from_bits());  // the next float16 up
        const float divisor = float(step) > 0.f ? float(step) : 1.f;
        for (int64_t d = 0; d < D; ++d)
          to[h * D + d] = static_cast<int8_t>(std::clamp(std::nearbyint(float(from[h * D + d]) / divisor), -127.f, 127.f));
        scales[slots[i] * heads + h] = step;
      }
    } else {
      for (int64_t c = 0; c < row; c += kLanes) store(to + c, load(from + c));
    }
  }
}

}  // namespace

namespace tokenmill {

void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                     at::Tensor& out, const std::optional<at::Tensor>& k_scale,
                     const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && out.scalar_type() == q.scalar_type());
  const at::Half *ks = scales_of(k_cache, k_scale), *vs = scales_of(v_cache, v_scale);
  TORCH_CHECK(block_tables.size(0) == q.size(0) && seq_lens.size(0) == q.size(0), "a block table and length per row");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && out.sizes() == q.sizes() &&
              k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "paged_attention takes q and out [rows, heads, D] and caches [blocks, block_size, kv_heads, D] alike, "
              "heads a multiple of kv_heads");
  // A length past its table, or a block outside the pool, would read outside the caches.
  const int64_t width = block_tables.size(1), blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t *tables = block_tables.data_ptr<int64_t>(), *lens = seq_lens.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= width * block_size, "row ", r, " sees ", lens[r], " keys, outside 1 to ",
                width * block_size);
    const int64_t first = window > 0 ? std::max<int64_t>(0, lens[r] - window) : 0;  // the first key it reads
    for (int64_t j = first / block_size; j < (lens[r] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tables[r * width + j] >= 0 && tables[r * width + j] < blocks, "block ", tables[r * width + j],
                  " is outside the KV cache");
  }
  dispatch_activation(q, "paged_attention", [&](auto type) {
    dispatch_kv(k_cache, "paged_attention", [&](auto kv) {
      using Q = decltype(type);
      using KV = decltype(kv);
      const int64_t heads = q.size(1), kv_heads = k_cache.size(2);
      const Inputs<Q, KV> in{q.data_ptr<Q>(), q.stride(0), out.data_ptr<Q>(), k_cache.data_ptr<KV>(),
                             v_cache.data_ptr<KV>(), ks, vs, tables, lens, q.size(0), heads, kv_heads,
                             heads / kv_heads, width, block_size, window, float(scale)};
      switch (q.size(2)) {
        case 32: return attend<Q, KV, 2>(in);
        case 64: return attend<Q, KV, 4>(in);
        case 128: return attend<Q, KV, 8>(in);
        case 256: return attend<Q, KV, 16>(in);
        default: TORCH_CHECK(false, "paged_attention takes head_dim 32, 64, 128 or 256, not ", q.size(2));
      }
    });
  });
}

// k, v: [tokens, kv_heads, D] (views into the fused QKV output); token i goes to slot slots[i] of the
// caches, each seen as [slots, kv_heads, D]. One op for both caches instead of two index_copy_ calls.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots, const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2));
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous() &&
              k.scalar_type() == v.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type());
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2), capacity = k_cache.numel() / row;
  // One slot per token, v shaped as k, and rows as wide as the caches': else tokens land in slots never given.
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && slots.numel() == tokens && k_cache.sizes() == v_cache.sizes() &&
              k_cache.size(-2) == k.size(1) && k_cache.size(-1) == k.size(2),
              "store_kv: k, v, slots and caches disagree in shape");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() || row % kLanes == 0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < capacity, "slot ", sp[i], " is outside the KV cache");
  // Written through the op's mutable scale arguments: const here is the optional's, not the data's.
  at::Half *ks = scales_of(k_cache, k_scale), *vs = scales_of(v_cache, v_scale);
  dispatch_activation(k, "store_kv", [&](auto type) {
    dispatch_kv(k_cache, "store_kv", [&](auto kv) {
      store_rows<decltype(type), decltype(kv)>(k, k_cache, ks, sp, tokens);
      store_rows<decltype(type), decltype(kv)>(v, v_cache, vs, sp, tokens);
    });
  });
}

}  // namespace tokenmill
