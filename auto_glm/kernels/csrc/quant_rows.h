// Per-row symmetric INT8 quantization, shared by the w8a8 kernels (quant.cpp, amx_linear.cpp).
//
// q = round(x / scale) in [-127, 127], scale = max|x_row| / 127 (float32), rounding half to
// even like torch.round (x times 1 / scale may round a tie the other way); an all-zero row
// gets the smallest normal scale, a row with NaN or inf a NaN scale.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>

namespace autoglm {

// x [rows, width] (row stride x_stride) -> q [rows, width] (row stride q_stride), scales [rows]
template <typename T>
void quantize_rows(const T* x, int8_t* q, float* scales, int64_t rows, int64_t width,
                   int64_t x_stride, int64_t q_stride) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      int8_t* qr = q + r * q_stride;
      // std::max does not vectorise without -ffinite-math-only (10x slower); a NaN is no
      // maximum here, so non-finite values are counted and give the row a NaN scale that
      // carries on to the layer's output, as torch's path does
      float amax = 0.f;
      int32_t non_finite = 0;
#pragma omp simd reduction(max : amax) reduction(+ : non_finite)
      for (int64_t i = 0; i < width; ++i) {
        const float a = std::fabs(static_cast<float>(xr[i]));
        amax = a > amax ? a : amax;
        non_finite += a <= FLT_MAX ? 0 : 1;
      }
      const float scale = non_finite ? NAN : std::max(amax / 127.f, FLT_MIN);
      scales[r] = scale;
      const float inv = 1.f / scale;  // |x * inv| <= 127 (up to rounding): no clamp
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float v = std::nearbyint(static_cast<float>(xr[i]) * inv);
        qr[i] = static_cast<int8_t>(static_cast<int32_t>(v));
      }
    }
  });
}

}  // namespace autoglm
