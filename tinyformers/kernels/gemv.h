// What the gemv kernels share (gemv.cpp, kquant.cpp): the row-block loop over torch's thread
// pool, the masked store of a block's outputs, and per instruction set its vector helpers:
// AVX-512's vpdpbusd, or AVX2's masks, reductions and int8 stores (build.py picks the flags).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace tinyformers::gemv {

constexpr int64_t MR = 8;  // rows of x per microkernel call

// Calls f.template operator()<m>() for m in 1..8, so each row count gets its own unrolled kernel.
template <typename F>
inline void with_rows(int64_t m, F&& f) {
  switch (m) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: f.template operator()<8>(); break;
  }
}

// Splits the blocks of output rows over torch's own thread pool; within a block, rows of x
// go 8 at a time. tile(block, m0, rows) does the work.
template <typename Tile>
inline void for_blocks(int64_t M, int64_t nblk, int64_t block_bytes, const Tile& tile) {
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_bytes);  // >= 64 KB per task
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)
      for (int64_t m0 = 0; m0 < M; m0 += MR) tile(b, m0, std::min(MR, M - m0));
  });
}

#if defined(__AVX512F__)
// subtle: each tile asks for its weight stream PREFETCH bytes ahead of its loads. On the Intel
// Xeon (Emerald Rapids, 2 cores) a test kernel over GPT-2's 48 f32 block matrices went from 15
// to 21 GB/s in one run and from 24 to 27 in another (1 KB and 4 KB ahead within 1 GB/s of 2
// KB); the real tiles gained less (docs/kernels.md: f32 and q4 8-13%, bf16 and int8 in noise).
constexpr int64_t PREFETCH = 2048;
inline void prefetch_ahead(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + PREFETCH, _MM_HINT_T0);
}

inline __mmask16 first_n(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// y[0:n] = acc (+ bias[0:n]) for the n <= 16 outputs that exist (the last block is padded).
inline void store(float* y, const float* bias, __m512 acc, int64_t n) {
  const __mmask16 mask = first_n(n);
  if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, bias));
  _mm512_mask_storeu_ps(y, mask, acc);
}

// subtle: with the intrinsic, GCC 12 copies the accumulators around each vpdpbusd in a loop (it
// does not tie the accumulator to the output register): int8 and q4 measured 5-10% slower.
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
#else  // AVX2: 8 float lanes, masks are vectors, no vpdpbusd

// A tile of M rows of x in groups of R, f.template operator()<rows>(first row) each (the last
// group may be shorter): 16 ymm registers hold the accumulators of only a few rows, so each
// group reads the block again, from cache.
template <int M, int R, typename F>
inline void in_groups(F&& f) {
  for (int m = 0; m + R <= M; m += R) f.template operator()<R>(m);
  if constexpr (M % R != 0) f.template operator()<M % R>(M - M % R);
}

// All ones in the 32-bit lanes 0..n-1 (n clamped to 0..8): the mask of maskload and maskstore.
inline __m256i first_n(int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::clamp<int64_t>(n, 0, 8))), lanes);
}

// x[0:n] for n <= 8, zeros beyond.
inline __m256 load8(const float* x, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(x) : _mm256_maskload_ps(x, first_n(n));
}

// y[0:n] = acc (+ bias[0:n]) for the n <= 8 outputs that exist (the last block is padded).
inline void store(float* y, const float* bias, __m256 acc, int64_t n) {
  const __m256i mask = first_n(n);
  if (bias) acc = _mm256_add_ps(acc, _mm256_maskload_ps(bias, mask));
  _mm256_maskstore_ps(y, mask, acc);
}

// The 8 B outputs of one block row (B ymm), of which n exist.
template <int B>
inline void store_block(float* y, const float* bias, const __m256 (&acc)[B], int64_t n) {
  for (int i = 0; i < B; i++) store(y + 8 * i, bias ? bias + 8 * i : nullptr, acc[i], n - 8 * i);
}

inline __m256 abs_ps(__m256 v) {
  return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)));
}

inline float reduce_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)));
}

// The first n <= 8 of 8 int32 as int8, saturated like AVX-512's vpmovsdb.
inline void store_i8(int8_t* dst, __m256i q, int64_t n) {
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256());
  // packs works per 128-bit lane: q0-3 lead the low lane, q4-7 the high one
  const __m128i v = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  int8_t out[16];
  _mm_storeu_si128((__m128i*)out, v);
  std::copy_n(out, std::min<int64_t>(n, 8), dst);
}

// 4 int8 (x's values for one quad of columns) in every 32-bit lane.
inline __m256i broadcast4(const int8_t* p) { return _mm256_broadcastd_epi32(_mm_loadu_si32(p)); }

// The int32 sums of adjacent int16 pairs: vpmaddubsw's pair sums to vpdpbusd's quad sums.
inline __m256i sum_pairs(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

#endif

inline const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
              "bias must be a contiguous float32 tensor of ", n, " values");
  return bias->data_ptr<float>();
}

inline void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous [..., K > 0] float32 tensor");
}

// y [..., n] for x [..., K]: reshaping here saves two Python-side views per call.
inline at::Tensor empty_out(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return at::empty(shape, x.options());
}

}  // namespace tinyformers::gemv

namespace tinyformers {
// y = x @ W^T (+ bias) for a weight in one of kquant.cpp's formats (kind: 0 q5_0, 1 q5_1,
// 2 q4_k, 3 q5_k, 4 q6_k), for packed_linear's dispatch.
at::Tensor gemv_kquant(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t n, int64_t kind);
}  // namespace tinyformers
