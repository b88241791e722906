// A Llama-family decoder stack on CPU as one op: the ops the Python layers call (models/llama.py), in the same
// order on the same inputs, so the results are the same bits. What it saves is what lies between them: about
// 10 Python calls a layer through torch's dispatcher, each 3-5 us, plus an output tensor each, on a 2-core VM
// (docs/benchmarks.md).
#include <algorithm>

#include "ops.h"

namespace tokenmill {

// x: [tokens, hidden], the first layer's input, which becomes the residual stream (written in place, as the layers
// write it). weights, per layer in this order: input norm; QKV levels and scales; O levels and scales;
// post-attention norm; gate/up levels and scales; down levels and scales; K and V caches; for int8 caches their
// scales: 12 or 14 tensors a layer. bits: per layer, those of QKV, O, gate/up and down. The attention sees every
// key before a row's position (no sliding window). Returns the last layer's output, in a new tensor.
at::Tensor llama_layers(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList weights,
                        at::IntArrayRef bits, int64_t heads, int64_t kv_heads, double eps, double scale,
                        const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens) {
  const int64_t layers = static_cast<int64_t>(bits.size()) / 4;
  const int64_t per_layer = layers ? static_cast<int64_t>(weights.size()) / layers : 0;
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(bits.size()) == 4 * layers &&
              static_cast<int64_t>(weights.size()) == per_layer * layers && (per_layer == 12 || per_layer == 14),
              "llama_layers takes 4 bits and 12 or 14 tensors a layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "llama_layers takes float32 rows");
  const int64_t tokens = x.size(0), hidden = x.size(1), head_dim = weights[10].size(3);
  const int64_t q_size = heads * head_dim, kv_size = kv_heads * head_dim;
  // The gate/up width from the down projection's input: its chunks hold 32 / bits inputs each.
  const int64_t intermediate = weights[8].size(1) * 32 / bits[3];
  // One buffer per intermediate result, shared by every layer: each is consumed before the next layer writes it.
  // h is a layer's normed input, and the previous layer's output before that. The MLP takes the rows kMlpRows
  // at a time (each row's result is the same bits in any batch): its gate/up and activation buffers, 6 and 3 MiB
  // for a 512-row SmolLM2 prompt chunk whole, were the step's largest, and glibc keeps a step's freed buffers in
  // its heap for the next.
  constexpr int64_t kMlpRows = 128;
  const int64_t mlp_rows = std::min(tokens, kMlpRows);
  at::Tensor h = x.new_empty({tokens, hidden}), qkv = x.new_empty({tokens, q_size + 2 * kv_size});
  at::Tensor attn = x.new_empty({tokens, heads, head_dim}), o = x.new_empty({tokens, hidden});
  at::Tensor gate_up = x.new_empty({mlp_rows, 2 * intermediate}), act = x.new_empty({mlp_rows, intermediate});
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = weights.data() + l * per_layer;
    const int64_t* b = bits.data() + 4 * l;
    at::Tensor k_cache = w[10], v_cache = w[11];
    std::optional<at::Tensor> k_scale, v_scale;
    if (per_layer == 14) k_scale = w[12], v_scale = w[13];
    if (l == 0) rms_norm(x, w[0], eps, h);
    else fused_add_rms_norm(h, x, w[0], eps);
    quantized_matmul(h, w[1], w[2], b[0], qkv);
    // Query and key heads lie side by side in each row: one in-place rotation covers both.
    at::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({tokens, heads + kv_heads, head_dim});
    rotary_(qk, cos, sin);
    const at::Tensor q = qkv.narrow(1, 0, q_size).view({tokens, heads, head_dim});
    const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({tokens, kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({tokens, kv_heads, head_dim});
    store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale);
    paged_attention(q, k_cache, v_cache, tables, lens, scale, 0, attn, k_scale, v_scale);
    quantized_matmul(attn.view({tokens, q_size}), w[3], w[4], b[1], o);
    fused_add_rms_norm(o, x, w[5], eps);
    for (int64_t r = 0; r < tokens; r += mlp_rows) {
      const int64_t n = std::min(mlp_rows, tokens - r);
      at::Tensor gate_up_n = gate_up.narrow(0, 0, n), act_n = act.narrow(0, 0, n), h_n = h.narrow(0, r, n);
      quantized_matmul(o.narrow(0, r, n), w[6], w[7], b[2], gate_up_n);
      silu_and_mul(gate_up_n, act_n);
      quantized_matmul(act_n, w[8], w[9], b[3], h_n);
    }
  }
  return h;
}

}  // namespace tokenmill
