// bfloat16 weights in a float32 model, on CPUs without native bfloat16 arithmetic (AVX2 and
// FMA, no AVX512_BF16 or AMX; auto_glm/layers/linear.py). There a bfloat16 checkpoint computes
// in float32, and oneDNN's float32 matmul needs float32 weights: twice the bytes of the
// checkpoint. Here the weight stays in bfloat16 and is widened to float32 in registers (exact:
// a bfloat16 is the high half of a float32), so a call reads half the bytes and does the same
// float32 arithmetic; only the order of the sums differs from a float32 matmul.
//
// Layout (pack_bf16_avx2): output channels in panels of 16, zero-padded to whole panels;
// panel p holds, for each input k, 16 bfloat16 values = 32 bytes, with channel 16p+i in lane
// 2i and channel 16p+8+i in lane 2i+1. One 256-bit load is then widened by a shift (the even
// lanes: channels 0-7) and a mask (the odd lanes: channels 8-15), with no lane shuffles.
//
// The micro-kernel keeps a 6-row by 16-channel block of sums in 12 registers and adds one
// input k at a time: a broadcast of x[r][k] times the panel's two widened vectors. Inputs are
// taken 1024 at a time, so that a panel's block (32 KiB) stays in L1 while every row of a
// block of rows passes over it; a block of rows holds 256 KiB of those inputs (L2), 64 rows
// and more, so a decode step reads the weight from memory once. Each block's panels are
// split among the threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define AUTOGLM_AVX2 1
#endif

namespace {

constexpr int64_t kPanel = 16;        // output channels per panel
constexpr int64_t kRows = 6;          // rows per micro-kernel call
constexpr int64_t kDepth = 1024;      // inputs per block: a panel's block is 32 KiB (L1)
constexpr int64_t kRowBlockBytes = 256 * 1024;  // a block of rows' inputs (L2)

bool bf16_avx2_available() {
#ifdef AUTOGLM_AVX2
  return true;
#else
  return false;
#endif
}

// w [out, in] (float32 holding bfloat16 values, or bfloat16) -> [panels, in, 16] bfloat16
at::Tensor pack_bf16_avx2(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "pack_bf16_avx2: w must be a float32 or bfloat16 [out, in] tensor, got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t out = w.size(0), in = w.size(1), panels = (out + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, in}, w.options().dtype(at::kBFloat16));
  padded.narrow(0, 0, out).copy_(w);
  // [panel, half, i, in] -> [panel, in, i, half]: lane 2i + half holds channel 8 * half + i
  return padded.view({panels, 2, kPanel / 2, in})
      .permute({0, 3, 2, 1})
      .contiguous()
      .view({panels, in, kPanel});
}

#ifdef AUTOGLM_AVX2
// The first `cols` of p[0:16] as two vectors (the rest 0); `cols` < 16 only in the last panel
// of a layer whose size is not a multiple of 16
inline void load_cols(const float* p, int64_t cols, __m256& lo, __m256& hi) {
  if (cols == kPanel) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
    return;
  }
  alignas(32) float part[kPanel] = {};
  std::copy(p, p + cols, part);
  lo = _mm256_load_ps(part);
  hi = _mm256_load_ps(part + 8);
}

inline void store_cols(float* p, int64_t cols, __m256 lo, __m256 hi) {
  if (cols == kPanel) {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
    return;
  }
  alignas(32) float part[kPanel];
  _mm256_store_ps(part, lo);
  _mm256_store_ps(part + 8, hi);
  std::copy(part, part + cols, p);
}

// y[r][0:cols] (+)= x[r][0:depth] @ panel[0:depth]^T for R <= 6 rows: the sums start from
// `start` (the bias, or null for 0) on the first block of inputs, and from y on later ones
template <int R>
void micro(const float* x, int64_t x_stride, const uint16_t* panel, int64_t depth, bool first,
           const float* start, float* y, int64_t y_stride, int64_t cols) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (!first) {
      load_cols(y + r * y_stride, cols, acc[r][0], acc[r][1]);
    } else if (start != nullptr) {
      load_cols(start, cols, acc[r][0], acc[r][1]);
    } else {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kPanel));
    const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));   // channels 0-7
    const __m256 hi = _mm256_castsi256_ps(_mm256_and_si256(v, high));  // channels 8-15
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * x_stride + k);
      acc[r][0] = _mm256_fmadd_ps(a, lo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, hi, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store_cols(y + r * y_stride, cols, acc[r][0], acc[r][1]);
}

using Micro = void (*)(const float*, int64_t, const uint16_t*, int64_t, bool, const float*,
                       float*, int64_t, int64_t);
constexpr Micro kMicro[kRows + 1] = {nullptr,   &micro<1>, &micro<2>, &micro<3>,
                                     &micro<4>, &micro<5>, &micro<6>};
#endif

at::Tensor bf16_linear_avx2(const at::Tensor& x, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "bf16_linear_avx2: x must be float32 [T, in] rows with unit stride, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 &&
                  packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.size(1) == x.size(1),
              "bf16_linear_avx2: packed must come from pack_bf16_avx2 for a weight with ",
              x.size(1), " inputs, got ", packed.sizes());
  const int64_t panels = packed.size(0), in = x.size(1), m = x.size(0), n = out_features;
  TORCH_CHECK(n > (panels - 1) * kPanel && n <= panels * kPanel,
              "bf16_linear_avx2: out_features ", n, " does not match ", panels, " panels");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                        bias->numel() == n),
              "bf16_linear_avx2: bias must be a contiguous float32 [", n, "] tensor");
  TORCH_CHECK(bf16_avx2_available(),
              "bf16_linear_avx2 needs a build for a CPU with AVX2 and FMA; check "
              "bf16_avx2_available() first");
  at::Tensor y = at::empty({m, n}, x.options());
#ifdef AUTOGLM_AVX2
  const float* xp = x.const_data_ptr<float>();
  const uint16_t* pp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>());
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t depth = std::min(in, kDepth);
  const int64_t block = std::max(kRows, kRowBlockBytes / (depth * 4) / kRows * kRows);
  for (int64_t m0 = 0; m0 < m; m0 += block) {
    const int64_t m1 = std::min(m, m0 + block);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c0 = p * kPanel, cols = std::min(kPanel, n - c0);
        const float* pb = bp != nullptr ? bp + c0 : nullptr;
        for (int64_t k0 = 0; k0 < in; k0 += depth) {  // the panel's block stays in L1
          const uint16_t* panel = pp + (p * in + k0) * kPanel;
          const int64_t kd = std::min(depth, in - k0);
          for (int64_t r = m0; r < m1; r += kRows) {
            const int64_t rows = std::min(kRows, m1 - r);
            kMicro[rows](xp + r * xs + k0, xs, panel, kd, k0 == 0, pb, yp + r * n + c0, n,
                         cols);
          }
        }
      }
    });
  }
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoglm, m) {
  m.def("bf16_avx2_available() -> bool", &bf16_avx2_available);
  m.def("pack_bf16_avx2(Tensor w) -> Tensor");
  m.impl("pack_bf16_avx2", c10::DispatchKey::CPU, &pack_bf16_avx2);
  m.def("bf16_linear_avx2(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.impl("bf16_linear_avx2", c10::DispatchKey::CPU, &bf16_linear_avx2);
}
