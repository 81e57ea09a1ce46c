// w8a8 linear layers on AMX (auto_glm/layers/quant.py): one call quantizes the activations
// per row, multiplies them by the INT8 weight in int32 with AMX tiles (TDPBSSD), and writes
// acc * row_scale * channel_scale (+ bias) in the activations' dtype. oneDNN's INT8 matmul
// does the middle step, but a decode step calls it with a few rows, where its per-call work
// and the separate quantize and rescale passes (a float32 result written and read back)
// cost as much as reading the weight.
//
// The weight is packed by pack_int8_amx in amx.h's layout with groups of 4 inputs (tiles of
// 64 inputs). Built where the compiler targets AMX (-march=native on such a CPU); elsewhere
// amx_available() is false and the layer uses oneDNN.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>

#include "amx.h"
#include "common.h"
#include "quant_rows.h"

namespace {

using namespace autoglm::amx;

constexpr int64_t kGroup = 4;  // int8 inputs per channel in a B tile row
constexpr int64_t kTileK = kTile * kGroup;
constexpr int64_t kPrefetch = 4;  // K blocks ahead that a block's B tiles are prefetched

bool amx_available() { return ready(); }

at::Tensor pack_int8_amx(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(),
              "pack_int8_amx: w must be a contiguous int8 [out, in] tensor");
  return pack_tiles(w, kGroup);
}

#ifdef AUTOGLM_AMX
// acc [32][32] int32 = xq[m0:m0+16*a_tiles] @ block^T, over kb K blocks
void block_product(const int8_t* xq, int64_t xq_stride, const int8_t* block, int64_t kb,
                   bool two_a, int32_t* acc) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t i = 0; i < kb; ++i) {
    const int8_t* b = block + i * 2 * kTileBytes;
    if (i + kPrefetch < kb) {
      const char* ahead = reinterpret_cast<const char*>(b + kPrefetch * 2 * kTileBytes);
      for (int64_t line = 0; line < 2 * kTileBytes; line += 64) {
        _mm_prefetch(ahead + line, _MM_HINT_T0);
      }
    }
    _tile_loadd(2, b, kRowBytes);
    _tile_loadd(3, b + kTileBytes, kRowBytes);
    _tile_loadd(0, xq + i * kTileK, xq_stride);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 0, 3);
    if (two_a) {
      _tile_loadd(1, xq + kTile * xq_stride + i * kTileK, xq_stride);
      _tile_dpbssd(6, 1, 2);
      _tile_dpbssd(7, 1, 3);
    }
  }
  store_block(acc, two_a);
}
#endif

template <typename T>
void w8a8_rows(const T* x, int64_t x_stride, const int8_t* packed, const float* w_scales,
               const T* bias, T* out, int64_t m, int64_t n, int64_t k) {
#ifdef AUTOGLM_AMX
  const int64_t kp = round_up(k, kTileK), kb = kp / kTileK, nb = round_up(n, kBlockN) / kBlockN;
  const int64_t mp = round_up(m, kTile);
  // the activations as INT8 rows padded with zeros to whole tiles: [mp, kp]
  at::Tensor xq_buf = at::zeros({mp, kp}, at::kChar);
  at::Tensor xs_buf = at::empty({m}, at::kFloat);
  int8_t* xq = xq_buf.mutable_data_ptr<int8_t>();
  float* xs = xs_buf.mutable_data_ptr<float>();
  autoglm::quantize_rows<T>(x, xq, xs, m, k, x_stride, kp);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) int32_t acc[kBlockM * kBlockN];
    for (int64_t j = begin; j < end; ++j) {
      const int8_t* block = packed + j * kb * 2 * kTileBytes;
      const int64_t n0 = j * kBlockN, cols = std::min(kBlockN, n - n0);
      for (int64_t m0 = 0; m0 < mp; m0 += kBlockM) {
        const bool two_a = m0 + kTile < mp;
        block_product(xq + m0 * kp, kp, block, kb, two_a, acc);
        const int64_t rows = std::min(kBlockM, m - m0);
        for (int64_t r = 0; r < rows; ++r) {
          scale_row(acc + r * kBlockN, xs[m0 + r], w_scales + n0,
                    bias == nullptr ? nullptr : bias + n0, out + (m0 + r) * n + n0, cols);
        }
      }
    }
    _tile_release();
  });
#else
  TORCH_CHECK(false, "w8a8_linear_amx: these kernels were built without AMX");
#endif
}

at::Tensor w8a8_linear_amx(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  autoglm::check_kernel_dtype("w8a8_linear_amx", x);
  check_layer_args("w8a8_linear_amx", "pack_int8_amx", x, packed, w_scales, bias, out_features,
                   kTileK);
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  const int8_t* pp = packed.const_data_ptr<int8_t>();
  const float* sp = w_scales.const_data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    w8a8_rows<float>(x.const_data_ptr<float>(), x.stride(0), pp, sp,
                     bias ? bias->const_data_ptr<float>() : nullptr,
                     out.mutable_data_ptr<float>(), m, n, k);
  } else {
    using B = c10::BFloat16;
    w8a8_rows<B>(x.const_data_ptr<B>(), x.stride(0), pp, sp,
                 bias ? bias->const_data_ptr<B>() : nullptr, out.mutable_data_ptr<B>(), m, n, k);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoglm, m) {
  m.def("amx_available() -> bool", &amx_available);
  m.def("pack_int8_amx(Tensor w) -> Tensor");
  m.impl("pack_int8_amx", c10::DispatchKey::CPU, &pack_int8_amx);
  m.def("w8a8_linear_amx(Tensor x, Tensor packed, Tensor w_scales, Tensor? bias, "
        "int out_features) -> Tensor");
  m.impl("w8a8_linear_amx", c10::DispatchKey::CPU, &w8a8_linear_amx);
}
