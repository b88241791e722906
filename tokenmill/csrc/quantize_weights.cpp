// Float weight rows to the int8 / int4 layout that the quantized matmul multiplies (quant_kernel.h describes
// it): per group along the input, unsigned levels and a float16 step and offset, w = step * level + offset.
// Run at load, once per piece of a checkpoint tensor. The same in ~20 PyTorch ops per piece, with float
// temporaries as large as the piece, made SmolLM2's int8 load 2.8 s against 1.8 s (docs/benchmarks.md).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "quant_layout.h"

// The choice between two grids compares their rounding errors, as written: a fused multiply-add
// (-ffp-contract=fast) would round differently and could flip it.
#pragma GCC optimize("fp-contract=off")

namespace {

using namespace tokenmill;

// float16's smallest normal: the least step, so a group of equal weights still has one.
constexpr float kMinStep = 6.103515625e-05f;

float to_half(float x) { return static_cast<float>(at::Half(x)); }

struct Grid {
  float step, offset, error;
};

// The group on levels + 1 evenly spaced values from its min to its max (GGUF Q4_1's grid at 15 levels),
// fitted to the float16 step and min that are stored, so a GGUF block's come back exactly.
Grid min_max_grid(const float* w, int64_t n, int levels, float* out) {
  float lo = w[0], hi = w[0];
  for (int64_t i = 1; i < n; ++i) lo = std::min(lo, w[i]), hi = std::max(hi, w[i]);
  const float low = to_half(lo), step = to_half(std::max((hi - low) / levels, kMinStep));
  float error = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::clamp(std::nearbyint((w[i] - low) / step), 0.f, float(levels));
    error = std::max(error, std::fabs(out[i] * step + low - w[i]));
  }
  return {step, low, error};
}

// Symmetric around zero with step absmax / 127 (GGUF Q8_0's grid), its levels shifted by 128.
Grid symmetric_grid(const float* w, int64_t n, float* out) {
  float absmax = 0.f;
  for (int64_t i = 0; i < n; ++i) absmax = std::max(absmax, std::fabs(w[i]));
  const float step = to_half(std::max(absmax / 127, kMinStep)), offset = -128 * step;
  float error = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::clamp(std::nearbyint(w[i] / step), -127.f, 127.f) + 128;
    error = std::max(error, std::fabs(out[i] * step + offset - w[i]));
  }
  return {step, offset, error};
}

// One row's levels [K] and (step, offset) per group. int8 takes the closer of the two grids per group:
// weights from a Q8_0 file come back exactly, a Q4_1 file's up to float16 rounding of step / 17 (256
// levels hold its 16 as level = 17 * q4). One scale per output row instead parted greedy output from
// float32 within 32 tokens on 7 of 8 prompts (docs/benchmarks.md).
void quantize_row(const float* w, int64_t K, int64_t group, int64_t bits, float* levels, Grid* grids) {
  std::vector<float> other(bits == 8 ? group : 0);
  for (int64_t g = 0; g < K / group; ++g) {
    const float* wg = w + g * group;
    float* lg = levels + g * group;
    if (bits == 4) {
      grids[g] = min_max_grid(wg, group, 15, lg);
      continue;
    }
    grids[g] = symmetric_grid(wg, group, lg);
    const Grid min_max = min_max_grid(wg, group, 255, other.data());
    if (min_max.error < grids[g].error) {
      grids[g] = min_max;
      std::copy(other.begin(), other.end(), lg);
    }
  }
}

// Where rows of a layer go in q: uint8 [blocks, chunks, 64] and scale: float16 [blocks, groups, 2, 16].
struct Layout {
  uint8_t* q;
  at::Half* scale;
  int64_t K, group, groups, block_bytes;

