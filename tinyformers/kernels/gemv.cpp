// Small-M matmul y[M, N] = x[M, K] @ W^T (+ bias) for decode: the weight is streamed once from
// memory in the blocked layouts written by packed.py, so speed = weight bytes / bandwidth.
//
// Layouts (one block = NB consecutive output rows, stored as one contiguous stream):
//   f32   [N/32][K][32]        float       acc[m] += x[m, k] * w[k, :]          (vfmadd231ps)
//   bf16  [N/32][K/2][32][2]   bf16 pairs  acc[m] += x[m, k:k+2] . w[k/2, :, :] (vdpbf16ps)
//   int8  [N/16][K/4][16][4]   w + 128 u8  acc[m] += x8[m, k:k+4] . w[k/4, :, :] (vpdpbusd)
//         scales [N/16][K/G][16] fp16, one per G input columns of each output row
//   q4    [N/16][K/32][4][16][4] nibbles: byte j holds quad j (low) and quad j + 4 (high)
//         scales [N/16][K/32][2][16] fp16: d then m, w = d * q + m (GGUF Q4_1; Q4_0: m = -8d)
//   q5_0 ... q6_k: the q4 layout with bit planes and wider scales, in kquant.cpp
// Rows of x are processed 8 at a time (the microkernel's register budget); for M > 8 each
// block is reused from cache for the next 8 rows, so the weight still leaves DRAM once.
// On AVX2 (the #else halves below) the same layouts are read 8 outputs to a ymm register: bf16
// widened to float32 for vfmadd231ps, int8 products summed by vpmaddubsw and vpmaddwd.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include "gemv.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using namespace tinyformers::gemv;

#if defined(__AVX512F__)
// The 32 outputs of one f32 or bf16 block row, of which n exist.
void store32(float* y, const float* bias, const __m512 (&acc)[2], int64_t n) {
  store(y, bias, acc[0], n);
  store(y + 16, bias ? bias + 16 : nullptr, acc[1], n - 16);
}

// ---- f32 and bf16: one tile loop, two kinds of step along K. A block is [steps][32] of
// Step::W: f32, one column a step (x broadcast as a float); bf16, a pair of columns a step
// (x arrives as bf16 pairs, one uint32 per two columns, and vdpbf16ps sums the pair).
struct F32Step {
  using W = float;
  using X = float;
  static __m512 load(const W* w) { return _mm512_loadu_ps(w); }
  static __m512 broadcast(X x) { return _mm512_set1_ps(x); }
  static __m512 fma(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }
};

