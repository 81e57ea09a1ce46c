// int8 (weight-only) linear layers on AMX (auto_glm/layers/quant.py): bfloat16 activations
// times an INT8 weight, summed in float32 with AMX-BF16 tiles (TDPBF16PS), written as
// acc * channel_scale (+ bias) in bfloat16. The weight's tiles are widened from INT8 to
// bfloat16 as they are used (exact: |q| <= 127 fits bfloat16's 8-bit significand), two at a
// time into a buffer that stays in L1 for up to 32 rows, or a block of 32 output channels at
// once for more rows, which reuse it; so a call reads the INT8 weight, half the bytes of a
// bfloat16 one. torch's _weight_int8pack_mm reads it too but is fast only for a few rows;
// more rows used to convert the whole weight per call.
//
// The weight is packed by pack_int8_amx_bf16 in amx.h's layout with groups of 2 inputs
// (tiles of 32 inputs). Built where the compiler targets AMX (-march=native on such a
// CPU); elsewhere amx_available() (amx_linear.cpp) is false and the layer keeps torch's
// paths.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "amx.h"

namespace {

using namespace autoglm::amx;
using BF16 = c10::BFloat16;

constexpr int64_t kGroup = 2;  // bfloat16 inputs per channel in a B tile row
constexpr int64_t kTileK = kTile * kGroup;
constexpr int64_t kTileValues = kTile * kTileK;  // values in one B tile: 16 rows of 32

at::Tensor pack_int8_amx_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(),
              "pack_int8_amx_bf16: w must be a contiguous int8 [out, in] tensor");
  return pack_tiles(w, kGroup);
}

#ifdef AUTOGLM_AMX
// `values` INT8 weights (a multiple of 32) -> bfloat16, exactly
void widen(const int8_t* block, int64_t values, BF16* wide) {
  for (int64_t i = 0; i < values; i += 32) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + i));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + i + 16));
    const __m512 f_lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo));
    const __m512 f_hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi));
    _mm512_storeu_si512(wide + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f_hi, f_lo)));
  }
}

// acc [32][32] float32 = x[m0:m0+16*a_tiles] @ w^T over kb K blocks, w's tiles read from
// `wide` (the block widened once) or, without it, widened from `block` step by step into a
// buffer that stays in L1 (one block of rows: each tile is used once)
void block_product(const BF16* x, int64_t x_stride_bytes, const int8_t* block, const BF16* wide,
                   int64_t kb, bool two_a, float* acc) {
  alignas(64) BF16 step[2 * kTileValues];
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  const int64_t second_rows = kTile * x_stride_bytes / static_cast<int64_t>(sizeof(BF16));
  for (int64_t i = 0; i < kb; ++i) {
    const BF16* b = step;
    if (wide != nullptr) {
      b = wide + i * 2 * kTileValues;
    } else {
      widen(block + i * 2 * kTileValues, 2 * kTileValues, step);
    }
    _tile_loadd(2, b, kRowBytes);
    _tile_loadd(3, b + kTileValues, kRowBytes);
    _tile_loadd(0, x + i * kTileK, x_stride_bytes);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    if (two_a) {
      _tile_loadd(1, x + second_rows + i * kTileK, x_stride_bytes);
      _tile_dpbf16ps(6, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  store_block(acc, two_a);
}
#endif

at::Tensor int8_linear_amx(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16,
              "int8_linear_amx multiplies bfloat16 activations, got ", x.scalar_type(),
              "; other dtypes use the layer's torch path");
  check_layer_args("int8_linear_amx", "pack_int8_amx_bf16", x, packed, w_scales, bias,
                   out_features, kTileK);
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
#ifdef AUTOGLM_AMX
  const int64_t kp = round_up(k, kTileK), kb = kp / kTileK, nb = round_up(n, kBlockN) / kBlockN;
  const int64_t mp = round_up(m, kTile);
  // the activations padded with zeros to whole tiles: [mp, kp]
  at::Tensor x_buf = at::zeros({mp, kp}, x.options());
  BF16* xp = x_buf.mutable_data_ptr<BF16>();
  const BF16* src = x.const_data_ptr<BF16>();
  for (int64_t r = 0; r < m; ++r) {
    std::memcpy(xp + r * kp, src + r * x.stride(0), k * sizeof(BF16));
  }
  const int8_t* pp = packed.const_data_ptr<int8_t>();
  const float* sp = w_scales.const_data_ptr<float>();
  const BF16* bp = bias ? bias->const_data_ptr<BF16>() : nullptr;
  BF16* op = out.mutable_data_ptr<BF16>();
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    // more than one block of rows reuses each tile: widen the whole block once
    std::vector<BF16> wide(mp > kBlockM ? kb * 2 * kTileValues : 0);
    alignas(64) float acc[kBlockM * kBlockN];
    for (int64_t j = begin; j < end; ++j) {
      const int8_t* block = pp + j * kb * 2 * kTileValues;
      if (!wide.empty()) widen(block, kb * 2 * kTileValues, wide.data());
      const int64_t n0 = j * kBlockN, cols = std::min(kBlockN, n - n0);
      for (int64_t m0 = 0; m0 < mp; m0 += kBlockM) {
        const bool two_a = m0 + kTile < mp;
        block_product(xp + m0 * kp, kp * sizeof(BF16), block, wide.empty() ? nullptr : wide.data(),
                      kb, two_a, acc);
        const int64_t rows = std::min(kBlockM, m - m0);
        for (int64_t r = 0; r < rows; ++r) {
          scale_row(acc + r * kBlockN, 1.f, sp + n0, bp == nullptr ? nullptr : bp + n0,
                    op + (m0 + r) * n + n0, cols);
        }
      }
    }
    _tile_release();
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoglm, m) {
  m.def("pack_int8_amx_bf16(Tensor w) -> Tensor");
  m.impl("pack_int8_amx_bf16", c10::DispatchKey::CPU, &pack_int8_amx_bf16);
  m.def("int8_linear_amx(Tensor x, Tensor packed, Tensor w_scales, Tensor? bias, "
        "int out_features) -> Tensor");
  m.impl("int8_linear_amx", c10::DispatchKey::CPU, &int8_linear_amx);
}
