// The int8 / int4 matmul's kernels, one per instruction set, behind one signature of raw pointers and no
// torch types: each builds in a file of its own under its own target (arch/<family>/), and quant_matmul.cpp,
// the only file that knows torch, picks the fastest one this CPU runs.
//
// Layout, in blocks of 16 output rows, each weight an unsigned level with a (step, offset) per group
// along the input: w = step * level + offset. q is uint8 [blocks, chunks, 64]. int8: byte r * 4 + i of
// chunk c is row r's level at input 4c + i. int4: chunk c covers inputs 8c to 8c + 7, byte r * 4 + i
// holding row r's level at 8c + i in its low nibble and at 8c + 4 + i in its high one. scale is float16
// [blocks, groups, 2, 16]: each row's step, then each row's offset.
//
// Inputs are quantized per row in blocks of 32 to 16 bits, x = dx * (256 * hi + lo) with hi and lo int8,
// and each half is multiplied as int8: twice the multiplies of int8 inputs (llama.cpp's Q8_1 route), for
// inputs 256x finer. With int8 inputs SmolLM2's greedy tokens parted from float32 within 32 tokens on 6
// of 8 prompts (perplexity unchanged); with 16 bits they agree as float32's own kernel did
// (docs/benchmarks.md). The offsets ride on sx = dx * sum(levels): sum(w * x) = step * dx *
// sum(level * x16) + offset * sx.
//
// NOTE: every kernel computes the same exact int32 sums, high = sum(level * hi) and low = sum(level * lo)
// per 32 inputs, then the same float work in the same order: acc = fma(float(256 * high + low), step * dx,
// acc); acc = fma(offset, sx, acc). So every kernel gives the same bits, and a row's result does not
// depend on the batch around it or on the CPU (tests/quant/test_kernels.py holds them to it).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace tokenmill {

// Output rows per block (one per int32 lane of a 512-bit vector), bytes per chunk, inputs per block of
// quantized input; exported to Python by quant_matmul.cpp.
constexpr int kBlockRows = 16, kChunkBytes = 64, kInputBlock = 32;
// Level vectors of 4 inputs x 16 rows per 32 inputs.
constexpr int kLevelVectors = kInputBlock / 4;
constexpr int chunks_per_input_block(int bits) { return kInputBlock * bits / 32; }
// The largest input level: 256 * 127 + 127, so both halves stay within int8.
constexpr float kMaxLevel = 32639.f;

// The input rows quantized: 16-bit levels as int8 halves hi and lo [M, K], and per row and block of 32
// inputs its step dx and dx * sum(levels).
struct QuantizedRows {
  const int8_t* hi;
  const int8_t* lo;
  const float* dx;
  const float* sx;
  int64_t K;
};

// A quantized layer's weights: q [blocks, chunks, 64], scale as float16 bits [blocks, groups, 2, 16].
struct QuantizedWeights {
  const uint8_t* q;
  const uint16_t* scale;
  int64_t bits, group, N;  // N output rows; the last block may hold fewer than 16
  int64_t block_bytes, block_scales;
};

// One instruction set's kernel. The caller splits work across threads: input blocks for quantize, weight
// blocks for matmul.
struct QuantKernel {
  const char* name;
  // Input rows the hi / lo buffers hold for M rows (AMX reads whole tiles; the extra rows are ignored).
  int64_t (*rows_held)(int64_t M);
  // Input blocks [begin, end) of 32 floats (row-major over [M, K / 32]) to levels, dx and sx.
  void (*quantize)(const float* x, int64_t begin, int64_t end, int8_t* hi, int8_t* lo, float* dx, float* sx);
  // out[m, 16 b .. 16 b + 15] for all M input rows and weight blocks b in [begin, end); out is [M, N].
  // scratch holds two blocks of int8 levels, 2 * K * 16 bytes, for this thread.
  void (*matmul)(const QuantizedWeights& w, const QuantizedRows& x, int64_t M, float* out, int64_t begin,
                 int64_t end, uint8_t* scratch);
};

extern const QuantKernel kPortableKernel;
#if defined(__x86_64__)
extern const QuantKernel kAvx2Kernel, kAvxVnniKernel, kAvx512VnniKernel, kAmxKernel;
#endif

