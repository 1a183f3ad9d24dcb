// The small ops between the matmuls of a decoder layer, each one pass in C++ where torch takes
// several ops (and a Python call, a dispatch and an allocation each): on SmolLM2's 30 thin
// layers these cost more per decode step than the matmuls. Float32 only; the model files keep
// the written-out math beside each call (models/), and tests compare the two.
//   rms_norm        x / rms(x) * w
//   silu_mul        silu(gate) * up from the stacked [gate | up] rows
//   rope_cache      rotate q and k (HF's half-split pairs), write k and v into the KV cache
//   attend          softmax(q k^T * scale, masked) v for a few query rows, GQA without copies
//   decoder_layers  every layer of a decode step (Llama, GPT-2, Gemma 3) with the ops above
//
// Built for AVX-512, or for AVX2 where the CPU has no AVX-512 (build.py): the vector code comes
// in both under #if defined(__AVX512F__) / #else, AVX2's 16 lanes as two ymm (V16) so that the
// two read alike; the checks and the orchestration are shared.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if !defined(__AVX512F__)
#include "gemv.h"  // AVX2's vector helpers
#endif

namespace {

#if defined(__AVX512F__)
__mmask16 first(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// A cache row of hs values as float32, 16 at a time: the cache is float32 or float16.
inline __m512 load_row(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_row(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline void store_row(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store_row(at::Half* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp(x) to about 1 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-7 Taylor polynomial of r
// (error < 6e-9), times 2^n. Below -104 the result underflows to 0, so -inf gives 0.
__m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);       // ln2, the rest
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#else
// 16 floats as two 8-lane halves (lo: lanes 0-7), and the few operations the code below uses.
struct V16 {
  __m256 lo, hi;
};
inline V16 set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
V16 operator/(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) {  // a b + c
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 max(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }

using tinyformers::gemv::first_n;  // the maskload/maskstore mask of lanes i < n

// The first n lanes of v, the others `rest` (what AVX-512's masks do in one instruction).
inline V16 first(int64_t n, V16 v, float rest = 0.0f) {
  if (n >= 16) return v;
  const __m256 r = _mm256_set1_ps(rest);
  return {_mm256_blendv_ps(r, v.lo, _mm256_castsi256_ps(first_n(n))),
          _mm256_blendv_ps(r, v.hi, _mm256_castsi256_ps(first_n(n - 8)))};
}

// 16 values at p as float32, of which the first n exist (all for n >= 16): the others read as
// 0 and are not written. Float32 rows, or float16 cache rows (whose end goes through a copy:
// AVX2 has no 16-bit masked load or store).
inline V16 load_row(const float* p, int64_t n) {
  if (n >= 16) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  if (n <= 0) return set1(0.0f);
  return {_mm256_maskload_ps(p, first_n(n)), _mm256_maskload_ps(p + 8, first_n(n - 8))};
}
inline V16 load_row(const at::Half* p, int64_t n) {
  if (n < 16) {
    uint16_t part[16] = {};
    std::memcpy(part, p, 2 * std::max<int64_t>(n, 0));
    return load_row(reinterpret_cast<const at::Half*>(part), 16);
  }
  const __m128i* h = reinterpret_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(h)), _mm256_cvtph_ps(_mm_loadu_si128(h + 1))};
}
inline void store_row(float* p, int64_t n, V16 v) {
  if (n >= 16) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
  } else if (n > 0) {
    _mm256_maskstore_ps(p, first_n(n), v.lo);
    if (n > 8) _mm256_maskstore_ps(p + 8, first_n(n - 8), v.hi);
  }
}
inline void store_row(at::Half* p, int64_t n, V16 v) {
  uint16_t part[16];
  __m128i* h = reinterpret_cast<__m128i*>(n >= 16 ? static_cast<void*>(p) : part);
  _mm_storeu_si128(h, _mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(h + 1, _mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT));
  if (n < 16) std::memcpy(p, part, 2 * std::max<int64_t>(n, 0));
}

// The sum of the 16 lanes in _mm512_reduce_add_ps's order (halves, quarters, lanes 0 + 2 and
// 1 + 3, then those two), so a norm's sum is the AVX-512 build's to the bit; and the max.
inline float reduce_add(V16 v) {
  const __m256 a = _mm256_add_ps(v.hi, v.lo);
  __m128 s = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(V16 v) {
  const __m256 a = _mm256_max_ps(v.hi, v.lo);
  __m128 s = _mm_max_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp(x) as exp16 above computes it, with the same steps, but 2^n built from exponent bits:
// n runs from -150 (below the smallest normal exponent, -126) to 128 (above the largest, 127),
// so it is applied as 2^(n/2) 2^(n - n/2), both normal; only the second product rounds, as
// _mm512_scalef_ps rounds once, and the two agree to the bit. -inf still gives 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.7f)), _mm256_set1_ps(-104.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2, high bits
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);       // ln2, the rest
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1);
  const auto pow2 = [](__m256i e) {  // 2^e for -126 <= e <= 127
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(k1)), pow2(_mm256_sub_epi32(k, k1)));
}
inline V16 exp16(V16 x) { return {exp8(x.lo), exp8(x.hi)}; }
#endif

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() >= 1, name,
              " must be a contiguous float32 tensor");
}

