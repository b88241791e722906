// The int8 / int4 matmul on AVX512-VNNI, and on AMX tiles from 6 input rows where the CPU has them.
//
// With a row per vector lane, one VPDPBUSD multiplies 4 inputs into 16 rows and adds them up in int32, so
// products need no horizontal sum and the float work comes once per 32 inputs: about 3x fewer
// instructions per weight than widening weights to float32.
//
// NOTE: only intrinsics, builtins (std::memcpy) and this file's own functions below the target pragma: a library
// template instantiated here would be built for AVX-512, and the linker may keep that copy for the whole extension.
#include "../../quant_kernel.h"

#include <sys/syscall.h>
#include <unistd.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")
#include <immintrin.h>

namespace tokenmill {
namespace {

constexpr int kTile = 4;  // input rows per pass over one or two blocks' weights: each level vector serves them all

// Inputs xp[0, 32) as 16-bit levels split into hi and lo; returns the sum of the levels.
inline int32_t quantize_block(const float* xp, float inv, int8_t* hi, int8_t* lo) {
  __m512i total = _mm512_setzero_si512();
  for (int j = 0; j < kInputBlock; j += 16) {
    // cvtps rounds half to even, as nearbyint does in the portable loop: both give the same levels.
    const __m512i level = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xp + j), _mm512_set1_ps(inv)));
    const __m512i low = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(level, _mm512_set1_epi32(128)), _mm512_set1_epi32(255)),
                                         _mm512_set1_epi32(128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + j), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(level, low), 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + j), _mm512_cvtepi32_epi8(low));
    total = _mm512_add_epi32(total, level);
  }
  return _mm512_reduce_add_epi32(total);
}

inline float abs_max(const float* xp) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  const __m512i a = _mm512_and_si512(_mm512_loadu_si512(xp), magnitude);
  const __m512i b = _mm512_and_si512(_mm512_loadu_si512(xp + 16), magnitude);
  const uint32_t m = _mm512_reduce_max_epu32(_mm512_max_epu32(a, b));
  float f;
  std::memcpy(&f, &m, 4);
  return f;
}

void quantize(const float* x, int64_t begin, int64_t end, int8_t* hi, int8_t* lo, float* dx, float* sx) {
  // Lambdas, not the functions themselves: an instantiation over function pointer types would be one
  // symbol for every kernel's file, and the linker could keep another target's copy.
  quantize_input_blocks(x, begin, end, hi, lo, dx, sx, [](const float* xp) { return abs_max(xp); },
                        [](const float* xp, float inv, int8_t* h, int8_t* l) { return quantize_block(xp, inv, h, l); });
}

inline __m512 load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// An int4 chunk's two level vectors: its 64 bytes' low nibbles, then their high ones.
inline void unpack_nibbles(__m512i chunk, __m512i& low, __m512i& high) {
  low = _mm512_and_si512(chunk, _mm512_set1_epi8(0x0F));
  high = _mm512_and_si512(_mm512_srli_epi16(chunk, 4), _mm512_set1_epi8(0x0F));
}

// The 8 level vectors of inputs [32 kb, 32 kb + 32) of a block: vector j holds inputs 4j to 4j + 3.
template <int Bits>
inline void load_levels(const uint8_t* q, int64_t kb, __m512i (&levels)[kLevelVectors]) {
  const uint8_t* p = q + kb * chunks_per_input_block(Bits) * kChunkBytes;
  if constexpr (Bits == 8) {
    for (int j = 0; j < kLevelVectors; ++j) levels[j] = _mm512_loadu_si512(p + j * kChunkBytes);
  } else {
    for (int c = 0; c < kLevelVectors / 2; ++c)
      unpack_nibbles(_mm512_loadu_si512(p + c * kChunkBytes), levels[2 * c], levels[2 * c + 1]);
  }
}

// The float work on one input row's exact sums over 32 inputs, shared by the VNNI and AMX paths so that
// both give the same bits: acc += step * dx * (256 * high + low) + offset * sx.
inline __m512 accumulate(__m512 acc, __m512i high, __m512i low, __m512 step, __m512 offset, float dx, float sx) {
  // Exact in int32: |high| <= 32 * 255 * 128, so high * 256 stays below 2^31.
  const __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(high, 8), low));
  acc = _mm512_fmadd_ps(dots, _mm512_mul_ps(step, _mm512_set1_ps(dx)), acc);
  return _mm512_fmadd_ps(offset, _mm512_set1_ps(sx), acc);
}

