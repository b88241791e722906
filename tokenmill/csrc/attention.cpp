// The paged KV pool on CPU: writing a step's keys and values into their slots, and decode attention,
// where each query token attends over its sequence's blocks where they lie in the pool, so no step
// gathers the cache into a padded copy or builds a mask (one op replaces two gathers, the mask and SDPA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using namespace tokenmill;

constexpr int64_t kMaxVectors = 16;  // head_dim up to 256

// q: [batch, heads, D], heads side by side (a token's row may hold more, as in the fused QKV output);
// out: [batch, heads, D]; caches: [blocks, block_size, kv_heads, D]; block_tables: [batch, width];
// seq_lens: [batch], the tokens of each sequence in the cache, this step's included. The caches may hold
// a narrower type (KV) than the queries (T): keys and values are widened as they are read.
template <typename T, typename KV>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int64_t width = block_tables.size(1), vectors = D / kLanes;
  const T* qp = q.data_ptr<T>();
  const KV* kp = k_cache.data_ptr<KV>();
  const KV* vp = v_cache.data_ptr<KV>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t token_stride = kv_heads * D, block_stride = block_size * token_stride, q_stride = q.stride(0);
  // One task per (sequence, KV head): the K and V rows it reads serve its whole query group.
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(group * D), acc(group * D), total(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads, len = lens[b];
      const int64_t* table = tables + b * width;
      for (int64_t i = 0; i < group * D; ++i) qf[i] = float(qp[b * q_stride + h * group * D + i]) * float(scale);
      scores.assign(group * len, 0.f);
      // Rows are walked block by block: dividing each position by the block size cost as much as the math.
      for (int64_t t = 0, block = 0, slot = 0; t < len; ++t) {
        const KV* k = kp + table[block] * block_stride + slot * token_stride + h * D;
        f32x16 key[kMaxVectors];  // widened once for the whole query group
        for (int64_t c = 0; c < vectors; ++c) key[c] = load(k + c * kLanes);
        for (int64_t g = 0; g < group; ++g) {
          f32x16 dot = {};
          for (int64_t c = 0; c < vectors; ++c) dot += load(qf.data() + g * D + c * kLanes) * key[c];
          scores[g * len + t] = sum(dot);
        }
        if (++slot == block_size) slot = 0, ++block;
      }
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) top = std::max(top, s[t]);
        int64_t t = 0;
        for (; t + kLanes <= len; t += kLanes) {
          const f32x16 e = tokenmill::exp(load(s + t) - top);
          store(s + t, e);
          total[g] += sum(e);
        }
        for (; t < len; ++t) { s[t] = std::exp(s[t] - top); total[g] += s[t]; }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0, block = 0, slot = 0; t < len; ++t) {
        const KV* v = vp + table[block] * block_stride + slot * token_stride + h * D;
        for (int64_t c = 0; c < vectors; ++c) {
          const f32x16 vv = load(v + c * kLanes);
          for (int64_t g = 0; g < group; ++g) {
            float* a = acc.data() + g * D + c * kLanes;
            store(a, load(a) + scores[g * len + t] * vv);
          }
        }
        if (++slot == block_size) slot = 0, ++block;
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t c = 0; c < vectors; ++c)
          store(op + (b * heads + h * group + g) * D + c * kLanes, load(acc.data() + g * D + c * kLanes) / total[g]);
    }
  });
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous() && q.size(2) % kLanes == 0 &&
              q.size(2) <= kMaxVectors * kLanes);
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && out.scalar_type() == q.scalar_type());
  dispatch_kv(q, "paged_decode_attention", [&](auto type) {
    dispatch_kv(k_cache, "paged_decode_attention", [&](auto kv) {
      decode<decltype(type), decltype(kv)>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
    });
  });
}

// Token i's row of src to slot slots[i] of cache, converted to the cache's type where it differs.
template <typename T, typename KV>
void store_rows(const at::Tensor& src, at::Tensor& cache, const int64_t* slots, int64_t tokens, int64_t row) {
  const T* sp = src.data_ptr<T>();
  KV* cp = cache.data_ptr<KV>();
  for (int64_t i = 0; i < tokens; ++i) {
    const T* from = sp + i * src.stride(0);
    KV* to = cp + slots[i] * row;
    if constexpr (std::is_same_v<T, KV>) {
      std::memcpy(to, from, row * sizeof(T));
    } else {
      for (int64_t c = 0; c < row; c += kLanes) store(to + c, load(from + c));
    }
  }
}

// k, v: [tokens, kv_heads, D] (views into the fused QKV output); token i goes to slot slots[i] of the
// caches, each seen as [slots, kv_heads, D]. One op for both caches instead of two index_copy_ calls.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots) {
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2));
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous() &&
              k.scalar_type() == v.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type());
  const int64_t tokens = k.size(0), row = k.size(1) * k.size(2), capacity = k_cache.numel() / row;
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() || row % kLanes == 0);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < capacity, "slot ", sp[i], " is outside the KV cache");
  dispatch_kv(k, "store_kv", [&](auto type) {
    dispatch_kv(k_cache, "store_kv", [&](auto kv) {
      store_rows<decltype(type), decltype(kv)>(k, k_cache, sp, tokens, row);
      store_rows<decltype(type), decltype(kv)>(v, v_cache, sp, tokens, row);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("store_kv", store_kv);
}