// Rows of x [..., C] split over the pool only when there is enough work to pay for the wake-up.
template <typename F>
void for_rows(int64_t rows, int64_t work_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) f(r);
  });
}

#if defined(__AVX512F__)
// y = x / rms(x) * (w + plus) for one row of C values: plus 1 for Gemma, which stores its gain
// minus 1 (1 + w rounded to float32 first, as its written-out norm computes it), else 0.
void rms_norm_row(const float* xr, const float* wp, float* yr, int64_t C, double eps,
                  float plus = 0.0f) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(first(C - c), xr + c);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / float(C) + float(eps));
  const __m512 s = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = first(C - c);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + c), s);  // rms 1
    const __m512 g = _mm512_add_ps(_mm512_maskz_loadu_ps(m, wp + c), _mm512_set1_ps(plus));
    _mm512_mask_storeu_ps(yr + c, m, _mm512_mul_ps(g, v));
  }
}

// y = (x - mean) / sqrt(var + eps) * w + b for one row of C values (GPT-2's LayerNorm); the
// variance from the centred values, as torch computes it.
void layer_norm_row(const float* xr, const float* wp, const float* bp, float* yr, int64_t C,
                    double eps) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(first(C - c), xr + c));
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / float(C));
  __m512 ss = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = first(C - c);
    const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr + c), mean);
    ss = _mm512_fmadd_ps(d, d, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / float(C) + float(eps)));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = first(C - c);
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + c), mean), inv);
    _mm512_mask_storeu_ps(yr + c, m, _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, wp + c),
                                                     _mm512_maskz_loadu_ps(m, bp + c)));
  }
}
#else
void rms_norm_row(const float* xr, const float* wp, float* yr, int64_t C, double eps,
                  float plus = 0.0f) {
  V16 ss = set1(0.0f);
  for (int64_t c = 0; c < C; c += 16) {
    const V16 v = load_row(xr + c, C - c);
    ss = fmadd(v, v, ss);
  }
  const float inv = 1.0f / std::sqrt(reduce_add(ss) / float(C) + float(eps));
  for (int64_t c = 0; c < C; c += 16) {
    const V16 v = load_row(xr + c, C - c) * set1(inv);  // rms 1
    store_row(yr + c, C - c, (load_row(wp + c, C - c) + set1(plus)) * v);
  }
}

void layer_norm_row(const float* xr, const float* wp, const float* bp, float* yr, int64_t C,
                    double eps) {
  V16 s = set1(0.0f);
  for (int64_t c = 0; c < C; c += 16) s = s + load_row(xr + c, C - c);
  const V16 mean = set1(reduce_add(s) / float(C));
  V16 ss = set1(0.0f);
  for (int64_t c = 0; c < C; c += 16) {
    const V16 d = first(C - c, load_row(xr + c, C - c) - mean);
    ss = fmadd(d, d, ss);
  }
  const V16 inv = set1(1.0f / std::sqrt(reduce_add(ss) / float(C) + float(eps)));
  for (int64_t c = 0; c < C; c += 16) {
    const V16 v = (load_row(xr + c, C - c) - mean) * inv;
    store_row(yr + c, C - c, fmadd(v, load_row(wp + c, C - c), load_row(bp + c, C - c)));
  }
}
#endif

// A layer's norm of one row: the layer norm where it has a bias (GPT-2), else the RMS norm.
inline void norm_row(const float* xr, const float* wp, const float* bp, float* yr, int64_t C,
                     double eps, float plus) {
  if (bp) layer_norm_row(xr, wp, bp, yr, C, eps);
  else rms_norm_row(xr, wp, yr, C, eps, plus);
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_f32(x, "x");
  check_f32(w, "weight");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(w.numel() == C, "weight must have ", C, " values");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(rows, C, [&](int64_t r) { rms_norm_row(xp + r * C, wp, yp + r * C, C, eps); });
  return y;
}

// x += a in place (the residual add), a first normed by `post` where given (Gemma's norm after
// each sublayer); then, with a norm weight wp (bias bp: layer norm), the norm of the sum into y.
void add_norm(at::Tensor& x, const at::Tensor& a, const float* post, const float* wp,
              const float* bp, float* yp, double eps, float plus) {
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK(a.numel() == x.numel(), "residual add: shapes differ");
  float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  std::vector<float> normed(post ? C : 0);
  for (int64_t r = 0; r < rows; r++) {
    float* xr = xp + r * C;
    const float* ar = ap + r * C;
    if (post) {
      rms_norm_row(ar, post, normed.data(), C, eps, plus);
      ar = normed.data();
    }
#if defined(__AVX512F__)
    for (int64_t c = 0; c < C; c += 16) {
      const __mmask16 m = first(C - c);
      _mm512_mask_storeu_ps(xr + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, xr + c),
                                                     _mm512_maskz_loadu_ps(m, ar + c)));
    }
