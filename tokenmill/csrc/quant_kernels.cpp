// Weight-only int8 / int4 matmuls for the CPU decode path, and dequantization for the GEMM path.
//
// Weights are stored in groups along the input, each with a float32 (step, offset): w = step * q + offset.
// int8: q is int8 [N, K]. int4: q is uint8 [N, K / 2]; within a group of G weights, byte j holds weight j
// in its low nibble and weight j + G / 2 in its high nibble, so 16 bytes unpack to two 16-lane vectors.
//
// Decode reads every weight once per step, so these kernels are built to run at memory bandwidth: each
// pass dequantizes 16 weights of R output rows into registers and multiplies them with up to 4 input
// rows at once, and prefetches rows ahead (cache-cold weights ran 1.7x slower without).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstring>

#include "vec.h"

namespace {

using namespace tokenmill;

constexpr int kRows = 4;          // output rows per pass: independent FMA chains, one input load for all
// How far ahead of the current chunk to prefetch weights and scales: rows are read in address order,
// so this is a few rows ahead (4 KiB measured best of 1-8 KiB for int4 decode).
constexpr int64_t kPrefetchBytes = 4096, kPrefetchScaleBytes = 1024;

inline f32x16 from_halves(__m256 lo, __m256 hi) {
  f32x16 out;
  std::memcpy(&out, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&out) + 32, &hi, 32);
  return out;
}

// 16 int8 weights as float32. gcc 12 scalarizes __builtin_convertvector from 8-bit lanes, so intrinsics.
inline f32x16 widen_int8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  return from_halves(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                     _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
#else
  f32x16 out;
  for (int l = 0; l < kLanes; ++l) out[l] = float(int8_t(p[l]));
  return out;
#endif
}

// 16 bytes of int4 pairs as two vectors of weights, step * level + offset: the low nibbles, then the
// high ones. With AVX-512 the group's 16 possible weights sit in one register and a permute picks each
// (the permute reads only an index's low 4 bits, so the low nibbles need no mask): 5 instructions per 32
// weights instead of 7, and the int4 kernel is compute-bound.
inline void dequantize_int4(const uint8_t* p, f32x16 step, f32x16 offset, f32x16& low, f32x16& high) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  const f32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const __m512 table = (__m512)(iota * step + offset);
  low = (f32x16)_mm512_permutexvar_ps(v, table);
  high = (f32x16)_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
#elif defined(__AVX2__)
  const __m128i v = _mm_loadu_si128((const __m128i*)p);
  const __m256i a = _mm256_cvtepu8_epi32(v), b = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)), m = _mm256_set1_epi32(15);
  low = from_halves(_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b, m)));
  high = from_halves(_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)));
  low = low * step + offset;
  high = high * step + offset;
#else
  for (int l = 0; l < kLanes; ++l) {
    low[l] = float(p[l] & 15) * step[l] + offset[l];
    high[l] = float(p[l] >> 4) * step[l] + offset[l];
  }
#endif
}

// Where a layer's weights live and how they are laid out.
struct Weights {
  const uint8_t* q;
  const float* scale;  // [N, groups, 2]
  int64_t K, groups, group, row_bytes;
  bool int4;
};

// Bytes of one group in a row.
inline int64_t group_bytes(const Weights& W) { return W.int4 ? W.group / 2 : W.group; }

