// The int8 / int4 matmul on 256-bit vectors, included by quant_avx2.cpp (AVX2: VPMADDUBSW) and
// quant_avxvnni.cpp (AVX-VNNI: VPDPBUSD on 256 bits), each under its own target pragma with kVnni set.
//
// A block's 16 rows are two halves of 8 int32 lanes, a row per lane as in the AVX-512 kernel. A pass over the
// block's bytes takes kTile input rows at once, and each input's broadcast serves both halves: with a pass
// per half, the broadcasts (a load each) held the loop back as much as the multiplies (docs/benchmarks.md).
// The sums are the exact sums of quant_kernel.h, so the bits are the portable loops'.
//
// Without VNNI, VPMADDUBSW multiplies unsigned levels by signed int8 inputs into int16 pairs and
// saturates past 32767. int4 levels (at most 15) against inputs of at most 128 in size give pairs of at
// most 3,840, so the 8 level vectors of 32 inputs add up in int16 (at most 30,720) before one VPMADDWD
// widens them. int8 levels (up to 255) would saturate there, so they are widened to int16 and multiplied
// by VPMADDWD against the whole 16-bit inputs, 256 * hi + lo: one multiply per 16 products, where the
// int8 halves split into nibbles took four.
//
// NOTE: only intrinsics and this file's own functions: a library template instantiated here would be
// built for this target, and the linker may keep that copy for the whole extension.
#include <immintrin.h>

namespace tokenmill {
namespace {

constexpr int kHalfRows = 8;

// Input rows per pass: their accumulators for both halves must fit the 16 registers with the levels and inputs.
constexpr int kTile = 2;

// Inputs xp[0, 32) as 16-bit levels split into hi and lo; returns the sum of the levels.
inline int32_t quantize_block(const float* xp, float inv, int8_t* hi, int8_t* lo) {
  __m256i high[4], low[4], total = _mm256_setzero_si256();
  for (int j = 0; j < 4; ++j) {
    // cvtps rounds half to even, as nearbyint does in the portable loop: both give the same levels.
    const __m256i level = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp + 8 * j), _mm256_set1_ps(inv)));
    low[j] = _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(level, _mm256_set1_epi32(128)), _mm256_set1_epi32(255)),
                              _mm256_set1_epi32(128));
    high[j] = _mm256_srai_epi32(_mm256_sub_epi32(level, low[j]), 8);
    total = _mm256_add_epi32(total, level);
  }
  // int32 to int8 in order: the packs interleave 128-bit lanes, the permutation puts them back.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto narrow = [&](const __m256i (&v)[4]) {
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(packed, order);
  };
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), narrow(high));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), narrow(low));
  const __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  const __m128i sum2 = _mm_add_epi32(sum4, _mm_unpackhi_epi64(sum4, sum4));
  return _mm_cvtsi128_si32(_mm_add_epi32(sum2, _mm_shuffle_epi32(sum2, 1)));
}

inline float abs_max(const float* xp) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  auto bits = [&](int j) {
    return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 8 * j)), magnitude);
  };
  const __m256i m = _mm256_max_epu32(_mm256_max_epu32(bits(0), bits(1)), _mm256_max_epu32(bits(2), bits(3)));
  __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4e));
  m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xb1));
  return _mm_cvtss_f32(_mm_castsi128_ps(m4));
}

void quantize(const float* x, int64_t begin, int64_t end, int8_t* hi, int8_t* lo, float* dx, float* sx) {
  // Lambdas, not the functions themselves: an instantiation over function pointer types would be one
  // symbol for every kernel's file, and the linker could keep another target's copy.
  quantize_input_blocks(x, begin, end, hi, lo, dx, sx, [](const float* xp) { return abs_max(xp); },
                        [](const float* xp, float inv, int8_t* h, int8_t* l) { return quantize_block(xp, inv, h, l); });
}

inline __m256 load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Level vector j (inputs 4j to 4j + 3) of inputs [32 kb, 32 kb + 32), for the 8 rows of half h.
template <int Bits>
inline __m256i load_levels(const uint8_t* q, int64_t kb, int j, int h) {
  const uint8_t* p = q + kb * chunks_per_input_block(Bits) * kChunkBytes + h * 32;
  if constexpr (Bits == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j * kChunkBytes));
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (j / 2) * kChunkBytes));
  return _mm256_and_si256(j % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
}