#else
    for (int64_t c = 0; c < C; c += 16)
      store_row(xr + c, C - c, load_row(xr + c, C - c) + load_row(ar + c, C - c));
#endif
    if (wp) norm_row(xr, wp, bp, yp + r * C, C, eps, plus);
  }
}

#if defined(__AVX512F__)
// silu(x) = x sigmoid(x) = x / (1 + exp(-x)).
inline __m512 silu16(__m512 x) {
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));  // exp(-x)
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// gelu(x) in its tanh approximation, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
// written as x sigmoid(2u) (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)), one exp.
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  const __m512 e = exp16(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));  // exp(-2u)
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#else
inline V16 silu16(V16 x) { return x / (set1(1.0f) + exp16(set1(0.0f) - x)); }

inline V16 gelu_tanh16(V16 x) {
  const V16 u = set1(0.7978845608f) * fmadd(set1(0.044715f), x * x * x, x);
  return x / (set1(1.0f) + exp16(set1(-2.0f) * u));  // x / (1 + exp(-2u))
}
#endif

// The MLP's middle: f(gate) * up from the stacked [gate | up] rows (`gated`: SwiGLU with silu,
// Gemma's GeGLU with gelu_tanh), or f(h) of plain rows (GPT-2's MLP): [..., 2H] or [..., H]
// -> [..., H].
template <class F>
at::Tensor activate(const at::Tensor& h, bool gated, F f) {
  check_f32(h, "h");
  const int64_t W = h.size(-1), H = gated ? W / 2 : W, rows = h.numel() / W;
  TORCH_CHECK(!gated || W == 2 * H, "gate_up must hold gate and up: an even width");
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = H;
  at::Tensor y = at::empty(shape, h.options());
  const float* hp = h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_rows(rows, 8 * H, [&](int64_t r) {
    const float *g = hp + r * W, *u = g + H;
#if defined(__AVX512F__)
    for (int64_t i = 0; i < H; i += 16) {
      const __mmask16 m = first(H - i);
      __m512 v = f(_mm512_maskz_loadu_ps(m, g + i));
      if (gated) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, u + i));
      _mm512_mask_storeu_ps(yp + r * H + i, m, v);
    }
#else
    for (int64_t i = 0; i < H; i += 16) {
      V16 v = f(load_row(g + i, H - i));
      if (gated) v = v * load_row(u + i, H - i);
      store_row(yp + r * H + i, H - i, v);
    }
#endif
  });
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate_up) { return activate(gate_up, true, silu16); }

at::Tensor gelu_act(const at::Tensor& h, bool gated) { return activate(h, gated, gelu_tanh16); }

at::Tensor gelu_tanh(const at::Tensor& h) { return gelu_act(h, false); }

#if defined(__AVX512F__)
// out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for halves x1, x2 of hs.
template <typename C>
void rotate_row(const float* x, const float* cos, const float* sin, C* out, int64_t hs) {
  const int64_t half = hs / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = first(half - i);
    const __m512 x1 = _mm512_maskz_loadu_ps(m, x + i), x2 = _mm512_maskz_loadu_ps(m, x + half + i);
    const __m512 a = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, cos + i));
    const __m512 b = _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, sin + i));
    store_row(out + i, m, _mm512_sub_ps(a, b));
    const __m512 c = _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(m, cos + half + i));
    const __m512 d = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(m, sin + half + i));
    store_row(out + half + i, m, _mm512_add_ps(c, d));
  }
}

// out = x, hs values, in the cache's type.
template <typename C>
void copy_row(const float* x, C* out, int64_t hs) {
  for (int64_t i = 0; i < hs; i += 16) {
    const __mmask16 m = first(hs - i);
    store_row(out + i, m, _mm512_maskz_loadu_ps(m, x + i));
  }
}
#else
template <typename C>
void rotate_row(const float* x, const float* cos, const float* sin, C* out, int64_t hs) {
  const int64_t half = hs / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const int64_t m = half - i;
    const V16 x1 = load_row(x + i, m), x2 = load_row(x + half + i, m);
    store_row(out + i, m, x1 * load_row(cos + i, m) - x2 * load_row(sin + i, m));
    const V16 c = load_row(cos + half + i, m), s = load_row(sin + half + i, m);
    store_row(out + half + i, m, x2 * c + x1 * s);
  }
}

template <typename C>
void copy_row(const float* x, C* out, int64_t hs) {
  for (int64_t i = 0; i < hs; i += 16) store_row(out + i, hs - i, load_row(x + i, hs - i));
}
#endif

void check_cache(const at::Tensor& c, int64_t B, int64_t nkv, int64_t hs) {
  TORCH_CHECK((c.scalar_type() == at::kFloat || c.scalar_type() == at::kHalf) && c.dim() == 4 &&
                  c.size(0) == B && c.size(1) == nkv && c.size(3) == hs && c.stride(3) == 1,
              "cache must be float32 or float16 [B, nkv, S, hs] with contiguous rows");
}

