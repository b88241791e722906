// Gated activations for the CPU decode path: silu(gate) * up (SwiGLU) and gelu_tanh(gate) * up (GeGLU) in
// one pass over the fused gate/up output, instead of a chunk, an activation and a multiply that each write a
// tensor.
#include <ATen/Parallel.h>

#include "ops.h"
#include "vec.h"

namespace {

using namespace tokenmill;

// Both are gate * sigmoid(a * u(gate)): silu with u(g) = g, a = 1; GELU's tanh form with
// u(g) = g + 0.044715 g^3, a = 2 sqrt(2 / pi), since (1 + tanh(x)) / 2 = sigmoid(2x).
struct Silu {
  static f32x16 arg(f32x16 g) { return -g; }
};
struct GeluTanh {
  static f32x16 arg(f32x16 g) { return (g + 0.044715f * g * g * g) * -1.5957691216057308f; }
};

// gate_up: [tokens, 2 * dim], gate then up; out: [tokens, dim].
template <typename Act, typename T>
void gated_mul(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t tokens = out.size(0), dim = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = gp + t * 2 * dim;
      for (int64_t d = 0; d < dim; d += kLanes) {
        const f32x16 g = load(gate + d);
        store(op + t * dim + d, g / (1.f + tokenmill::exp(Act::arg(g))) * load(gate + dim + d));
      }
    }
  });
}

template <typename Act>
void act_and_mul(const at::Tensor& gate_up, at::Tensor& out) {
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous() && gate_up.dim() == 2 && out.dim() == 2);
  TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * out.size(1) && out.size(1) % kLanes == 0 &&
              gate_up.scalar_type() == out.scalar_type());
  dispatch_float(out, "gated activation", [&](auto type) { gated_mul<Act, decltype(type)>(gate_up, out); });
}

}  // namespace

namespace tokenmill {

void silu_and_mul(const at::Tensor& gate_up, at::Tensor& out) { act_and_mul<Silu>(gate_up, out); }

void gelu_tanh_and_mul(const at::Tensor& gate_up, at::Tensor& out) { act_and_mul<GeluTanh>(gate_up, out); }

}  // namespace tokenmill