// The lanes of block rows n0 .. n0 + 15 that exist: the last block may hold fewer than 16 of N rows.
inline __mmask16 valid_rows(int64_t N, int64_t n0) {
  return N - n0 >= kBlockRows ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
}

// out[t, the 16 * B rows of B consecutive blocks] for T input rows: each input's broadcast feeds the B blocks'
// VPDPBUSD. `valid` masks the last block's rows past N (only the matrix's last block has any).
// Level vectors are loaded (int4: unpacked, two from each 64 bytes) as the multiplies reach them, not all 8 of a
// block first: the registers that frees hold 4 rows' sums for two blocks (docs/benchmarks.md).
template <int Bits, int B, int T>
void block_tile(const uint8_t* q, const uint16_t* scale, const QuantizedWeights& w, const QuantizedRows& x,
                float* out, int64_t ldo, __mmask16 valid, bool first) {
  const int64_t blocks = x.K / kInputBlock;
  __m512 acc[T][B];
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < B; ++b) acc[t][b] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < blocks; ++kb) {
    // The first pass over the blocks reads them from memory; later passes find them in cache.
    if (first)
      for (int b = 0; b < B; ++b) prefetch_ahead<Bits>(q + b * w.block_bytes, scale + b * w.block_scales, kb, w.group);
    const uint8_t* p = q + kb * chunks_per_input_block(Bits) * kChunkBytes;
    __m512i high_nibbles[B];
    __m512i high[T][B], low[T][B];
    for (int t = 0; t < T; ++t)
      for (int b = 0; b < B; ++b) high[t][b] = low[t][b] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int j = 0; j < kLevelVectors; ++j) {
      __m512i levels[B];
      for (int b = 0; b < B; ++b) {
        if constexpr (Bits == 8) {
          levels[b] = _mm512_loadu_si512(p + b * w.block_bytes + j * kChunkBytes);
        } else if (j % 2 == 0) {  // int4: chunk j / 2 holds vectors j and j + 1
          unpack_nibbles(_mm512_loadu_si512(p + b * w.block_bytes + j / 2 * kChunkBytes), levels[b], high_nibbles[b]);
        } else {
          levels[b] = high_nibbles[b];
        }
      }
      for (int t = 0; t < T; ++t) {
        int32_t four_high, four_low;
        std::memcpy(&four_high, x.hi + t * x.K + kb * kInputBlock + 4 * j, 4);
        std::memcpy(&four_low, x.lo + t * x.K + kb * kInputBlock + 4 * j, 4);
        const __m512i h = _mm512_set1_epi32(four_high), l = _mm512_set1_epi32(four_low);
        for (int b = 0; b < B; ++b) {
          high[t][b] = _mm512_dpbusd_epi32(high[t][b], levels[b], h);
          low[t][b] = _mm512_dpbusd_epi32(low[t][b], levels[b], l);
        }
      }
    }
    const int64_t g = kb * kInputBlock / w.group;
    for (int b = 0; b < B; ++b) {
      const uint16_t* s = scale + b * w.block_scales;
      const __m512 step = load_half(s + g * 2 * kBlockRows), offset = load_half(s + (g * 2 + 1) * kBlockRows);
      for (int t = 0; t < T; ++t)
        acc[t][b] = accumulate(acc[t][b], high[t][b], low[t][b], step, offset, x.dx[t * blocks + kb], x.sx[t * blocks + kb]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < B; ++b) _mm512_mask_storeu_ps(out + t * ldo + b * kBlockRows, b == B - 1 ? valid : 0xFFFF, acc[t][b]);
}

