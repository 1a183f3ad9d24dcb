// Decode matmuls on GGUF's Q5_0, Q5_1, Q4_K, Q5_K and Q6_K blocks: y[M, N] = x[M, K] @ W^T.
//
// Each is the file's own integer values and scales, regrouped at load (packed.py) into the q4
// layout of gemv.cpp plus bit planes for the bits above the nibble, so one kernel serves all:
//   data   [N/16][K/32][256 + 64 P] uint8: per group of 32 columns, 256 bytes of nibbles as q4
//          ([quad j][16 rows][4], byte low = column 4j + c, high = column 16 + 4j + c), then
//          P planes of the 5th (and 6th) bits as 64-bit masks [j][low/high][plane], bit 4r + c
//          for row r, so a masked byte add puts them on the nibbles the vector already holds
//   scales [N/16][K/32][S][16] per group and row: fp16 as stored (Q5_0: d; Q5_1: d, m), or
//          float32 products (Q4_K, Q5_K: d * scale, -dmin * min; Q6_K: d * scale of each
//          half, 16 columns), exact in float32 (an 11-bit mantissa times a 6- or 8-bit integer)
// w = d * (q - offset) + m, offset 16 for Q5_0 and 32 for Q6_K. x is quantised like llama.cpp's
// Q8_0 (int8 and a scale per 32 columns, finer than the Q8_K llama.cpp pairs with K-quants);
// vpdpbusd multiplies the unsigned q by it, and the offset is taken off by starting each
// accumulator at -offset * sum(x8) over its 16 columns, as int8 does in gemv.cpp.
// On AVX2 (the #else halves) vpmaddubsw and vpmaddwd take vpdpbusd's place, and a byte shuffle
// spreads the planes' bits to bytes in place of the mask register.
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "gemv.h"

namespace {

using namespace tinyformers::gemv;

// x rows [M, K] as int8 q [M, Kp], a scale per 32 columns and sum(q) per 16 columns.
struct XRows {
  std::vector<int8_t> q;
  std::vector<float> scale;   // [M, Kp/32]
  std::vector<int32_t> sum;   // [M, Kp/16]
};

#if defined(__AVX512F__)
XRows quantize_x(const float* x, int64_t M, int64_t K, int64_t Kp) {
  const int64_t ng = Kp / 32;
  XRows r{std::vector<int8_t>(M * Kp), std::vector<float>(M * ng), std::vector<int32_t>(M * 2 * ng)};
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < ng; g++) {
      const int64_t k = g * 32;
      const __m512 v0 = _mm512_maskz_loadu_ps(first_n(K - k), x + m * K + k);
      const __m512 v1 = _mm512_maskz_loadu_ps(first_n(K - k - 16), x + m * K + k + 16);
      const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127;
      const __m512 inv = _mm512_set1_ps(d > 0 ? 1 / d : 0);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));  // nearest even
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
      _mm512_mask_cvtsepi32_storeu_epi8(r.q.data() + m * Kp + k, 0xffff, q0);
      _mm512_mask_cvtsepi32_storeu_epi8(r.q.data() + m * Kp + k + 16, 0xffff, q1);
      r.scale[m * ng + g] = d;
      r.sum[(m * ng + g) * 2] = _mm512_reduce_add_epi32(q0);
      r.sum[(m * ng + g) * 2 + 1] = _mm512_reduce_add_epi32(q1);
    }
  return r;
}

__m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
__m512 load16(const float* p) { return _mm512_loadu_ps(p); }

#else  // AVX2

XRows quantize_x(const float* x, int64_t M, int64_t K, int64_t Kp) {
  const int64_t ng = Kp / 32;
  XRows r{std::vector<int8_t>(M * Kp), std::vector<float>(M * ng),
          std::vector<int32_t>(M * 2 * ng)};
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < ng; g++) {
      const int64_t k = g * 32;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; i++) {
        v[i] = load8(x + m * K + k + 8 * i, K - k - 8 * i);
        amax = _mm256_max_ps(amax, abs_ps(v[i]));
      }
      const float d = reduce_max(amax) / 127;
      const __m256 inv = _mm256_set1_ps(d > 0 ? 1 / d : 0);
      __m256i q[4];
      for (int i = 0; i < 4; i++) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // nearest even
        store_i8(r.q.data() + m * Kp + k + 8 * i, q[i], 8);
      }
      r.scale[m * ng + g] = d;
      r.sum[(m * ng + g) * 2] = reduce_add(_mm256_add_epi32(q[0], q[1]));
      r.sum[(m * ng + g) * 2 + 1] = reduce_add(_mm256_add_epi32(q[2], q[3]));
    }
  return r;
}