// A head's q or k: normed first where `norm` is given (Gemma's q/k norms, gain 1 + w), then
// rotated where `cos` is given (no rotation: GPT-2's learned positions), into out.
template <typename C>
void head_row(const float* x, const float* norm, double eps, float plus, const float* cos,
              const float* sin, C* out, int64_t hs, float* tmp) {
  if (norm) {
    rms_norm_row(x, norm, tmp, hs, eps, plus);
    x = tmp;
  }
  if (cos) rotate_row(x, cos, sin, out, hs);
  else copy_row(x, out, hs);
}

// rope_cache's work, for a cache of float32 or float16.
template <typename C>
void rope_rows(const at::Tensor& qkv, const float* cp, const float* sp, const float* qn,
               const float* kn, double eps, float plus, at::Tensor& k_cache, at::Tensor& v_cache,
               const int64_t* slot, int64_t slot_row, int64_t nh, at::Tensor& q) {
  const int64_t B = qkv.size(0), T = qkv.size(1), W = qkv.size(2);
  const int64_t nkv = k_cache.size(1), hs = k_cache.size(3);
  const float* xp = qkv.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  C *kp = k_cache.data_ptr<C>(), *vp = v_cache.data_ptr<C>();
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  for_rows(B * T, W, [&](int64_t r) {
    const int64_t b = r / T, t = r % T;
    const float *x = xp + r * W, *c = cp ? cp + r * hs : nullptr, *s = sp ? sp + r * hs : nullptr;
    std::vector<float> tmp(hs);
    for (int64_t h = 0; h < nh; h++)
      head_row(x + h * hs, qn, eps, plus, c, s, qp + ((b * nh + h) * T + t) * hs, hs, tmp.data());
    for (int64_t h = 0; h < nkv; h++) {
      const int64_t at = slot[slot_row * b + t];
      head_row(x + (nh + h) * hs, kn, eps, plus, c, s, kp + b * ks0 + h * ks1 + at * ks2, hs, tmp.data());
      copy_row(x + (nh + nkv + h) * hs, vp + b * vs0 + h * vs1 + at * vs2, hs);
    }
  });
}

// qkv [B, T, (nh + 2 nkv) hs] -> q [B, nh, T, hs]; k and v into the cache at slots pos, [T] for
// every row or [B, T] a row each (the server's rows sit at different positions). q and k are
// normed by qn, kn where given, and rotated where cos, sin [B, T, hs] (any leading shape of
// B * T rows) are defined.
at::Tensor qkv_to_cache(const at::Tensor& qkv, const at::Tensor* cos, const at::Tensor* sin,
                        at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos,
                        int64_t n_head, const float* qn, const float* kn, double eps,
                        float plus) {
  check_f32(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && pos.scalar_type() == at::kLong && pos.is_contiguous() &&
                  ((pos.dim() == 1 && pos.size(0) == qkv.size(1)) ||
                   (pos.dim() == 2 && pos.size(0) == qkv.size(0) && pos.size(1) == qkv.size(1))),
              "qkv must be [B, T, width] and pos [T] or [B, T] int64");
  const int64_t B = qkv.size(0), T = qkv.size(1), nkv = k_cache.size(1), hs = k_cache.size(3);
  const int64_t nh = n_head, S = k_cache.size(2), W = (nh + 2 * nkv) * hs;
  TORCH_CHECK(qkv.size(2) == W && hs % 2 == 0, "qkv width must be (nh + 2 nkv) * hs");
  const float *cp = nullptr, *sp = nullptr;
  if (cos) {
    check_f32(*cos, "cos");
    check_f32(*sin, "sin");
    TORCH_CHECK(cos->numel() == B * T * hs && sin->numel() == B * T * hs, "cos, sin: [B, T, hs]");
    cp = cos->data_ptr<float>();
    sp = sin->data_ptr<float>();
  }
  check_cache(k_cache, B, nkv, hs);
  check_cache(v_cache, B, nkv, hs);
  const int64_t* slot = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < pos.numel(); i++)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < S, "pos out of range");
  const int64_t slot_row = pos.dim() == 2 ? T : 0;  // row b's slots start at slot_row * b
  at::Tensor q = at::empty({B, nh, T, hs}, qkv.options());
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches must agree");
  if (k_cache.scalar_type() == at::kHalf)
    rope_rows<at::Half>(qkv, cp, sp, qn, kn, eps, plus, k_cache, v_cache, slot, slot_row, nh, q);
  else
    rope_rows<float>(qkv, cp, sp, qn, kn, eps, plus, k_cache, v_cache, slot, slot_row, nh, q);
  return q;
}

// Rotate q and k of qkv and write k and v into the cache (qkv_to_cache with rotation, no norms).
at::Tensor rope_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& pos,
                      int64_t n_head) {
  return qkv_to_cache(qkv, &cos, &sin, k_cache, v_cache, pos, n_head, nullptr, nullptr, 0.0,
                      0.0f);
}