// B consecutive blocks from output row n0, for all M input rows, kTile rows a pass: with two blocks, 16 int32 sums
// and 8 float accumulators beside the level vectors and broadcasts, 30 of the 32 registers.
template <int Bits, int B>
void block_rows(const uint8_t* q, const uint16_t* scale, const QuantizedWeights& w, const QuantizedRows& x, int64_t M,
                float* out, int64_t n0) {
  const __mmask16 valid = valid_rows(w.N, n0 + (B - 1) * kBlockRows);
  const int64_t blocks = x.K / kInputBlock;
  auto rows = [&](int64_t m) {
    return QuantizedRows{x.hi + m * x.K, x.lo + m * x.K, x.dx + m * blocks, x.sx + m * blocks, x.K};
  };
  float* o = out + n0;
  int64_t m = 0;
  for (; m + kTile <= M; m += kTile) block_tile<Bits, B, kTile>(q, scale, w, rows(m), o + m * w.N, w.N, valid, m == 0);
  switch (M - m) {
    case 3: block_tile<Bits, B, 3>(q, scale, w, rows(m), o + m * w.N, w.N, valid, m == 0); break;
    case 2: block_tile<Bits, B, 2>(q, scale, w, rows(m), o + m * w.N, w.N, valid, m == 0); break;
    case 1: block_tile<Bits, B, 1>(q, scale, w, rows(m), o + m * w.N, w.N, valid, m == 0); break;
  }
}

// Past kTile rows, blocks two at a time, so a broadcast feeds two VPDPBUSD (alone, int4 15-40% faster from 6 to 512
// rows, int8 10-12% at 8 and 16; 4 rows a pass rather than 2, int4 11-16% and int8 8-10% more). Up to kTile rows one
// pass of a block already takes every row, and with the weights read from memory as two interleaved streams pairs
// were slower (int4 19% at 1 row, int8 25-45% at 1 to 4), so decode keeps a block at a time.
void vnni_matmul(const QuantizedWeights& w, const QuantizedRows& x, int64_t M, float* out, int64_t begin, int64_t end,
                 uint8_t*) {
  int64_t b = begin;
  if (M > kTile)
    for (; b + 2 <= end; b += 2) {
      const uint8_t* q = w.q + b * w.block_bytes;
      const uint16_t* scale = w.scale + b * w.block_scales;
      if (w.bits == 8) block_rows<8, 2>(q, scale, w, x, M, out, b * kBlockRows);
      else block_rows<4, 2>(q, scale, w, x, M, out, b * kBlockRows);
    }
  for_weight_blocks(w, b, end, [&](auto bits, const uint8_t* q, const uint16_t* scale, int64_t n0) {
    block_rows<decltype(bits)::kBits, 1>(q, scale, w, x, M, out, n0);
  });
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")

// AMX: one TDPBSUD multiplies 16 input rows by a block's 16 weight rows over 32 inputs, 16x the work of a
// VPDPBUSD, so batches (decode of many sequences, prefill) stop being compute-bound. The weights are
// already in the tile's layout (4 inputs of 16 rows per 64 bytes); the int32 sums are the same exact
// sums, and the float work after them is the VNNI kernel's, in the same order: a row's result is the
// same bits whichever path ran it.
constexpr int kTileRows = 16;  // the most input rows a tile holds
// From this many input rows on, the tiles win (at 1 row the VNNI kernel reads the weights once, faster). int8
// tiles read the weights as they are: from 6 rows they took 0.65-0.86x the VNNI kernel's time up to 32 rows. int4
// blocks must first be unpacked, and their tiles took 1.00-1.36x its time from 6 to 32 rows, 0.97-1.09x at 48
// and 0.75-1.11x at 64, 0.77-0.89x at 128 (docs/benchmarks.md).
constexpr int64_t kAmxMinRows = 6, kAmxMinRowsInt4 = 64;

// Linux hands AMX's 8 KB of tile registers only to processes that ask for them, once.
bool amx_permitted() {
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool permitted = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

// Tiles 0 and 5: two blocks' weights over 32 inputs; tiles 1 and 2: up to 16 input rows' hi and lo halves over
// the same 32 inputs; tiles 3 and 4 (block 0), 6 and 7 (block 1): their int32 sums [input rows, 16 weight rows].
// Dots and stores take a cycle per input row, so fewer rows than 16 are configured as such rather than padded.
void configure_tiles(uint8_t input_rows) {
  struct Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
  };
  const uint8_t r = input_rows;
  const Config config{1, 0, {}, {kChunkBytes, kInputBlock, kInputBlock, kBlockRows * 4, kBlockRows * 4, kChunkBytes,
                                 kBlockRows * 4, kBlockRows * 4},
                      {kLevelVectors, r, r, r, r, kLevelVectors, r, r}};
  static_assert(sizeof(config) == 64);
  _tile_loadconfig(&config);
}

// The int32 sums of B blocks (high and low halves) for up to 16 input rows over 32 inputs.
template <int B>
struct TileSums {
  alignas(64) int32_t high[B][kTileRows][kBlockRows], low[B][kTileRows][kBlockRows];
};

// Multiplies up to 16 input rows' halves by B blocks' weights over 32 inputs (block b's at w + b * block_stride),
// into tiles 3 and 4, then 6 and 7. The input tiles' loads were the hot spot (`perf`: every block read all input
// rows again, from L2 at 512 rows); in pairs one load serves two blocks: alone, 512 rows 10-40% faster, SmolLM2's
// 512-token prefill 6-29%. The tiles are throughput-bound, so the caller post-processes the previous 32 inputs' sums
// between this and store_sums (10% faster at 16 rows than storing at once).
template <int B>
inline void tile_sums(const uint8_t* w, int64_t block_stride, const int8_t* hi, const int8_t* lo, int64_t stride) {
  _tile_loadd(1, hi, stride);
  _tile_loadd(2, lo, stride);
  _tile_loadd(0, w, kChunkBytes);
  _tile_zero(3);
  _tile_zero(4);
  _tile_dpbsud(3, 1, 0);
  _tile_dpbsud(4, 2, 0);
  if constexpr (B == 2) {
    _tile_loadd(5, w + block_stride, kChunkBytes);
    _tile_zero(6);
    _tile_zero(7);
    _tile_dpbsud(6, 1, 5);
    _tile_dpbsud(7, 2, 5);
  }
}

template <int B>
inline void store_sums(TileSums<B>& sums) {
  _tile_stored(3, sums.high[0], kBlockRows * 4);
  _tile_stored(4, sums.low[0], kBlockRows * 4);
  if constexpr (B == 2) {
    _tile_stored(6, sums.high[1], kBlockRows * 4);
    _tile_stored(7, sums.low[1], kBlockRows * 4);
  }
}

// Input rows per tile for M rows: as many as evenly fill the fewest tiles, so every tile takes one
// configuration (a reconfiguration costs about 120 cycles) and at most a row per tile is padding.
int64_t tile_rows(int64_t M) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  return (M + tiles - 1) / tiles;
}

