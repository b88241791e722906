// Registers the ops of ops.h as torch.ops.tokenmill.*: their schemas, and the CPU functions that run them.
#include <torch/library.h>

#include "ops.h"

using namespace tokenmill;

TORCH_LIBRARY(tokenmill, m) {
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("gelu_tanh_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("argmax_rows(Tensor x, Tensor(a!) out) -> ()");
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor(c!)? k_scale=None, "
        "Tensor(d!)? v_scale=None) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale, int window, Tensor(a!) out, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  m.def("llama_layers(Tensor(a!) x, Tensor cos, Tensor sin, Tensor(b!)[] weights, int[] bits, "
        "int heads, int kv_heads, float eps, float scale, Tensor slots, Tensor tables, Tensor lens) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("quantized_matmul(Tensor x, Tensor q, Tensor scale, int bits, Tensor(a!) out) -> ()");
  m.def("quantized_matmul_with(str kernel, Tensor x, Tensor q, Tensor scale, int bits, Tensor(a!) out) -> ()");
  m.def("quantize_weight_rows(Tensor w, int bits, Tensor(a!) q, Tensor(b!) scale, int start) -> ()");
  m.def("pack_weight_rows(Tensor levels, Tensor step, Tensor offset, int bits, Tensor(a!) q, Tensor(b!) scale, "
        "int start) -> ()");
  // No tensors: registered for every backend.
  m.def("quantized_matmul_kernels() -> str[]", &quantized_matmul_kernels);
  m.def("quantized_matmul_kernel() -> str", &quantized_matmul_kernel);
  m.def("quant_layout() -> int[]", &quant_layout);
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("gelu_tanh_and_mul", gelu_tanh_and_mul);
  m.impl("argmax_rows", argmax_rows);
  m.impl("store_kv", store_kv);
  m.impl("paged_attention", paged_attention);
  m.impl("llama_layers", llama_layers);
  m.impl("rms_norm", rms_norm);
  m.impl("fused_add_rms_norm", fused_add_rms_norm);
  m.impl("rotary_", rotary_);
  m.impl("quantized_matmul", quantized_matmul);
  m.impl("quantized_matmul_with", quantized_matmul_with);
  m.impl("quantize_weight_rows", quantize_weight_rows);
  m.impl("pack_weight_rows", pack_weight_rows);
}
