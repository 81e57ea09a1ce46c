// Decode attention on the CPU over the block-paged K/V cache.
//
// Each sequence feeds one query token. Keys and values are read in place through the
// sequence's block table, so no gathered copy of the context is made: a decode step reads
// every cached K/V byte once.
//
// The cache holds the model's dtype, or (kv_cache_dtype int8 / fp8_e4m3, see
// auto_glm/layers/kv_quant.py) int8 or float8_e4m3fn values with a bfloat16 scale per
// (slot, KV head) in k_scale / v_scale [slots, kv_heads]: the dispatch goes on the cache's
// dtype, and a quantized slot is converted to float32 and scaled as it is read (once per
// tile of slots, shared by the query heads of its KV head). Static scales (one per layer and
// KV head, kv_cache_scales calibrate / checkpoint) come as the same [slots, kv_heads] view
// with slot stride 0; there an int8 -128 marks a non-finite value and reads as NaN (see
// auto_glm/layers/kv_static.py), as a float8 NaN does.
//
// Built at run time by torch.utils.cpp_extension (see auto_glm/kernels/build.py) and
// registered as torch.ops.autoglm.paged_decode_attention.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

// One vector register of float lanes in GCC's vector extension: 16 with AVX-512, 8 with
// AVX2. The compiler lowers it to whatever -march=native offers, so no intrinsics are
// needed. Wider vectors than the registers (16 lanes on AVX2) made the compiler keep the
// score tile and the queries in memory: the kernel was then 0.9x torch's path there.
#ifdef __AVX512F__
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * 4)));
typedef uint16_t HalfV __attribute__((vector_size(kLanes * 2)));
typedef uint32_t WordV __attribute__((vector_size(kLanes * 4)));
typedef int8_t Int8V __attribute__((vector_size(kLanes)));
typedef uint8_t ByteV __attribute__((vector_size(kLanes)));
typedef int16_t ShortV __attribute__((vector_size(kLanes * 2)));
typedef int32_t IntV __attribute__((vector_size(kLanes * 4)));
// accumulators of one query head's output held in registers at a time (of 16 or 32)
constexpr int64_t kAccChunks = 8;
using Fp8 = c10::Float8_e4m3fn;

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec load(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  HalfV h;
  std::memcpy(&h, p, sizeof h);
  const WordV w = __builtin_convertvector(h, WordV) << 16;
  Vec v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// GCC lowers a conversion that widens lanes 2x to one instruction (vpmovsxbw, vpmovzxwd...)
// but one that widens them 4x (bytes to 32 bits) to sixteen scalar ones, 6-10x slower
// here: bytes widen in two steps. -128 (never a quantized value) is the poison of a
// non-finite one and reads as NaN.
inline Vec load(const int8_t* p) {
  Int8V b;
  std::memcpy(&b, p, sizeof b);
  const IntV i = __builtin_convertvector(__builtin_convertvector(b, ShortV), IntV);
  return i == -128 ? Vec{} + __builtin_nanf("") : __builtin_convertvector(i, Vec);
}

// float8 e4m3fn: a sign, 4 exponent bits (bias 7) and 3 mantissa bits; no infinity, NaN is
// S.1111.111. A normal value's exponent and mantissa bits move into a float32's with the
// bias raised by 120 (127 - 7); a subnormal one (exponent 0) is its mantissa times 2^-9,
// computed in float so that no float32 subnormal arises (a flush-to-zero mode would eat it).
inline Vec load(const Fp8* p) {
  ByteV b;
  std::memcpy(&b, p, sizeof b);
  const WordV w = __builtin_convertvector(__builtin_convertvector(b, HalfV), WordV);
  const WordV mag = w & 0x7Fu;
  const Vec small = __builtin_convertvector(mag, Vec) * (1.f / 512.f);
  WordV subnormal;
  std::memcpy(&subnormal, &small, sizeof subnormal);
  WordV bits = mag < 8u ? subnormal : (mag << 20) + (120u << 23);
  bits = mag == 0x7Fu ? WordV{} + 0x7FC00000u : bits;
  bits |= (w & 0x80u) << 24;
  Vec v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// Lane j of the result is the sum of all lanes of p[j]: kLanes horizontal sums in
// kLanes - 1 shuffle-and-add steps, where summing each vector on its own would take kLanes
// times as many. Each level sums pairs of lanes and packs two vectors' halves into one.
inline Vec transpose_sum(Vec p[kLanes]) {
#define AUTOGLM_PAIR(a, b, lo, hi) (__builtin_shufflevector(a, b, lo) + \
                                    __builtin_shufflevector(a, b, hi))
#ifdef __AVX512F__
#define AUTOGLM_HALVES_LO 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define AUTOGLM_HALVES_HI 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define AUTOGLM_QUARTERS_LO 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define AUTOGLM_QUARTERS_HI 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define AUTOGLM_PAIRS_LO 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define AUTOGLM_PAIRS_HI 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define AUTOGLM_EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define AUTOGLM_ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
  Vec c[8], d[4], e[2];  // partial sums of 2, 4 and 8 vectors, 8, 4 and 2 lanes each
  for (int i = 0; i < 8; ++i)
    c[i] = AUTOGLM_PAIR(p[2 * i], p[2 * i + 1], AUTOGLM_HALVES_LO, AUTOGLM_HALVES_HI);
  for (int i = 0; i < 4; ++i)
    d[i] = AUTOGLM_PAIR(c[2 * i], c[2 * i + 1], AUTOGLM_QUARTERS_LO, AUTOGLM_QUARTERS_HI);
  for (int i = 0; i < 2; ++i)
    e[i] = AUTOGLM_PAIR(d[2 * i], d[2 * i + 1], AUTOGLM_PAIRS_LO, AUTOGLM_PAIRS_HI);
  return AUTOGLM_PAIR(e[0], e[1], AUTOGLM_EVEN, AUTOGLM_ODD);
#undef AUTOGLM_QUARTERS_LO
#undef AUTOGLM_QUARTERS_HI
#else
#define AUTOGLM_HALVES_LO 0, 1, 2, 3, 8, 9, 10, 11
#define AUTOGLM_HALVES_HI 4, 5, 6, 7, 12, 13, 14, 15
#define AUTOGLM_PAIRS_LO 0, 1, 4, 5, 8, 9, 12, 13
#define AUTOGLM_PAIRS_HI 2, 3, 6, 7, 10, 11, 14, 15
#define AUTOGLM_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define AUTOGLM_ODD 1, 3, 5, 7, 9, 11, 13, 15
  Vec c[4], d[2];  // partial sums of 2 and 4 vectors, 4 and 2 lanes each
  for (int i = 0; i < 4; ++i)
    c[i] = AUTOGLM_PAIR(p[2 * i], p[2 * i + 1], AUTOGLM_HALVES_LO, AUTOGLM_HALVES_HI);
  for (int i = 0; i < 2; ++i)
    d[i] = AUTOGLM_PAIR(c[2 * i], c[2 * i + 1], AUTOGLM_PAIRS_LO, AUTOGLM_PAIRS_HI);
  return AUTOGLM_PAIR(d[0], d[1], AUTOGLM_EVEN, AUTOGLM_ODD);
#endif
#undef AUTOGLM_PAIR
#undef AUTOGLM_HALVES_LO
#undef AUTOGLM_HALVES_HI
#undef AUTOGLM_PAIRS_LO
#undef AUTOGLM_PAIRS_HI
#undef AUTOGLM_EVEN
#undef AUTOGLM_ODD
}

struct Shape {
  int64_t group;              // query heads per KV head
  int64_t kv_heads;
  int64_t block_size;
  int64_t q_seq, q_head;      // strides of q: [num_seqs, num_heads, head_dim]
  int64_t out_seq, out_head;  // strides of out, same shape
  int64_t max_blocks;         // columns of the block table
};

// The cache as the kernel reads it: K and V values [slots, kv_heads, head_dim] of type C,
// and for an int8 or float8 cache their scales [slots, kv_heads] (null for a float cache),
// slot `scale_stride` apart: kv_heads, or 0 for static scales.
template <typename C>
struct Kv {
  const C* k;
  const C* v;
  const c10::BFloat16* k_scale;
  const c10::BFloat16* v_scale;
  int64_t scale_stride;
};

template <typename C>
constexpr bool kQuantized = std::is_same_v<C, int8_t> || std::is_same_v<C, Fp8>;

// The largest of p[0..n), 16 lanes at a time: std::max in a loop vectorises only under
// -ffinite-math-only, which the build leaves off. A NaN may be passed over here, but its exp
// below is NaN all the same, and so is the row's output, as in torch.
inline float row_max(const float* p, int64_t n) {
  float m = p[0];
  int64_t t = 0;
  if (n >= kLanes) {
    Vec mv = load(p);
    for (t = kLanes; t + kLanes <= n; t += kLanes) {
      const Vec x = load(p + t);
      mv = mv > x ? mv : x;
    }
    for (int64_t i = 0; i < kLanes; ++i) m = m > mv[i] ? m : mv[i];
  }
  for (; t < n; ++t) m = m > p[t] ? m : p[t];
  return m;
}

// Softmax of each of the `rows` rows of `scores` ([rows, n]) in place; returns in `inv` the
// reciprocal of each row's sum, applied once to the output instead of to every weight.
void softmax_rows(float* scores, int64_t rows, int64_t n, float* inv) {
  for (int64_t g = 0; g < rows; ++g) {
    float* p = scores + g * n;
    const float m = row_max(p, n);
    float total = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      p[t] = std::exp(p[t] - m);
      total += p[t];
    }
    inv[g] = 1.f / total;
  }
}