bool use_tiles(int64_t M, int64_t bits) { return M >= (bits == 4 ? kAmxMinRowsInt4 : kAmxMinRows) && amx_permitted(); }

// Tiles read whole tiles of input rows: the buffers round M up (for int8's threshold, enough for int4's too).
int64_t amx_rows_held(int64_t M) {
  if (!use_tiles(M, 8)) return M;
  const int64_t per_tile = tile_rows(M);
  return (M + per_tile - 1) / per_tile * per_tile;
}

// As block_rows, for B consecutive blocks from output row n0, with tiles of tile_rows(M) rows; x's buffers hold M
// rounded up to whole tiles (the extra rows are ignored). w is the blocks' weights as int8 levels, one block after
// another (int4 blocks unpacked by the caller).
template <int B>
void block_rows_amx(const uint8_t* w, const uint16_t* scale, const QuantizedWeights& q, const QuantizedRows& x,
                    int64_t M, float* out, int64_t n0) {
  const __mmask16 valid = valid_rows(q.N, n0 + (B - 1) * kBlockRows);
  const int64_t blocks = x.K / kInputBlock, group_bytes = kLevelVectors * kChunkBytes;
  const int64_t block_stride = blocks * group_bytes;
  TileSums<B> sums[2];
  const int64_t per_tile = tile_rows(M);
  for (int64_t m0 = 0; m0 < M; m0 += per_tile) {
    const int rows = static_cast<int>(M - m0 < per_tile ? M - m0 : per_tile);
    const int8_t *hi = x.hi + m0 * x.K, *lo = x.lo + m0 * x.K;
    __m512 acc[B][kTileRows];
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < rows; ++t) acc[b][t] = _mm512_setzero_ps();
    tile_sums<B>(w, block_stride, hi, lo, x.K);
    store_sums(sums[0]);
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const TileSums<B>& done = sums[kb & 1];
      const bool more = kb + 1 < blocks;
      // Past one tile the inputs outgrow L1, and the tile loads, 16 rows K bytes apart, waited on L2 (`perf`: 23% of
      // the time at 512 rows): each row's line two loads ahead is prefetched (at the end, the next tile's first).
      if (M > per_tile) {
        const int64_t ahead =
            kb + 2 < blocks ? (kb + 2) * kInputBlock : (kb + 2 - blocks) * kInputBlock + per_tile * x.K;
        for (int t = 0; t < rows; ++t) {
          _mm_prefetch(reinterpret_cast<const char*>(hi + t * x.K + ahead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(lo + t * x.K + ahead), _MM_HINT_T0);
        }
      }
      // int8 tiles read their weights from memory on the first tile of rows: the LM head 10-20% faster at 6-16 rows.
      // int4 tiles read scratch; a prefetch in the unpacking ahead of them was up to 14% slower at 16 rows.
      if (q.bits == 8 && m0 == 0) prefetch_ahead<8>(w, scale, kb, q.group);
      if (more)
        tile_sums<B>(w + (kb + 1) * group_bytes, block_stride, hi + (kb + 1) * kInputBlock, lo + (kb + 1) * kInputBlock,
                     x.K);
      const int64_t g = kb * kInputBlock / q.group;
      for (int b = 0; b < B; ++b) {
        const uint16_t* s = scale + b * q.block_scales;
        const __m512 step = load_half(s + g * 2 * kBlockRows), offset = load_half(s + (g * 2 + 1) * kBlockRows);
        for (int t = 0; t < rows; ++t) {
          const int64_t at = (m0 + t) * blocks + kb;
          acc[b][t] = accumulate(acc[b][t], _mm512_load_si512(done.high[b][t]), _mm512_load_si512(done.low[b][t]), step,
                                 offset, x.dx[at], x.sx[at]);
        }
      }
      if (more) store_sums(sums[!(kb & 1)]);
    }
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < rows; ++t)
        _mm512_mask_storeu_ps(out + (m0 + t) * q.N + n0 + b * kBlockRows, b == B - 1 ? valid : 0xFFFF, acc[b][t]);
  }
}

