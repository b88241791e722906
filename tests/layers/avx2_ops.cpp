// The ops whose vector code the target CPU decides (vec.h), registered as torch.ops.tokenmill_avx2.* for
// tests/layers/test_avx2_build.py, which builds them for an AVX2-only CPU. Schemas are inferred: the test calls
// them eagerly and nothing traces them.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(tokenmill_avx2, m) {
  m.def("silu_and_mul", tokenmill::silu_and_mul);
  m.def("gelu_tanh_and_mul", tokenmill::gelu_tanh_and_mul);
  m.def("argmax_rows", tokenmill::argmax_rows);
  m.def("store_kv", tokenmill::store_kv);
  m.def("paged_attention", tokenmill::paged_attention);
  m.def("rms_norm", tokenmill::rms_norm);
  m.def("fused_add_rms_norm", tokenmill::fused_add_rms_norm);
  m.def("rotary_", tokenmill::rotary_);
}
