// w8a8 linear layers on AMX (auto_glm/layers/quant.py): one call quantizes the activations
// per row, multiplies them by the INT8 weight in int32 with AMX tiles, and writes
// acc * row_scale * channel_scale (+ bias) in the activations' dtype. oneDNN's INT8 matmul
// does the middle step, but a decode step calls it with a few rows, where its per-call work
// and the separate quantize and rescale passes (a float32 result written and read back)
// cost as much as reading the weight.
//
// Weight layout (pack_int8_amx): N padded to a multiple of 32 and K to a multiple of 64,
// stored as [N/32][K/64][2][16][64] int8: for each block of 32 output channels and 64 inputs,
// two B tiles of 16 channels, tile row r holding the four inputs 4r..4r+3 of each channel
// (packed[n / 32][k / 64][n / 16 % 2][k % 64 / 4][n % 16 * 4 + k % 4] = w[n][k]). One
// thread streams a block's tiles from contiguous memory.
//
// Built where the compiler targets AMX-INT8 (-march=native on such a CPU); elsewhere
// amx_int8_available() is false and the layer uses oneDNN.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "common.h"
#include "quant_rows.h"

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AUTOGLM_AMX 1
#endif

namespace {

constexpr int64_t kTile = 16;       // rows of an A or C tile; K quads of a B tile
constexpr int64_t kTileK = 64;      // int8 inputs in one tile row
constexpr int64_t kBlockN = 32;     // output channels per block: two C tiles side by side
constexpr int64_t kBlockM = 32;     // rows per block: two A tiles
constexpr int64_t kTileBytes = kTile * kTileK;
constexpr int64_t kPrefetch = 4;    // K blocks ahead that a block's B tiles are prefetched

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

bool amx_ready() {
#ifdef AUTOGLM_AMX
  // Linux hands out the tile registers' state only on request (arch_prctl), per process.
  static const bool ready = [] {
    constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXtileData = 18;         // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

bool amx_int8_available() { return amx_ready(); }

at::Tensor pack_int8_amx(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(),
              "pack_int8_amx: w must be a contiguous int8 [out, in] tensor");
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t nb = round_up(n, kBlockN) / kBlockN, kb = round_up(k, kTileK) / kTileK;
  at::Tensor packed = at::zeros({nb, kb, 2, kTile, kTileK}, w.options());  // padding stays 0
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst = packed.mutable_data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int8_t* block = dst + (c / kBlockN) * kb * 2 * kTileBytes + (c / kTile % 2) * kTileBytes;
      for (int64_t i = 0; i < k; ++i) {
        block[(i / kTileK) * 2 * kTileBytes + (i % kTileK / 4) * kTileK + (c % kTile) * 4 +
              i % 4] = src[c * k + i];
      }
    }
  });
  return packed;
}

#ifdef AUTOGLM_AMX
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-1: A tiles (rows m0.., m0+16..), tmm2-3: B tiles (channels n0.., n0+16..),
// tmm4-7: C tiles (A0B0, A0B1, A1B0, A1B1); every tile is 16 rows of 64 bytes
void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = kTileK;
  }
  _tile_loadconfig(&cfg);
}

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
    _tile_loadd(2, b, kTileK);
    _tile_loadd(3, b + kTileBytes, kTileK);
    _tile_loadd(0, xq + i * kTileK, xq_stride);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 0, 3);
    if (two_a) {
      _tile_loadd(1, xq + kTile * xq_stride + i * kTileK, xq_stride);
      _tile_dpbssd(6, 1, 2);
      _tile_dpbssd(7, 1, 3);
    }
  }
  constexpr int64_t stride = kBlockN * sizeof(int32_t);
  _tile_stored(4, acc, stride);
  _tile_stored(5, acc + kTile, stride);
  if (two_a) {
    _tile_stored(6, acc + kTile * kBlockN, stride);
    _tile_stored(7, acc + kTile * kBlockN + kTile, stride);
  }
}

// o[c] = a[c] * (s * w_scales[c]) (+ bias[c]) for c < cols <= 32, rounded once to T
inline __m512 bias_lanes(const float* bias, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, bias);
}
inline __m512 bias_lanes(const c10::BFloat16* bias, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void store_lanes(float* o, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(o, mask, v); }
inline void store_lanes(c10::BFloat16* o, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(o, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

template <typename T>
void scale_row(const int32_t* a, float s, const float* w_scales, const T* bias, T* o,
               int64_t cols) {
  const __m512 row_scale = _mm512_set1_ps(s);
  for (int64_t c = 0; c < cols; c += kTile) {
    const int64_t left = std::min(kTile, cols - c);
    const __mmask16 mask = left == kTile ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512 acc = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, a + c));
    const __m512 scale = _mm512_mul_ps(row_scale, _mm512_maskz_loadu_ps(mask, w_scales + c));
    __m512 v = _mm512_mul_ps(acc, scale);
    if (bias != nullptr) v = _mm512_add_ps(v, bias_lanes(bias + c, mask));
    store_lanes(o + c, v, mask);
  }
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
          scale_row<T>(acc + r * kBlockN, xs[m0 + r], w_scales + n0,
                       bias == nullptr ? nullptr : bias + n0, out + (m0 + r) * n + n0, cols);
        }
      }
    }
    _tile_release();
  });
#else
  TORCH_CHECK(false, "w8a8_linear_amx: these kernels were built without AMX-INT8");
#endif
}

at::Tensor w8a8_linear_amx(const at::Tensor& x, const at::Tensor& packed,
                           const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  autoglm::check_kernel_dtype("w8a8_linear_amx", x);
  TORCH_CHECK(amx_ready(), "w8a8_linear_amx: AMX-INT8 is not available on this CPU or build");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [rows, in] with unit stride");
  const int64_t m = x.size(0), k = x.size(1), n = out_features;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 5 &&
                  packed.size(0) == round_up(n, kBlockN) / kBlockN &&
                  packed.size(1) == round_up(k, kTileK) / kTileK,
              "packed must be pack_int8_amx's result for an [out_features, x.size(1)] weight");
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.is_contiguous() &&
                  w_scales.numel() == n,
              "w_scales must be a contiguous float32 tensor of out_features values");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == n &&
                        bias->scalar_type() == x.scalar_type()),
              "bias must be a contiguous [out_features] tensor of x's dtype");
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
  m.def("amx_int8_available() -> bool", &amx_int8_available);
  m.def("pack_int8_amx(Tensor w) -> Tensor");
  m.impl("pack_int8_amx", c10::DispatchKey::CPU, &pack_int8_amx);
  m.def("w8a8_linear_amx(Tensor x, Tensor packed, Tensor w_scales, Tensor? bias, "
        "int out_features) -> Tensor");
  m.impl("w8a8_linear_amx", c10::DispatchKey::CPU, &w8a8_linear_amx);
}