// Rows j < n of a block's K or V (`rows`, slots `row` elements apart) as float32 into
// tile [n, kChunks], scaled by their slot's scale for an int8 or float8 cache (`scales`,
// slot `scale_stride` apart); rows n..pad-1 are zeroed.
template <typename C, int64_t kChunks>
void fill_tile(const C* rows, int64_t row, int64_t n, int64_t pad, const c10::BFloat16* scales,
               int64_t scale_stride, Vec* tile) {
  for (int64_t j = 0; j < n; ++j) {
    const float sc = scales != nullptr ? static_cast<float>(scales[j * scale_stride]) : 1.f;
    for (int64_t c = 0; c < kChunks; ++c)
      tile[j * kChunks + c] = load(rows + j * row + c * kLanes) * sc;
  }
  for (int64_t j = n; j < pad; ++j)
    for (int64_t c = 0; c < kChunks; ++c) tile[j * kChunks + c] = Vec{};
}

// The scores of one query head (scaled query qg [kChunks]) against a tile of kLanes keys:
// `Row(j, c)` gives chunk c of key j. The kLanes partial dot products stay in registers
// while the query's chunks go by, one chunk of every key at a time.
template <int64_t kChunks, typename Row>
inline Vec tile_scores(const Vec* qg, Row row) {
  Vec p[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) p[j] = Vec{};
  for (int64_t c = 0; c < kChunks; ++c) {
    const Vec qc = qg[c];
    for (int64_t j = 0; j < kLanes; ++j) p[j] += qc * row(j, c);
  }
  return transpose_sum(p);
}

