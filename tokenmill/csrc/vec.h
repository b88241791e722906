// 16-lane float32 vectors (GCC vector extensions, so AVX2 machines get two 8-lane halves) and their
// loads and stores from float32 and bfloat16 memory, shared by the CPU ops.
#pragma once

#include <ATen/core/Tensor.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstring>

namespace tokenmill {

constexpr int kLanes = 16;
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

#if defined(__AVX2__) && !defined(__AVX512F__)
// Where 16 lanes are two 256-bit registers, vectors are loaded or broadcast a half at a time and joined: a
// vector built lane by lane went through the stack, and the wide loads after the narrow stores stalled.

inline f32x16 join(__m256 low, __m256 high) {
  return __builtin_shufflevector((f32x8)low, (f32x8)high, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

inline __m256 half_of(f32x16 v, int h) {
  return (__m256)(h ? __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)
                    : __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// The sum of 16 lanes held as two halves, by _mm512_reduce_add_ps's tree: both builds sum alike, and a chain of 16
// scalar adds (the portable sum) cost as much as the vector work around it in attention's softmax.
inline float sum(__m256 low, __m256 high) {
  const __m256 h = _mm256_add_ps(high, low);
  const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps(p, p, 1));
}
#endif

inline f32x16 splat(float s) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  return join(_mm256_set1_ps(s), _mm256_set1_ps(s));
#else
  return f32x16{} + s;
#endif
}

inline float sum(f32x16 v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
  return sum(half_of(v, 0), half_of(v, 1));
#else
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
#endif
}

// e^x to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^6, and 2^n put
// straight into the exponent bits. Inputs below -87 give about 1e-38 rather than 0.
#if defined(__AVX2__) && !defined(__AVX512F__)
// The same operations on 8 lanes: GCC built the 16-lane form through the stack here, with each constant
// broadcast again on every call.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(12582912.f)),
                                 _mm256_set1_ps(12582912.f));
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x));
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvttps_epi32(n), 23)));
}

inline f32x16 exp(f32x16 x) { return join(exp8(half_of(x, 0)), exp8(half_of(x, 1))); }
#else
inline f32x16 exp(f32x16 x) {
  x = x < -87.f ? splat(-87.f) : (x > 88.f ? splat(88.f) : x);
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const f32x16 n = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const f32x16 r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln 2 in two parts, so r stays exact
  f32x16 p = splat(1.f / 720);
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return (f32x16)((i32x16)p + (__builtin_convertvector(n, i32x16) << 23));
}
#endif

inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// The portable widening, one lane at a time, for the types below where no vector instruction is built in.
template <typename T>
inline f32x16 widen_each(const T* p) {
  f32x16 v;
  for (int l = 0; l < kLanes; ++l) v[l] = float(p[l]);
  return v;
}

// bfloat16 is the top half of a float32, so widening is a shift.
inline f32x16 load(const at::BFloat16* p) {
#if defined(__AVX512F__)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (f32x16)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#elif defined(__AVX2__)
  auto widen = [](const at::BFloat16* q) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), 16));
  };
  return join(widen(p), widen(p + 8));
#else
  return widen_each(p);
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

inline f32x16 load(const at::Half* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__) && defined(__F16C__)
  return join(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
#else
  return widen_each(p);
#endif
}

// Rounds to nearest even, as at::Half(float) does.
inline void store(at::Half* p, f32x16 v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__AVX2__) && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(half_of(v, 0), _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(half_of(v, 1), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int l = 0; l < kLanes; ++l) p[l] = at::Half(v[l]);
#endif
}

// int8 levels of a quantized KV cache, as floats (the caller applies the scale).
inline f32x16 load(const int8_t* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  auto widen = [](const int8_t* q) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)))); };
  return join(widen(p), widen(p + 8));
#else
  return widen_each(p);
#endif
}

// Calls f with a value of the tensor's element type, float32 or bfloat16, the two the ops take.
template <typename F>
inline void dispatch_float(const at::Tensor& t, const char* op, F&& f) {
  if (t.scalar_type() == at::kFloat) f(float{});
  else if (t.scalar_type() == at::kBFloat16) f(at::BFloat16{});
  else TORCH_CHECK(false, op, " takes float32 or bfloat16, not ", t.scalar_type());
}

// The same with float16 too: the activations' types on CPU.
template <typename F>
inline void dispatch_activation(const at::Tensor& t, const char* op, F&& f) {
  if (t.scalar_type() == at::kHalf) f(at::Half{});
  else dispatch_float(t, op, f);
}

// A KV cache's types: those, and int8 levels with a scale per token and head.
template <typename F>
inline void dispatch_kv(const at::Tensor& t, const char* op, F&& f) {
  if (t.scalar_type() == at::kChar) f(int8_t{});
  else dispatch_activation(t, op, f);
}

// The sum of p[0..n)'s squares, n a multiple of 16: per lane, then by sum()'s tree.
template <typename T>
inline float sum_of_squares(const T* p, int64_t n) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  // On halves: GCC kept a loop-carried 16-lane sum on the stack (RMSNorm ran 6x slower than on AVX-512).
  __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
  for (int64_t d = 0; d < n; d += kLanes) {
    const f32x16 h = load(p + d);
    low = _mm256_fmadd_ps(half_of(h, 0), half_of(h, 0), low);
    high = _mm256_fmadd_ps(half_of(h, 1), half_of(h, 1), high);
  }
  return sum(low, high);
#else
  f32x16 squares = {};
  for (int64_t d = 0; d < n; d += kLanes) {
    const f32x16 h = load(p + d);
    squares += h * h;
  }
  return sum(squares);
#endif
}

}  // namespace tokenmill