struct BF16Step {
  using W = uint32_t;
  using X = uint32_t;
  static __m512bh load(const W* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static __m512bh broadcast(X x) { return (__m512bh)_mm512_set1_epi32(int(x)); }
  static __m512 fma(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
};

// A block's steps in STREAMS runs, each summed from zero into its own accumulators, step by
// step; the steps left over (fewer than STREAMS) go on run 0's sum; the runs' sums are then
// added in order. One order of sums for every row count, so a row of x gets the same bits
// alone or in a batch.
// subtle: one row of x (a decode step) reads the runs side by side: one run at a time is one
// address stream per core, with nothing else to overlap the memory's latency; four keep four
// streams in flight. On the Intel Xeon (Emerald Rapids, 2 cores), ours / torch's best in the
// same run (benchmarks/kernels.py, one row): f32 0.82-0.90x -> 0.92-1.00x, bf16 1.66-1.98x ->
// 1.87-2.24x. More rows reuse each load M times and read the runs one after another.
constexpr int64_t STREAMS = 4;

template <class Step>
void tile_one_row(const typename Step::X* x, int64_t steps, const typename Step::W* w,
                  const float* bias, float* y, int64_t n) {
  const int64_t run = steps / STREAMS;
  __m512 acc[STREAMS][2];
  for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < run; k++) {
    for (int64_t s = 0; s < STREAMS; s++) {
      const typename Step::W* ws = w + (s * run + k) * 32;
      prefetch_ahead(ws);  // a step reads two cache lines
      prefetch_ahead(ws + 16);
      const auto xs = Step::broadcast(x[s * run + k]);
      acc[s][0] = Step::fma(acc[s][0], Step::load(ws), xs);
      acc[s][1] = Step::fma(acc[s][1], Step::load(ws + 16), xs);
    }
  }
  for (int64_t k = STREAMS * run; k < steps; k++) {
    const auto xk = Step::broadcast(x[k]);
    acc[0][0] = Step::fma(acc[0][0], Step::load(w + k * 32), xk);
    acc[0][1] = Step::fma(acc[0][1], Step::load(w + k * 32 + 16), xk);
  }
  for (int64_t s = 1; s < STREAMS; s++) {
    acc[0][0] = _mm512_add_ps(acc[0][0], acc[s][0]);
    acc[0][1] = _mm512_add_ps(acc[0][1], acc[s][1]);
  }
  store32(y, bias, acc[0], n);
}

// M rows of x [M, steps] times one block; two zmm of outputs per row of x.
template <class Step, int M>
void tile(const typename Step::X* x, int64_t steps, const typename Step::W* w, const float* bias,
          float* y, int64_t ldy, int64_t n) {
  if constexpr (M == 1) return tile_one_row<Step>(x, steps, w, bias, y, n);
  __m512 acc[M][2], sum[M][2];
  const auto add_steps = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; k++) {
      prefetch_ahead(w + k * 32);
      prefetch_ahead(w + k * 32 + 16);
      const auto w0 = Step::load(w + k * 32), w1 = Step::load(w + k * 32 + 16);
      for (int m = 0; m < M; m++) {
        const auto xm = Step::broadcast(x[m * steps + k]);
        acc[m][0] = Step::fma(acc[m][0], w0, xm);
        acc[m][1] = Step::fma(acc[m][1], w1, xm);
      }
    }
  };
  const int64_t run = steps / STREAMS;
  for (int64_t s = 0; s < STREAMS; s++) {
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    add_steps(s * run, (s + 1) * run);
    if (s == 0) add_steps(STREAMS * run, steps);
    for (int m = 0; m < M; m++) {
      sum[m][0] = s == 0 ? acc[m][0] : _mm512_add_ps(sum[m][0], acc[m][0]);
      sum[m][1] = s == 0 ? acc[m][1] : _mm512_add_ps(sum[m][1], acc[m][1]);
    }
  }
  for (int m = 0; m < M; m++) store32(y + m * ldy, bias, sum[m], n);
}

// x rows [M, K] float -> [M, kpairs] bf16 pairs, rounded to nearest even, odd K padded with 0.
std::vector<uint32_t> to_bf16_pairs(const float* x, int64_t M, int64_t K, int64_t kpairs) {
  std::vector<uint32_t> out(M * kpairs);
  auto* dst = reinterpret_cast<uint16_t*>(out.data());
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < 2 * kpairs; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(first_n(K - k), x + m * K + k);
      const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(dst + m * 2 * kpairs + k, first_n(2 * kpairs - k), b);
    }
  return out;
}

#else  // AVX2: a block row of 32 outputs is 4 ymm; bf16 is widened to float32 for the FMAs

// f32 and bf16 as above, 8 outputs a step instead of 16; an AVX2 tile walks its rows 2 at a time
// (8 accumulators, the weights and the broadcasts fill 14 of the 16 ymm).
struct F32Step {
  using W = float;
  using X = float;
  static __m256 load(const W* w) { return _mm256_loadu_ps(w); }
  static __m256 broadcast(X x) { return _mm256_set1_ps(x); }
  static __m256 fma(__m256 acc, __m256 w, __m256 x) { return _mm256_fmadd_ps(w, x, acc); }
};

// A bf16 is the top half of a float32: of a stored pair (one uint32), the even column is
// u << 16 and the odd one u & 0xffff0000, both exact float32s.
struct BF16Step {
  using W = uint32_t;
  using X = uint32_t;
  struct Pair {
    __m256 even, odd;
  };
  static Pair widen(__m256i u) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int(0xffff0000))))};
  }
  static Pair load(const W* w) { return widen(_mm256_loadu_si256((const __m256i*)w)); }
  static Pair broadcast(X x) { return widen(_mm256_set1_epi32(int(x))); }
  // odd then even, in vdpbf16ps's order; the products of two bf16s are exact in float32
  static __m256 fma(__m256 acc, Pair w, Pair x) {
    return _mm256_fmadd_ps(w.even, x.even, _mm256_fmadd_ps(w.odd, x.odd, acc));
  }
};