__m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
__m256 load8(const float* p) { return _mm256_loadu_ps(p); }

#endif

int32_t x4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(__AVX512F__)
// P bit planes; scales of type S; SPLIT: a scale per 16 columns (Q6_K), else per 32 and,
// without an offset, a min beside it.
template <int M, int P, typename S, bool SPLIT, int OFFSET>
void kq_tile(const XRows& xr, int64_t m0, int64_t Kp, const uint8_t* w, const S* scales,
             const float* bias, float* y, int64_t ldy, int64_t n) {
  constexpr bool MIN = !SPLIT && OFFSET == 0;
  constexpr int NS = SPLIT || MIN ? 2 : 1, GB = 256 + 64 * P;
  const int64_t ng = Kp / 32;
  const int8_t* xq = xr.q.data() + m0 * Kp;
  const float* sx = xr.scale.data() + m0 * ng;
  const int32_t* sum = xr.sum.data() + m0 * 2 * ng;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 acc[M];
  for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    const uint8_t* wg = w + g * GB;
    for (int b = 0; b < GB; b += 64) prefetch_ahead(wg + b);  // nibbles, then bit planes
    prefetch_ahead(scales + g * NS * 16);
    __m512i lo_acc[M], hi_acc[M];  // columns 0-15 and 16-31 of the group
    for (int m = 0; m < M; m++) {
      lo_acc[m] = _mm512_set1_epi32(-OFFSET * sum[m * 2 * ng + 2 * g]);
      hi_acc[m] = _mm512_set1_epi32(-OFFSET * sum[m * 2 * ng + 2 * g + 1]);
    }
    for (int j = 0; j < 4; j++) {
      const __m512i v = _mm512_loadu_si512(wg + j * 64);
      __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      for (int p = 0; p < P; p++) {
        __mmask64 klo, khi;
        std::memcpy(&klo, wg + 256 + ((2 * j) * P + p) * 8, 8);
        std::memcpy(&khi, wg + 256 + ((2 * j + 1) * P + p) * 8, 8);
        const __m512i bit = _mm512_set1_epi8(char(16 << p));
        lo = _mm512_mask_add_epi8(lo, klo, lo, bit);
        hi = _mm512_mask_add_epi8(hi, khi, hi, bit);
      }
      for (int m = 0; m < M; m++) {
        const int8_t* xg = xq + m * Kp + g * 32 + 4 * j;
        lo_acc[m] = dpbusd(lo_acc[m], lo, _mm512_set1_epi32(x4(xg)));
        hi_acc[m] = dpbusd(hi_acc[m], hi, _mm512_set1_epi32(x4(xg + 16)));
      }
    }
    const S* sg = scales + g * NS * 16;
    const __m512 d0 = load16(sg), d1 = NS == 2 ? load16(sg + 16) : d0;
    for (int m = 0; m < M; m++) {
      const __m512 s = _mm512_set1_ps(sx[m * ng + g]);
      if constexpr (SPLIT) {
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_acc[m]), _mm512_mul_ps(d0, s), acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi_acc[m]), _mm512_mul_ps(d1, s), acc[m]);
      } else {
        const __m512i q = _mm512_add_epi32(lo_acc[m], hi_acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(d0, s), acc[m]);
        if constexpr (MIN) {  // m * sum(x) over the group
          const int32_t xs = sum[m * 2 * ng + 2 * g] + sum[m * 2 * ng + 2 * g + 1];
          acc[m] = _mm512_fmadd_ps(d1, _mm512_mul_ps(s, _mm512_set1_ps(float(xs))), acc[m]);
        }
      }
    }
  }
  for (int m = 0; m < M; m++) store(y + m * ldy, bias, acc[m], n);
}

#else  // AVX2