// An accumulator held as it is: without it GCC regroups a chain of adds into a tree, which holds every term at
// once and spills them to the stack.
inline __m256i kept(__m256i v) {
  __asm__("" : "+x"(v));
  return v;
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm256_set1_epi32(four);
}

// The exact int32 sums over 32 inputs of each of T input rows against both halves' levels: 256 * high + low,
// where high sums the levels times the hi halves and low times the lo halves (quant_kernel.h).
template <int Bits, int T>
inline void sums(const uint8_t* q, int64_t kb, const int8_t* const (&hi)[T], const int8_t* const (&lo)[T],
                 __m256i (&dots)[T][2]) {
  if constexpr (kVnni) {
    __m256i high[T][2], low[T][2];
    for (int t = 0; t < T; ++t) high[t][0] = high[t][1] = low[t][0] = low[t][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < kLevelVectors; ++j) {
      const __m256i levels[2] = {load_levels<Bits>(q, kb, j, 0), load_levels<Bits>(q, kb, j, 1)};
      for (int t = 0; t < T; ++t) {
        const __m256i h = broadcast4(hi[t] + 4 * j), l = broadcast4(lo[t] + 4 * j);
        for (int half = 0; half < 2; ++half) {
          high[t][half] = _mm256_dpbusd_avx_epi32(high[t][half], levels[half], h);
          low[t][half] = _mm256_dpbusd_avx_epi32(low[t][half], levels[half], l);
        }
      }
    }
    // Exact in int32: |high| <= 32 * 255 * 128, so high * 256 stays below 2^31.
    for (int t = 0; t < T; ++t)
      for (int half = 0; half < 2; ++half) dots[t][half] = _mm256_add_epi32(_mm256_slli_epi32(high[t][half], 8), low[t][half]);
  } else if constexpr (Bits == 8) {
    // Each row's 32 inputs as int16, 256 * hi + lo (at most 32,639 in size).
    alignas(32) int16_t x16[T][kInputBlock];
    for (int t = 0; t < T; ++t)
      for (int part = 0; part < 2; ++part) {
        const __m256i h16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi[t] + 16 * part)));
        const __m256i l16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo[t] + 16 * part)));
        _mm256_store_si256(reinterpret_cast<__m256i*>(x16[t] + 16 * part), _mm256_add_epi16(_mm256_slli_epi16(h16, 8), l16));
      }
    // Each half's rows 0-3 and 4-7, widened: each int32 lane sums two of a row's four inputs, so a row is two
    // lanes until the end. Exact: at most 32 * 255 * 32,639 in size, below 2^31.
    __m256i rows03[T][2], rows47[T][2];
    for (int t = 0; t < T; ++t) rows03[t][0] = rows03[t][1] = rows47[t][0] = rows47[t][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < kLevelVectors; ++j) {
      __m256i w03[2], w47[2];
      for (int half = 0; half < 2; ++half) {
        const __m256i levels = load_levels<8>(q, kb, j, half);
        w03[half] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(levels));
        w47[half] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(levels, 1));
      }
      for (int t = 0; t < T; ++t) {
        int64_t four;
        std::memcpy(&four, x16[t] + 4 * j, 8);
        const __m256i x = _mm256_set1_epi64x(four);
        for (int half = 0; half < 2; ++half) {
          rows03[t][half] = kept(_mm256_add_epi32(rows03[t][half], _mm256_madd_epi16(w03[half], x)));
          rows47[t][half] = kept(_mm256_add_epi32(rows47[t][half], _mm256_madd_epi16(w47[half], x)));
        }
      }
    }
    // The pairs added: rows 0 1 4 5 | 2 3 6 7, then put in order.
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    for (int t = 0; t < T; ++t)
      for (int half = 0; half < 2; ++half)
        dots[t][half] = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(rows03[t][half], rows47[t][half]), order);
  } else {
    const __m256i ones = _mm256_set1_epi16(1);
    // int16 sums of the hi and the lo inputs.
    __m256i h16[T][2], l16[T][2];
    for (int t = 0; t < T; ++t) h16[t][0] = h16[t][1] = l16[t][0] = l16[t][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int j = 0; j < kLevelVectors; ++j) {
      const __m256i levels[2] = {load_levels<4>(q, kb, j, 0), load_levels<4>(q, kb, j, 1)};
      for (int t = 0; t < T; ++t) {
        const __m256i h = broadcast4(hi[t] + 4 * j), l = broadcast4(lo[t] + 4 * j);
        for (int half = 0; half < 2; ++half) {
          h16[t][half] = kept(_mm256_add_epi16(h16[t][half], _mm256_maddubs_epi16(levels[half], h)));
          l16[t][half] = kept(_mm256_add_epi16(l16[t][half], _mm256_maddubs_epi16(levels[half], l)));
        }
      }
    }
    for (int t = 0; t < T; ++t)
      for (int half = 0; half < 2; ++half)
        dots[t][half] = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(h16[t][half], ones), 8),
                                         _mm256_madd_epi16(l16[t][half], ones));
  }
}