template <class Step, int M>
void tile(const typename Step::X* x, int64_t steps, const typename Step::W* w, const float* bias,
          float* y, int64_t ldy, int64_t n) {
  in_groups<M, 2>([&]<int R>(int r0) {
    const typename Step::X* xr = x + r0 * steps;
    __m256 acc[R][4];
    for (int m = 0; m < R; m++)
      for (int i = 0; i < 4; i++) acc[m][i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < steps; k++) {
      decltype(Step::broadcast(0)) xm[R];
      for (int m = 0; m < R; m++) xm[m] = Step::broadcast(xr[m * steps + k]);
      for (int i = 0; i < 4; i++) {
        const auto wi = Step::load(w + k * 32 + 8 * i);
        for (int m = 0; m < R; m++) acc[m][i] = Step::fma(acc[m][i], wi, xm[m]);
      }
    }
    for (int m = 0; m < R; m++) store_block(y + (r0 + m) * ldy, bias, acc[m], n);
  });
}

// float32 bits -> bf16 bits, rounded to nearest even in integers (AVX2 has no vcvtneps2bf16):
// add 0x7fff and the kept half's lowest bit, keep the top half. inf stays inf (NaN may not).
inline uint16_t round_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

inline __m256i round_bf16(__m256 v) {  // 8 at once, in the low half of each 32-bit lane
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
  return _mm256_srli_epi32(rounded, 16);
}

// x rows [M, K] float -> [M, kpairs] bf16 pairs, rounded to nearest even, odd K padded with 0.
std::vector<uint32_t> to_bf16_pairs(const float* x, int64_t M, int64_t K, int64_t kpairs) {
  std::vector<uint32_t> out(M * kpairs);
  for (int64_t m = 0; m < M; m++) {
    const float* xm = x + m * K;
    auto* dst = reinterpret_cast<uint16_t*>(out.data() + m * kpairs);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256i lo = round_bf16(_mm256_loadu_ps(xm + k));
      const __m256i hi = round_bf16(_mm256_loadu_ps(xm + k + 8));
      // packus interleaves the 128-bit lanes (lo 0-3, hi 0-3, lo 4-7, hi 4-7): the permute
      // puts them back in order
      const __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
      _mm256_storeu_si256((__m256i*)(dst + k), b);
    }
    for (; k < K; k++) dst[k] = round_bf16(xm[k]);
  }
  return out;
}

#endif

// ---- int8 and q4: x is quantised per row and per group of G columns, like llama.cpp's q8_0:
// x ~= sx * q with q in [-127, 127]. vpdpbusd multiplies unsigned by signed bytes, so the
// int8 weight is stored as w + 128 (unsigned) and the extra 128 * sum(q) is subtracted by
// starting each group's accumulator at -128 * sum(q); q4 weights are unsigned already.
struct QuantRows {
  std::vector<int8_t> q;      // [M, Kp]
  std::vector<float> scale;   // [M, ngroups]
  std::vector<int32_t> sum;   // [M, ngroups]
};

#if defined(__AVX512F__)
QuantRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t G) {
  const int64_t ng = Kp / G;
  QuantRows r{std::vector<int8_t>(M * Kp), std::vector<float>(M * ng),
              std::vector<int32_t>(M * ng)};
  for (int64_t m = 0; m < M; m++) {
    const float* xm = x + m * K;
    for (int64_t g = 0; g < ng; g++) {
      const int64_t k0 = g * G, k1 = k0 + G;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(
                                       first_n(std::min(k1, K) - k), xm + k)));
      const float d = _mm512_reduce_max_ps(amax) / 127.0f;
      const __m512 inv = _mm512_set1_ps(d > 0 ? 1.0f / d : 0.0f);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(first_n(std::min(k1, K) - k), xm + k);
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // nearest even
        _mm512_mask_cvtsepi32_storeu_epi8(r.q.data() + m * Kp + k, first_n(k1 - k), q);
        sum = _mm512_add_epi32(sum, q);
      }
      r.scale[m * ng + g] = d;
      r.sum[m * ng + g] = _mm512_reduce_add_epi32(sum);
    }
  }
  return r;
}