// B blocks from block b: their int8 levels, int4 ones unpacked into scratch once for all their input rows.
template <int B>
void amx_blocks(const QuantizedWeights& w, const QuantizedRows& x, int64_t M, float* out, int64_t b, uint8_t* scratch) {
  const uint8_t* weights = w.q + b * w.block_bytes;
  if (w.bits == 4) {
    const int64_t blocks = x.K / kInputBlock;
    for (int i = 0; i < B; ++i)
      for (int64_t kb = 0; kb < blocks; ++kb) {
        __m512i levels[kLevelVectors];
        load_levels<4>(weights + i * w.block_bytes, kb, levels);
        for (int j = 0; j < kLevelVectors; ++j)
          _mm512_storeu_si512(scratch + ((i * blocks + kb) * kLevelVectors + j) * kChunkBytes, levels[j]);
      }
    weights = scratch;
  }
  block_rows_amx<B>(weights, w.scale + b * w.block_scales, w, x, M, out, b * kBlockRows);
}

// Below kAmxMinRows rows (kAmxMinRowsInt4 for int4), or where Linux refuses the tiles, the VNNI kernel. Tiles are
// configured for this thread and released after. int4 blocks go two at a time: they are unpacked into scratch, so
// each pair's weights are read from memory once. int8 pairs were slower, since their tiles read the weights straight
// from memory (the int8 LM head at 24 rows: 4317-9501 against 3657-6220 us a block at a time).
void amx_matmul(const QuantizedWeights& w, const QuantizedRows& x, int64_t M, float* out, int64_t begin, int64_t end,
                uint8_t* scratch) {
  if (!use_tiles(M, w.bits)) return vnni_matmul(w, x, M, out, begin, end, scratch);
  configure_tiles(static_cast<uint8_t>(tile_rows(M)));
  int64_t b = begin;
  if (w.bits == 4)
    for (; b + 2 <= end; b += 2) amx_blocks<2>(w, x, M, out, b, scratch);
  for (; b < end; ++b) amx_blocks<1>(w, x, M, out, b, scratch);
  _tile_release();
}

#pragma GCC pop_options

}  // namespace

const QuantKernel kAvx512VnniKernel{"avx512_vnni", rows_as_given, quantize, vnni_matmul};
const QuantKernel kAmxKernel{"amx", amx_rows_held, quantize, amx_matmul};

}  // namespace tokenmill

#pragma GCC pop_options
