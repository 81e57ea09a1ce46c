// What the AMX kernels share (amx_linear.cpp: INT8 x INT8; amx_weight_only.cpp: INT8 weights
// x bfloat16 activations): the tile permission and configuration, the packed weight layout,
// and the vectorised epilogue.
//
// Every tile is 16 rows of 64 bytes: tmm0-1 A tiles (rows m0.., m0+16..), tmm2-3 B tiles
// (channels n0.., n0+16..), tmm4-7 C tiles (A0B0, A0B1, A1B0, A1B1), so one step computes
// a block of 32 rows by 32 output channels. A B tile row holds, for each of 16 channels,
// `group` consecutive inputs (4 int8 for TDPBSSD, 2 bfloat16 for TDPBF16PS).
//
// Weight layout (pack_tiles): N padded to a multiple of 32 and K to a multiple of
// k_tile = 16 * group, stored as [N/32][K/k_tile][2][16][k_tile] int8:
// packed[n / 32][k / k_tile][n / 16 % 2][k % k_tile / group][n % 16 * group + k % group]
// = w[n][k]. One thread streams a block's tiles from contiguous memory.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && \
    defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AUTOGLM_AMX 1
#endif

namespace autoglm::amx {

constexpr int64_t kTile = 16;    // rows of an A or C tile; input groups of a B tile
constexpr int64_t kRowBytes = 64;  // bytes in one tile row
constexpr int64_t kTileBytes = kTile * kRowBytes;
constexpr int64_t kBlockN = 32;  // output channels per block: two C tiles side by side
constexpr int64_t kBlockM = 32;  // rows per block: two A tiles

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// Linux hands out the tile registers' state only on request (arch_prctl), per process.
inline bool ready() {
#ifdef AUTOGLM_AMX
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXtileData = 18;         // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

// what both layer ops check before any work: x [rows, in] in `x_dtype`, a weight packed by
// `pack_op` for [out_features, in] (tiles of k_tile inputs), the channel scales and the bias
inline void check_layer_args(const char* op, const char* pack_op, const at::Tensor& x,
                             const at::Tensor& packed, const at::Tensor& w_scales,
                             const std::optional<at::Tensor>& bias, int64_t out_features,
                             int64_t k_tile) {
  TORCH_CHECK(ready(), op, ": AMX is not available on this CPU or kernel build");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [rows, in] with unit stride");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 5 &&
                  packed.size(0) == round_up(out_features, kBlockN) / kBlockN &&
                  packed.size(1) == round_up(x.size(1), k_tile) / k_tile,
              op, ": packed must be ", pack_op,
              "'s result for an [out_features, x.size(1)] weight");
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.is_contiguous() &&
                  w_scales.numel() == out_features,
              op, ": w_scales must be a contiguous float32 tensor of out_features values");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == out_features &&
                        bias->scalar_type() == x.scalar_type()),
              op, ": bias must be a contiguous [out_features] tensor of x's dtype");
}

// w [N, K] int8 -> [N/32, K/k_tile, 2, 16, k_tile] int8 in the layout above, zero padded
// (a tile row holds k_tile = 16 * group int8 values: 64 bytes for group 4, and 32 for
// group 2, which widen to a 64-byte row of bfloat16)
inline at::Tensor pack_tiles(const at::Tensor& w, int64_t group) {
  const int64_t k_tile = kTile * group, tile = kTile * k_tile;
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t nb = round_up(n, kBlockN) / kBlockN, kb = round_up(k, k_tile) / k_tile;
  at::Tensor packed = at::zeros({nb, kb, 2, kTile, k_tile}, w.options());
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst = packed.mutable_data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int8_t* block = dst + (c / kBlockN) * kb * 2 * tile + (c / kTile % 2) * tile;
      for (int64_t i = 0; i < k; ++i) {
        block[(i / k_tile) * 2 * tile + (i % k_tile / group) * k_tile + (c % kTile) * group +
              i % group] = src[c * k + i];
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

// on each thread before its tile work; _tile_release() after it
inline void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = kRowBytes;
  }
  _tile_loadconfig(&cfg);
}

inline __m512 acc_lanes(const int32_t* a, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, a));
}
inline __m512 acc_lanes(const float* a, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, a); }
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

// o[c] = a[c] * (s * w_scales[c]) (+ bias[c]) for c < cols <= 32, rounded once to T
template <typename Acc, typename T>
void scale_row(const Acc* a, float s, const float* w_scales, const T* bias, T* o,
               int64_t cols) {
  const __m512 row_scale = _mm512_set1_ps(s);
  for (int64_t c = 0; c < cols; c += kTile) {
    const int64_t left = std::min(kTile, cols - c);
    const __mmask16 mask = left == kTile ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512 scale = _mm512_mul_ps(row_scale, _mm512_maskz_loadu_ps(mask, w_scales + c));
    __m512 v = _mm512_mul_ps(acc_lanes(a + c, mask), scale);
    if (bias != nullptr) v = _mm512_add_ps(v, bias_lanes(bias + c, mask));
    store_lanes(o + c, v, mask);
  }
}

// C tiles -> acc [32][32] (the second row of tiles only with two_a)
template <typename Acc>
void store_block(Acc* acc, bool two_a) {
  constexpr int64_t stride = kBlockN * sizeof(Acc);
  _tile_stored(4, acc, stride);
  _tile_stored(5, acc + kTile, stride);
  if (two_a) {
    _tile_stored(6, acc + kTile * kBlockN, stride);
    _tile_stored(7, acc + kTile * kBlockN + kTile, stride);
  }
}
#endif

}  // namespace autoglm::amx