#if defined(__AVX512F__)
// r[i] = the sum of the 16 lanes of v[i]: 16 dot products finished in 45 ops, not 16 reductions.
__m512 sum_lanes16(const __m512* v) {
  __m512 s2[8], s4[4];
  for (int i = 0; i < 8; i++)  // per 128-bit block: (v[2i] 0+2, v[2i+1] 0+2, v[2i] 1+3, ...)
    s2[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per block: the block's sum of v[4i], ..., v[4i + 3]
    const __m512d a = _mm512_castps_pd(s2[2 * i]), b = _mm512_castps_pd(s2[2 * i + 1]);
    s4[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const auto pairs = [](__m512 a, __m512 b) {  // blocks (a0 + a1, a2 + a3, b0 + b1, b2 + b3)
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return pairs(pairs(s4[0], s4[1]), pairs(s4[2], s4[3]));
}

// One piece of attention: query heads h0 .. h0 + rep of one (row, position) over the kept
// slots keep[0 .. L) of their kv head; leaves the piece's max score, sum of exp(score - max)
// and the unnormalized sum of exp(score - max) v per head, for `attend` to merge.
template <typename C>
void attend_piece(const float* q, int64_t q_head_stride, const C* kb, int64_t ks, const C* vb,
                  int64_t vs, const int32_t* keep, int64_t L, int64_t rep, int64_t hs,
                  float scale, float* top, float* total, float* acc) {
  std::vector<float> p(rep * (L + 16));  // head j's scores, then exp(score - max), at j (L + 16)
  const int64_t P = L + 16;
  for (int64_t n0 = 0; n0 < L; n0 += 16) {  // 16 keys at a time: dots summed in one vector
    for (int64_t j = 0; j < rep; j++) {
      const float* qr = q + j * q_head_stride;
      __m512 d[16];
      for (int64_t n = 0; n < 16; n++) d[n] = _mm512_setzero_ps();
      for (int64_t i = 0; i < hs; i += 16) {
        const __mmask16 mk = first(hs - i);
        const __m512 qv = _mm512_maskz_loadu_ps(mk, qr + i);
        for (int64_t n = 0; n < 16; n++)  // keep has 16 slots past L: the unrolled loop
          d[n] = _mm512_fmadd_ps(qv, load_row(kb + keep[n0 + n] * ks + i, mk), d[n]);
      }
      _mm512_storeu_ps(&p[j * P + n0], _mm512_mul_ps(sum_lanes16(d), _mm512_set1_ps(scale)));
    }
  }
  for (int64_t j = 0; j < rep; j++) {
    float* pj = &p[j * P];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t n = 0; n < L; n += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first(L - n), pj + n));
    const float m = _mm512_reduce_max_ps(mx);
    __m512 sum = _mm512_setzero_ps();  // p = exp(score - max)
    for (int64_t n = 0; n < L; n += 16) {
      const __mmask16 mk = first(L - n);
      const __m512 e = _mm512_maskz_mov_ps(
          mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, pj + n), _mm512_set1_ps(m))));
      _mm512_mask_storeu_ps(pj + n, mk, e);
      sum = _mm512_add_ps(sum, e);
    }
    top[j] = m;
    total[j] = _mm512_reduce_add_ps(sum);
    float* aj = acc + j * hs;
    for (int64_t i0 = 0; i0 < hs; i0 += 64) {  // p v, 64 columns at a time in registers
      const __mmask16 m0 = first(hs - i0), m1 = first(hs - i0 - 16);
      const __mmask16 m2 = first(hs - i0 - 32), m3 = first(hs - i0 - 48);
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t n = 0; n < L; n++) {
        const C* v = vb + keep[n] * vs + i0;
        const __m512 pn = _mm512_set1_ps(pj[n]);
        a0 = _mm512_fmadd_ps(pn, load_row(v, m0), a0);
        a1 = _mm512_fmadd_ps(pn, load_row(v + 16, m1), a1);
        a2 = _mm512_fmadd_ps(pn, load_row(v + 32, m2), a2);
        a3 = _mm512_fmadd_ps(pn, load_row(v + 48, m3), a3);
      }
      _mm512_mask_storeu_ps(aj + i0, m0, a0);
      _mm512_mask_storeu_ps(aj + i0 + 16, m1, a1);
      _mm512_mask_storeu_ps(aj + i0 + 32, m2, a2);
      _mm512_mask_storeu_ps(aj + i0 + 48, m3, a3);
    }
  }
}
#else
// r[i] = the sum of the 8 lanes of v[i], as sum_lanes16 above for 8 vectors of 8.
__m256 sum_lanes8(const __m256* v) {
  __m256 s2[4], s4[2];
  for (int i = 0; i < 4; i++)  // per 128-bit half: (v[2i] 0+2, v[2i+1] 0+2, v[2i] 1+3, ...)
    s2[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 2; i++) {  // per half: the half's sum of v[4i], ..., v[4i + 3]
    const __m256d a = _mm256_castps_pd(s2[2 * i]), b = _mm256_castps_pd(s2[2 * i + 1]);
    s4[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                          _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  return _mm256_add_ps(_mm256_permute2f128_ps(s4[0], s4[1], 0x20),   // low halves
                       _mm256_permute2f128_ps(s4[0], s4[1], 0x31));  // + high halves
}

// attend_piece above, 8 keys at a time where it takes 16: one ymm of dots per key, and 16 keys'
// accumulators would need all 16 ymm registers.
template <typename C>
void attend_piece(const float* q, int64_t q_head_stride, const C* kb, int64_t ks, const C* vb,
                  int64_t vs, const int32_t* keep, int64_t L, int64_t rep, int64_t hs,
                  float scale, float* top, float* total, float* acc) {
  std::vector<float> p(rep * (L + 16));  // head j's scores, then exp(score - max), at j (L + 16)
  const int64_t P = L + 16;
  for (int64_t n0 = 0; n0 < L; n0 += 8) {
    for (int64_t j = 0; j < rep; j++) {
      const float* qr = q + j * q_head_stride;
      __m256 d[8];
      for (int64_t n = 0; n < 8; n++) d[n] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hs; i += 16) {
        const V16 qv = load_row(qr + i, hs - i);
        for (int64_t n = 0; n < 8; n++) {  // keep has 16 slots past L: the unrolled loop
          const V16 k = load_row(kb + keep[n0 + n] * ks + i, hs - i);
          d[n] = _mm256_fmadd_ps(qv.hi, k.hi, _mm256_fmadd_ps(qv.lo, k.lo, d[n]));
        }
      }
      _mm256_storeu_ps(&p[j * P + n0], _mm256_mul_ps(sum_lanes8(d), _mm256_set1_ps(scale)));
    }
  }
  for (int64_t j = 0; j < rep; j++) {
    float* pj = &p[j * P];
    V16 mx = set1(-INFINITY);
    for (int64_t n = 0; n < L; n += 16)
      mx = max(mx, first(L - n, load_row(pj + n, L - n), -INFINITY));
    const float m = reduce_max(mx);
    V16 sum = set1(0.0f);  // p = exp(score - max)
    for (int64_t n = 0; n < L; n += 16) {
      const V16 e = first(L - n, exp16(load_row(pj + n, L - n) - set1(m)));
      store_row(pj + n, L - n, e);
      sum = sum + e;
    }
    top[j] = m;
    total[j] = reduce_add(sum);
    float* aj = acc + j * hs;
    for (int64_t i0 = 0; i0 < hs; i0 += 64) {  // p v, 64 columns at a time in registers
      V16 a0 = set1(0.0f), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t n = 0; n < L; n++) {
        const C* v = vb + keep[n] * vs + i0;
        const V16 pn = set1(pj[n]);
        a0 = fmadd(pn, load_row(v, hs - i0), a0);
        a1 = fmadd(pn, load_row(v + 16, hs - i0 - 16), a1);
        a2 = fmadd(pn, load_row(v + 32, hs - i0 - 32), a2);
        a3 = fmadd(pn, load_row(v + 48, hs - i0 - 48), a3);
      }
      store_row(aj + i0, hs - i0, a0);
      store_row(aj + i0 + 16, hs - i0 - 16, a1);
      store_row(aj + i0 + 32, hs - i0 - 32, a2);
      store_row(aj + i0 + 48, hs - i0 - 48, a3);
    }
  }
}
#endif

