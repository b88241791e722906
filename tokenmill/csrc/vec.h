// 16-lane float32 vectors (GCC vector extensions, so AVX2 machines get two 8-lane halves) and their
// loads and stores from float32 and bfloat16 memory, shared by the CPU ops.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstring>

namespace tokenmill {

constexpr int kLanes = 16;
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 splat(float s) { return f32x16{} + s; }

inline float sum(f32x16 v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// bfloat16 is the top half of a float32, so widening is a shift.
inline f32x16 load(const at::BFloat16* p) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (f32x16)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
  f32x16 v;
  for (int l = 0; l < kLanes; ++l) v[l] = float(p[l]);
  return v;
#endif
}

// Rounds to nearest even, as at::BFloat16(float) does.
inline void store(at::BFloat16* p, f32x16 v) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
#else
  for (int l = 0; l < kLanes; ++l) p[l] = at::BFloat16(v[l]);
#endif
}

}  // namespace tokenmill
