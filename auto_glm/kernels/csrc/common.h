// What every kernel in csrc/ shares: the dtype check at its boundary, and the vector exp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

// The kernels build with -ffast-math -fno-finite-math-only (see auto_glm/kernels/build.py):
// NaN and inf must come out where torch gives them, so that a request whose activations blow
// up fails instead of running on with made-up finite numbers. Without finite-math-only,
// glibc no longer declares its vector expf (libmvec) to the compiler and every std::exp in a
// loop would go one lane at a time; the same declaration glibc makes under -ffast-math is
// repeated here. libmvec returns exact NaN, inf and 0 for special inputs, as expf does.
#if defined(__x86_64__) && defined(__GLIBC__) && defined(_OPENMP)
extern "C" {
#pragma omp declare simd notinbranch
float expf(float) noexcept;
}
#endif

namespace autoglm {

// float16 (and anything else) is refused up front: its models run on the torch path.
inline void check_kernel_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              " supports float32 and bfloat16, got ", x.scalar_type(),
              "; use the layer's torch path for other dtypes (auto_glm.kernels.KERNEL_DTYPES)");
}

}  // namespace autoglm