inline int64_t rows_as_given(int64_t M) { return M; }

// The loops every kernel shares around its own per-block code, which it passes in as lambdas: each
// instantiation is then local to its kernel's file and built under that file's target.

// Input blocks [begin, end): abs_max(x) of 32 inputs, then levels(x, kMaxLevel / abs_max, hi, lo), which
// writes their levels and returns the levels' sum. abs_max compares the inputs' bits with their signs cleared as
// unsigned integers: the order of floats for finite values and infinities, and above them every NaN, which a float
// max may drop.
template <typename AbsMax, typename Levels>
inline void quantize_input_blocks(const float* x, int64_t begin, int64_t end, int8_t* hi, int8_t* lo, float* dx,
                                  float* sx, const AbsMax& abs_max, const Levels& levels) {
  for (int64_t i = begin; i < end; ++i) {
    const float* xp = x + i * kInputBlock;
    const float amax = abs_max(xp);
    if (!(amax <= std::numeric_limits<float>::max())) {
      // An infinity or NaN has no level (its conversion is undefined): the block's steps make every result of the
      // row NaN, as in a float matmul, whichever kernel runs it.
      std::memset(hi + i * kInputBlock, 0, kInputBlock);
      std::memset(lo + i * kInputBlock, 0, kInputBlock);
      dx[i] = sx[i] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    // Below kMaxLevel / FLT_MAX the inverse overflows to inf (levels of inf and NaN, undefined as integers): such
    // a block's products lie far below float's resolution, so its levels are zero, as an all-zero block's.
    const float inv = amax > kMaxLevel / std::numeric_limits<float>::max() ? kMaxLevel / amax : 0.f;
    const int32_t total = levels(xp, inv, hi + i * kInputBlock, lo + i * kInputBlock);
    dx[i] = amax / kMaxLevel;
    sx[i] = dx[i] * float(total);
  }
}

template <int Bits>
struct BitsTag {
  static constexpr int kBits = Bits;
};

// Weight blocks [begin, end): block_rows(BitsTag<8 or 4>, block's levels, block's scales, first output row).
template <typename BlockRows>
inline void for_weight_blocks(const QuantizedWeights& w, int64_t begin, int64_t end, const BlockRows& block_rows) {
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* q = w.q + b * w.block_bytes;
    const uint16_t* scale = w.scale + b * w.block_scales;
    if (w.bits == 8) block_rows(BitsTag<8>{}, q, scale, b * kBlockRows);
    else block_rows(BitsTag<4>{}, q, scale, b * kBlockRows);
  }
}

// Decode reads each weight once, from memory, and the hardware prefetchers stop at every 4 KiB page (a block
// of SmolLM2's 576 inputs is 4.6 KB): kernels reading a block for the first time ask for its levels and scales
// this far ahead in its stream. At 1 to 4 rows the AVX-512, AVX-VNNI and AVX2 kernels ran 10-25% faster
// (docs/benchmarks.md); 2 and 8 KiB did about as well, 0.5 and 1 KiB less.
constexpr int64_t kPrefetchBytes = 4096;

// Prefetches ahead of a block's inputs [32 kb, 32 kb + 32): blocks follow each other in memory, and the scales
// (64 bytes per 32 inputs with groups of 32) stream at 1 / Bits of the levels' bytes.
// NOTE: always inlined. A call GCC leaves out of line (from a kernel under another target pragma) it deems free
// of side effects, and deletes.
template <int Bits>
[[gnu::always_inline]] inline void prefetch_ahead(const uint8_t* q, const uint16_t* scale, int64_t kb, int64_t group) {
  const uint8_t* levels = q + kb * chunks_per_input_block(Bits) * kChunkBytes + kPrefetchBytes;
  for (int c = 0; c < chunks_per_input_block(Bits); ++c) __builtin_prefetch(levels + c * kChunkBytes);
  __builtin_prefetch(reinterpret_cast<const uint8_t*>(scale + kb * kInputBlock / group * 2 * kBlockRows) +
                     kPrefetchBytes / Bits);
}

// float16 bits to float32, exactly (every float16 is a float32).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float f = float(mantissa) * 5.9604644775390625e-08f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace tokenmill
