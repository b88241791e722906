// RMSNorm, alone and with the residual add fused in, for the CPU decode path: one pass over each row
// instead of the five ops (add, square, mean, rsqrt, scale) and float32 round trip PyTorch runs for it.
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"
#include "vec.h"

namespace {

using namespace tokenmill;

// residual += x, then x = residual / rms(residual) * weight, row by row, both in place. The sum is
// rounded to the residual's dtype before it is squared, as the unfused add then norm would see it.
template <typename T>
void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  // A row is well under a microsecond of work: threads only pay off for prefill-sized batches.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xr = xp + i * dim;
      T* rr = rp + i * dim;
      for (int64_t d = 0; d < dim; d += kLanes) store(rr + d, load(xr + d) + load(rr + d));
      const float inv = 1.f / std::sqrt(sum_of_squares(rr, dim) / float(dim) + float(eps));
      for (int64_t d = 0; d < dim; d += kLanes) store(xr + d, load(rr + d) * inv * load(wp + d));
    }
  });
}

// out = x / rms(x) * weight, row by row. x and out are [rows, dim] or [tokens, heads, dim] with contiguous
// rows at any stride (a slice of the query/key heads); out may be x.
template <typename T>
void rms_norm_rows(const at::Tensor& x, at::Tensor& out, const at::Tensor& weight, double eps) {
  const int64_t dim = x.size(-1), heads = x.dim() == 3 ? x.size(1) : 1, rows = x.numel() / dim;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const auto row_offset = [&](const at::Tensor& t, int64_t i) {
    return (i / heads) * t.stride(0) + (t.dim() == 3 ? (i % heads) * t.stride(1) : 0);
  };
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = xp + row_offset(x, i);
      T* orow = op + row_offset(out, i);
      const float inv = 1.f / std::sqrt(sum_of_squares(xr, dim) / float(dim) + float(eps));
      for (int64_t d = 0; d < dim; d += kLanes) store(orow + d, load(xr + d) * inv * load(wp + d));
    }
  });
}

}  // namespace

namespace tokenmill {

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && x.stride(-1) == 1 && out.stride(-1) == 1 && weight.is_contiguous());
  TORCH_CHECK(x.sizes() == out.sizes() && x.scalar_type() == out.scalar_type() &&
              x.scalar_type() == weight.scalar_type() && weight.numel() == x.size(-1) && x.size(-1) % kLanes == 0);
  dispatch_float(x, "rms_norm", [&](auto type) { rms_norm_rows<decltype(type)>(x, out, weight, eps); });
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous());
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type() &&
              x.scalar_type() == weight.scalar_type() && weight.numel() == x.size(1) && x.size(1) % kLanes == 0);
  dispatch_float(x, "fused_add_rms_norm", [&](auto type) { add_rms_norm<decltype(type)>(x, residual, weight, eps); });
}

}  // namespace tokenmill
