// Linear layers whose weights stay narrow in a float32 model, on CPUs with AVX2 and FMA
// (auto_glm/layers/linear.py, auto_glm/layers/quant.py). Three weight formats:
// * bfloat16: a bfloat16 checkpoint on a CPU without native bfloat16 (no AVX512_BF16 or
//   AMX) computes in float32, and oneDNN's float32 matmul would need float32 weights;
// * float16: a float16 checkpoint computes in float32 on every CPU, for the same reason;
// * int8: quantization='int8' in a float32 model, with a float32 scale per output channel.
// A weight is widened to float32 in registers as it is used (exactly: every bfloat16,
// float16 and int8 value is a float32), so a call reads a half or a quarter of the bytes of
// a float32 weight and does the same float32 arithmetic; only the order of the sums
// differs from a float32 matmul. An int8 layer's sums are multiplied by its channel scales
// at the end: y = (x @ q^T) * scale + bias.
//
// Layout (pack_linear_avx2): output channels in panels of 16, zero-padded to whole panels;
// panel p holds, for each input k, the 16 channels' values (32 bytes, or 16 for int8).
// float16 and int8 keep the channels in order: each half of the panel's row widens to one
// vector of 8 floats (F16C's vcvtph2ps; vpmovsxbd and vcvtdq2ps). bfloat16 puts channel
// 16p+i in lane 2i and channel 16p+8+i in lane 2i+1, so that one 256-bit load widens by a
// shift (the even lanes: channels 0-7) and a mask (the odd lanes: channels 8-15), with no
// lane shuffles.
//
// The micro-kernel keeps a 6-row by 16-channel block of sums in 12 registers and adds one
// input k at a time: a broadcast of x[r][k] times the panel's two widened vectors. Inputs are
// taken 1024 at a time, so that a panel's block (at most 32 KiB) stays in L1 while every row
// of a block of rows passes over it; a block of rows holds 256 KiB of those inputs (L2), 60
// rows and more, so a decode step reads the weight from memory once. Each block's panels are
// split among the threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AUTOGLM_AVX2 1
#endif

namespace {

constexpr int64_t kPanel = 16;        // output channels per panel
constexpr int64_t kRows = 6;          // rows per micro-kernel call
constexpr int64_t kDepth = 1024;      // inputs per block: a panel's block is <= 32 KiB (L1)
constexpr int64_t kRowBlockBytes = 256 * 1024;  // a block of rows' inputs (L2)

bool avx2_linear_available() {
#ifdef AUTOGLM_AVX2
  return true;
#else
  return false;
#endif
}

// w [out, in] -> [panels, in, 16] of `dtype`: bfloat16 or float16 (from float32 holding such
// values, or from that dtype), or int8 (from int8)
at::Tensor pack_linear_avx2(const at::Tensor& w, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kChar,
              "pack_linear_avx2: dtype must be bfloat16, float16 or int8, got ", dtype);
  const bool int8 = dtype == at::kChar;
  const auto from = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && (int8 ? from == at::kChar : (from == at::kFloat || from == dtype)),
              "pack_linear_avx2: w must be a [out, in] tensor of int8 (for dtype int8) or of "
              "float32 or the dtype itself (for bfloat16 and float16); got ",
              from, " ", w.sizes(), " for dtype ", dtype);
  const int64_t out = w.size(0), in = w.size(1), panels = (out + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, in}, w.options().dtype(dtype));
  padded.narrow(0, 0, out).copy_(w);
  if (dtype != at::kBFloat16) {  // [panel, i, in] -> [panel, in, i]
    return padded.view({panels, kPanel, in}).transpose(1, 2).contiguous();
  }
  // [panel, half, i, in] -> [panel, in, i, half]: lane 2i + half holds channel 8 * half + i
  return padded.view({panels, 2, kPanel / 2, in})
      .permute({0, 3, 2, 1})
      .contiguous()
      .view({panels, in, kPanel});
}

#ifdef AUTOGLM_AVX2
// The helpers of the micro-kernel are always inlined: a call would take the addresses of its
// sums and make the compiler keep them in memory (measured: 2.3x slower).
#define AUTOGLM_INLINE inline __attribute__((always_inline))