template <int M>
void int8_tile(const QuantRows& xr, int64_t m0, int64_t Kp, int64_t G, const uint8_t* w,
               const uint16_t* scales, const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t ng = Kp / G, quads = G / 4;
  const int8_t* xq = xr.q.data() + m0 * Kp;
  const float* sx = xr.scale.data() + m0 * ng;
  const int32_t* sum = xr.sum.data() + m0 * ng;
  __m512 acc[M];
  for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m512i iacc[M];
    for (int m = 0; m < M; m++) iacc[m] = _mm512_set1_epi32(-128 * sum[m * ng + g]);
    const uint8_t* wg = w + g * G * 16;
    prefetch_ahead(scales + g * 16);
    for (int64_t p = 0; p < quads; p++) {
      prefetch_ahead(wg + p * 64);
      const __m512i wq = _mm512_loadu_si512(wg + p * 64);
      for (int m = 0; m < M; m++) {
        int32_t x4;
        std::memcpy(&x4, xq + m * Kp + g * G + p * 4, 4);
        iacc[m] = dpbusd(iacc[m], wq, _mm512_set1_epi32(x4));
      }
    }
    const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(scales + g * 16)));
    for (int m = 0; m < M; m++) {
      const __m512 s = _mm512_mul_ps(sw, _mm512_set1_ps(sx[m * ng + g]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), s, acc[m]);
    }
  }
  for (int m = 0; m < M; m++) store(y + m * ldy, bias, acc[m], n);
}

template <int M>
void q4_tile(const QuantRows& xr, int64_t m0, int64_t Kp, const uint8_t* w, const uint16_t* dm,
             const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t ng = Kp / 32;
  const int8_t* xq = xr.q.data() + m0 * Kp;
  const float* sx = xr.scale.data() + m0 * ng;
  const int32_t* sum = xr.sum.data() + m0 * ng;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc[M];
  for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    __m512i iacc[M];
    for (int m = 0; m < M; m++) iacc[m] = _mm512_setzero_si512();
    prefetch_ahead(dm + g * 32);
    for (int64_t j = 0; j < 4; j++) {
      prefetch_ahead(w + g * 256 + j * 64);
      const __m512i v = _mm512_loadu_si512(w + g * 256 + j * 64);
      const __m512i lo = _mm512_and_si512(v, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int m = 0; m < M; m++) {
        int32_t x4[2];
        std::memcpy(&x4[0], xq + m * Kp + g * 32 + j * 4, 4);
        std::memcpy(&x4[1], xq + m * Kp + g * 32 + j * 4 + 16, 4);
        iacc[m] = dpbusd(iacc[m], lo, _mm512_set1_epi32(x4[0]));
        iacc[m] = dpbusd(iacc[m], hi, _mm512_set1_epi32(x4[1]));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dm + g * 32)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dm + g * 32 + 16)));
    for (int m = 0; m < M; m++) {
      const float s = sx[m * ng + g];
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(s));
      const __m512 xsum = _mm512_set1_ps(s * float(sum[m * ng + g]));  // sum(x) over the group
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), ds, acc[m]);  // d * sum(q * x)
      acc[m] = _mm512_fmadd_ps(mn, xsum, acc[m]);                         // m * sum(x)
    }
  }
  for (int m = 0; m < M; m++) store(y + m * ldy, bias, acc[m], n);
}

#else  // AVX2

QuantRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t G) {
  const int64_t ng = Kp / G;
  QuantRows r{std::vector<int8_t>(M * Kp), std::vector<float>(M * ng),
              std::vector<int32_t>(M * ng)};
  for (int64_t m = 0; m < M; m++) {
    const float* xm = x + m * K;
    for (int64_t g = 0; g < ng; g++) {
      const int64_t k0 = g * G, k1 = k0 + G;
      __m256 amax = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; k += 8)
        amax = _mm256_max_ps(amax, abs_ps(load8(xm + k, std::min(k1, K) - k)));
      const float d = reduce_max(amax) / 127.0f;
      const __m256 inv = _mm256_set1_ps(d > 0 ? 1.0f / d : 0.0f);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = k0; k < k1; k += 8) {
        const __m256 v = load8(xm + k, std::min(k1, K) - k);
        const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));  // nearest even
        store_i8(r.q.data() + m * Kp + k, q, k1 - k);
        sum = _mm256_add_epi32(sum, q);
      }
      r.scale[m * ng + g] = d;
      r.sum[m * ng + g] = reduce_add(sum);
    }
  }
  return r;
}

// AVX2 has no vpdpbusd, and vpmaddubsw (unsigned x signed bytes, pairs summed to int16)
// saturates: 255 * 127 * 2 does not fit. So it takes the signed w (the stored byte xor 0x80)
// as |w| <= 128 times x * sign(w): 128 * 127 * 2 fits, the sums are exact, and no -128 * sum(q)
// start is needed. Two rows of x at a time.
template <int M>
void int8_tile(const QuantRows& xr, int64_t m0, int64_t Kp, int64_t G, const uint8_t* w,
               const uint16_t* scales, const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t ng = Kp / G, quads = G / 4;
  in_groups<M, 2>([&]<int R>(int r0) {
    const int8_t* xq = xr.q.data() + (m0 + r0) * Kp;
    const float* sx = xr.scale.data() + (m0 + r0) * ng;
    __m256 acc[R][2];  // rows 0-7 and 8-15 of the block
    for (int m = 0; m < R; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
      __m256i iacc[R][2];
      for (int m = 0; m < R; m++) iacc[m][0] = iacc[m][1] = _mm256_setzero_si256();
      const uint8_t* wg = w + g * G * 16;
      for (int64_t p = 0; p < quads; p++) {
        __m256i xp[R];
        for (int m = 0; m < R; m++) xp[m] = broadcast4(xq + m * Kp + g * G + p * 4);
        for (int h = 0; h < 2; h++) {
          const __m256i u = _mm256_loadu_si256((const __m256i*)(wg + p * 64 + h * 32));
          const __m256i ws = _mm256_xor_si256(u, _mm256_set1_epi8(char(0x80)));  // w
          const __m256i wa = _mm256_abs_epi8(ws);  // |w| as unsigned: 128 stays 128
          for (int m = 0; m < R; m++) {
            const __m256i prod = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(xp[m], ws));
            iacc[m][h] = _mm256_add_epi32(iacc[m][h], sum_pairs(prod));
          }
        }
      }
      for (int h = 0; h < 2; h++) {
        const auto* sg = (const __m128i*)(scales + g * 16 + h * 8);
        const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(sg));
        for (int m = 0; m < R; m++) {
          const __m256 s = _mm256_mul_ps(sw, _mm256_set1_ps(sx[m * ng + g]));
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m][h]), s, acc[m][h]);
        }
      }
    }
    for (int m = 0; m < R; m++) store_block(y + (r0 + m) * ldy, bias, acc[m], n);
  });
}

