// The kernel bodies for any CPU, in baseline instructions (SSE2 on x86-64), with separately rounded
// multiply and add. See simd.h for why they are included inside a namespace.

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_common.h"

#define ORTHRUS_SIMD_FUSED 0
namespace orthrus::cpu::portable {
#include "simd.h"
#include "linear_kernel.h"
#include "attention_kernel.h"
}  // namespace orthrus::cpu::portable
