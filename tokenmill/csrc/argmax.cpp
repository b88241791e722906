// Each row's argmax, for the sampler (greedy tokens and the exponential race alike): ATen's max(dim) tracks
// indices in a scalar-paced reduction, 0.47 ms for 16 rows of SmolLM2's 49,152 logits and 2.3 ms for Gemma 3's
// 262,144, where amax alone takes 27 and 129 us.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "ops.h"
#include "vec.h"

namespace {

using namespace tokenmill;

// True where a beats b as torch.argmax ranks values: NaN above everything, else larger.
inline bool beats(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

// The index of x[0..n)'s largest value, the first one on ties, NaN counting as largest: as torch.argmax.
int64_t row_argmax(const float* x, int64_t n) {
  // 8-lane vectors on every CPU: 16 lanes carried around a loop went through the stack where AVX2 is the widest
  // (vec.h), and a row is read once, so width matters less than independent chains. kChains of them side by side,
  // each lane keeping its first best (it takes a later value only if strictly better): independent
  // compare-and-blend chains. One chain waited on its own latency and ran twice as slow.
  constexpr int kChains = 4, kWidth = 8 * kChains;
  int64_t best = 0, i = 0;
  if (n >= kWidth) {
    f32x8 top[kChains];
    i32x8 where[kChains];
    for (int c = 0; c < kChains; ++c) {
      __builtin_memcpy(&top[c], x + 8 * c, sizeof(f32x8));
      where[c] = i32x8{0, 1, 2, 3, 4, 5, 6, 7} + 8 * c;
    }
    for (i = kWidth; i + kWidth <= n; i += kWidth)
      for (int c = 0; c < kChains; ++c) {
        f32x8 v;
        __builtin_memcpy(&v, x + i + 8 * c, sizeof v);
        const i32x8 better = (v > top[c]) | ((v != v) & (top[c] == top[c]));
        top[c] = better ? v : top[c];
        where[c] = better ? i32x8{0, 1, 2, 3, 4, 5, 6, 7} + int32_t(i + 8 * c) : where[c];
      }
    // Across lanes: the best value, then the lowest index among the lanes holding it.
    best = where[0][0];
    for (int c = 0; c < kChains; ++c)
      for (int l = 0; l < 8; ++l)
        if (beats(top[c][l], x[best]) || (!beats(x[best], top[c][l]) && where[c][l] < best)) best = where[c][l];
  }
  for (; i < n; ++i)  // the last n % 32, after every index above
    if (beats(x[i], x[best])) best = i;
  return best;
}

}  // namespace

namespace tokenmill {

void argmax_rows(const at::Tensor& x, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat && x.size(1) > 0 &&
              x.size(1) <= INT32_MAX, "argmax_rows takes float32 rows with unit stride, indexed in int32 lanes");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kLong && out.numel() == x.size(0));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), stride = x.stride(0);
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = row_argmax(xp + r * stride, n);
  });
}

}  // namespace tokenmill
