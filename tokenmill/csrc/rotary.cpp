// Rotary position embedding applied in place to the query and key heads of the fused QKV output, for
// the CPU decode path: one op instead of the ten (chunk, four multiplies, add, subtract, cat, for q and k).
#include <ATen/Parallel.h>

#include "ops.h"
#include "vec.h"

namespace {

using namespace tokenmill;

// x: [tokens, heads, D] with unit stride within a head (the token stride may span the V columns too);
// cos, sin: [tokens, 1, D / 2]. Half-split layout, as Hugging Face: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
template <typename T>
void rotate(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), half = x.size(2) / 2;
  const int64_t token_stride = x.stride(0), head_stride = x.stride(1);
  T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t d = 0; d < half; d += kLanes) {
        const f32x16 c = load(cp + t * half + d), s = load(sp + t * half + d);
        for (int64_t h = 0; h < heads; ++h) {
          T* x1 = xp + t * token_stride + h * head_stride + d;
          const f32x16 a = load(x1), b = load(x1 + half);
          store(x1, a * c - b * s);
          store(x1 + half, b * c + a * s);
        }
      }
    }
  });
}

}  // namespace

namespace tokenmill {

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(cos.numel() == x.size(0) * x.size(2) / 2 && cos.scalar_type() == x.scalar_type() &&
              sin.sizes() == cos.sizes() && sin.scalar_type() == cos.scalar_type() && x.size(2) % (2 * kLanes) == 0);
  dispatch_float(x, "rotary_", [&](auto type) { rotate<decltype(type)>(x, cos, sin); });
}

}  // namespace tokenmill