constexpr int64_t PIECE = 256;  // keys per piece: its v rows stay in L2 while each head reads them

// z [B, T, nh * hs] = softmax(q k^T * scale where mask, float32) v, for q [B, nh, T, hs] and
// the cache [B, nkv, S, hs] (float32 or float16): query head h reads kv head h / (nh / nkv).
// Masked slots are skipped, not computed: a decode step reads only the keys it may see. The
// kept keys are cut in pieces of PIECE, spread over the threads (one row's step at long
// context is the 2 threads' work, not one kv head each); each piece's softmax is exact with
// its own max, and the pieces merge by rescaling to the largest (Milakov & Gimelshein 2018).
template <typename C>
void attend_cache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& mask, double scale, at::Tensor& z) {
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hs = q.size(3);
  const int64_t nkv = k_cache.size(1), S = k_cache.size(2), rep = nh / nkv;
  const float* qp = q.data_ptr<float>();
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  const bool* mp = mask.data_ptr<bool>();
  float* zp = z.data_ptr<float>();
  const int64_t ms0 = mask.stride(0), ms2 = mask.stride(2), ms3 = mask.stride(3);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  std::vector<std::vector<int32_t>> keep(B * T);  // the slots (b, t) may read, in order
  struct Piece { int64_t b, t, g, n0, n1; };
  std::vector<Piece> pieces;
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++) {
      std::vector<int32_t>& kept = keep[b * T + t];
      const bool* m = mp + b * ms0 + t * ms2;
      for (int64_t s = 0; s < S; s++)
        if (m[s * ms3]) kept.push_back(int32_t(s));
      const int64_t L = kept.size();
      kept.resize(L + 16, L ? kept[L - 1] : 0);  // attend_piece reads 16 keys at a time
      for (int64_t g = 0; g < nkv; g++)
        for (int64_t n0 = 0; n0 < std::max<int64_t>(L, 1); n0 += PIECE)
          pieces.push_back({b, t, g, n0, std::min(L, n0 + PIECE)});
    }
  const int64_t np = pieces.size();
  std::vector<float> top(np * rep), total(np * rep), acc(np * rep * hs);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (PIECE * rep * hs));
  at::parallel_for(0, np, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t i = p0; i < p1; i++) {
      const Piece& c = pieces[i];
      attend_piece<C>(qp + ((c.b * nh + c.g * rep) * T + c.t) * hs, T * hs,
                      kp + c.b * ks0 + c.g * ks1, ks2, vp + c.b * vs0 + c.g * vs1, vs2,
                      keep[c.b * T + c.t].data() + c.n0, c.n1 - c.n0, rep, hs, float(scale),
                      &top[i * rep], &total[i * rep], &acc[i * rep * hs]);
    }
  });
  // Merge the pieces of each (row, position, kv head), which sit one after another.
  for (int64_t i0 = 0, i1; i0 < np; i0 = i1) {
    const Piece& c = pieces[i0];
    for (i1 = i0 + 1; i1 < np && pieces[i1].b == c.b && pieces[i1].t == c.t &&
                      pieces[i1].g == c.g; i1++) {}
    for (int64_t j = 0; j < rep; j++) {
      float m = -INFINITY, sum = 0;
      for (int64_t i = i0; i < i1; i++) m = std::max(m, top[i * rep + j]);
      std::vector<float> w(i1 - i0);
      for (int64_t i = i0; i < i1; i++) {
        w[i - i0] = top[i * rep + j] == -INFINITY ? 0.0f : std::exp(top[i * rep + j] - m);
        sum += w[i - i0] * total[i * rep + j];
      }
      const float inv = sum > 0 ? 1.0f / sum : 0.0f;  // no slot to read: z = 0
      float* zr = zp + (c.b * T + c.t) * nh * hs + (c.g * rep + j) * hs;
      for (int64_t h = 0; h < hs; h++) {
        float s = 0;
        for (int64_t i = i0; i < i1; i++) s += w[i - i0] * acc[(i * rep + j) * hs + h];
        zr[h] = s * inv;
      }
    }
  }
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& mask, double scale) {
  check_f32(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be [B, nh, T, hs]");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hs = q.size(3);
  const int64_t nkv = k_cache.size(1), S = k_cache.size(2);
  check_cache(k_cache, B, nkv, hs);
  check_cache(v_cache, B, nkv, hs);
  TORCH_CHECK(nh % nkv == 0 && v_cache.size(2) == S && v_cache.scalar_type() == k_cache.scalar_type(),
              "query heads must group over kv heads, and k and v caches agree");
  TORCH_CHECK(S < (int64_t(1) << 31), "at most 2^31 cache slots");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && mask.size(0) == B &&
                  mask.size(1) == 1 && mask.size(2) == T && mask.size(3) == S,
              "mask must be bool [B, 1, T, S]");
  at::Tensor z = at::empty({B, T, nh * hs}, q.options());
  if (k_cache.scalar_type() == at::kHalf)
    attend_cache<at::Half>(q, k_cache, v_cache, mask, scale, z);
  else
    attend_cache<float>(q, k_cache, v_cache, mask, scale, z);
  return z;
}

}  // namespace