// out[t, the block's rows] for T input rows starting at row m; `valid` masks each half's rows past N.
template <int Bits, int T>
void tile(const uint8_t* q, const uint16_t* scale, int64_t group, const QuantizedRows& x, int64_t m, float* out,
          int64_t ldo, const __m256i (&valid)[2]) {
  const int64_t blocks = x.K / kInputBlock;
  __m256 acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < blocks; ++kb) {
    // The first pass over a block reads it from memory; the others find it in cache.
    if (m == 0) prefetch_ahead<Bits>(q, scale, kb, group);
    const uint16_t* s = scale + kb * kInputBlock / group * 2 * kBlockRows;
    const int8_t* hi[T];
    const int8_t* lo[T];
    for (int t = 0; t < T; ++t) hi[t] = x.hi + (m + t) * x.K + kb * kInputBlock, lo[t] = x.lo + (m + t) * x.K + kb * kInputBlock;
    __m256i dots[T][2];
    sums<Bits, T>(q, kb, hi, lo, dots);
    for (int t = 0; t < T; ++t)
      for (int half = 0; half < 2; ++half) {
        const int64_t at = (m + t) * blocks + kb;
        const __m256 step = load_half(s + half * kHalfRows), offset = load_half(s + kBlockRows + half * kHalfRows);
        acc[t][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[t][half]), _mm256_mul_ps(step, _mm256_set1_ps(x.dx[at])), acc[t][half]);
        acc[t][half] = _mm256_fmadd_ps(offset, _mm256_set1_ps(x.sx[at]), acc[t][half]);
      }
  }
  for (int t = 0; t < T; ++t)
    for (int half = 0; half < 2; ++half) _mm256_maskstore_ps(out + t * ldo + half * kHalfRows, valid[half], acc[t][half]);
}

template <int Bits>
void block_rows(const uint8_t* q, const uint16_t* scale, int64_t group, const QuantizedRows& x, int64_t M,
                float* out, int64_t N, int64_t n0) {
  // The last block may hold fewer than 16 of N rows: lanes past N are not stored (a masked lane is not touched,
  // so a half past N stores nothing).
  __m256i valid[2];
  for (int half = 0; half < 2; ++half) {
    const int64_t left = N - n0 - half * kHalfRows;
    const int32_t rows = left <= 0 ? 0 : left < kHalfRows ? static_cast<int32_t>(left) : kHalfRows;
    valid[half] = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  int64_t m = 0;
  for (; m + kTile <= M; m += kTile) tile<Bits, kTile>(q, scale, group, x, m, out + m * N + n0, N, valid);
  for (; m < M; ++m) tile<Bits, 1>(q, scale, group, x, m, out + m * N + n0, N, valid);
}

void matmul(const QuantizedWeights& w, const QuantizedRows& x, int64_t M, float* out, int64_t begin, int64_t end,
            uint8_t*) {
  for_weight_blocks(w, begin, end, [&](auto bits, const uint8_t* q, const uint16_t* scale, int64_t n0) {
    block_rows<decltype(bits)::kBits>(q, scale, w.group, x, M, out, w.N, n0);
  });
}

}  // namespace
}  // namespace tokenmill
