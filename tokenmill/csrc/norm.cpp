// RMSNorm with the residual add fused in, for the CPU decode path: one pass over each row instead of
// the five ops (add, square, mean, rsqrt, scale) and float32 round trip PyTorch runs for it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace {

// residual += x, then x = residual / rms(residual) * weight, row by row, both in place.
template <typename T>
void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  // A row is ~1 us of work: threads only pay off for prefill-sized batches.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* xr = xp + i * dim;
      T* rr = rp + i * dim;
      float squares = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float h = float(xr[d]) + float(rr[d]);
        rr[d] = T(h);
        squares += float(rr[d]) * float(rr[d]);
      }
      const float inv = 1.f / std::sqrt(squares / float(dim) + float(eps));
      for (int64_t d = 0; d < dim; ++d) xr[d] = T(float(rr[d]) * inv * float(wp[d]));
    }
  });
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous());
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type() &&
              x.scalar_type() == weight.scalar_type());
  if (x.scalar_type() == at::kFloat) add_rms_norm<float>(x, residual, weight, eps);
  else if (x.scalar_type() == at::kBFloat16) add_rms_norm<at::BFloat16>(x, residual, weight, eps);
  else TORCH_CHECK(false, "fused_add_rms_norm takes float32 or bfloat16, not ", x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("fused_add_rms_norm", fused_add_rms_norm);
}
