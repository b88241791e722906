// The int8 / int4 matmul for AVX2 CPUs without VNNI (AMD Zen 2 and 3, Intel before Alder Lake).
#include "../../quant_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
constexpr bool kVnni = false;
#include "quant_avx2.h"
#pragma GCC pop_options

const tokenmill::QuantKernel tokenmill::kAvx2Kernel{"avx2", tokenmill::rows_as_given, quantize, matmul};