// Bytes 32 h .. 32 h + 31 of a 64-bit plane mask spread to bytes: value where the bit is set,
// else 0 (what AVX-512 does with a mask register). Byte i takes mask byte i / 8 and tests bit
// i % 8 of it.
__m256i plane_bytes(const uint8_t* mask, int h, char value) {
  const __m256i bits = _mm256_broadcastd_epi32(_mm_loadu_si32(mask + 4 * h));
  const __m256i spread = _mm256_shuffle_epi8(
      bits, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(value));
}

// As above, two rows of x at a time, vpmaddubsw and vpmaddwd in place of vpdpbusd: q <= 63 and
// |x| <= 127, so a pair sum (16002 at most) fits int16. q stays unsigned, so the offset start
// is the same as AVX-512's.
template <int M, int P, typename S, bool SPLIT, int OFFSET>
void kq_tile(const XRows& xr, int64_t m0, int64_t Kp, const uint8_t* w, const S* scales,
             const float* bias, float* y, int64_t ldy, int64_t n) {
  constexpr bool MIN = !SPLIT && OFFSET == 0;
  constexpr int NS = SPLIT || MIN ? 2 : 1, GB = 256 + 64 * P;
  const int64_t ng = Kp / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  in_groups<M, 2>([&]<int R>(int r0) {
    const int8_t* xq = xr.q.data() + (m0 + r0) * Kp;
    const float* sx = xr.scale.data() + (m0 + r0) * ng;
    const int32_t* sum = xr.sum.data() + (m0 + r0) * 2 * ng;
    __m256 acc[R][2];  // rows 0-7 and 8-15 of the block
    for (int m = 0; m < R; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
      const uint8_t* wg = w + g * GB;
      __m256i lo_acc[R][2], hi_acc[R][2];  // columns 0-15 and 16-31 of the group
      for (int m = 0; m < R; m++)
        for (int h = 0; h < 2; h++) {
          lo_acc[m][h] = _mm256_set1_epi32(-OFFSET * sum[m * 2 * ng + 2 * g]);
          hi_acc[m][h] = _mm256_set1_epi32(-OFFSET * sum[m * 2 * ng + 2 * g + 1]);
        }
      for (int j = 0; j < 4; j++) {
        __m256i xlo[R], xhi[R];
        for (int m = 0; m < R; m++) {
          xlo[m] = _mm256_set1_epi32(x4(xq + m * Kp + g * 32 + 4 * j));
          xhi[m] = _mm256_set1_epi32(x4(xq + m * Kp + g * 32 + 4 * j + 16));
        }
        for (int h = 0; h < 2; h++) {
          const __m256i v = _mm256_loadu_si256((const __m256i*)(wg + j * 64 + h * 32));
          __m256i lo = _mm256_and_si256(v, low4);
          __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          const uint8_t* planes = wg + 256 + 2 * j * P * 8;  // [low/high][plane] of quad j
          for (int p = 0; p < P; p++) {  // the bit is above the nibble: or adds it
            lo = _mm256_or_si256(lo, plane_bytes(planes + p * 8, h, char(16 << p)));
            hi = _mm256_or_si256(hi, plane_bytes(planes + (P + p) * 8, h, char(16 << p)));
          }
          for (int m = 0; m < R; m++) {
            const __m256i dlo = sum_pairs(_mm256_maddubs_epi16(lo, xlo[m]));
            const __m256i dhi = sum_pairs(_mm256_maddubs_epi16(hi, xhi[m]));
            lo_acc[m][h] = _mm256_add_epi32(lo_acc[m][h], dlo);
            hi_acc[m][h] = _mm256_add_epi32(hi_acc[m][h], dhi);
          }
        }
      }
      const S* sg = scales + g * NS * 16;
      for (int h = 0; h < 2; h++) {
        const __m256 d0 = load8(sg + 8 * h), d1 = NS == 2 ? load8(sg + 16 + 8 * h) : d0;
        for (int m = 0; m < R; m++) {
          const __m256 s = _mm256_set1_ps(sx[m * ng + g]);
          __m256& a = acc[m][h];
          if constexpr (SPLIT) {
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo_acc[m][h]), _mm256_mul_ps(d0, s), a);
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi_acc[m][h]), _mm256_mul_ps(d1, s), a);
          } else {
            const __m256i q = _mm256_add_epi32(lo_acc[m][h], hi_acc[m][h]);
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(d0, s), a);
            if constexpr (MIN) {  // m * sum(x) over the group
              const int32_t xs = sum[m * 2 * ng + 2 * g] + sum[m * 2 * ng + 2 * g + 1];
              a = _mm256_fmadd_ps(d1, _mm256_mul_ps(s, _mm256_set1_ps(float(xs))), a);
            }
          }
        }
      }
    }
    for (int m = 0; m < R; m++) store_block(y + (r0 + m) * ldy, bias, acc[m], n);
  });
}