// One (sequence, KV head) with head dim kChunks * kLanes. The `group` query heads that share
// this KV head attend together. Both passes go a tile of slots at a time and one query head
// at a time, so that head's scores or output accumulators stay in registers while the
// tile's rows come from L1. A float32 cache is read in place; other caches' rows (bfloat16,
// and int8 or float8 times their scales) are converted to float32 once per tile into
// `tile`, which the query heads then read: converting int8 or float8 takes 3-8
// instructions per 16 values, and repeating that for each of the group's query heads made
// a decode 1.7x slower than on a bfloat16 cache at group 6.
template <typename T, typename C, int64_t kChunks>
void attend(const Shape& s, const T* q, const Kv<C>& kv, const int64_t* table, int64_t ctx,
            int64_t kv_head, float scale, T* out, std::vector<Vec>& qbuf,
            std::vector<float>& fbuf) {
  constexpr int64_t D = kChunks * kLanes;
  constexpr bool kInPlace = std::is_same_v<C, float>;
  // a query head's output accumulators go kAccChunks at a time (at most), in equal groups
  constexpr int64_t kGroups = (kChunks + kAccChunks - 1) / kAccChunks;
  constexpr int64_t kWidth = kChunks / kGroups;
  static_assert(kChunks % kGroups == 0, "head dims split into equal groups of chunks");
  const int64_t G = s.group;
  qbuf.resize((2 * G + std::max(kLanes, s.block_size)) * kChunks);
  Vec* qv = qbuf.data();               // [G, kChunks] scaled queries
  Vec* acc = qv + G * kChunks;         // [G, kChunks] weighted sums of values
  Vec* tile = acc + G * kChunks;       // [max(kLanes, block_size), kChunks] float32 rows
  fbuf.resize(G * ctx + G + kLanes);
  float* scores = fbuf.data();         // [G, ctx] scores, then unnormalised weights
  float* inv = scores + G * ctx;       // [G]
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < kChunks; ++c) {
      qv[g * kChunks + c] = load(q + g * s.q_head + c * kLanes) * scale;
      acc[g * kChunks + c] = Vec{};
    }

  const int64_t row = s.kv_heads * D;  // elements between consecutive slots of a block
  const int64_t block_elems = s.block_size * row;
  const auto tile_row = [tile](int64_t j, int64_t c) { return tile[j * kChunks + c]; };
  for (int64_t t = 0; t < ctx; t += s.block_size) {
    const int64_t block = table[t / s.block_size];
    const C* kb = kv.k + block * block_elems + kv_head * D;
    const int64_t block_end = std::min(s.block_size, ctx - t);
    for (int64_t j0 = 0; j0 < block_end; j0 += kLanes) {  // a tile of up to kLanes slots
      const int64_t n = std::min(kLanes, block_end - j0);
      const C* k0 = kb + j0 * row;
      const bool in_place = kInPlace && n == kLanes;
      if (!in_place) {
        const c10::BFloat16* ks =
            kQuantized<C> ? kv.k_scale + (block * s.block_size + j0) * kv.scale_stride + kv_head
                          : nullptr;
        fill_tile<C, kChunks>(k0, row, n, kLanes, ks, kv.scale_stride, tile);
      }
      for (int64_t g = 0; g < G; ++g) {
        const Vec* qg = qv + g * kChunks;
        Vec sums;
        if constexpr (kInPlace) {
          sums = in_place ? tile_scores<kChunks>(qg, [k0, row](int64_t j, int64_t c) {
                   return load(k0 + j * row + c * kLanes);
                 })
                          : tile_scores<kChunks>(qg, tile_row);
        } else {
          sums = tile_scores<kChunks>(qg, tile_row);
        }
        std::memcpy(scores + g * ctx + t + j0, &sums, n * sizeof(float));
      }
    }
  }
  softmax_rows(scores, G, ctx, inv);
  for (int64_t t = 0; t < ctx; t += s.block_size) {
    const int64_t n = std::min(s.block_size, ctx - t);
    const int64_t block = table[t / s.block_size];
    const C* vb = kv.v + block * block_elems + kv_head * D;
    if constexpr (!kInPlace) {
      const c10::BFloat16* vs =
          kQuantized<C> ? kv.v_scale + block * s.block_size * kv.scale_stride + kv_head : nullptr;
      fill_tile<C, kChunks>(vb, row, n, n, vs, kv.scale_stride, tile);
    }
    for (int64_t c0 = 0; c0 < kChunks; c0 += kWidth) {
      for (int64_t g = 0; g < G; ++g) {
        Vec a[kWidth];
        for (int64_t c = 0; c < kWidth; ++c) a[c] = acc[g * kChunks + c0 + c];
        const float* w = scores + g * ctx + t;
        for (int64_t j = 0; j < n; ++j) {
          const Vec wj = Vec{} + w[j];
          for (int64_t c = 0; c < kWidth; ++c) {
            if constexpr (kInPlace) {
              a[c] += wj * load(vb + j * row + (c0 + c) * kLanes);
            } else {
              a[c] += wj * tile[j * kChunks + c0 + c];
            }
          }
        }
        for (int64_t c = 0; c < kWidth; ++c) acc[g * kChunks + c0 + c] = a[c];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < kChunks; ++c) {
      const Vec o = acc[g * kChunks + c] * inv[g];
      for (int64_t i = 0; i < kLanes; ++i)
        out[g * s.out_head + c * kLanes + i] = static_cast<T>(o[i]);
    }
}

template <typename T, typename C, int64_t kChunks>
void run(const Shape& s, const at::Tensor& q, const Kv<C>& kv, const at::Tensor& tables,
         const at::Tensor& lens, float scale, at::Tensor& out) {
  const T* qp = q.const_data_ptr<T>();
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, q.size(0) * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> qbuf;
    std::vector<float> fbuf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / s.kv_heads, h = task % s.kv_heads, head = h * s.group;
      attend<T, C, kChunks>(s, qp + seq * s.q_seq + head * s.q_head, kv,
                            tp + seq * s.max_blocks, lp[seq], h, scale,
                            op + seq * s.out_seq + head * s.out_head, qbuf, fbuf);
    }
  });
}

