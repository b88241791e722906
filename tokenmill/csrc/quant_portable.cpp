// The int8 / int4 matmul in plain loops: the reference the vector kernels are tested against, and what runs
// on a CPU none of them covers. The layout and the sums it computes are described in quant_kernel.h.
#include <cmath>

#include "quant_kernel.h"

namespace tokenmill {
namespace {

void quantize(const float* x, int64_t begin, int64_t end, int8_t* hi, int8_t* lo, float* dx, float* sx) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xp = x + i * kInputBlock;
    float amax = 0.f;
    for (int j = 0; j < kInputBlock; ++j) amax = std::fmax(amax, std::fabs(xp[j]));
    const float inv = amax > 0.f ? kMaxLevel / amax : 0.f;
    int32_t total = 0;
    for (int j = 0; j < kInputBlock; ++j) {
      const int32_t level = static_cast<int32_t>(std::nearbyint(xp[j] * inv));
      const int32_t low = ((level + 128) & 255) - 128;  // level = 256 * high + low, low in [-128, 127]
      hi[i * kInputBlock + j] = static_cast<int8_t>((level - low) / 256);
      lo[i * kInputBlock + j] = static_cast<int8_t>(low);
      total += level;
    }
    dx[i] = amax / kMaxLevel;
    sx[i] = dx[i] * float(total);
  }
}

// Row r's level at input k of a block's weights.
template <int Bits>
inline int32_t level(const uint8_t* q, int r, int64_t k) {
  if constexpr (Bits == 8) return q[(k / 4) * kChunkBytes + r * 4 + k % 4];
  const uint8_t byte = q[(k / 8) * kChunkBytes + r * 4 + k % 4];
  return k % 8 < 4 ? byte & 15 : byte >> 4;
}

template <int Bits>
void block_rows(const uint8_t* q, const uint16_t* scale, int64_t group, const QuantizedRows& x, int64_t M,
                float* out, int64_t N, int64_t n0) {
  const int64_t blocks = x.K / kInputBlock;
  for (int64_t m = 0; m < M; ++m) {
    for (int r = 0; r < kBlockRows && n0 + r < N; ++r) {
      float acc = 0.f;
      for (int64_t kb = 0; kb < blocks; ++kb) {
        const int64_t g = kb * kInputBlock / group;
        int32_t high = 0, low = 0;
        for (int64_t k = kb * kInputBlock; k < (kb + 1) * kInputBlock; ++k) {
          high += level<Bits>(q, r, k) * x.hi[m * x.K + k];
          low += level<Bits>(q, r, k) * x.lo[m * x.K + k];
        }
        const int32_t dot = high * 256 + low;
        const float step = half_to_float(scale[g * 2 * kBlockRows + r]);
        const float offset = half_to_float(scale[(g * 2 + 1) * kBlockRows + r]);
        acc = std::fma(float(dot), step * x.dx[m * blocks + kb], acc);
        acc = std::fma(offset, x.sx[m * blocks + kb], acc);
      }
      out[m * N + n0 + r] = acc;
    }
  }
}

void matmul(const QuantizedWeights& w, const QuantizedRows& x, int64_t M, float* out, int64_t begin, int64_t end,
            uint8_t*) {
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* q = w.q + b * w.block_bytes;
    const uint16_t* scale = w.scale + b * w.block_scales;
    if (w.bits == 8) block_rows<8>(q, scale, w.group, x, M, out, w.N, b * kBlockRows);
    else block_rows<4>(q, scale, w.group, x, M, out, w.N, b * kBlockRows);
  }
}

}  // namespace

const QuantKernel kPortableKernel{"portable", rows_as_given, quantize, matmul};

}  // namespace tokenmill