#endif

template <int P, typename S, bool SPLIT, int OFFSET>
void run(const XRows& xr, int64_t M, int64_t Kp, const uint8_t* w, const S* scales,
         const float* bias, float* y, int64_t n, int64_t nblk) {
  constexpr int NS = SPLIT || OFFSET == 0 ? 2 : 1;
  const int64_t block_bytes = Kp / 32 * (256 + 64 * P), block_scales = Kp / 32 * NS * 16;
  for_blocks(M, nblk, block_bytes, [&](int64_t blk, int64_t m0, int64_t rows) {
    with_rows(rows, [&]<int R>() {
      kq_tile<R, P, S, SPLIT, OFFSET>(xr, m0, Kp, w + blk * block_bytes,
                                      scales + blk * block_scales, bias ? bias + blk * 16 : nullptr,
                                      y + m0 * n + blk * 16, n, n - blk * 16);
    });
  });
}

constexpr int PLANES[] = {1, 1, 0, 1, 2};   // by kind: q5_0, q5_1, q4_k, q5_k, q6_k
constexpr int NSCALES[] = {1, 2, 2, 2, 2};

}  // namespace

namespace tinyformers {
at::Tensor gemv_kquant(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n, int64_t kind) {
  check_x(x);
  TORCH_CHECK(kind >= 0 && kind < 5, "unknown kquant kind ", kind);
  const int64_t K = x.size(-1), M = x.numel() / K, nblk = w.size(0), Kp = w.size(1) * 32;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 3 &&
                  w.size(2) == 256 + 64 * PLANES[kind] && nblk * 16 >= n && Kp >= K && Kp - K < 32,
              "kquant weight must be [ceil(N/16), ceil(K/32), 256 + 64 planes] uint8");
  const bool half = kind < 2;
  TORCH_CHECK(scales.scalar_type() == (half ? at::kHalf : at::kFloat) && scales.is_contiguous() &&
                  scales.numel() == nblk * (Kp / 32) * NSCALES[kind] * 16,
              "kquant scales must be [ceil(N/16), ceil(K/32), S, 16], float16 for Q5_0 and Q5_1, "
              "float32 for the K-quants");
  const float* b = bias_ptr(bias, n);
  at::Tensor y = empty_out(x, n);
  const XRows xr = quantize_x(x.data_ptr<float>(), M, K, Kp);
  const auto* wp = static_cast<const uint8_t*>(w.data_ptr());
  const auto* h = static_cast<const uint16_t*>(scales.data_ptr());
  const auto* f = static_cast<const float*>(scales.data_ptr());
  float* yp = y.data_ptr<float>();
  switch (kind) {
    case 0: run<1, uint16_t, false, 16>(xr, M, Kp, wp, h, b, yp, n, nblk); break;
    case 1: run<1, uint16_t, false, 0>(xr, M, Kp, wp, h, b, yp, n, nblk); break;
    case 2: run<0, float, false, 0>(xr, M, Kp, wp, f, b, yp, n, nblk); break;
    case 3: run<1, float, false, 0>(xr, M, Kp, wp, f, b, yp, n, nblk); break;
    default: run<2, float, true, 32>(xr, M, Kp, wp, f, b, yp, n, nblk); break;
  }
  return y;
}
}  // namespace tinyformers

TORCH_LIBRARY_FRAGMENT(tinyformers, m) {
  m.def("gemv_kquant(Tensor x, Tensor w, Tensor scales, Tensor? bias, int n, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyformers, CPU, m) { m.impl("gemv_kquant", &tinyformers::gemv_kquant); }