template <typename T, typename C>
void dispatch_head_dim(int64_t head_dim, const Shape& s, const at::Tensor& q, const Kv<C>& kv,
                       const at::Tensor& tables, const at::Tensor& lens, float scale,
                       at::Tensor& out) {
  switch (head_dim) {  // keep in step with DECODE_HEAD_DIMS in auto_glm/kernels/build.py
    case 16: return run<T, C, 16 / kLanes>(s, q, kv, tables, lens, scale, out);
    case 32: return run<T, C, 32 / kLanes>(s, q, kv, tables, lens, scale, out);
    case 64: return run<T, C, 64 / kLanes>(s, q, kv, tables, lens, scale, out);
    case 80: return run<T, C, 80 / kLanes>(s, q, kv, tables, lens, scale, out);
    case 96: return run<T, C, 96 / kLanes>(s, q, kv, tables, lens, scale, out);
    case 128: return run<T, C, 128 / kLanes>(s, q, kv, tables, lens, scale, out);
    case 256: return run<T, C, 256 / kLanes>(s, q, kv, tables, lens, scale, out);
  }
  TORCH_CHECK(false, "paged_decode_attention has no build for head_dim=", head_dim,
              "; supported: 16, 32, 64, 80, 96, 128, 256");
}

template <typename C>
Kv<C> kv_of(const at::Tensor& k_cache, const at::Tensor& v_cache,
            const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale) {
  return {static_cast<const C*>(k_cache.const_data_ptr()),
          static_cast<const C*>(v_cache.const_data_ptr()),
          k_scale ? k_scale->const_data_ptr<c10::BFloat16>() : nullptr,
          v_scale ? v_scale->const_data_ptr<c10::BFloat16>() : nullptr,
          k_scale ? k_scale->stride(0) : 0};
}

