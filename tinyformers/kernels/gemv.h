// What the gemv kernels share (gemv.cpp, kquant.cpp): the row-block loop over torch's thread
// pool, the masked store of a block's outputs, and vpdpbusd.
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
