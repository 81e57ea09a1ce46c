// INT8 activation kernels for w8a8 linear layers (auto_glm/layers/quant.py): one pass per
// row where plain torch makes six (upcast, abs, max, divide, round, narrow), each
// allocating its result.
//
// quantize_rows_int8: see quant_rows.h.
// scale_rows: out = acc * row_scale (+ bias), rounded once to out's dtype.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "common.h"
#include "quant_rows.h"

namespace {

void quantize_rows_int8(const at::Tensor& x, at::Tensor& q, at::Tensor& scales) {
  autoglm::check_kernel_dtype("quantize_rows_int8", x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, width] with unit stride");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.sizes() == x.sizes(),
              "q must be a contiguous int8 tensor shaped like x");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == x.size(0),
              "scales must be a contiguous float32 tensor of one value per row");
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scales.mutable_data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    autoglm::quantize_rows<float>(x.const_data_ptr<float>(), qp, sp, x.size(0), x.size(1),
                                  x.stride(0), x.size(1));
  } else {
    using B = c10::BFloat16;
    autoglm::quantize_rows<B>(x.const_data_ptr<B>(), qp, sp, x.size(0), x.size(1), x.stride(0),
                              x.size(1));
  }
}

template <typename T>
void scale_rows_impl(const float* acc, const float* row_scales, const T* bias, T* out,
                     int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* a = acc + r * width;
      const float s = row_scales[r];
      T* o = out + r * width;
      if (bias != nullptr) {
        for (int64_t i = 0; i < width; ++i) {
          o[i] = static_cast<T>(a[i] * s + static_cast<float>(bias[i]));
        }
      } else {
        for (int64_t i = 0; i < width; ++i) {
          o[i] = static_cast<T>(a[i] * s);
        }
      }
    }
  });
}

void scale_rows(const at::Tensor& acc, const at::Tensor& row_scales,
                const std::optional<at::Tensor>& bias, at::Tensor& out) {
  autoglm::check_kernel_dtype("scale_rows", out);
  TORCH_CHECK(acc.scalar_type() == at::kFloat && acc.dim() == 2 && acc.is_contiguous(),
              "acc must be a contiguous float32 [rows, width] tensor");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == acc.sizes(), "out must be shaped like acc");
  TORCH_CHECK(row_scales.scalar_type() == at::kFloat && row_scales.is_contiguous() &&
                  row_scales.numel() == acc.size(0),
              "row_scales must be a contiguous float32 tensor of one value per row");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == acc.size(1) &&
                        bias->scalar_type() == out.scalar_type()),
              "bias must be a contiguous [width] tensor of out's dtype");
  const float* ap = acc.const_data_ptr<float>();
  const float* sp = row_scales.const_data_ptr<float>();
  if (out.scalar_type() == at::kFloat) {
    scale_rows_impl<float>(ap, sp, bias ? bias->const_data_ptr<float>() : nullptr,
                           out.mutable_data_ptr<float>(), acc.size(0), acc.size(1));
  } else {
    using B = c10::BFloat16;
    scale_rows_impl<B>(ap, sp, bias ? bias->const_data_ptr<B>() : nullptr,
                       out.mutable_data_ptr<B>(), acc.size(0), acc.size(1));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoglm, m) {
  m.def("quantize_rows_int8(Tensor x, Tensor(a!) q, Tensor(b!) scales) -> ()");
  m.impl("quantize_rows_int8", c10::DispatchKey::CPU, &quantize_rows_int8);
  m.def("scale_rows(Tensor acc, Tensor row_scales, Tensor? bias, Tensor(a!) out) -> ()");
  m.impl("scale_rows", c10::DispatchKey::CPU, &scale_rows);
}