// Query dtype T, then the cache's: T itself, int8 or float8_e4m3fn.
template <typename T>
void dispatch_cache(const Shape& s, const at::Tensor& q, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale, const at::Tensor& tables,
                    const at::Tensor& lens, float scale, at::Tensor& out) {
  const int64_t d = q.size(2);
  switch (k_cache.scalar_type()) {
    case at::kChar: {
      const auto kv = kv_of<int8_t>(k_cache, v_cache, k_scale, v_scale);
      return dispatch_head_dim<T, int8_t>(d, s, q, kv, tables, lens, scale, out);
    }
    case at::kFloat8_e4m3fn: {
      const auto kv = kv_of<Fp8>(k_cache, v_cache, k_scale, v_scale);
      return dispatch_head_dim<T, Fp8>(d, s, q, kv, tables, lens, scale, out);
    }
    default: {
      const auto kv = kv_of<T>(k_cache, v_cache, k_scale, v_scale);
      return dispatch_head_dim<T, T>(d, s, q, kv, tables, lens, scale, out);
    }
  }
}

// The scales an int8 or float8 cache needs, and that a float cache must not get.
void check_scales(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale) {
  const auto cache_type = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == cache_type, "k_cache and v_cache must share one dtype");
  if (cache_type != at::kChar && cache_type != at::kFloat8_e4m3fn) {
    TORCH_CHECK(cache_type == q.scalar_type(),
                "q, caches and out must share one dtype (or the caches be int8 or "
                "float8_e4m3fn, with k_scale and v_scale)");
    TORCH_CHECK(!k_scale && !v_scale, "k_scale and v_scale go with an int8 or float8_e4m3fn "
                "cache, not a ", cache_type, " one");
    return;
  }
  for (const auto* scales : {&k_scale, &v_scale})
    TORCH_CHECK(scales->has_value() && (*scales)->scalar_type() == at::kBFloat16 &&
                    (*scales)->dim() == 2 && (*scales)->size(0) == k_cache.size(0) &&
                    (*scales)->size(1) == k_cache.size(1) && (*scales)->stride(1) == 1 &&
                    (*scales)->stride(0) == k_scale->stride(0) &&
                    ((*scales)->stride(0) == k_cache.size(1) || (*scales)->stride(0) == 0),
                "an ", cache_type, " cache needs k_scale and v_scale: bfloat16 [slots, "
                "kv_heads] tensors, both contiguous or both static (slot stride 0)");
}