namespace tinyformers {
at::Tensor packed_linear(const at::Tensor& x, int64_t fmt, const at::Tensor& w,
                         const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& bias, int64_t n, int64_t group_size);
}

namespace {

// Per layer: the norms' weights (absent ones None), then data, scales, bias of each matrix.
constexpr int64_t NORMS = 8, WEIGHTS = NORMS + 4 * 3, META = 4 * 3;
enum Norm { LN1, LN1_BIAS, LN2, LN2_BIAS, ATTN_POST, MLP_POST, Q_NORM, K_NORM };
enum Act { SILU_GATED, GELU_GATED, GELU };  // the MLP's middle: silu(gate) * up, ...

const float* data_or_null(const std::optional<at::Tensor>& t, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_f32(*t, "norm weight or bias");
  TORCH_CHECK(t->numel() == n, "a norm's weight has ", t->numel(), " values, expected ", n);
  return t->data_ptr<float>();
}

// One decoder layer for a few query rows (decode): what Block.forward computes, with the ops
// above and the packed matmuls (gemv.cpp), without a Python call between them.
//   x + post1(o(attend(rope(norm q, k of qkv(ln1(x))))))  then  + post2(down(act(up(ln2(x)))))
//   w = the layer's WEIGHTS entries (Norm's order, then qkv, o, up (or gate_up), down)
//   meta = [format, n, group size] of each of the four matrices (packed_linear's)
at::Tensor decoder_layer(const at::Tensor& x_in, const std::optional<at::Tensor>* w,
                         const int64_t* meta, at::Tensor& k_cache, at::Tensor& v_cache,
                         const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                         const at::Tensor& pos, const at::Tensor& mask, int64_t act,
                         int64_t n_head, float plus, double eps, double scale) {
  const auto lin = [&](int j, const at::Tensor& h) {
    const std::optional<at::Tensor>* m = w + NORMS + 3 * j;
    return tinyformers::packed_linear(h, meta[3 * j], *m[0], m[1], m[2], meta[3 * j + 1],
                                      meta[3 * j + 2]);
  };
  const int64_t C = x_in.size(-1), hs = k_cache.size(3);
  TORCH_CHECK(w[LN1].has_value() && w[LN2].has_value(), "a layer needs its two norms");
  const float *ln1 = data_or_null(w[LN1], C), *ln1_b = data_or_null(w[LN1_BIAS], C);
  const float *ln2 = data_or_null(w[LN2], C), *ln2_b = data_or_null(w[LN2_BIAS], C);
  const float *post1 = data_or_null(w[ATTN_POST], C), *post2 = data_or_null(w[MLP_POST], C);
  const float *qn = data_or_null(w[Q_NORM], hs), *kn = data_or_null(w[K_NORM], hs);
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin: both or neither");
  at::Tensor x = x_in.clone(at::MemoryFormat::Contiguous);  // the residual stream, added to below
  at::Tensor h = at::empty_like(x);  // the normed stream each sublayer reads
  const int64_t rows = x.numel() / C;
  float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>();
  for (int64_t r = 0; r < rows; r++) norm_row(xp + r * C, ln1, ln1_b, hp + r * C, C, eps, plus);
  const at::Tensor q = qkv_to_cache(lin(0, h), cos ? &*cos : nullptr, sin ? &*sin : nullptr,
                                    k_cache, v_cache, pos, n_head, qn, kn, eps, plus);
  add_norm(x, lin(1, attend(q, k_cache, v_cache, mask, scale)), post1, ln2, ln2_b, hp, eps, plus);
  const at::Tensor up = lin(2, h);
  const at::Tensor mid = act == SILU_GATED ? silu_mul(up) : gelu_act(up, act == GELU_GATED);
  add_norm(x, lin(3, mid), post2, nullptr, nullptr, nullptr, eps, plus);
  return x;
}

// Every decoder layer in turn, one call per decode step (or one layer a call): layer i reads
// WEIGHTS entries of weights from WEIGHTS i, META of meta from META i, its own caches, angles
// (None: no rotation), mask and score scale. kind = [activation (Act), n_head, plus (1: the
// RMS norms' gain is 1 + w, Gemma's)]; the norms are layer norms where their biases are given.
at::Tensor decoder_layers(const at::Tensor& x_in,
                          const c10::List<std::optional<at::Tensor>>& weights, at::IntArrayRef meta,
                          at::TensorList k_caches, at::TensorList v_caches,
                          const c10::List<std::optional<at::Tensor>>& cos,
                          const c10::List<std::optional<at::Tensor>>& sin, const at::Tensor& pos,
                          at::TensorList masks, at::IntArrayRef kind, double eps,
                          at::ArrayRef<double> scales) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 3, "x must be float32 [B, T, C]");
  const int64_t n = k_caches.size();
  TORCH_CHECK(int64_t(weights.size()) == WEIGHTS * n && int64_t(meta.size()) == META * n &&
                  int64_t(v_caches.size()) == n && int64_t(masks.size()) == n &&
                  int64_t(cos.size()) == n && int64_t(sin.size()) == n &&
                  int64_t(scales.size()) == n && kind.size() == 3,
              "per layer: 8 norms + 4 x 3 tensors, 12 ints, caches, angles, a mask, a scale; "
              "kind: [activation, n_head, plus]");
  TORCH_CHECK(kind[0] >= SILU_GATED && kind[0] <= GELU, "unknown activation ", kind[0]);
  const std::vector<std::optional<at::Tensor>> w(weights.begin(), weights.end());
  at::Tensor x = x_in;
  for (int64_t i = 0; i < n; i++) {
    at::Tensor k = k_caches[i], v = v_caches[i];
    std::optional<at::Tensor> c = cos[i], s = sin[i];
    if (c) c = c->contiguous();
    if (s) s = s->contiguous();
    x = decoder_layer(x, w.data() + WEIGHTS * i, meta.data() + META * i, k, v, c, s, pos,
                      masks[i], kind[0], kind[1], float(kind[2]), eps, scales[i]);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyformers, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("gelu_tanh(Tensor h) -> Tensor");
  m.def("rope_cache(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache,"
        " Tensor pos, int n_head) -> Tensor");
  m.def("attend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor mask, float scale) -> Tensor");
  m.def("decoder_layers(Tensor x, Tensor?[] weights, int[] meta, Tensor(a!)[] k_caches,"
        " Tensor(b!)[] v_caches, Tensor?[] cos, Tensor?[] sin, Tensor pos, Tensor[] masks,"
        " int[] kind, float eps, float[] scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyformers, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("gelu_tanh", &gelu_tanh);
  m.impl("rope_cache", &rope_cache);
  m.impl("attend", &attend);
  m.impl("decoder_layers", &decoder_layers);
}