template <int M>
void q4_tile(const QuantRows& xr, int64_t m0, int64_t Kp, const uint8_t* w, const uint16_t* dm,
             const float* bias, float* y, int64_t ldy, int64_t n) {
  const int64_t ng = Kp / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  in_groups<M, 2>([&]<int R>(int r0) {
    const int8_t* xq = xr.q.data() + (m0 + r0) * Kp;
    const float* sx = xr.scale.data() + (m0 + r0) * ng;
    const int32_t* sum = xr.sum.data() + (m0 + r0) * ng;
    __m256 acc[R][2];
    for (int m = 0; m < R; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
      // q <= 15 and |x| <= 127: a group's 16 products per int16 lane sum to at most 30480, so
      // vpmaddubsw's pair sums add up in int16, widened once per group
      __m256i isum[R][2];
      for (int m = 0; m < R; m++) isum[m][0] = isum[m][1] = _mm256_setzero_si256();
      for (int64_t j = 0; j < 4; j++) {
        __m256i xlo[R], xhi[R];
        for (int m = 0; m < R; m++) {
          xlo[m] = broadcast4(xq + m * Kp + g * 32 + j * 4);
          xhi[m] = broadcast4(xq + m * Kp + g * 32 + j * 4 + 16);
        }
        for (int h = 0; h < 2; h++) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(w + g * 256 + j * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int m = 0; m < R; m++) {
            const __m256i both = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo[m]),
                                                  _mm256_maddubs_epi16(hi, xhi[m]));
            isum[m][h] = _mm256_add_epi16(isum[m][h], both);
          }
        }
      }
      for (int h = 0; h < 2; h++) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dm + g * 32 + h * 8)));
        const __m256 mn =
            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dm + g * 32 + 16 + h * 8)));
        for (int m = 0; m < R; m++) {
          const float s = sx[m * ng + g];
          const __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(s));
          const __m256 xsum = _mm256_set1_ps(s * float(sum[m * ng + g]));  // sum(x), the group
          const __m256i q = sum_pairs(isum[m][h]);
          acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), ds, acc[m][h]);  // d * sum(q * x)
          acc[m][h] = _mm256_fmadd_ps(mn, xsum, acc[m][h]);                  // m * sum(x)
        }
      }
    }
    for (int m = 0; m < R; m++) store_block(y + (r0 + m) * ldy, bias, acc[m], n);
  });
}

#endif

// ---- ops. Shapes and dtypes are checked in Python (packing.py); these checks guard memory.

at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                    int64_t n) {
  check_x(x);
  const int64_t K = x.size(-1), M = x.numel() / K, nblk = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 3 &&
                  w.size(1) == K && w.size(2) == 32 && nblk * 32 >= n,
              "f32 weight must be [ceil(N/32), K, 32]");
  const float* b = bias_ptr(bias, n);
  at::Tensor y = empty_out(x, n);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_blocks(M, nblk, K * 32 * 4, [&](int64_t blk, int64_t m0, int64_t rows) {
    with_rows(rows, [&]<int R>() {
      tile<F32Step, R>(xp + m0 * K, K, wp + blk * K * 32, b ? b + blk * 32 : nullptr,
                       yp + m0 * n + blk * 32, n, n - blk * 32);
    });
  });
  return y;
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& w,
                     const std::optional<at::Tensor>& bias, int64_t n) {
  check_x(x);
  const int64_t K = x.size(-1), M = x.numel() / K, nblk = w.size(0), kpairs = w.size(1);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 4 &&
                  kpairs == (K + 1) / 2 && w.size(2) == 32 && w.size(3) == 2 && nblk * 32 >= n,
              "bf16 weight must be [ceil(N/32), ceil(K/2), 32, 2]");
  const float* b = bias_ptr(bias, n);
  at::Tensor y = empty_out(x, n);
  const std::vector<uint32_t> xb = to_bf16_pairs(x.data_ptr<float>(), M, K, kpairs);
  const auto* wp = static_cast<const uint32_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  for_blocks(M, nblk, kpairs * 32 * 4, [&](int64_t blk, int64_t m0, int64_t rows) {
    with_rows(rows, [&]<int R>() {
      tile<BF16Step, R>(xb.data() + m0 * kpairs, kpairs, wp + blk * kpairs * 32,
                        b ? b + blk * 32 : nullptr, yp + m0 * n + blk * 32, n, n - blk * 32);
    });
  });
  return y;
}

