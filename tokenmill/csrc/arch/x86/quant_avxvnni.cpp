// The int8 / int4 matmul for AVX2 CPUs with AVX-VNNI's 256-bit VPDPBUSD (Intel Alder Lake on, AMD Zen 5).
#include "../../quant_kernel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
constexpr bool kVnni = true;
#include "quant_avx2.h"
#pragma GCC pop_options

const tokenmill::QuantKernel tokenmill::kAvxVnniKernel{"avx_vnni", tokenmill::rows_as_given, quantize, matmul};