  // Row r's K levels (each below 2^bits).
  template <typename Level>
  void put_levels(int64_t r, const Level* levels, int64_t bits) const {
    uint8_t* row = q + r / kBlockRows * block_bytes + r % kBlockRows * 4;
    for (int64_t k = 0; k < K; ++k) {
      if (bits == 8) {  // chunk k / 4 holds inputs 4c to 4c + 3
        row[k / 4 * kChunkBytes + k % 4] = static_cast<uint8_t>(levels[k]);
      } else if (k % 8 < 4) {  // chunk k / 8: inputs 8c to 8c + 3 in low nibbles, 8c + 4 to 8c + 7 in high
        row[k / 8 * kChunkBytes + k % 8] = static_cast<uint8_t>(levels[k]) | static_cast<uint8_t>(levels[k + 4]) << 4;
      }
    }
  }

  // Row r's step and offset for group g.
  void put_scale(int64_t r, int64_t g, at::Half step, at::Half offset) const {
    at::Half* s = scale + ((r / kBlockRows * groups + g) * 2) * kBlockRows + r % kBlockRows;
    s[0] = step;
    s[kBlockRows] = offset;
  }
};

// The layout of q and scale, checked for rows [start, start + n) of K inputs.
Layout layout_for(at::Tensor& q, at::Tensor& scale, int64_t K, int64_t bits, int64_t start, int64_t n) {
  const int64_t group = check_layout(q, scale, K, bits);
  TORCH_CHECK(start >= 0 && start + n <= q.size(0) * kBlockRows, "rows ", start, " to ", start + n, " are out of range");
  return {q.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), K, group, K / group, q.size(1) * kChunkBytes};
}

}  // namespace

namespace tokenmill {

// w: float32 [n, K] becomes rows [start, start + n) of q: uint8 [blocks, chunks, 64] and scale: float16
// [blocks, groups, 2, 16].
void quantize_weight_rows(const at::Tensor& w, int64_t bits, at::Tensor& q, at::Tensor& scale, int64_t start) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kFloat, "weights must be contiguous float32 rows");
  const int64_t n = w.size(0), K = w.size(1);
  const Layout out = layout_for(q, scale, K, bits, start, n);
  const float* wp = w.data_ptr<float>();
  // Each row writes only its own bytes and scales, so rows run in parallel.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> levels(K);
    std::vector<Grid> grids(out.groups);
    for (int64_t i = begin; i < end; ++i) {
      quantize_row(wp + i * K, K, out.group, bits, levels.data(), grids.data());
      out.put_levels(start + i, levels.data(), bits);
      for (int64_t g = 0; g < out.groups; ++g)
        out.put_scale(start + i, g, at::Half(grids[g].step), at::Half(grids[g].offset));
    }
  });
}

// Rows already on the grid (a GGUF file's Q4_1 or Q8_0 blocks): levels uint8 [n, K] below 2^bits, and per
// group their float16 step and offset [n, groups], written unchanged into rows [start, start + n).
void pack_weight_rows(const at::Tensor& levels, const at::Tensor& step, const at::Tensor& offset, int64_t bits,
                      at::Tensor& q, at::Tensor& scale, int64_t start) {
  TORCH_CHECK(levels.dim() == 2 && levels.is_contiguous() && levels.scalar_type() == at::kByte,
              "levels must be contiguous uint8 rows");
  const int64_t n = levels.size(0), K = levels.size(1);
  const Layout out = layout_for(q, scale, K, bits, start, n);
  for (const at::Tensor* t : {&step, &offset})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == n &&
                t->size(1) == out.groups, "steps and offsets must be float16 [", n, ", ", out.groups, "]");
  const uint8_t* lp = levels.data_ptr<uint8_t>();
  const at::Half* sp = step.data_ptr<at::Half>();
  const at::Half* op = offset.data_ptr<at::Half>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out.put_levels(start + i, lp + i * K, bits);
      for (int64_t g = 0; g < out.groups; ++g)
        out.put_scale(start + i, g, sp[i * out.groups + g], op[i * out.groups + g]);
    }
  });
}

}  // namespace tokenmill
