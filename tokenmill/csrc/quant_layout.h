// The int8 / int4 weight layout's shape check (the layout is described in quant_kernel.h), shared by the
// matmul that reads it and the quantizer that writes it.
#pragma once

#include <ATen/core/Tensor.h>

#include "quant_kernel.h"

namespace tokenmill {

// Checks q: uint8 [blocks, chunks, 64] and scale: float16 [blocks, groups, 2, 16] against an input width
// of K; returns the group size.
inline int64_t check_layout(const at::Tensor& q, const at::Tensor& scale, int64_t K, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && q.scalar_type() == at::kByte && scale.scalar_type() == at::kHalf);
  TORCH_CHECK(q.dim() == 3 && q.size(1) * 32 / bits == K && q.size(2) == kChunkBytes && scale.dim() == 4 &&
              scale.size(0) == q.size(0) && scale.size(2) == 2 && scale.size(3) == kBlockRows &&
              K % scale.size(1) == 0 && (K / scale.size(1)) % kInputBlock == 0,
              "int", bits, " weights and scales do not match an input width of ", K);
  return K / scale.size(1);
}

}  // namespace tokenmill