// How one panel row of 16 values widens to two float32 vectors (channels 0-7, 8-15)
struct BF16 {
  using T = uint16_t;
  static AUTOGLM_INLINE void widen(const T* p, __m256& lo, __m256& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

struct F16 {
  using T = uint16_t;
  static AUTOGLM_INLINE void widen(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};

struct Int8 {
  using T = int8_t;
  static AUTOGLM_INLINE void widen(const T* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    hi = _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
};

// The first `cols` of p[0:16] as two vectors (the rest 0); `cols` < 16 only in the last panel
// of a layer whose size is not a multiple of 16
AUTOGLM_INLINE void load_cols(const float* p, int64_t cols, __m256& lo, __m256& hi) {
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

AUTOGLM_INLINE void store_cols(float* p, int64_t cols, __m256 lo, __m256 hi) {
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

// What a panel's 16 channels add after their last block of inputs: y = sums * scale + bias
// (either may be null)
struct Epilogue {
  const float* scale;
  const float* bias;
};

// y[r][0:cols] (+)= x[r][0:depth] @ panel[0:depth]^T for R <= 6 rows: the sums start from 0
// on the first block of inputs and from y on later ones; `last` applies the epilogue
template <class W, int R>
void micro(const float* x, int64_t x_stride, const typename W::T* panel, int64_t depth,
           bool first, const Epilogue* last, float* y, int64_t y_stride, int64_t cols) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (first) {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    } else {
      load_cols(y + r * y_stride, cols, acc[r][0], acc[r][1]);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m256 lo, hi;
    W::widen(panel + k * kPanel, lo, hi);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * x_stride + k);
      acc[r][0] = _mm256_fmadd_ps(a, lo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, hi, acc[r][1]);
    }
  }
  if (last != nullptr) {
    __m256 s_lo = _mm256_set1_ps(1.0f), s_hi = s_lo, b_lo = _mm256_setzero_ps(), b_hi = b_lo;
    if (last->scale != nullptr) load_cols(last->scale, cols, s_lo, s_hi);
    if (last->bias != nullptr) load_cols(last->bias, cols, b_lo, b_hi);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(acc[r][0], s_lo, b_lo);
      acc[r][1] = _mm256_fmadd_ps(acc[r][1], s_hi, b_hi);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store_cols(y + r * y_stride, cols, acc[r][0], acc[r][1]);
}

// y [m, n] = x [m, in] @ W^T (* scales) (+ bias) over a packed weight
template <class W>
void linear(const float* xp, int64_t xs, int64_t m, int64_t in, const typename W::T* pp,
            int64_t panels, const float* sp, const float* bp, float* yp, int64_t n) {
  using Micro = void (*)(const float*, int64_t, const typename W::T*, int64_t, bool,
                         const Epilogue*, float*, int64_t, int64_t);
  constexpr Micro kMicro[kRows + 1] = {nullptr,        &micro<W, 1>, &micro<W, 2>, &micro<W, 3>,
                                       &micro<W, 4>, &micro<W, 5>, &micro<W, 6>};
  const int64_t depth = std::min(in, kDepth);
  const int64_t block = std::max(kRows, kRowBlockBytes / (depth * 4) / kRows * kRows);
  for (int64_t m0 = 0; m0 < m; m0 += block) {
    const int64_t m1 = std::min(m, m0 + block);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c0 = p * kPanel, cols = std::min(kPanel, n - c0);
        const Epilogue epilogue{sp != nullptr ? sp + c0 : nullptr,
                                bp != nullptr ? bp + c0 : nullptr};
        for (int64_t k0 = 0; k0 < in; k0 += depth) {  // the panel's block stays in L1
          const typename W::T* panel = pp + (p * in + k0) * kPanel;
          const int64_t kd = std::min(depth, in - k0);
          const Epilogue* last = k0 + kd == in ? &epilogue : nullptr;
          for (int64_t r = m0; r < m1; r += kRows) {
            const int64_t rows = std::min(kRows, m1 - r);
            kMicro[rows](xp + r * xs + k0, xs, panel, kd, k0 == 0, last, yp + r * n + c0, n,
                         cols);
          }
        }
      }
    });
  }
}
#endif

void check_channels(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  TORCH_CHECK(!t || (t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n),
              "linear_avx2: ", name, " must be a contiguous float32 [", n, "] tensor");
}

at::Tensor linear_avx2(const at::Tensor& x, const at::Tensor& packed,
                       const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "linear_avx2: x must be float32 [T, in] rows with unit stride, got ",
              x.scalar_type(), " ", x.sizes());
  const auto dtype = packed.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kChar) &&
                  packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.size(1) == x.size(1),
              "linear_avx2: packed must come from pack_linear_avx2 for a weight with ",
              x.size(1), " inputs, got ", dtype, " ", packed.sizes());
  const int64_t panels = packed.size(0), in = x.size(1), m = x.size(0), n = out_features;
  TORCH_CHECK(n > (panels - 1) * kPanel && n <= panels * kPanel,
              "linear_avx2: out_features ", n, " does not match ", panels, " panels");
  check_channels(scales, "scales", n);
  check_channels(bias, "bias", n);
  TORCH_CHECK(dtype != at::kChar || scales,
              "linear_avx2: an int8 weight needs its channel scales");
  TORCH_CHECK(avx2_linear_available(),
              "linear_avx2 needs a build for a CPU with AVX2, FMA and F16C; check "
              "avx2_linear_available() first");
  at::Tensor y = at::empty({m, n}, x.options());
#ifdef AUTOGLM_AVX2
  const float* xp = x.const_data_ptr<float>();
  const float* sp = scales ? scales->const_data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  const void* pp = packed.const_data_ptr();
  if (dtype == at::kChar) {
    linear<Int8>(xp, x.stride(0), m, in, static_cast<const int8_t*>(pp), panels, sp, bp, yp, n);
  } else if (dtype == at::kHalf) {
    linear<F16>(xp, x.stride(0), m, in, static_cast<const uint16_t*>(pp), panels, sp, bp, yp, n);
  } else {
    linear<BF16>(xp, x.stride(0), m, in, static_cast<const uint16_t*>(pp), panels, sp, bp, yp, n);
  }
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoglm, m) {
  m.def("avx2_linear_available() -> bool", &avx2_linear_available);
  m.def("pack_linear_avx2(Tensor w, ScalarType dtype) -> Tensor");
  m.impl("pack_linear_avx2", c10::DispatchKey::CPU, &pack_linear_avx2);
  m.def("linear_avx2(Tensor x, Tensor packed, Tensor? scales, Tensor? bias, int out_features) -> "
        "Tensor");
  m.impl("linear_avx2", c10::DispatchKey::CPU, &linear_avx2);
}
