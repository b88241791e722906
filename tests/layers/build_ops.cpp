// The ops whose vector code the target CPU decides (vec.h), registered as torch.ops.<TOKENMILL_BUILD_OPS>.* for
// tests/layers/test_cpu_builds.py, which builds them for other CPUs than this one under a name for each. Schemas
// are inferred: the test calls them eagerly and nothing traces them.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(TOKENMILL_BUILD_OPS, m) {
  m.def("silu_and_mul", tokenmill::silu_and_mul);
  m.def("gelu_tanh_and_mul", tokenmill::gelu_tanh_and_mul);
  m.def("argmax_rows", tokenmill::argmax_rows);
  m.def("store_kv", tokenmill::store_kv);
  m.def("paged_attention", tokenmill::paged_attention);
  m.def("rms_norm", tokenmill::rms_norm);
  m.def("fused_add_rms_norm", tokenmill::fused_add_rms_norm);
  m.def("rotary_", tokenmill::rotary_);
}