// out[m, n + r] = x[m] . w[n + r] for R output rows and M input rows. Each 16-byte chunk of a group is
// dequantized in registers once and used for all M input rows, and each input load serves all R rows.
template <bool Int4, int R, int M>
inline void tile(const Weights& W, int64_t n, const float* x, float* out, int64_t N) {
  const int64_t gb = group_bytes(W), half = W.group / 2;
  f32x16 acc[R][M] = {};
  for (int64_t g = 0; g < W.groups; ++g) {
    f32x16 step[R], offset[R];
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(reinterpret_cast<const char*>(W.scale + ((n + r) * W.groups + g) * 2) + kPrefetchScaleBytes);
      step[r] = splat(W.scale[((n + r) * W.groups + g) * 2]);
      offset[r] = splat(W.scale[((n + r) * W.groups + g) * 2 + 1]);
    }
    for (int64_t c = 0; c < gb; c += kLanes) {
      const int64_t k = g * W.group + c;
      for (int r = 0; r < R; ++r) __builtin_prefetch(W.q + (n + r) * W.row_bytes + g * gb + c + kPrefetchBytes);
      f32x16 x_low[M], x_high[M];
      for (int m = 0; m < M; ++m) {
        x_low[m] = load(x + m * W.K + k);
        if constexpr (Int4) x_high[m] = load(x + m * W.K + k + half);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* bytes = W.q + (n + r) * W.row_bytes + g * gb + c;
        if constexpr (Int4) {
          f32x16 low, high;
          dequantize_int4(bytes, step[r], offset[r], low, high);
          for (int m = 0; m < M; ++m) acc[r][m] += low * x_low[m] + high * x_high[m];
        } else {
          const f32x16 w = widen_int8(bytes) * step[r] + offset[r];
          for (int m = 0; m < M; ++m) acc[r][m] += w * x_low[m];
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) out[m * N + n + r] = sum(acc[r][m]);
}

// All M input rows against R output rows, in tiles of up to 4 input rows (2 for int4, whose two
// vectors per chunk would otherwise spill registers).
template <bool Int4, int R>
inline void rows_pass(const Weights& W, int64_t n, const float* x, int64_t M, float* out, int64_t N) {
  constexpr int kTile = Int4 ? 2 : 4;
  int64_t m = 0;
  for (; m + kTile <= M; m += kTile) tile<Int4, R, kTile>(W, n, x + m * W.K, out + m * N, N);
  switch (M - m) {
    case 3: tile<Int4, R, 3>(W, n, x + m * W.K, out + m * N, N); break;
    case 2: tile<Int4, R, 2>(W, n, x + m * W.K, out + m * N, N); break;
    case 1: tile<Int4, R, 1>(W, n, x + m * W.K, out + m * N, N); break;
  }
}

template <bool Int4>
void matmul_rows(const Weights& W, const float* x, int64_t M, float* out, int64_t N) {
  at::parallel_for(0, (N + kRows - 1) / kRows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kRows;
      if (n + kRows <= N) rows_pass<Int4, kRows>(W, n, x, M, out, N);
      else for (int64_t r = n; r < N; ++r) rows_pass<Int4, 1>(W, r, x, M, out, N);
    }
  });
}

// Row n of the weight, dequantized into out[K].
inline void dequantize_row(const Weights& W, int64_t n, float* out) {
  const int64_t gb = group_bytes(W), half = W.group / 2;
  for (int64_t g = 0; g < W.groups; ++g) {
    const f32x16 step = splat(W.scale[(n * W.groups + g) * 2]), offset = splat(W.scale[(n * W.groups + g) * 2 + 1]);
    for (int64_t c = 0; c < gb; c += kLanes) {
      const uint8_t* bytes = W.q + n * W.row_bytes + g * gb + c;
      const int64_t k = g * W.group + c;
      f32x16 low, high;
      if (W.int4) {
        dequantize_int4(bytes, step, offset, low, high);
        std::memcpy(out + k + half, &high, sizeof high);
      } else {
        low = widen_int8(bytes) * step + offset;
      }
      std::memcpy(out + k, &low, sizeof low);
    }
  }
}

Weights weights_of(const at::Tensor& q, const at::Tensor& scale, int64_t K, bool int4) {
  TORCH_CHECK(q.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == at::kFloat);
  const int64_t groups = scale.size(1), group = K / groups;
  TORCH_CHECK(group * groups == K && group % (int4 ? 2 * kLanes : kLanes) == 0, "unsupported group size ", group);
  return {reinterpret_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(), K, groups, group,
          q.size(1) * q.element_size(), int4};
}

void matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, at::Tensor& out, bool int4) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && out.is_contiguous());
  const int64_t M = x.size(0), N = q.size(0);
  const Weights W = weights_of(q, scale, x.size(1), int4);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (int4) matmul_rows<true>(W, xp, M, op, N);
  else matmul_rows<false>(W, xp, M, op, N);
}

void dequantize(const at::Tensor& q, const at::Tensor& scale, int64_t start, at::Tensor& out, bool int4) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat);
  const Weights W = weights_of(q, scale, out.size(1), int4);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, out.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dequantize_row(W, start + i, op + i * W.K);
  });
}

void int8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
  matmul(x, q, scale, out, false);
}
void int4_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
  matmul(x, q, scale, out, true);
}
void int8_dequantize(const at::Tensor& q, const at::Tensor& scale, int64_t start, at::Tensor& out) {
  dequantize(q, scale, start, out, false);
}
void int4_dequantize(const at::Tensor& q, const at::Tensor& scale, int64_t start, at::Tensor& out) {
  dequantize(q, scale, start, out, true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int8_matmul(Tensor x, Tensor q, Tensor scale, Tensor(a!) out) -> ()");
  m.def("int4_matmul(Tensor x, Tensor q, Tensor scale, Tensor(a!) out) -> ()");
  m.def("int8_dequantize(Tensor q, Tensor scale, int start, Tensor(a!) out) -> ()");
  m.def("int4_dequantize(Tensor q, Tensor scale, int start, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("int8_matmul", int8_matmul);
  m.impl("int4_matmul", int4_matmul);
  m.impl("int8_dequantize", int8_dequantize);
  m.impl("int4_dequantize", int4_dequantize);
}
