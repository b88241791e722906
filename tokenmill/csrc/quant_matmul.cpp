// The int8 / int4 CPU matmul as torch ops: checks shapes, quantizes the inputs, and runs the fastest kernel
// (quant_kernel.h) this CPU has across torch's threads. Kernels are chosen at run time from what the CPU
// reports, so one build serves every path it can run and the tests check each of them here.
#include <ATen/Parallel.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "ops.h"
#include "quant_layout.h"

namespace {

using namespace tokenmill;

#if defined(__x86_64__)
// GCC's run-time checks, which also ask the OS whether it saves the wider registers.
bool avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"); }
bool avx512_vnni() {
  return avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
}
#endif

// Every kernel this build holds, fastest first, with whether this CPU runs it.
struct Candidate {
  const QuantKernel* kernel;
  bool (*runs)();
};

const Candidate kCandidates[] = {
#if defined(__x86_64__)
    {&kAmxKernel, [] { return avx512_vnni() && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8"); }},
    {&kAvx512VnniKernel, avx512_vnni},
    {&kAvxVnniKernel, [] { return avx2() && __builtin_cpu_supports("avxvnni"); }},
    {&kAvx2Kernel, avx2},
#endif
    {&kPortableKernel, [] { return true; }},
};

// The kernels this CPU runs, fastest first; the portable loops always.
const std::vector<const QuantKernel*>& runnable() {
  static const std::vector<const QuantKernel*> kernels = [] {
    std::vector<const QuantKernel*> out;
    for (const Candidate& c : kCandidates)
      if (c.runs()) out.push_back(c.kernel);
    return out;
  }();
  return kernels;
}

const QuantKernel& kernel_named(const std::string& name) {
  for (const QuantKernel* k : runnable())
    if (name == k->name) return *k;
  TORCH_CHECK(false, "the ", name, " int8/int4 kernel does not run on this CPU");
}

// x: float32 [M, K]; out: float32 [M, N].
void run(const QuantKernel& kernel, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t bits,
         at::Tensor& out) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && out.is_contiguous() && out.scalar_type() == at::kFloat);
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), group = check_layout(q, scale, K, bits);
  TORCH_CHECK(out.size(0) == M && (N + kBlockRows - 1) / kBlockRows == q.size(0));
  const int64_t rows_held = kernel.rows_held(M), input_blocks = M * (K / kInputBlock);
  // Reused across calls: two tensor allocations and their views cost about 4 us of a 30 us call at 1 row.
  thread_local std::vector<int8_t> levels;
  thread_local std::vector<float> steps;
  levels.resize(2 * rows_held * K);
  steps.resize(2 * input_blocks);
  int8_t *hi = levels.data(), *lo = hi + rows_held * K;
  float *dx = steps.data(), *sx = dx + input_blocks;
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, input_blocks, 256, [&](int64_t begin, int64_t end) { kernel.quantize(xp, begin, end, hi, lo, dx, sx); });
  const QuantizedRows rows{hi, lo, dx, sx, K};
  const QuantizedWeights weights{q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>()),
                                 bits, group, N, q.size(1) * kChunkBytes, scale.size(1) * 2 * kBlockRows};
  float* op = out.data_ptr<float>();
  at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<uint8_t> scratch;
    scratch.resize(2 * K * kBlockRows);
    kernel.matmul(weights, rows, M, op, begin, end, scratch.data());
  });
}

// The fastest kernel, or the one TOKENMILL_QUANT_KERNEL names (to measure one path against another on a
// machine that runs both).
const QuantKernel& chosen() {
  static const QuantKernel& kernel = [&]() -> const QuantKernel& {
    const char* name = std::getenv("TOKENMILL_QUANT_KERNEL");
    return name && *name ? kernel_named(name) : *runnable().front();
  }();
  return kernel;
}

}  // namespace

namespace tokenmill {

void quantized_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, int64_t bits, at::Tensor& out) {
  run(chosen(), x, q, scale, bits, out);
}

// The same with a named kernel: for tests and benchmarks that compare the paths on one machine.
void quantized_matmul_with(const std::string& kernel, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           int64_t bits, at::Tensor& out) {
  run(kernel_named(kernel), x, q, scale, bits, out);
}

std::vector<std::string> quantized_matmul_kernels() {
  std::vector<std::string> names;
  for (const QuantKernel* k : runnable()) names.emplace_back(k->name);
  return names;
}

std::string quantized_matmul_kernel() { return chosen().name; }

std::vector<int64_t> quant_layout() { return {kBlockRows, kChunkBytes, kInputBlock}; }

}  // namespace tokenmill
