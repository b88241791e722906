// The ops the extension registers (bindings.cpp), one declaration each. Only bindings.cpp includes torch's
// registration headers, which take most of a source's compile time; every other file needs at::Tensor alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace tokenmill {

// activation.cpp
void silu_and_mul(const at::Tensor& gate_up, at::Tensor& out);
void gelu_tanh_and_mul(const at::Tensor& gate_up, at::Tensor& out);

// argmax.cpp
void argmax_rows(const at::Tensor& x, at::Tensor& out);

// attention.cpp
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
                     at::Tensor& out, const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slots, const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale);

// llama_layers.cpp
at::Tensor llama_layers(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList weights,
                        at::IntArrayRef bits, int64_t heads, int64_t kv_heads, double eps, double scale,
                        const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens);

// norm.cpp
void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out);
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);

// rotary.cpp
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// quant_matmul.cpp
void quantized_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t bits, at::Tensor& out);
void quantized_matmul_with(const std::string& kernel, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           int64_t bits, at::Tensor& out);
std::vector<std::string> quantized_matmul_kernels();
std::string quantized_matmul_kernel();
std::vector<int64_t> quant_layout();

// quantize_weights.cpp
void quantize_weight_rows(const at::Tensor& w, int64_t bits, at::Tensor& q, at::Tensor& scale, int64_t start);
void pack_weight_rows(const at::Tensor& levels, const at::Tensor& step, const at::Tensor& offset, int64_t bits,
                      at::Tensor& q, at::Tensor& scale, int64_t start);

}  // namespace tokenmill