at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, int64_t n, int64_t group_size) {
  check_x(x);
  const int64_t K = x.size(-1), M = x.numel() / K, nblk = w.size(0), Kp = w.size(1) * 4;
  const int64_t G = group_size;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 4 &&
                  w.size(2) == 16 && w.size(3) == 4 && nblk * 16 >= n,
              "int8 weight must be [ceil(N/16), Kp/4, 16, 4] uint8");
  TORCH_CHECK(G > 0 && G % 4 == 0 && Kp % G == 0 && Kp >= K && Kp - K < G,
              "group size must be a multiple of 4 dividing the padded K");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == nblk * (Kp / G) * 16,
              "int8 scales must be [ceil(N/16), Kp/G, 16] float16");
  const float* b = bias_ptr(bias, n);
  at::Tensor y = empty_out(x, n);
  const QuantRows xr = quantize_rows(x.data_ptr<float>(), M, K, Kp, G);
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const auto* sp = static_cast<const uint16_t*>(scales.data_ptr());
  float* yp = y.data_ptr<float>();
  for_blocks(M, nblk, Kp * 16, [&](int64_t blk, int64_t m0, int64_t rows) {
    with_rows(rows, [&]<int R>() {
      int8_tile<R>(xr, m0, Kp, G, wp + blk * Kp * 16, sp + blk * (Kp / G) * 16,
                   b ? b + blk * 16 : nullptr, yp + m0 * n + blk * 16, n, n - blk * 16);
    });
  });
  return y;
}

at::Tensor gemv_q4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const std::optional<at::Tensor>& bias, int64_t n) {
  check_x(x);
  const int64_t K = x.size(-1), M = x.numel() / K, nblk = w.size(0), Kp = w.size(1) * 32;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 5 &&
                  w.size(2) == 4 && w.size(3) == 16 && w.size(4) == 4 && nblk * 16 >= n &&
                  Kp >= K && Kp - K < 32,
              "q4 weight must be [ceil(N/16), ceil(K/32), 4, 16, 4] uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == nblk * (Kp / 32) * 32,
              "q4 scales must be [ceil(N/16), ceil(K/32), 2, 16] float16");
  const float* b = bias_ptr(bias, n);
  at::Tensor y = empty_out(x, n);
  const QuantRows xr = quantize_rows(x.data_ptr<float>(), M, K, Kp, 32);
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const auto* sp = static_cast<const uint16_t*>(scales.data_ptr());
  float* yp = y.data_ptr<float>();
  for_blocks(M, nblk, Kp * 8, [&](int64_t blk, int64_t m0, int64_t rows) {
    with_rows(rows, [&]<int R>() {
      q4_tile<R>(xr, m0, Kp, wp + blk * Kp * 8, sp + blk * Kp, b ? b + blk * 16 : nullptr,
                 yp + m0 * n + blk * 16, n, n - blk * 16);
    });
  });
  return y;
}

}  // namespace

namespace tinyformers {
// y = x @ W^T (+ bias) for a weight in format fmt (0 f32, 1 bf16, 2 int8, 3 q4, 4-8 kquant.cpp's
// q5_0, q5_1, q4_k, q5_k, q6_k; -1: zeros of
// the output's shape, the benchmark's stand-in that times everything but the matmuls), for
// the one C++ call per decoder layer in layers.cpp.
at::Tensor packed_linear(const at::Tensor& x, int64_t fmt, const at::Tensor& w,
                         const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& bias, int64_t n, int64_t group_size) {
  TORCH_CHECK(fmt < 2 || scales.has_value(), "quantized weights need scales");
  switch (fmt) {
    case 0: return gemv_f32(x, w, bias, n);
    case 1: return gemv_bf16(x, w, bias, n);
    case 2: return gemv_int8(x, w, *scales, bias, n, group_size);
    case 3: return gemv_q4(x, w, *scales, bias, n);
    case 4: case 5: case 6: case 7: case 8:
      return tinyformers::gemv_kquant(x, w, *scales, bias, n, fmt - 4);
    default: {
      TORCH_CHECK(fmt == -1, "unknown weight format ", fmt);
      at::Tensor y = empty_out(x, n);
      std::memset(y.data_ptr<float>(), 0, y.numel() * 4);
      return y;
    }
  }
}
}  // namespace tinyformers

// Schemas apart from the CPU kernels, so torch.compile can be given shape-only versions (build.py).
TORCH_LIBRARY(tinyformers, m) {
  m.def("gemv_f32(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scales, Tensor? bias, int n, int group_size)"
        " -> Tensor");
  m.def("gemv_q4(Tensor x, Tensor w, Tensor scales, Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyformers, CPU, m) {
  m.impl("gemv_f32", &gemv_f32);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_q4", &gemv_q4);
}