// The kernel reads wherever the tables point: refuse any entry it would use that lies
// outside the cache, and any length the table cannot hold (cheap: one pass over the tables).
void check_tables(const at::Tensor& tables, const at::Tensor& lens, int64_t block_size,
                  int64_t num_blocks) {
  const int64_t* tp = tables.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  for (int64_t i = 0; i < tables.size(0); ++i) {
    TORCH_CHECK(lp[i] >= 1 && lp[i] <= width * block_size, "context_lens[", i, "]=", lp[i],
                " is outside 1..", width * block_size, " (the block table's capacity)");
    for (int64_t b = 0; b < (lp[i] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tp[i * width + b] >= 0 && tp[i * width + b] < num_blocks, "block_tables[", i,
                  "][", b, "]=", tp[i * width + b], " is not a block of the cache (0..",
                  num_blocks - 1, ")");
  }
}

void paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& context_lens, int64_t block_size, double scale,
                            at::Tensor& out, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale) {
  autoglm::check_kernel_dtype("paged_decode_attention", q);
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [seqs, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must be [slots, kv_heads, dim]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out need a contiguous last dim");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "q and out must share one dtype");
  check_scales(q, k_cache, v_cache, k_scale, v_scale);
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.dim() == 2 && block_tables.size(0) == q.size(0),
              "block_tables must be a contiguous int64 [seqs, max_blocks] tensor");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous() &&
                  context_lens.numel() == q.size(0),
              "context_lens must be a contiguous int64 [seqs] tensor");
  const int64_t kv_heads = k_cache.size(1);
  TORCH_CHECK(q.size(1) % kv_heads == 0 && q.size(2) == k_cache.size(2),
              "q heads must be a multiple of the cache's KV heads, with the same head dim");
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0,
              "cache slots must be whole blocks");
  check_tables(block_tables, context_lens, block_size, k_cache.size(0) / block_size);
  const Shape s{q.size(1) / kv_heads, kv_heads,      block_size,    q.stride(0),
                q.stride(1),          out.stride(0), out.stride(1), block_tables.size(1)};
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kFloat) {
    dispatch_cache<float>(s, q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens,
                          sc, out);
  } else {
    dispatch_cache<c10::BFloat16>(s, q, k_cache, v_cache, k_scale, v_scale, block_tables,
                                  context_lens, sc, out);
  }
}

}  // namespace

TORCH_LIBRARY(autoglm, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, int block_size, float scale, Tensor(a!) out, "
      "Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, &paged_decode_attention);
}
