// Fused elementwise kernels for the CPU: one pass over the activations where plain torch
// makes three (add, normalise, scale; silu, multiply), each allocating its result.
//
// Rounding follows the reference models step by step, so a bfloat16 model rounds where
// transformers rounds: the residual sum and the normalised value are rounded to the model
// dtype before the weight is applied.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "common.h"

namespace {

template <typename T>
inline T round_to(float x) {
  return static_cast<T>(x);
}

// out = weight * rms_normalise(x + residual), and residual = x + residual (the next layer's
// residual); with add_residual false, out = weight * rms_normalise(x).
template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows,
                   int64_t width, int64_t x_stride, double eps, bool add_residual) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      T* res = residual + r * width;
      T* o = out + r * width;
      float squares = 0.f;
      for (int64_t i = 0; i < width; ++i) {
        float v = static_cast<float>(xr[i]);
        if (add_residual) {
          const T sum = round_to<T>(v + static_cast<float>(res[i]));
          res[i] = sum;
          v = static_cast<float>(sum);
        }
        squares += v * v;
      }
      const float scale = 1.f / std::sqrt(squares / width + static_cast<float>(eps));
      const T* src = add_residual ? res : xr;
      for (int64_t i = 0; i < width; ++i) {
        const float normed = static_cast<float>(round_to<T>(static_cast<float>(src[i]) * scale));
        o[i] = round_to<T>(static_cast<float>(weight[i]) * normed);
      }
    }
  });
}

void norm(const char* op, const at::Tensor& x, at::Tensor* residual, const at::Tensor& weight,
          double eps, at::Tensor& out) {
  autoglm::check_kernel_dtype(op, x);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, hidden] with unit stride");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes(), "out must be contiguous, like x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [hidden]");
  TORCH_CHECK(!residual || (residual->is_contiguous() && residual->sizes() == x.sizes()),
              "residual must be contiguous, like x");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.scalar_type() == weight.scalar_type() &&
                  (!residual || residual->scalar_type() == x.scalar_type()),
              "x, residual, weight and out must share one dtype");
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(x.const_data_ptr<float>(),
                         residual ? residual->mutable_data_ptr<float>() : nullptr,
                         weight.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                         x.size(0), x.size(1), x.stride(0), eps, residual != nullptr);
  } else {
    using B = c10::BFloat16;
    rms_norm_rows<B>(x.const_data_ptr<B>(), residual ? residual->mutable_data_ptr<B>() : nullptr,
                     weight.const_data_ptr<B>(), out.mutable_data_ptr<B>(), x.size(0), x.size(1),
                     x.stride(0), eps, residual != nullptr);
  }
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  norm("rms_norm", x, nullptr, weight, eps, out);
}

void add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                  double eps, at::Tensor& out) {
  norm("add_rms_norm", x, &residual, weight, eps, out);
}

// out = silu(gate) * up over x = [gate | up] ([rows, 2 * width]).
template <typename T>
void silu_and_mul_rows(const T* x, T* out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = x + r * 2 * width;
      const T* up = gate + width;
      T* o = out + r * width;
      for (int64_t i = 0; i < width; ++i) {
        const float g = static_cast<float>(gate[i]);
        const T act = round_to<T>(g / (1.f + std::exp(-g)));
        o[i] = round_to<T>(static_cast<float>(act) * static_cast<float>(up[i]));
      }
    }
  });
}

void silu_and_mul(const at::Tensor& x, at::Tensor& out) {
  autoglm::check_kernel_dtype("silu_and_mul", x);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "x must be a contiguous [rows, 2 * width] tensor");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) * 2 == x.size(1) &&
                  out.scalar_type() == x.scalar_type(),
              "out must be a contiguous [rows, width] tensor of x's dtype");
  if (x.scalar_type() == at::kFloat) {
    silu_and_mul_rows<float>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                             x.size(0), out.size(1));
  } else {
    using B = c10::BFloat16;
    silu_and_mul_rows<B>(x.const_data_ptr<B>(), out.mutable_data_ptr<B>(), x.size(0),
                         out.size(1));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoglm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.def(
      "add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps, Tensor(b!) out) "
      "-> ()");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.impl("silu_and_mul", c10::DispatchKey::CPU, &silu_and_mul);
}
