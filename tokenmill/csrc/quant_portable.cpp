// The int8 / int4 matmul in plain loops: the reference the vector kernels are tested against, and what runs
// on a CPU none of them covers. The layout and the sums it computes are described in quant_kernel.h.
#include <algorithm>
#include <cmath>

#include "quant_kernel.h"

namespace tokenmill {
namespace {

void quantize(const float* x, int64_t begin, int64_t end, int8_t* hi, int8_t* lo, float* dx, float* sx) {
  auto abs_max = [](const float* xp) {
    uint32_t amax = 0;
    for (int j = 0; j < kInputBlock; ++j) {
      uint32_t bits;
      std::memcpy(&bits, xp + j, 4);
      amax = std::max(amax, bits & 0x7fffffffu);
    }
    float f;
    std::memcpy(&f, &amax, 4);
    return f;
  };
  auto levels = [](const float* xp, float inv, int8_t* high, int8_t* low) {
    int32_t total = 0;
    for (int j = 0; j < kInputBlock; ++j) {
      const int32_t level = static_cast<int32_t>(std::nearbyint(xp[j] * inv));
      const int32_t rest = ((level + 128) & 255) - 128;  // level = 256 * high + rest, rest in [-128, 127]
      high[j] = static_cast<int8_t>((level - rest) / 256);
      low[j] = static_cast<int8_t>(rest);
      total += level;
    }
    return total;
  };
  quantize_input_blocks(x, begin, end, hi, lo, dx, sx, abs_max, levels);
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
  for_weight_blocks(w, begin, end, [&](auto bits, const uint8_t* q, const uint16_t* scale, int64_t n0) {
    block_rows<decltype(bits)::kBits>(q, scale, w.group, x, M, out, w.N, n0);
  });
}

}  // namespace

const QuantKernel kPortableKernel{"portable", rows_as_given, quantize, matmul};

}  // namespace tokenmill
