// The kernel bodies for x86-64 CPUs with AVX2, FMA and F16C (chosen at run time by use_fused_math):
// 8-lane vectors in single registers and multiply-adds rounded once. See simd.h for why they are included
// inside a namespace; everything from cpu_common.h and the standard library is included before the target
// pragma so that none of it is compiled for AVX2.

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_common.h"

#if ORTHRUS_CPU_X86_DISPATCH
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ORTHRUS_SIMD_FUSED 1
namespace orthrus::cpu::fused {
#include "simd.h"
#include "linear_kernel.h"
#include "attention_kernel.h"
}  // namespace orthrus::cpu::fused
#pragma GCC pop_options
#endif
