// SwiGLU's activation for the CPU decode path: silu(gate) * up in one pass over the fused gate/up
// output, instead of a chunk, a silu and a multiply that each write a tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec.h"

namespace {

using namespace tokenmill;

// gate_up: [tokens, 2 * dim], gate then up; out: [tokens, dim].
template <typename T>
void silu_mul(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t tokens = out.size(0), dim = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = gp + t * 2 * dim;
      for (int64_t d = 0; d < dim; d += kLanes) {
        const f32x16 g = load(gate + d);
        store(op + t * dim + d, g / (1.f + tokenmill::exp(-g)) * load(gate + dim + d));
      }
    }
  });
}

void silu_and_mul(const at::Tensor& gate_up, at::Tensor& out) {
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous() && gate_up.dim() == 2 && out.dim() == 2);
  TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * out.size(1) && out.size(1) % kLanes == 0 &&
              gate_up.scalar_type() == out.scalar_type());
  dispatch_float(out, "silu_and_mul", [&](auto type) { silu_mul<decltype(type)>(gate_up, out); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("silu_and_mul(Tensor gate_up, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("silu_and_mul", silu_and_mul);
}
