// Matrix products for inference on x86 CPUs with AVX2 and FMA, for the few activation rows of a decode step
// (kernels.py builds this file on first use and says why it exists), x and y float32:
// - int8_linear: y[M, N] = x[M, K] @ (w[N, K] * w_scale[N])^T (+ bias) (+ residual), w int8 in groups of 4 rows.
// - panel_linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) (+ residual), w float32, bfloat16 or float16 repacked in
//   panels of 8 output features (16 on AVX-512), for any number of rows. The residual stream, when given, is added
//   as the output is stored: one small op less a sublayer.
// - decode_attention: a decode step's attention, each row's one query over its cached keys (cached_decode_attention
//   also writes the step's keys and values into the KV cache first); float32, bfloat16 or float16 caches.
// - DecoderLayer, DecoderStack: a decoder block's decode step, and all of a decoder's, in one call.
// Where the CPU has them, AVX-512 (panels of 16) and AVX-512 VNNI (int8) versions run instead, chosen at run time
// (kernels.panel_width, kernels.int8_vnni), each giving the same bits as the AVX2 one; with AMX, bfloat16 weights
// go through the tile unit (kernels.amx_bfloat16; its own rounding, ~3e-6 of the magnitude).
//
// int8: each activation row is quantized per block of 32 values to int8 with its own scale (llama.cpp's q8_0 does
// the same), and each block's dot product is exact in int32: maddubs(|q|, sign(w, q)) multiplies |q| (unsigned) by
// w carrying q's sign, so q keeps all 8 bits. A block's int32 sum becomes float32 and is scaled into the output's
// float32 accumulator.
//
// - A row's result depends only on that row: every (row of x, row of w) pair runs the same instructions in the
//   same order whatever M is, however the rows are tiled and whatever the thread count.
// - The weight is read once per call (per 64 rows for float): each thread owns a contiguous range of it and
//   streams through it. int8 weights are repacked in groups of 4 rows side by side block by block, so that one
//   stream carries 4 rows, each activation row multiplied by the group while it sits in L1: GPT-2's 49 matrices
//   at one row in 5.64 vs 6.22 ms row by row (1.07x, medians of 40 alternating passes); the same loops reading
//   the weight without the arithmetic take 92-93% of that time, so memory, not the arithmetic, sets it. Reading 4 row-major rows at once, 768
//   bytes apart, left the hardware prefetcher 4 short streams (GPT-2's output matrix at ~10 GB/s against ~31);
//   2 or 4 streams a thread, or software prefetch ahead, measured 3-17% slower. Float weights are repacked in
//   panels (panel_linear).

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/topk.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;   // int8: activation values sharing one scale, and the unit of the int32 dot product
constexpr int64_t kGroup = 4;    // int8: weight rows stored block by block side by side (quant.int8_groups)
constexpr int64_t kRowBlock = 64;  // activation rows kept in L2 while a thread streams its part of the weight

inline float horizontal_sum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// ---------------------------------------------------------------------------------------------------------- int8

// One activation row -> int8 q, |q| and one scale per block (scale = max |x| / 127; a block of zeros gets 0).
// The last block is zero-padded when K is not a multiple of 32; the weight is padded the same way by kernels.py.
void quantize_row(const float* x, int64_t K, int8_t* q, uint8_t* magnitude, float* scale) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the lane interleaving of the packs
  float padded[kBlock];
  for (int64_t start = 0, b = 0; start < K; start += kBlock, b++) {
    const float* block = x + start;
    if (K - start < kBlock) {
      std::fill(padded, padded + kBlock, 0.0f);
      std::memcpy(padded, block, sizeof(float) * (K - start));
      block = padded;
    }
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
      v[j] = _mm256_loadu_ps(block + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[j]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    scale[b] = m / 127.0f;
    const __m256 inverse = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
    __m256i i[4];
    for (int j = 0; j < 4; j++)
      i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inverse));  // rounds to nearest even
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    packed = _mm256_permutevar8x32_epi32(packed, order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), packed);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(magnitude + b * kBlock), _mm256_abs_epi8(packed));
  }
}

// The float32 value of one block's exact int32 dot product, as 8 partial sums.
inline __m256 block_dot(__m256i w, __m256i q, __m256i magnitude) {
  const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w, q));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// One group of R <= kGroup weight rows (block-interleaved, [blocks][R][32]) times one quantized activation row:
// out[r] = the row's dot product with weight row r, unscaled by the weight's row scale. Each weight row has one
// accumulator, a block's float32 sum times the block's activation scale added in block order; the R chains run
// side by side and share the activation block's loads.
template <int R>
void int8_group(const int8_t* group, const int8_t* q, const uint8_t* magnitude, const float* scale, int64_t blocks,
                float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
    const __m256i mb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(magnitude + b * kBlock));
    const __m256 s = _mm256_set1_ps(scale[b]);
    for (int r = 0; r < R; r++) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + (b * R + r) * kBlock));
      acc[r] = _mm256_fmadd_ps(block_dot(w, qb, mb), s, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = horizontal_sum(acc[r]);
}

// The residual stream a product's output is added to, or nullptr: M x N contiguous float32 values, in any shape
// (the caller's [batch, length, features] as it is: a view to [M, N] would cost an op).
const float* residual_data(const c10::optional<at::Tensor>& residual, int64_t M, int64_t N) {
  if (!residual.has_value()) return nullptr;
  TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->numel() == M * N && residual->is_contiguous(),
              "residual: contiguous float32 of ", M, " x ", N, " values, got ", residual->sizes());
  return residual->data_ptr<float>();
}

// An int8 product's output: a weight row's unscaled sum times its scale, + bias (one rounding: an explicit fma, as
// a * b + c may or may not be contracted into one depending on the code around it), + residual. Every kernel stores
// through it, so the AVX2 and VNNI kernels give the same bits.
inline float int8_output(float sum, float w_scale, const float* bias, const float* residual, int64_t n, int64_t at) {
  const float value = std::fma(sum, w_scale, bias ? bias[n] : 0.0f);
  return residual ? value + residual[at] : value;
}

// Rows of quantized activations (quantize_row's q, |q| and block scales, and for VNNI each block's correction)
// times one group of `rows` <= 4 weight rows starting at output feature n0, on AVX2.
void int8_group_rows(const int8_t* group, int64_t rows, int64_t n0, int64_t M, const int8_t* Q, const uint8_t* A,
                     const float* S, int64_t Kp, int64_t blocks, const float* WS, const float* bias, const float* R,
                     float* Y, int64_t N) {
  float out[kGroup];
  for (int64_t m = 0; m < M; m++) {
    const int8_t* q = Q + m * Kp;
    const uint8_t* a = A + m * Kp;
    const float* s = S + m * blocks;
    switch (rows) {
      case 4: int8_group<4>(group, q, a, s, blocks, out); break;
      case 3: int8_group<3>(group, q, a, s, blocks, out); break;
      case 2: int8_group<2>(group, q, a, s, blocks, out); break;
      default: int8_group<1>(group, q, a, s, blocks, out);
    }
    for (int64_t r = 0; r < rows; r++)
      Y[m * N + n0 + r] = int8_output(out[r], WS[n0 + r], bias, R, n0 + r, m * N + n0 + r);
  }
}

bool has_vnni();
namespace vnni {
void corrections(const int8_t* q, int64_t blocks, int32_t* out);
void int8_product(int64_t M, int64_t N, int64_t Kp, const int8_t* Q, const int32_t* C, const uint8_t* A,
                  const float* S, const int8_t* W, const float* WS, const float* bias, const float* R, float* Y);
}  // namespace vnni

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual, bool vnni) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) % kBlock == 0,
              "w: contiguous int8 [N, K padded to a multiple of 32] in groups of 4 rows (quant.int8_groups)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1), blocks = Kp / kBlock;
  TORCH_CHECK(K <= Kp && Kp - K < kBlock, "x has ", K, " features, w ", Kp);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == N && w_scale.is_contiguous(), "w_scale");
  TORCH_CHECK(!vnni || has_vnni(), "vnni: this CPU has no AVX-512 VNNI");
  const float* b_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(), "bias");
    b_ptr = bias->data_ptr<float>();
  }
  // The quantized activations live in a per-thread buffer reused from call to call: three tensors a call were
  // three allocations, 144 of a GPT-2 decode step's ~310. VNNI adds 8 int32 corrections a block.
  thread_local std::vector<float> workspace;
  const int64_t corrections = vnni ? M * blocks * 8 : 0;
  workspace.resize(static_cast<size_t>(M * blocks + corrections + (2 * M * Kp + sizeof(float) - 1) / sizeof(float)));
  float* S = workspace.data();
  int32_t* C = reinterpret_cast<int32_t*>(S + M * blocks);
  int8_t* Q = reinterpret_cast<int8_t*>(C + corrections);
  uint8_t* A = reinterpret_cast<uint8_t*>(Q + M * Kp);
  auto y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; m++) {
      quantize_row(X + m * K, K, Q + m * Kp, A + m * Kp, S + m * blocks);
      if (vnni) vnni::corrections(Q + m * Kp, blocks, C + m * blocks * 8);
    }
  });
  const int8_t* W = w.data_ptr<int8_t>();
  const float* WS = w_scale.data_ptr<float>();
  const float* R = residual_data(residual, M, N);
  float* Y = y.data_ptr<float>();
  if (vnni) {
    vnni::int8_product(M, N, Kp, Q, C, A, S, W, WS, b_ptr, R, Y);
    return y;
  }
  // Each thread streams a contiguous range of groups; every activation row is multiplied by a group while it sits
  // in L1. A row's result depends on nothing but that row.
  at::parallel_for(0, (N + kGroup - 1) / kGroup, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++) {
      const int64_t n0 = g * kGroup;
      int8_group_rows(W + n0 * Kp, std::min(kGroup, N - n0), n0, M, Q, A, S, Kp, blocks, WS, b_ptr, R, Y, N);
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------ int8, AVX-512 VNNI

// The same int8 product on CPUs with AVX-512 VNNI (Cascade Lake and later Xeons, Zen 4 and later), whose vpdpbusd
// adds the products of 4 adjacent bytes into each int32 lane in one instruction (AVX2 takes sign, maddubs and madd).
// vpdpbusd multiplies unsigned bytes by signed ones, so the weight goes in as w + 128 (w ^ 0x80, unsigned) and each
// lane starts from -128 x (its 4 activation values' sum), computed once per activation row and block
// (`corrections`): the lane then holds exactly the AVX2 kernel's int32 (the same 4 products in the same lane), is
// converted and scaled the same way, and every output gets the same bits (tested). A 512-bit vector holds one block
// of two weight rows, so a group of 4 is 2 vectors a block; a tile of up to 4 activation rows x 2 groups (1 row x 4
// groups) shares each weight load among the rows while the group sits in L1. GPT-2-124M's 49 int8 matrices on a
// 2-core AVX-512 VM (Xeon, model 207), back to back, best of 7, ms at 1 / 2 / 4 / 8 / 16 / 32 rows: this kernel
// 2.15 / 2.22 / 3.18 / 5.84 / 11.5 / 21.3, the AVX2 kernel 2.81 / 4.02 / 7.62 / 13.9 / 26.1 / 47.5, fbgemm 4.22 /
// 4.70 / 6.23 / 8.15 / 9.94 / 13.5. At 8 rows it runs at ~190 GMAC/s, about what port 0 allows (vpdpbusd and the
// int32 -> float32 conversion both issue there): the scale of each block of 32 costs a conversion and an FMA per
// 64 products, the price of q8_0's accuracy (fbgemm and oneDNN scale whole rows, one conversion per output).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

namespace vnni {

// Each weight stream is prefetched this many blocks ahead (4 KB): the hardware prefetcher alone left a batch-8
// GPT-2 decode 1.07-1.12x slower than 16 blocks, 16 1.025-1.05x slower than 32 (alternating pairs, batch 8 and 1).
constexpr int64_t kAhead = 32;

void corrections(const int8_t* q, int64_t blocks, int32_t* out) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t b = 0; b < blocks; b++) {
    const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
    const __m256i sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), bias, qb);  // 128 x the sum of each 4
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * 8), _mm256_sub_epi32(_mm256_setzero_si256(), sum));
  }
}

// R activation rows (q row stride Kp, corrections and scales per block) times J / 2 whole groups of 4 weight rows
// (J vectors a block) -> out[r][2J] unscaled sums, weight row by weight row.
template <int R, int J>
void tile(const int8_t* __restrict w, int64_t blocks, int64_t Kp, const int8_t* __restrict q,
          const int32_t* __restrict c, const float* __restrict s, float* __restrict out) {
  static_assert(R >= 1 && J >= 2 && J % 2 == 0 && R * J <= 24, "a tile is up to 24 accumulators");
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t group = kGroup * Kp;  // bytes from one group to the next
  __m512 acc[R][J];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b++) {
    __m512i wv[J];
#pragma GCC unroll 8
    for (int j = 0; j < J; j++) {
      const int8_t* at = w + (j / 2) * group + b * kGroup * kBlock + (j % 2) * 2 * kBlock;
      _mm_prefetch(reinterpret_cast<const char*>(at + kAhead * kGroup * kBlock), _MM_HINT_T0);
      wv[j] = _mm512_xor_si512(flip, _mm512_loadu_si512(at));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m512i qb = _mm512_broadcast_i32x8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * Kp + b * kBlock)));
      const __m512i cb = _mm512_broadcast_i32x8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + (r * blocks + b) * 8)));
      const __m512 sb = _mm512_set1_ps(s[r * blocks + b]);
#pragma GCC unroll 8
      for (int j = 0; j < J; j++)
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(cb, wv[j], qb)), sb, acc[r][j]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int j = 0; j < J; j++) {
      out[r * 2 * J + 2 * j] = horizontal_sum(_mm512_castps512_ps256(acc[r][j]));
      out[r * 2 * J + 2 * j + 1] = horizontal_sum(_mm512_extractf32x8_ps(acc[r][j], 1));
    }
}

// Rows [0, M) times J / 2 whole groups starting at output feature n0, in tiles of up to 4 rows (1 when J > 4).
template <int J>
void tile_rows(int64_t M, int64_t n0, const int8_t* w, int64_t blocks, int64_t Kp, const int8_t* Q, const int32_t* C,
               const float* S, const float* WS, const float* bias, const float* R, float* Y, int64_t N) {
  constexpr int64_t kRows = J <= 4 ? 4 : 1;
  float out[4 * 2 * J];
  for (int64_t m = 0; m < M; m += kRows) {
    const int64_t rows = std::min(kRows, M - m);
    const int8_t* q = Q + m * Kp;
    const int32_t* c = C + m * blocks * 8;
    const float* s = S + m * blocks;
    if constexpr (J <= 4) {
      switch (rows) {
        case 4: tile<4, J>(w, blocks, Kp, q, c, s, out); break;
        case 3: tile<3, J>(w, blocks, Kp, q, c, s, out); break;
        case 2: tile<2, J>(w, blocks, Kp, q, c, s, out); break;
        default: tile<1, J>(w, blocks, Kp, q, c, s, out);
      }
    } else {
      tile<1, J>(w, blocks, Kp, q, c, s, out);
    }
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < 2 * J; i++) {
        const int64_t n = n0 + i, at = (m + r) * N + n;
        Y[at] = int8_output(out[r * 2 * J + i], WS[n], bias, R, n, at);
      }
  }
}

void int8_product(int64_t M, int64_t N, int64_t Kp, const int8_t* Q, const int32_t* C, const uint8_t* A,
                  const float* S, const int8_t* W, const float* WS, const float* bias, const float* R, float* Y) {
  const int64_t blocks = Kp / kBlock, whole = N / kGroup;
  const int64_t per_unit = M == 1 ? 4 : 2;  // groups a unit of work (a tile's width)
  const int64_t units = (whole + per_unit - 1) / per_unit + (N % kGroup ? 1 : 0);
  // Each thread streams a contiguous range of units while the rows it multiplies stay in L1.
  at::parallel_for(0, units, 4, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; u++) {
      const int64_t g = std::min(u * per_unit, whole), n0 = g * kGroup;
      if (g == whole) {  // the last N % 4 rows, a group of its own: as the AVX2 kernel does them
        int8_group_rows(W + n0 * Kp, N - n0, n0, M, Q, A, S, Kp, blocks, WS, bias, R, Y, N);
        continue;
      }
      const int8_t* w = W + n0 * Kp;
      switch (std::min(per_unit, whole - g)) {
        case 4: tile_rows<8>(M, n0, w, blocks, Kp, Q, C, S, WS, bias, R, Y, N); break;
        case 3: tile_rows<6>(M, n0, w, blocks, Kp, Q, C, S, WS, bias, R, Y, N); break;
        case 2: tile_rows<4>(M, n0, w, blocks, Kp, Q, C, S, WS, bias, R, Y, N); break;
        default: tile_rows<2>(M, n0, w, blocks, Kp, Q, C, S, WS, bias, R, Y, N);
      }
    }
  });
}

}  // namespace vnni

#pragma GCC pop_options


// ------------------------------------------------------------------------------------------------ weight panels

// panel_linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) (+ residual), w float32, bfloat16 or float16 stored in
// panels (quant.panels writes them): the output features in groups of kPanelWidth, each group k-major ([N / 8][K][8]),
// then the last N % 8 features k-major too ([K][N % 8]); a 1-D tensor, so N = its size / K.
//
// An outer product: for each k, one weight vector per panel (8 outputs) is multiplied by each row's x[k],
// broadcast. A tile of 4 rows x 3 panels keeps 12 accumulators in registers (AVX2 has 16) and does 12 FMAs for 3
// weight and 4 activation loads, so from a few rows on it runs near the FMA units' peak, and at one row its
// streams through memory outrun the row-by-row dot products this file had before (float_linear, the weight in
// nn.Linear's layout, 2 x 16 weights an iteration, summed across the vector at the end). Each output is one FMA
// chain over k in order, then + bias, then + residual: a row's result depends on nothing else (not M,
// the tiling or the thread count). Measured (medians of alternating passes, 2 threads, weights in huge pages):
// an opus-mt-sized decoder's 37 float32 matrices (104 MB) 3.4 vs 4.2 ms (float_linear) vs 5.8 (oneDNN pre-packed)
// at 1 row, 4.5 / 6.7 / 8.5 at 8, 11.9 vs 17.1 (oneDNN) at 32, 45.7 vs 55.8 at 128; in bfloat16 2.2 vs 2.5 ms
// (float_linear) vs 4.2-4.5 (fbgemm's float16 kernel) at 1 row, 4.4 / 8.0 / 6.9 at 8, 11.4 / 27.4 / 13.0 at 32;
// GPT-2's 48 block matrices in float32 10.8 vs 13.9 ms at 1 row and 14.3 vs 21.2 at 8, its 154 MB output matrix
// 4.7 vs 5.0 ms (MKL's batched product on a column-major copy); one matrix alone at 9-1024 rows 1.2-1.5x oneDNN's
// GFLOP/s.
constexpr int64_t kPanelWidth = 8;  // output features per panel: one AVX2 vector
constexpr int64_t kTileRows = 4, kTilePanels = 3;

inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const at::Half* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline __m256 load8(const at::BFloat16* w) {  // bfloat16 is a float32's high half: widen, shift up (exact)
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// R rows of x (row stride K) times P consecutive panels starting at w -> y (row stride ldy), + bias[0, 8P) and
// + residual (row stride ldy) when given, fetching next_lines cache lines from `next` into L2 meanwhile. The 12
// accumulators are named variables: as an array GCC kept some on the stack, an FMA a step reading and writing memory.
template <int R, int P, class Weight>
inline void panel_tile(const float* __restrict x, int64_t K, const Weight* __restrict w, float* __restrict y,
                       int64_t ldy, const float* __restrict bias, const float* __restrict residual,
                       const char* next = nullptr, int64_t next_lines = 0) {
  static_assert(R >= 1 && R <= 4 && P >= 1 && P <= 3, "a tile is up to 4 rows x 3 panels");
  __m256 a00, a01, a02, a10, a11, a12, a20, a21, a22, a30, a31, a32;
  a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = _mm256_setzero_ps();
  const Weight* __restrict w0 = w;
  const Weight* __restrict w1 = w + K * kPanelWidth;
  const Weight* __restrict w2 = w + 2 * K * kPanelWidth;
  int64_t spread = 0;  // next_lines prefetches spread evenly over the K steps (see panel_product)
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; k++) {
    for (spread += next_lines; spread >= K; spread -= K, next += 64) _mm_prefetch(next, _MM_HINT_T1);
    const __m256 b0 = load8(w0 + k * kPanelWidth);
    const __m256 b1 = P > 1 ? load8(w1 + k * kPanelWidth) : b0;
    const __m256 b2 = P > 2 ? load8(w2 + k * kPanelWidth) : b0;
    auto row = [&](int r, __m256& c0, __m256& c1, __m256& c2) {
      const __m256 a = _mm256_broadcast_ss(x + r * K + k);
      c0 = _mm256_fmadd_ps(a, b0, c0);
      if (P > 1) c1 = _mm256_fmadd_ps(a, b1, c1);
      if (P > 2) c2 = _mm256_fmadd_ps(a, b2, c2);
    };
    row(0, a00, a01, a02);
    if (R > 1) row(1, a10, a11, a12);
    if (R > 2) row(2, a20, a21, a22);
    if (R > 3) row(3, a30, a31, a32);
  }
  auto store = [&](int r, int p, __m256 v) {
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + p * kPanelWidth));
    if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + r * ldy + p * kPanelWidth));
    _mm256_storeu_ps(y + r * ldy + p * kPanelWidth, v);
  };
  const __m256 out[4][3] = {{a00, a01, a02}, {a10, a11, a12}, {a20, a21, a22}, {a30, a31, a32}};
  for (int r = 0; r < R; r++)
    for (int p = 0; p < P; p++) store(r, p, out[r][p]);
}

// One row of x times P <= 6 panels: at one row each accumulator's chain of FMAs waits on the FMA latency, so a
// one-row product takes twice the panels (chains) at a time; each output's sum is the same chain as in any tile.
// GPT-2's 49 matrices at one row, alternating 30 times: float32 15.45 vs 15.84 ms (20 of 30), bfloat16 8.94 vs
// 9.40 (24 of 30).
template <int P, class Weight>
inline void panel_row(const float* __restrict x, int64_t K, const Weight* __restrict w, float* __restrict y,
                      const float* __restrict bias, const float* __restrict residual) {
  static_assert(P >= 1 && P <= 6, "a one-row tile is up to 6 panels");
  __m256 a0, a1, a2, a3, a4, a5;
  a0 = a1 = a2 = a3 = a4 = a5 = _mm256_setzero_ps();
  const int64_t stride = K * kPanelWidth;
#pragma GCC unroll 4
  for (int64_t k = 0; k < K; k++) {
    const __m256 a = _mm256_broadcast_ss(x + k);
    const Weight* wk = w + k * kPanelWidth;
    a0 = _mm256_fmadd_ps(a, load8(wk), a0);
    if (P > 1) a1 = _mm256_fmadd_ps(a, load8(wk + stride), a1);
    if (P > 2) a2 = _mm256_fmadd_ps(a, load8(wk + 2 * stride), a2);
    if (P > 3) a3 = _mm256_fmadd_ps(a, load8(wk + 3 * stride), a3);
    if (P > 4) a4 = _mm256_fmadd_ps(a, load8(wk + 4 * stride), a4);
    if (P > 5) a5 = _mm256_fmadd_ps(a, load8(wk + 5 * stride), a5);
  }
  const __m256 out[6] = {a0, a1, a2, a3, a4, a5};
  for (int p = 0; p < P; p++) {
    __m256 v = out[p];
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + p * kPanelWidth));
    if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(residual + p * kPanelWidth));
    _mm256_storeu_ps(y + p * kPanelWidth, v);
  }
}

// Rows [0, M) of x times P panels, in tiles of kTileRows rows, the whole tiles fetching next_bytes from
// next_group into L2 between them.
template <int P, class Weight>
void panel_rows(int64_t M, const float* x, int64_t K, const Weight* w, float* y, int64_t ldy, const float* bias,
                const float* residual, const char* next_group = nullptr, int64_t next_bytes = 0) {
  auto at = [&](int64_t m) { return residual ? residual + m * ldy : nullptr; };
  const int64_t tiles = M / kTileRows, slice = tiles ? (next_bytes / 64 + tiles - 1) / tiles : 0;
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) {
    const int64_t first = m / kTileRows * slice, lines = std::max<int64_t>(0, std::min(slice, next_bytes / 64 - first));
    panel_tile<kTileRows, P>(x + m * K, K, w, y + m * ldy, ldy, bias, at(m), lines ? next_group + 64 * first : nullptr,
                             lines);
  }
  switch (M - m) {
    case 3: panel_tile<3, P>(x + m * K, K, w, y + m * ldy, ldy, bias, at(m)); break;
    case 2: panel_tile<2, P>(x + m * K, K, w, y + m * ldy, ldy, bias, at(m)); break;
    case 1: panel_tile<1, P>(x + m * K, K, w, y + m * ldy, ldy, bias, at(m)); break;
  }
}

// Runs f(i) for every i in [0, n) on torch's threads, each thread taking the next unit when it finishes one: a
// thread that starts late (an OpenMP wake-up) or is interrupted does fewer units instead of the others waiting for it.
template <class F>
void run_units(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) f(i);
  });
}

template <class Weight>
void panel_product(const float* X, const Weight* W, const float* bias, int64_t M, int64_t N, int64_t K, float* Y,
                   const float* R) {
  const int64_t full = N / kPanelWidth, tail = N % kPanelWidth;
  const int64_t per_group = M == 1 ? 2 * kTilePanels : kTilePanels;  // panels a unit of work
  const int64_t groups = (full + per_group - 1) / per_group;
  // units of work: groups of whole panels (3, or 6 at one row), then the tail's partial panel, for each block of rows
  const int64_t units = groups + (tail ? 1 : 0), blocks = (M + kRowBlock - 1) / kRowBlock;
  std::vector<float> tail_panel;
  if (tail) {  // zero-padded to a whole panel; its products are stored aside and then added up as panel_tile adds
    // bias and residual, so its outputs get the same roundings as every other
    tail_panel.assign(K * kPanelWidth, 0.0f);
    const Weight* t = W + full * kPanelWidth * K;
    for (int64_t k = 0; k < K; k++)
      for (int64_t c = 0; c < tail; c++) tail_panel[k * kPanelWidth + c] = static_cast<float>(t[k * tail + c]);
  }
  // When one thread runs every unit (a split decoder step, or one thread), each unit fetches the next one's weights
  // into L2 as it goes, spread over its row tiles, as the AVX-512 kernel does (see wide::panel_product; here the
  // next unit is the next group of the same row block). With TINYFORMER_KERNELS=avx2 on the AVX-512 machine,
  // alternating pairs: batch-32 translation beam 4 1.072x, greedy 1.108x (12 of 12 each), GPT-2-124M float32 batch
  // 64 1.130x (4 of 4), batch 16 on one thread 1.389x (6 of 6). With two threads taking turns at the groups a
  // thread's next unit is not the next group, so there it fetches nothing.
  const bool ahead = at::get_num_threads() == 1 || at::in_parallel_region();
  auto unit = [&](int64_t i) {
    const int64_t m0 = i / units * kRowBlock, g = i % units, rows = std::min(kRowBlock, M - m0);
    const float* x = X + m0 * K;
    if (g == groups) {
      float out[kTileRows * kPanelWidth];
      for (int64_t m = 0; m < rows; m += kTileRows) {
        const int64_t n = std::min(kTileRows, rows - m);
        panel_rows<1>(n, x + m * K, K, tail_panel.data(), out, kPanelWidth, nullptr, nullptr);
        for (int64_t r = 0; r < n; r++)
          for (int64_t c = 0; c < tail; c++) {
            const int64_t row = m0 + m + r, col = full * kPanelWidth + c;
            float v = out[r * kPanelWidth + c];
            if (bias) v += bias[col];
            if (R) v += R[row * N + col];
            Y[row * N + col] = v;
          }
      }
      return;
    }
    const int64_t p = g * per_group, n = std::min(per_group, full - p);
    const Weight* w = W + p * kPanelWidth * K;
    float* y = Y + m0 * N + p * kPanelWidth;
    const float* b = bias ? bias + p * kPanelWidth : nullptr;
    const float* r = R ? R + m0 * N + p * kPanelWidth : nullptr;
    if (M == 1) {
      switch (n) {
        case 6: panel_row<6>(x, K, w, y, b, r); break;
        case 5: panel_row<5>(x, K, w, y, b, r); break;
        case 4: panel_row<4>(x, K, w, y, b, r); break;
        case 3: panel_row<3>(x, K, w, y, b, r); break;
        case 2: panel_row<2>(x, K, w, y, b, r); break;
        default: panel_row<1>(x, K, w, y, b, r);
      }
    } else if (n == 3) {
      const int64_t next = ahead ? std::min(per_group, full - p - per_group) : 0;  // the next unit's whole panels
      panel_rows<3>(rows, x, K, w, y, N, b, r,
                    next > 0 ? reinterpret_cast<const char*>(w + per_group * kPanelWidth * K) : nullptr,
                    std::max<int64_t>(0, next) * kPanelWidth * K * static_cast<int64_t>(sizeof(Weight)));
    } else if (n == 2) panel_rows<2>(rows, x, K, w, y, N, b, r);
    else panel_rows<1>(rows, x, K, w, y, N, b, r);
  };
  // At a few rows the product streams the weight from memory, and a contiguous half per thread measured better
  // (batch-1 greedy translation 0.99x dynamic, 8 of 30 pairs); beyond, it computes, and dynamic units even out
  // threads that start late (batch-32 beam-4 translation 1.045x, 13 of 20 pairs; greedy 1.02-1.03x).
  if (M > 8) run_units(blocks * units, unit);
  else at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = 0; b < blocks; b++)
      for (int64_t g = begin; g < end; g++) unit(b * units + g);
  });
}

// ------------------------------------------------------------------------------------ weight panels, AVX-512

// The same outer product on CPUs with AVX-512 (F, BW, VL, DQ: what torch calls its AVX512 capability), on weights
// repacked in panels of 16 output features (one 512-bit vector), chosen at run time (kernels.panel_width). Each
// output is the same FMA chain over k, then + bias, then + residual, as in the AVX2 kernel above, so the two give
// the same bits (tested); what changes is the width: 16 lanes an FMA instead of 8, and 32 registers, so a tile
// of 8 rows x 3 panels keeps 24 accumulators (4 rows x 6 panels up to 4 rows). The last N % 16 features are read
// k-major with masked loads and stored with masked stores, so no padded copy is made per call. Measured on a
// 2-core AVX-512 VM (Xeon, model 207), all matrices back to back, best of 5, width 8 vs 16 (ms): GPT-2-124M's 49 at
// 1 / 8 rows float32 19.1 / 25.9 vs 16.6 / 20.9, bfloat16 10.3 / 18.5 vs 9.0 / 11.3; an opus-mt decoder's 37 at
// 1 / 8 / 32 / 128 rows float32 3.2 / 4.4 / 11.5 / 42.2 vs 2.8 / 3.4 / 7.5 / 25.4 (263 GFLOP/s at 128 rows).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")

namespace wide {

constexpr int64_t kWidth = 16;
// Each panel's stream is prefetched this many bytes ahead. Without it (the hardware prefetcher alone) GPT-2 decodes
// ran 1.25x slower in bfloat16 and 1.02x in float32 at batch 1, 1.16x and 1.20x at batch 8 (alternating pairs,
// 6-8 of 8). Tiles of up to 4 rows stream the weight from memory at a few cycles a k: 1024 bytes ahead (4096
// measured 0.988x at GPT-2 float32 batch 1, 3 of 10 pairs). Tiles of 5-8 rows spend ~12 cycles a k, and the first
// row tile of a 64-row block waits on the last-level cache for its panels: 4096 bytes ahead ran a batch-32 beam-4
// translation 1.046x (15 of 16 pairs) and batch-32 greedy 1.027x (15 of 16), GPT-2 float32 at batch 8 1.029x
// (10 of 10); 2048 was within 2% of 4096, 6144 and 8192 below both. Half an hour later, the host's other tenants
// quieter, the same change measured 0.998x (14 of 30 decoder steps): it helps when the cache is slow to answer.
constexpr int64_t kPanelAhead = 1024, kPanelAheadWide = 4096;

inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(const at::Half* w) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))); }
inline __m512 load16(const at::BFloat16* w) {  // widen, shift up (exact)
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const float* w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }
inline __m512 load16(const at::Half* w, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w)); }
inline __m512 load16(const at::BFloat16* w, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// R rows of x (row stride K) times P panels: panel p's k-th 16 weights at w + p * panel_stride + k * k_stride ->
// y (row stride ldy), + bias and + residual (row stride ldy) when given. Meanwhile the next_lines cache lines from
// `next` (a slice of the weights the thread multiplies next: see panel_product) are fetched into L2. With a mask
// (the last, partial panel: P is 1 and k_stride is its width) only the mask's lanes are read and stored. The
// accumulators stay in registers (checked in the assembly: an array indexed by constants after unrolling).
template <int R, int P, bool Masked, class Weight>
void tile(const float* __restrict x, int64_t K, const Weight* __restrict w, int64_t panel_stride, int64_t k_stride,
          __mmask16 mask, float* __restrict y, int64_t ldy, const float* __restrict bias,
          const float* __restrict residual, const char* next = nullptr, int64_t next_lines = 0) {
  static_assert(R >= 1 && P >= 1 && R * P <= 24 && (!Masked || P == 1), "a tile is up to 24 accumulators");
  __m512 acc[R][P];
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int p = 0; p < P; p++) acc[r][p] = _mm512_setzero_ps();
  int64_t spread = 0;  // next_lines prefetches spread evenly over the K steps
  for (int64_t k = 0; k < K; k++) {
    __m512 b[P];
    for (spread += next_lines; spread >= K; spread -= K, next += 64) _mm_prefetch(next, _MM_HINT_T1);
#pragma GCC unroll 8
    for (int p = 0; p < P; p++) {
      if (!Masked)
        _mm_prefetch(reinterpret_cast<const char*>(w + p * panel_stride + k * k_stride) +
                         (R > 4 ? kPanelAheadWide : kPanelAhead),
                     _MM_HINT_T0);
      b[p] = Masked ? load16(w + k * k_stride, mask) : load16(w + p * panel_stride + k * k_stride);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
#pragma GCC unroll 8
      for (int p = 0; p < P; p++) acc[r][p] = _mm512_fmadd_ps(a, b[p], acc[r][p]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; r++)
#pragma GCC unroll 8
    for (int p = 0; p < P; p++) {
      __m512 v = acc[r][p];
      const int64_t at = p * kWidth;
      if (bias) v = _mm512_add_ps(v, Masked ? _mm512_maskz_loadu_ps(mask, bias + at) : _mm512_loadu_ps(bias + at));
      if (residual) {
        const float* from = residual + r * ldy + at;
        v = _mm512_add_ps(v, Masked ? _mm512_maskz_loadu_ps(mask, from) : _mm512_loadu_ps(from));
      }
      if (Masked) _mm512_mask_storeu_ps(y + r * ldy + at, mask, v);
      else _mm512_storeu_ps(y + r * ldy + at, v);
    }
}

// Rows [0, R) times whole panels [0, n) in tiles of up to P(R) panels (6 up to 4 rows, else 3).
template <int R, class Weight>
void panel_run(const float* x, int64_t K, const Weight* w, int64_t n, float* y, int64_t ldy, const float* bias,
               const float* residual, const char* next, int64_t next_lines) {
  constexpr int P = R <= 4 ? 6 : 3;
  const int64_t stride = K * kWidth;
  int64_t p = 0;
  for (; p + P <= n; p += P, next_lines = 0)
    tile<R, P, false>(x, K, w + p * stride, stride, kWidth, 0, y + p * kWidth, ldy, bias ? bias + p * kWidth : nullptr,
                      residual ? residual + p * kWidth : nullptr, next, next_lines);
  for (; p < n; p++, next_lines = 0)  // the few left over, one at a time (R chains each)
    tile<R, 1, false>(x, K, w + p * stride, stride, kWidth, 0, y + p * kWidth, ldy,
                      bias ? bias + p * kWidth : nullptr, residual ? residual + p * kWidth : nullptr, next, next_lines);
}

// Rows [0, R) times panels [p0, p1) of a weight with `full` whole panels and a partial one of `tail` features after
// them (p1 may include it).
template <int R, class Weight>
void panel_block(const float* x, int64_t K, const Weight* W, int64_t full, int64_t tail, int64_t p0, int64_t p1,
                 float* y, int64_t ldy, const float* bias, const float* residual, const char* next,
                 int64_t next_lines) {
  auto offset = [&](const float* t, int64_t p) { return t ? t + p * kWidth : nullptr; };
  const int64_t whole = std::min(p1, full) - p0;
  if (whole > 0)
    panel_run<R>(x, K, W + p0 * K * kWidth, whole, y + p0 * kWidth, ldy, offset(bias, p0), offset(residual, p0), next,
                 next_lines);
  if (tail && p1 > full)
    tile<R, 1, true>(x, K, W + full * K * kWidth, 0, tail, static_cast<__mmask16>((1u << tail) - 1), y + full * kWidth,
                     ldy, offset(bias, full), offset(residual, full));
}

// Rows [0, rows) in tiles of 8 (the rest in one tile of rows % 8), the tiles fetching next_bytes from next_group
// into L2 between them.
template <class Weight>
void panel_rows(int64_t rows, const float* x, int64_t K, const Weight* W, int64_t full, int64_t tail, int64_t p0,
                int64_t p1, float* y, int64_t ldy, const float* bias, const float* residual,
                const char* next_group = nullptr, int64_t next_bytes = 0) {
  const int64_t tiles = (rows + 7) / 8, slice = (next_bytes / 64 + tiles - 1) / tiles;  // lines each tile fetches
  for (int64_t m = 0; m < rows; m += 8) {
    const float* xm = x + m * K;
    float* ym = y + m * ldy;
    const float* rm = residual ? residual + m * ldy : nullptr;
    const int64_t first = m / 8 * slice, next_lines = std::max<int64_t>(0, std::min(slice, next_bytes / 64 - first));
    const char* next = next_lines ? next_group + 64 * first : nullptr;
    switch (std::min<int64_t>(8, rows - m)) {
      case 8: panel_block<8>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      case 7: panel_block<7>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      case 6: panel_block<6>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      case 5: panel_block<5>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      case 4: panel_block<4>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      case 3: panel_block<3>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      case 2: panel_block<2>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines); break;
      default: panel_block<1>(xm, K, W, full, tail, p0, p1, ym, ldy, bias, rm, next, next_lines);
    }
  }
}

// Up to 8 rows the weight streams from memory once, each thread taking an even share of the panels; beyond, units
// of 64 rows x 3 panels go to whichever thread is free (as in the AVX2 kernel), a group of panels' row blocks one
// after another, so the threads read a group's weights from the last-level cache about once, not once a block: an
// opus-mt encoder layer's four matrices cycled over 6-12 layers' weights ran 1.017-1.025x at 128-335 rows (14-17 of
// 20 pairs), batch-32 greedy translation 1.031x / 1.034x (10 and 12 of 16), beam 4 1.009x (9 of 12).
template <class Weight>
void panel_product(const float* X, const Weight* W, const float* bias, int64_t M, int64_t N, int64_t K, float* Y,
                   const float* R) {
  const int64_t full = N / kWidth, tail = N % kWidth, panels = full + (tail ? 1 : 0);
  if (M <= 8) {
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      panel_rows(M, X, K, W, full, tail, begin, end, Y, N, bias, R);
    });
    return;
  }
  constexpr int64_t kGroupPanels = 3;
  const int64_t groups = (panels + kGroupPanels - 1) / kGroupPanels, blocks = (M + kRowBlock - 1) / kRowBlock;
  // Each unit fetches the next panel group's weights into L2 as it goes (spread over its row tiles: at 64 rows one
  // line for every 8 its tiles load), so that group's first row tile does not wait on the last-level cache. Only
  // where that group is the thread's own next work or the fetch is spread over 4+ row tiles: when a thread runs
  // every unit (a split decoder step) or from 32 rows; at 16 rows on two threads, which take turns at the groups,
  // it fetched the other thread's group: GPT-2-124M float32 batch 16 0.82x. A batch-32
  // translation (decoder steps split, 64 / 16 rows a thread) beam 4 1.027x and 1.094x (13 and 14 of 16
  // alternating pairs), greedy 1.011x and 1.051x (11 and 15 of 16); GPT-2 float32 batch 64 1.087x (5 of 6), batch
  // 16 on one thread 1.173x (6 of 6).
  const bool ahead = M >= 32 || at::get_num_threads() == 1 || at::in_parallel_region();
  run_units(groups * blocks, [&](int64_t i) {
    const int64_t m0 = i % blocks * kRowBlock, p0 = i / blocks * kGroupPanels;
    const int64_t next = ahead ? std::max<int64_t>(0, std::min(full, p0 + 2 * kGroupPanels) - p0 - kGroupPanels) : 0;
    panel_rows(std::min(kRowBlock, M - m0), X + m0 * K, K, W, full, tail, p0, std::min(panels, p0 + kGroupPanels),
               Y + m0 * N, N, bias, R ? R + m0 * N : nullptr,
               next ? reinterpret_cast<const char*>(W + (p0 + kGroupPanels) * K * kWidth) : nullptr,
               next * K * kWidth * static_cast<int64_t>(sizeof(Weight)));
  });
}

// e^x for a vector of x <= 0 (0 below -87, as float32 underflows there), as exp_nonpositive computes it (further
// down, 8 lanes): 2^n e^r with n = round(x / ln 2), e^r by its Taylor polynomial to degree 6.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GT_OQ), _mm512_scalef_ps(p, n));
}

// A log-softmax's row statistics: the largest of row[0, V) and log(sum(exp(row - largest))), 16 lanes at a time
// (4 maxima and 2 sums side by side: one chain waited on each max's or add's latency).
inline std::pair<float, float> log_sum_exp(const float* row, int64_t V) {
  __m512 top[4];
  for (auto& t : top) t = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 64 <= V; i += 64)
    for (int j = 0; j < 4; j++) top[j] = _mm512_max_ps(top[j], _mm512_loadu_ps(row + i + 16 * j));
  for (; i < V; i += 16) {
    const __mmask16 m = i + 16 <= V ? 0xFFFF : static_cast<__mmask16>((1u << (V - i)) - 1);
    top[0] = _mm512_max_ps(top[0], _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, row + i));
  }
  const float largest =
      _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(top[0], top[1]), _mm512_max_ps(top[2], top[3])));
  const __m512 shift = _mm512_set1_ps(largest);
  __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (i = 0; i + 32 <= V; i += 32)
    for (int j = 0; j < 2; j++)
      sum[j] = _mm512_add_ps(sum[j], exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(row + i + 16 * j), shift)));
  for (; i < V; i += 16) {
    const __mmask16 m = i + 16 <= V ? 0xFFFF : static_cast<__mmask16>((1u << (V - i)) - 1);
    sum[0] = _mm512_add_ps(sum[0], exp_nonpositive16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, row + i), shift)));
  }
  return {largest, std::log(_mm512_reduce_add_ps(_mm512_add_ps(sum[0], sum[1])))};
}

}  // namespace wide

#pragma GCC pop_options

// ------------------------------------------------------------------------------------ bfloat16 weights, AMX

// On CPUs with AMX (Intel Sapphire Rapids and later), bfloat16 weights go through the tile unit: one TDPBF16PS
// multiplies a 16 x 32 tile of bfloat16 activations by a 32 x 16 tile of weights into 16 x 16 float32 sums, 8192
// multiply-adds in the time AVX-512 does ~512, so a decode step of a few rows is no longer bound by widening the
// weights and FMAs but by reading them. The tile unit multiplies bfloat16 by bfloat16; to keep the activations'
// precision each float32 row x is carried as two bfloat16 rows, hi = bf16(x) and lo = bf16(x - hi), which sum to x
// within 2^-17 of its magnitude (float32 has 2^-24; a bfloat16 row alone 2^-9, a ~1e-2 error in the logits), and
// y = (hi . w) + (lo . w). The two rows share the tile: up to 8 activation rows make 16 tile rows, the same one
// instruction as 8 rows. Products of bfloat16 pairs are exact in float32 and each output's sums run over k in the
// same order for every row, so a row's result depends on nothing else (not M, the tiling or the thread count); it
// differs from the AVX-512 kernel's by rounding only (~1e-6 of the magnitude), and AMX flushes denormals to zero.
//
// Layout (quant.amx_panels writes it), K padded with zeros to Kp, a multiple of 32: the output features in panels
// of 16, each panel [Kp / 2][16][2] (a k pair of each feature side by side: the tile unit's B layout, so one tile is
// 1 KB in a row), then the last N % 16 features as [Kp / 2][N % 16][2]; a 1-D tensor of N * Kp values.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")

namespace amx {

constexpr int64_t kWidth = 16, kDepth = 32;  // a weight tile: 32 k values (16 pairs) x 16 output features
constexpr int64_t kLayout = 32;  // panel_linear's `width` for this layout (a weight tile row holds 32 values)
constexpr int64_t kRows = 8;                 // activation rows a tile holds (twice: hi and lo)
// Panels a thread's unit: accumulator tiles 0-1, activations tile 4, weights tiles 5-6. GPT-2-124M's 49 matrices at
// 1 / 8 rows: 4.57 / 5.08 ms with 2, 4.84 / 5.41 with 4 (3 weight tiles for 4 panels, one reused within a k step),
// 4.53 / 5.11 with 2 and the next k step's tiles loaded ahead (double buffering); the AVX-512 kernel 4.90 / 6.92.
constexpr int kPanels = 2;
// Each weight tile's stream is prefetched this far ahead: GPT-2-124M's 49 matrices at 1 / 8 rows 5.35 / 5.76 ms
// without, 4.93 / 5.53 with (1024 and 4096 bytes alike).
constexpr int64_t kAhead = 2048;

// n values of v's storage starting on a 64-byte line: a tile row that straddles two lines loads at half speed.
template <class T>
T* aligned(std::vector<T>& v, size_t n) {
  v.resize(n + 64 / sizeof(T));
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles for `rows` activation rows (2 * rows tile rows) and panels `width` features wide (16, or the last N % 16).
inline void configure(int64_t rows, int64_t width) {
  TileConfig c;
  for (int t = 0; t < kPanels; t++) c.rows[t] = 2 * rows, c.colsb[t] = width * 4;
  c.rows[4] = 2 * rows, c.colsb[4] = kDepth * 2;
  for (int t = 5; t < 7; t++) c.rows[t] = kDepth / 2, c.colsb[t] = width * 4;
  asm volatile("" : : "r"(&c) : "memory");  // c escapes: GCC 12 may drop stores that only its ldtilecfg reads
  _tile_loadconfig(&c);
}

// x [M, K] float32 -> a [ceil(M / 8)][16][Kp] bfloat16: each block's rows hi, then their lo, zeros past K.
void split_rows(const float* x, int64_t M, int64_t K, int64_t Kp, at::BFloat16* a) {
  for (int64_t m = 0; m < M; m++) {
    const int64_t block = m / kRows, r = m % kRows, rows = std::min(kRows, M - block * kRows);
    uint16_t* hi = reinterpret_cast<uint16_t*>(a + (block * 2 * kRows + r) * Kp);
    uint16_t* lo = hi + rows * Kp;
    for (int64_t k = 0; k < Kp; k += 16) {
      const __mmask16 valid = k + 16 <= K ? 0xffff : k < K ? static_cast<__mmask16>((1u << (K - k)) - 1) : 0;
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + m * K + k);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
      const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + k), (__m256i)h);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + k), (__m256i)l);
    }
  }
}

// GCC's tile intrinsics paste their tile numbers into the assembly text, so each tile is named by a literal.
template <int P>
inline void zero() {
  _tile_zero(0);
  if constexpr (P > 1) _tile_zero(1);
}

inline const char* prefetched(const at::BFloat16* w) {
  const char* b = reinterpret_cast<const char*>(w);
  for (int line = 0; line < kDepth * kWidth * 2; line += 64) _mm_prefetch(b + kAhead + line, _MM_HINT_T0);
  return b;
}

// Accumulators 0..P-1 += activations (tile 4) x the weight tile of panel p (tiles 5, 6).
template <int P>
inline void multiply(const at::BFloat16* w, int64_t panel_stride, int64_t stride) {
  _tile_loadd(5, prefetched(w), stride);
  _tile_dpbf16ps(0, 4, 5);
  if constexpr (P > 1) { _tile_loadd(6, prefetched(w + panel_stride), stride); _tile_dpbf16ps(1, 4, 6); }
}

template <int P>
inline void store(float* c) {
  _tile_stored(0, c, kWidth * 4);
  if constexpr (P > 1) _tile_stored(1, c + kWidth * kWidth, kWidth * 4);
}

// P panels (features width wide each, 16 but for the last) for `rows` rows whose hi/lo tile is at a: y = hi + lo
// sums, + bias, + residual, stored rows x P * width.
template <int P>
void panels(const at::BFloat16* a, int64_t Kp, const at::BFloat16* w, int64_t panel_stride, int64_t width,
            int64_t rows, float* y, int64_t ldy, const float* bias, const float* residual) {
  zero<P>();
  const int64_t step = kDepth / 2 * width * 2;  // one weight tile's values
  for (int64_t k = 0; k < Kp; k += kDepth) {
    _tile_loadd(4, a + k, Kp * 2);
    multiply<P>(w + k / kDepth * step, panel_stride, width * 4);
  }
  alignas(64) float c[kPanels * kWidth * kWidth];
  store<P>(c);
  const __mmask16 mask = width == kWidth ? 0xffff : static_cast<__mmask16>((1u << width) - 1);
  for (int p = 0; p < P; p++)
    for (int64_t r = 0; r < rows; r++) {
      const float* sums = c + p * kWidth * kWidth;
      __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sums + r * kWidth),
                               _mm512_maskz_loadu_ps(mask, sums + (rows + r) * kWidth));
      const int64_t at = p * kWidth;
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + at));
      if (residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, residual + r * ldy + at));
      _mm512_mask_storeu_ps(y + r * ldy + at, mask, v);
    }
}

// Output features [n0, n0 + count * 16) (count <= 2 whole panels) or the tail (count 0) for every row block.
void group(const at::BFloat16* a, int64_t M, int64_t Kp, const at::BFloat16* W, int64_t N, int64_t n0, int64_t count,
           float* Y, const float* bias, const float* residual, int64_t& configured) {
  const int64_t width = count ? kWidth : N % kWidth, panel_stride = Kp * kWidth;
  const at::BFloat16* w = W + n0 * Kp;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int64_t rows = std::min(kRows, M - m0), key = rows * 64 + width;
    if (configured != key) configure(rows, width), configured = key;
    const at::BFloat16* am = a + m0 * 2 * Kp;
    float* y = Y + m0 * N + n0;
    const float* b = bias ? bias + n0 : nullptr;
    const float* r = residual ? residual + m0 * N + n0 : nullptr;
    if (count == 2) panels<2>(am, Kp, w, panel_stride, width, rows, y, N, b, r);
    else panels<1>(am, Kp, w, panel_stride, width, rows, y, N, b, r);
  }
}

void product(const float* X, const at::BFloat16* W, const float* bias, int64_t M, int64_t N, int64_t K, float* Y,
             const float* residual) {
  const int64_t Kp = (K + kDepth - 1) / kDepth * kDepth, full = N / kWidth;
  const int64_t groups = (full + kPanels - 1) / kPanels, units = groups + (N % kWidth ? 1 : 0);
  thread_local std::vector<at::BFloat16> buffer;
  at::BFloat16* a = aligned(buffer, (M + kRows - 1) / kRows * 2 * kRows * Kp);
  split_rows(X, M, K, Kp, a);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    int64_t configured = -1;  // the tile configuration is each thread's own: loaded once per call and shape
    for (int64_t g = begin; g < end; g++) {
      const bool tail = g == groups;
      const int64_t n0 = tail ? full * kWidth : g * kPanels * kWidth;
      group(a, M, Kp, W, N, n0, tail ? 0 : std::min<int64_t>(kPanels, full - g * kPanels), Y, bias, residual,
            configured);
    }
  });
}

}  // namespace amx

#pragma GCC pop_options

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes;
}

bool has_vnni() {
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}

// AMX tiles with bfloat16 and AVX-512 BF16 (CPUID leaf 7: EDX bits 22, 24; sub-leaf 1 EAX bit 5), and Linux's
// permission for this process to use the tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked
// once: without it the first tile instruction dies of SIGILL.
bool has_amx() {
  static const bool yes = [] {
    unsigned a, b, c, d;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return yes;
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, int64_t width, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) > 0,
              "x: contiguous float32 [M, K], K > 0");
  const auto type = w.scalar_type();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf),
              "w: float32, bfloat16 or float16 panels (quant.panels), a contiguous 1-D tensor");
  TORCH_CHECK(width == kPanelWidth || (width == wide::kWidth && has_avx512()) || (width == amx::kLayout && has_amx()),
              "width: ", width, " is not ", kPanelWidth, has_avx512() ? " or 16" : " (this CPU has no AVX-512 for 16)",
              has_amx() ? " or 32 (AMX)" : "");
  const bool tiles = width == amx::kLayout;
  TORCH_CHECK(!tiles || type == at::kBFloat16, "w: AMX panels (width 32) are bfloat16, not ", type);
  const int64_t Kp = tiles ? (K + amx::kDepth - 1) / amx::kDepth * amx::kDepth : K;  // AMX: K padded to 32
  TORCH_CHECK(w.numel() % Kp == 0, "w: panels of ", Kp, "-feature rows", tiles ? " (K padded to 32)" : "",
              ", but its ", w.numel(), " values are not a multiple");
  const int64_t N = w.numel() / Kp;
  const float* b_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(), "bias: float32 [N]");
    b_ptr = bias->data_ptr<float>();
  }
  const float* R = residual_data(residual, M, N);
  auto y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  auto product = [&](auto* weight) {
    if constexpr (std::is_same_v<std::remove_const_t<std::remove_pointer_t<decltype(weight)>>, at::BFloat16>)
      if (width == amx::kLayout) return amx::product(X, weight, b_ptr, M, N, K, Y, R);
    if (width == wide::kWidth) wide::panel_product(X, weight, b_ptr, M, N, K, Y, R);
    else panel_product(X, weight, b_ptr, M, N, K, Y, R);
  };
  if (type == at::kFloat) product(w.data_ptr<float>());
  if (type == at::kBFloat16) product(w.data_ptr<at::BFloat16>());
  if (type == at::kHalf) product(w.data_ptr<at::Half>());
  return y;
}

// ----------------------------------------------------------------------------------------------------- attention

// e^x for x <= 0 (a score minus the row's maximum); below -87 it is 0, as float32 underflows there.
// e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor polynomial to degree 6 (the first
// term left out, r^7 / 7!, is below 1e-7 of the result).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln 2 in two parts, so r stays exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i exponent = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 e = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), exponent));
  return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ));
}

// Dot products of q with 4 keys (4 independent FMA chains; one chain a key waited on the FMA latency, 1.7x slower).
// Each key's sum is reduced by the same tree whichever of the 4 slots it is in.
template <class T>
inline void dot4(const float* q, const T* const key[4], int64_t D, float* out) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 4; j++) acc[j] = _mm256_fmadd_ps(x, load8(key[j] + d), acc[j]);
  }
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
  for (; d < D; d++)
    for (int j = 0; j < 4; j++) out[j] += q[d] * static_cast<float>(key[j][d]);
}

// out[0:8 * V] += sum over keys of p[s] * value_at(s)[0:8 * V], the 8 * V sums kept in registers.
template <int V, class ValueAt>
void add_weighted_values(const float* p, const ValueAt& value_at, int64_t S, float* out) {
  __m256 acc[V];
  for (int j = 0; j < V; j++) acc[j] = _mm256_loadu_ps(out + 8 * j);
  for (int64_t s = 0; s < S; s++) {
    if (p[s] == 0.0f) continue;  // masked or underflowed: adds nothing
    const __m256 weight = _mm256_set1_ps(p[s]);
    const auto* v = value_at(s);
    for (int j = 0; j < V; j++) acc[j] = _mm256_fmadd_ps(weight, load8(v + 8 * j), acc[j]);
  }
  for (int j = 0; j < V; j++) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

// Where one row's keys and values are: key s at k + s * k_stride, or, with a row table (beam search's reordered KV
// cache), at k + rows[s] * k_row_stride + s * k_stride: slot s of the cache row that wrote it; values alike. T:
// float32, or a 16-bit KV cache's bfloat16 or float16 (widened exactly as they are read).
template <class T>
struct RowKeys {
  const T *k, *v;
  int64_t k_stride, v_stride;
  const int64_t* rows;  // nullptr: every slot in this row
  int64_t k_row_stride, v_row_stride;
  const T* key(int64_t s) const { return k + (rows ? rows[s] * k_row_stride : 0) + s * k_stride; }
  const T* value(int64_t s) const { return v + (rows ? rows[s] * v_row_stride : 0) + s * v_stride; }
};

// softmax(q k^T / sqrt(D)) v for one query row over S keys; keys whose mask entry is false get weight 0. A key's
// score and weight do not depend on its index or on the other keys, and the sums over keys run in key order and skip
// weights of 0, so padding keys leave the result unchanged bit for bit (a row in a padded batch equals it alone).
template <class T>
void attend_row(const float* q, const RowKeys<T>& kv, const bool* mask, int64_t mask_stride, int64_t S, int64_t D,
                float scale, float* scores, float* out) {
  for (int64_t s = 0; s < S; s += 4) {
    const T* key[4];
    for (int j = 0; j < 4; j++) key[j] = kv.key(std::min(s + j, S - 1));
    float dots[4];
    dot4(q, key, D, dots);
    for (int j = 0; j < 4 && s + j < S; j++) scores[s + j] = dots[j] * scale;
  }
  float top = -INFINITY;
  for (int64_t s = 0; s < S; s++) {
    if (mask && !mask[s * mask_stride]) scores[s] = -INFINITY;
    top = std::max(top, scores[s]);
  }
  std::fill(out, out + D, 0.0f);
  if (top == -INFINITY) return;  // every key masked (callers always leave a row its own key)
  const __m256 shift = _mm256_set1_ps(top);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8)
    _mm256_storeu_ps(scores + s, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), shift)));
  if (s < S) {
    float tail[8];
    std::fill(tail, tail + 8, -INFINITY);
    std::copy(scores + s, scores + S, tail);
    _mm256_storeu_ps(tail, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), shift)));
    std::copy(tail, tail + (S - s), scores + s);
  }
  float total = 0.0f;
  for (s = 0; s < S; s++) total += scores[s];
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) add_weighted_values<8>(scores, [&](int64_t i) { return kv.value(i) + d; }, S, out + d);
  for (; d + 8 <= D; d += 8) add_weighted_values<1>(scores, [&](int64_t i) { return kv.value(i) + d; }, S, out + d);
  for (; d < D; d++)
    for (s = 0; s < S; s++) out[d] += scores[s] * static_cast<float>(kv.value(s)[d]);
  const float inverse = 1.0f / total;
  for (d = 0; d < D; d++) out[d] *= inverse;
}

// One operand of attention, [batch, heads, positions, head_dim], where it lies: any strides with head_dim
// contiguous, so the KV cache and the columns of the fused q/k/v product are read in place (as tensor views they
// cost ~10 ATen ops a layer, ~1 us each here).
template <class T>
struct StridedOf {
  const T* data;
  int64_t batch, head, position;
};
using Strided = StridedOf<float>;

template <class T = float>
inline StridedOf<T> strided(const at::Tensor& t) { return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)}; }

// Runs f on a null pointer of the element type of a KV cache or keys: float32, bfloat16 or float16.
template <class F>
inline auto with_key_type(at::ScalarType type, const F& f) {
  if (type == at::kBFloat16) return f(static_cast<at::BFloat16*>(nullptr));
  if (type == at::kHalf) return f(static_cast<at::Half*>(nullptr));
  return f(static_cast<float*>(nullptr));
}

// Attention of a decode step: q [B, H, T, D], k and v [B, Hkv, S, D] (H a multiple of Hkv, the heads of a group
// sharing their keys), mask bool broadcastable to [B, 1, T, S] or None -> [B, T, H, D] contiguous, which is the
// output projection's input as it is. No causal mask: the T queries see the same keys (a step's one token, or the
// beams of one source folded into T for cross-attention). With `rows`, row b's key s is in cache row rows[b][s].
template <class Key>
at::Tensor attend(const Strided& q, const StridedOf<Key>& k, const StridedOf<Key>& v, int64_t B, int64_t H, int64_t T, int64_t Hkv,
                  int64_t S, int64_t D, const c10::optional<at::Tensor>& mask, const int64_t* rows,
                  int64_t rows_stride) {
  const bool* M = nullptr;
  int64_t mask_batch = 0, mask_query = 0, mask_key = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(1) == 1 && (m.size(0) == B || m.size(0) == 1) &&
                    (m.size(2) == T || m.size(2) == 1) && (m.size(3) == S || m.size(3) == 1),
                "mask: bool [batch, 1, length or 1, keys] broadcastable to [", B, ", 1, ", T, ", ", S, "], got ",
                m.sizes());
    M = m.data_ptr<bool>();
    mask_batch = m.size(0) == 1 ? 0 : m.stride(0);
    mask_query = m.size(2) == 1 ? 0 : m.stride(2);
    mask_key = m.size(3) == 1 ? 0 : m.stride(3);
  }
  auto y = at::empty({B, T, H, D}, at::TensorOptions().dtype(at::kFloat));
  float* Y = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // One thread only when the call is tiny (2^15 query-key products): in a decode step the keys and values come from
  // memory, not from cache, and two threads read them faster. Total time in these ops over a whole generation,
  // threshold 2^18 -> 2^15 (medians of 3 profiled runs): GPT-2 int8 batch 1, 128 tokens 80 -> 58 ms; a batch-32
  // opus-mt-sized translation 35 -> 21 ms greedy, 73 -> 62 ms beam 4; batch-1 beam 4 unchanged (3.3 ms).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, S * D));
  at::parallel_for(0, B * H * T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S);
    for (int64_t i = begin; i < end; i++) {
      const int64_t b = i / (H * T), h = i / T % H, t = i % T, g = h / (H / Hkv);
      const int64_t own = rows ? 0 : b;
      const RowKeys<Key> kv{k.data + own * k.batch + g * k.head, v.data + own * v.batch + g * v.head, k.position,
                       v.position, rows ? rows + b * rows_stride : nullptr, k.batch, v.batch};
      attend_row(q.data + b * q.batch + h * q.head + t * q.position, kv,
                 M ? M + b * mask_batch + t * mask_query : nullptr, mask_key, S, D, scale, scores.data(),
                 Y + ((b * T + t) * H + h) * D);
    }
  });
  return y;
}

// Attention over packed tokens (an encoder's, layers.Unpadded): qkv [N, 3 * H * D], each token's q, k and v side by
// side (the fused product), sources one after another, source b's tokens [starts[b], starts[b + 1]) -> [N, H * D],
// each token attending to its own source's tokens only: the same bits as attend() on the padded layout with the
// padding masked (attend_row skips masked keys exactly), without unpacking q, k and v to that layout and packing the
// output back (~0.2 ms a layer for the translation benchmark's 32 sources), or attending from padding queries.
at::Tensor packed_attention(const at::Tensor& qkv, const at::Tensor& starts, int64_t H) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && H > 0 &&
                  qkv.size(1) % (3 * H) == 0,
              "qkv: contiguous float32 [tokens, 3 x ", H, " x head_dim], got ", qkv.sizes());
  const int64_t N = qkv.size(0), D = qkv.size(1) / (3 * H), row = 3 * H * D;
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) >= 2 && starts.scalar_type() == at::kLong && starts.is_contiguous(),
              "starts: int64 [sources + 1]");
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t B = starts.size(0) - 1;
  TORCH_CHECK(start[0] == 0 && start[B] == N, "starts: from 0 to ", N, " tokens, got ", start[0], " to ", start[B]);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(start[b] <= start[b + 1], "starts: not in order at source ", b);
    longest = std::max(longest, start[b + 1] - start[b]);
  }
  auto y = at::empty({N, H * D}, qkv.options());
  const float* X = qkv.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, longest * D));
  at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest);
    for (int64_t i = begin; i < end; i++) {
      const int64_t n = i / H, h = i % H;
      const int64_t b = std::upper_bound(start, start + B + 1, n) - start - 1, first = start[b];
      const RowKeys<float> kv{X + first * row + H * D + h * D, X + first * row + 2 * H * D + h * D, row, row,
                              nullptr, 0, 0};
      attend_row(X + n * row + h * D, kv, nullptr, 0, start[b + 1] - first, D, scale, scores.data(),
                 Y + n * H * D + h * D);
    }
  });
  return y;
}

// attend() on tensors: q [B, H, T, D], k and v [B, Hkv, S, D], any strides with D contiguous.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: [batch, heads, length, head_dim]");
  const auto keys = k.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v.scalar_type() == keys &&
                  (keys == at::kFloat || keys == at::kBFloat16 || keys == at::kHalf),
              "q: float32, k and v: float32, bfloat16 or float16 alike");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "k and v [", B, ", a divisor of ", H, ", S, ", D, "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v: head_dim contiguous");
  return with_key_type(keys, [&](auto* type) {
    using Key = std::remove_pointer_t<decltype(type)>;
    return attend(strided(q), strided<Key>(k), strided<Key>(v), B, H, T, Hkv, S, D, mask, nullptr, 0);
  });
}

// attend_cached (below) on a cache of element type T.
template <class T>
at::Tensor attend_cached_as(const Strided& q, int64_t H, const Strided& k_new, const Strided& v_new, at::Tensor& k_cache,
                            at::Tensor& v_cache, int64_t layer, int64_t slot, int64_t read,
                            const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& rows) {
  const int64_t B = k_cache.size(1), Hkv = k_cache.size(2), capacity = k_cache.size(3), D = k_cache.size(4);
  TORCH_CHECK(0 <= layer && layer < k_cache.size(0) && 0 <= slot && slot < read && read <= capacity,
              "layer ", layer, ", slot ", slot, ", read ", read, " outside the cache ", k_cache.sizes());
  T *keys = k_cache.data_ptr<T>(), *values = v_cache.data_ptr<T>();
  for (int64_t b = 0; b < B; b++)
    for (int64_t g = 0; g < Hkv; g++) {
      const int64_t to = layer * k_cache.stride(0) + b * k_cache.stride(1) + g * k_cache.stride(2) +
                         slot * k_cache.stride(3);  // v_cache has the same strides (check_caches)
      const float *k = k_new.data + b * k_new.batch + g * k_new.head, *v = v_new.data + b * v_new.batch + g * v_new.head;
      if constexpr (std::is_same_v<T, float>) {
        std::memcpy(keys + to, k, sizeof(float) * D);
        std::memcpy(values + to, v, sizeof(float) * D);
      } else {  // rounded to nearest even, as torch's .to(dtype) does
        for (int64_t d = 0; d < D; d++) keys[to + d] = T(k[d]), values[to + d] = T(v[d]);
      }
    }
  const int64_t* table = nullptr;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 2 && rows->size(0) == B &&
                    rows->size(1) >= read && rows->stride(1) == 1,
                "rows: int64 [", B, ", >= ", read, "] with slots contiguous, got ", rows->sizes());
    table = rows->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++)
      for (int64_t s = 0; s < read; s++)
        TORCH_CHECK(0 <= table[b * rows->stride(0) + s] && table[b * rows->stride(0) + s] < B,
                    "rows[", b, ", ", s, "] = ", table[b * rows->stride(0) + s], " is not a cache row");
  }
  const int64_t layer_offset = layer * k_cache.stride(0);
  const StridedOf<T> k{keys + layer_offset, k_cache.stride(1), k_cache.stride(2), k_cache.stride(3)};
  const StridedOf<T> v{values + layer_offset, v_cache.stride(1), v_cache.stride(2), v_cache.stride(3)};
  return attend(q, k, v, B, H, 1, Hkv, read, D, mask, table, table ? rows->stride(0) : 0);
}

// A self-attention decode step on the KV cache [layers, B, Hkv, capacity, D] (float32, or bfloat16 / float16: the
// new keys and values rounded as they are written): writes this step's keys and values (k_new, v_new: [B, Hkv, D]
// at the given strides) into slot `slot` of layer `layer`, then attends over slots [0, read) as decode_attention
// does. One call instead of the ~10 small ops of writing and viewing the cache from Python. With `rows` (int64 [B,
// >= read]), row b reads slot s from cache row rows[b][s]: beam search reorders its beams by reordering that table
// instead of copying every filled slot of the cache (each step writes one slot of every row, so a slot's keys stay
// where they were written).
at::Tensor attend_cached(const Strided& q, int64_t H, const Strided& k_new, const Strided& v_new, at::Tensor& k_cache,
                         at::Tensor& v_cache, int64_t layer, int64_t slot, int64_t read,
                         const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& rows) {
  return with_key_type(k_cache.scalar_type(), [&](auto* type) {
    return attend_cached_as<std::remove_pointer_t<decltype(type)>>(q, H, k_new, v_new, k_cache, v_cache, layer, slot,
                                                                   read, mask, rows);
  });
}

// The caches: [layers, batch, kv_heads, capacity, head_dim], contiguous but maybe for the batch (DecoderStack steps a
// range of rows on a view), both with the same strides.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const auto type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 5 && (type == at::kFloat || type == at::kBFloat16 || type == at::kHalf) &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides() &&
                  v_cache.scalar_type() == type &&
                  k_cache.stride(4) == 1 && k_cache.stride(3) == k_cache.size(4) &&
                  k_cache.stride(2) == k_cache.size(3) * k_cache.stride(3) &&
                  k_cache.stride(1) == k_cache.size(2) * k_cache.stride(2),
              "caches: float32, bfloat16 or float16 alike [layers, batch, kv_heads, capacity, head_dim], contiguous from "
              "the batch in");
}

// attend_cached on q [B, H, 1, D] and k_new, v_new [B, Hkv, 1, D] (any strides with D contiguous).
at::Tensor cached_decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                   at::Tensor& k_cache, at::Tensor& v_cache, int64_t layer, int64_t slot,
                                   int64_t read, const c10::optional<at::Tensor>& mask,
                                   const c10::optional<at::Tensor>& rows) {
  check_caches(k_cache, v_cache);
  const int64_t B = k_cache.size(1), Hkv = k_cache.size(2), D = k_cache.size(4);
  for (const at::Tensor* kv : {&k_new, &v_new})
    TORCH_CHECK(kv->dim() == 4 && kv->size(0) == B && kv->size(1) == Hkv && kv->size(2) == 1 && kv->size(3) == D &&
                    kv->stride(3) == 1 && kv->scalar_type() == at::kFloat,
                "k_new, v_new: float32 [", B, ", ", Hkv, ", 1, ", D, "] with head_dim contiguous, got ", kv->sizes());
  TORCH_CHECK(q.dim() == 4 && q.size(0) == B && q.size(1) % Hkv == 0 && q.size(2) == 1 && q.size(3) == D &&
                  q.stride(3) == 1 && q.scalar_type() == at::kFloat,
              "q: float32 [", B, ", a multiple of ", Hkv, ", 1, ", D, "] with head_dim contiguous, got ", q.sizes());
  return attend_cached(strided(q), q.size(1), strided(k_new), strided(v_new), k_cache, v_cache, layer, slot, read,
                       mask, rows);
}

// cached_decode_attention on the fused q/k/v product qkv [B, 1, 3 * H * D] (q, k and v side by side, as
// layers.Attention computes them in one product when keys have as many heads as queries): its views are taken here,
// where they cost no Python (five small ops a layer from Python).
at::Tensor cached_decode_attention_fused(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                                         int64_t layer, int64_t slot, int64_t read,
                                         const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& rows) {
  check_caches(k_cache, v_cache);
  const int64_t B = k_cache.size(1), H = k_cache.size(2), D = k_cache.size(4);
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.numel() == B * 3 * H * D,
              "qkv: contiguous float32 [", B, ", 1, 3 x ", H, " x ", D, "] (q, k and v side by side), got ",
              qkv.sizes());
  const float* data = qkv.data_ptr<float>();
  const int64_t row = 3 * H * D;  // [B, 3, H, D]: the part, then the head
  return attend_cached({data, row, D, 0}, H, {data + H * D, row, D, 0}, {data + 2 * H * D, row, D, 0}, k_cache,
                       v_cache, layer, slot, read, mask, rows);
}

// ----------------------------------------------------------------------------------------------------- greedy

// The index of the largest value of each row of x [..., V] float32, the first one on ties and the first NaN if a
// row has any: torch.argmax's answer -> int64 [...]. torch's reduction reads a row at ~2 ns a value here: 0.1 ms
// of a ~7 ms GPT-2 int8 decode step for its 50257 logits.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) > 0,
              "x: contiguous float32 [..., values > 0], got ", x.sizes());
  const int64_t V = x.size(-1), R = x.numel() / V;
  auto out = at::empty(x.sizes().slice(0, x.dim() - 1), at::TensorOptions().dtype(at::kLong));
  int64_t* O = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; r++) {
    const float* row = x.data_ptr<float>() + r * V;
    __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
    int64_t v = 0;
    for (; v + 8 <= V; v += 8) {
      const __m256 a = _mm256_loadu_ps(row + v);
      top8 = _mm256_max_ps(top8, a);
      nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(top8), _mm256_extractf128_ps(top8, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    bool nan = _mm256_movemask_ps(nan8) != 0;
    for (; v < V; v++) {
      if (std::isnan(row[v])) nan = true;
      top = std::max(top, row[v]);
    }
    // the first index holding the answer: vectors of 8 compared at once, then the tail
    const __m256 want = _mm256_set1_ps(top);
    int64_t i = 0, found = -1;
    for (; i + 8 <= V && found < 0; i += 8) {
      const __m256 a = _mm256_loadu_ps(row + i);
      const int hits = _mm256_movemask_ps(nan ? _mm256_cmp_ps(a, a, _CMP_UNORD_Q) : _mm256_cmp_ps(a, want, _CMP_EQ_OQ));
      if (hits) found = i + __builtin_ctz(hits);
    }
    for (; i < V && found < 0; i++)
      if (nan ? std::isnan(row[i]) : row[i] == top) found = i;
    O[r] = found;  // top is one of the row's values, so it is found
  }
  return out;
}

constexpr int64_t kMostTop = 64;  // the largest k topk_rows and beam_topk take

// The k largest of a sequence of values into best / where, largest first, equal values in index order (torch.topk
// leaves their order open). Values are offered in index order: the first k always, then only those that may beat the
// k-th best so far, which offer_all checks 8 at a time. A NaN offered is remembered (at::topk ranks NaN first;
// callers fall back to it).
struct TopK {
  int64_t k, count = 0;
  float* best;
  int64_t* where;
  bool nan = false;
  bool full() const { return count == k; }
  void offer(float v, int64_t i) {
    if (std::isnan(v)) {
      nan = true;
    } else if (count < k || v > best[k - 1]) {  // after every kept value >= v: equal values stay in index order
      int64_t j = count < k ? count++ : k - 1;
      for (; j > 0 && best[j - 1] < v; j--) best[j] = best[j - 1], where[j] = where[j - 1];
      best[j] = v, where[j] = i;
    }
  }
  // the values f(i), i in [0, n), at indices offset + i; f8(i) is f(i .. i + 7) as a vector
  template <class F, class F8>
  void offer_all(int64_t n, int64_t offset, const F& f, const F8& f8) {
    int64_t i = 0;
    for (; i < n && !full() && !nan; i++) offer(f(i), offset + i);
    for (; i + 8 <= n && !nan; i += 8) {  // greater than the k-th best, or unordered (a NaN)
      int hits = _mm256_movemask_ps(_mm256_cmp_ps(f8(i), _mm256_set1_ps(best[k - 1]), _CMP_NLE_UQ));
      for (; hits; hits &= hits - 1) offer(f(i + __builtin_ctz(hits)), offset + i + __builtin_ctz(hits));
    }
    for (; i < n && !nan; i++) offer(f(i), offset + i);
  }
  // row r of values / indices [R, k] is already written; when a NaN was offered, at::topk of values() instead
  template <class Values>
  void finish(at::Tensor& values, at::Tensor& indices, int64_t r, const Values& all) const {
    if (!nan && full()) return;
    const auto [v, w] = at::topk(all(), k);
    values.select(0, r).copy_(v), indices.select(0, r).copy_(w);
  }
};

// The k largest values of each row of x [R, V], largest first, and their indices: what x.topk(k) gives, with equal
// values in index order. Beam search's step over [sources, beams x vocabulary] (benchmarks/translate.py: 32 x 32768,
// k 8) took ~0.99 ms in at::topk, ~0.08 here: batch-32 beam-4 translation 1.032x (10 of 10 pairs).
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, values]");
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(k >= 1 && k <= V && k <= kMostTop, "k: ", k, " is not in [1, min(", V, ", ", kMostTop, ")]");
  auto values = at::empty({R, k}, x.options());
  auto indices = at::empty({R, k}, x.options().dtype(at::kLong));
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float* row = x.data_ptr<float>() + r * V;
      TopK top{k, 0, values.data_ptr<float>() + r * k, indices.data_ptr<int64_t>() + r * k};
      top.offer_all(V, 0, [&](int64_t i) { return row[i]; }, [&](int64_t i) { return _mm256_loadu_ps(row + i); });
      top.finish(values, indices, r, [&] { return x.select(0, r); });
    }
  });
  return {values, indices};
}

// wide::log_sum_exp on CPUs without AVX-512: 8 lanes, exp_nonpositive.
std::pair<float, float> log_sum_exp8(const float* row, int64_t V) {
  __m256 top[4];
  for (auto& t : top) t = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 32 <= V; i += 32)
    for (int j = 0; j < 4; j++) top[j] = _mm256_max_ps(top[j], _mm256_loadu_ps(row + i + 8 * j));
  float lanes[8], largest = -INFINITY, sum = 0.0f;
  _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(top[0], top[1]), _mm256_max_ps(top[2], top[3])));
  for (float v : lanes) largest = std::max(largest, v);
  for (; i < V; i++) largest = std::max(largest, row[i]);
  const __m256 shift = _mm256_set1_ps(largest);
  __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (i = 0; i + 16 <= V; i += 16)
    for (int j = 0; j < 2; j++)
      sums[j] = _mm256_add_ps(sums[j], exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + i + 8 * j), shift)));
  _mm256_storeu_ps(lanes, _mm256_add_ps(sums[0], sums[1]));
  for (float v : lanes) sum += v;
  for (; i < V; i++) sum += std::exp(row[i] - largest);
  return {largest, std::log(sum)};
}

// Beam search's step (generation/beam.py) in one pass a source: each row of logits x [R, V] to log-probabilities,
// (x - max) - log(sum(exp(x - max))) as torch.log_softmax computes them, the banned token ids at -inf, plus the row's
// score; then the k best of each source's `group` rows side by side ([R / group, group x V]), as topk_rows ->
// values, indices [R / group, k]. The ATen ops it replaces (log_softmax in place, index_fill, add, topk) took ~0.55
// ms a batch-32 beam-4 step over its 4 MB of logits. exp is a polynomial (log-probabilities equal torch's to
// rounding, ~1e-6), 16 lanes with AVX-512.
std::tuple<at::Tensor, at::Tensor> beam_topk(const at::Tensor& x, const at::Tensor& scores, int64_t group, int64_t k,
                                             const c10::optional<at::Tensor>& banned) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, vocabulary]");
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == R && scores.scalar_type() == at::kFloat && scores.is_contiguous(),
              "scores: contiguous float32 [", R, "], got ", scores.sizes());
  TORCH_CHECK(group >= 1 && R % group == 0, "group: ", group, " does not divide ", R, " rows");
  TORCH_CHECK(k >= 1 && k <= group * V && k <= kMostTop, "k: ", k, " is not in [1, min(", group * V, ", ", kMostTop, ")]");
  std::vector<int64_t> ban;
  if (banned.has_value()) {
    TORCH_CHECK(banned->dim() == 1 && banned->scalar_type() == at::kLong, "banned: int64 token ids [n]");
    const at::Tensor ids = banned->contiguous();
    ban.assign(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    for (int64_t id : ban) TORCH_CHECK(0 <= id && id < V, "banned id ", id, " is not in [0, ", V, ")");
    std::sort(ban.begin(), ban.end());
  }
  const int64_t sources = R / group;
  auto values = at::empty({sources, k}, x.options());
  auto indices = at::empty({sources, k}, x.options().dtype(at::kLong));
  const float *X = x.data_ptr<float>(), *S = scores.data_ptr<float>();
  std::vector<float> shift(R), log_sum(R);
  auto total = [&](int64_t r, int64_t i) {  // one log-probability plus its row's score
    return std::binary_search(ban.begin(), ban.end(), i) ? -INFINITY + S[r] : ((X[r * V + i] - shift[r]) - log_sum[r]) + S[r];
  };
  at::parallel_for(0, sources, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; s++) {
      TopK top{k, 0, values.data_ptr<float>() + s * k, indices.data_ptr<int64_t>() + s * k};
      for (int64_t r = s * group; r < (s + 1) * group; r++) {
        std::tie(shift[r], log_sum[r]) = has_avx512() ? wide::log_sum_exp(X + r * V, V) : log_sum_exp8(X + r * V, V);
        const __m256 m8 = _mm256_set1_ps(shift[r]), c8 = _mm256_set1_ps(log_sum[r]), score8 = _mm256_set1_ps(S[r]);
        // a banned token's vector value may pass the k-th best: total() then offers its -inf
        top.offer_all(V, (r - s * group) * V, [&](int64_t i) { return total(r, i); }, [&](int64_t i) {
          return _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(X + r * V + i), m8), c8), score8);
        });
      }
      top.finish(values, indices, s, [&] {  // the same totals as a tensor, for at::topk
        at::Tensor all = at::empty({group * V}, x.options());
        for (int64_t g = 0; g < group; g++)
          for (int64_t i = 0; i < V; i++) all.data_ptr<float>()[g * V + i] = total(s * group + g, i);
        return all;
      });
    }
  });
  return {values, indices};
}

// ------------------------------------------------------------------------------------------ a decoder layer's step

// One weight matrix as the kernels above read it: int8 with one scale per output row, or float32 / 16-bit panels
// `width` features wide.
struct Matrix {
  at::Tensor weight;
  c10::optional<at::Tensor> scale, bias;
  int64_t width;
  bool vnni;
  at::Tensor operator()(const at::Tensor& x, const c10::optional<at::Tensor>& residual = c10::nullopt) const {
    return scale.has_value() ? int8_linear(x, weight, *scale, bias, residual, vnni)
                             : panel_linear(x, weight, width, bias, residual);
  }
};

// A Transformer block's decode step (one new token a row) in one call: the same ATen norms, rotations and
// activations and the same kernels as layers.Block runs from Python, in the same order, so the result is bit for bit
// the same; what goes is the Python between them (module calls, views, checks: ~60% of a GPT-2 int8 step's time
// outside the matrix products here). Self-attention on the fused q/k/v product and the KV cache (rotary positions
// and grouped keys as Llama has them); cross-attention (seq2seq decoders) to keys and values the cache holds per
// source; LayerNorm or RMSNorm, pre-norm, x + f(norm(x)), or post-norm, norm(x + f(x)).
struct DecoderLayer : torch::CustomClassHolder {
  std::vector<c10::optional<at::Tensor>> norms;  // weight, bias of: self-attention, cross-attention, feed-forward
  std::vector<Matrix> matrices;  // q/k/v fused, output; cross: q, output; feed-forward: up, gate, down
  int64_t heads, kv_heads, head_dim;
  bool post_norm, rms_norm, cross;
  std::string activation;  // relu, gelu, gelu_tanh, silu, swiglu (silu(gate) * up)
  double eps;

  enum { kQKV, kOut, kCrossQ, kCrossOut, kUp, kGate, kDown };

  DecoderLayer(c10::List<c10::optional<at::Tensor>> norm_tensors, c10::List<c10::optional<at::Tensor>> matrix_tensors,
               int64_t heads, int64_t kv_heads, int64_t head_dim, bool post_norm, bool rms_norm, std::string activation,
               double eps, int64_t panel_width, bool vnni, bool amx)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), post_norm(post_norm), rms_norm(rms_norm),
        activation(std::move(activation)), eps(eps) {
    TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "DecoderLayer: ", heads, " heads in groups of ", kv_heads);
    TORCH_CHECK(panel_width == kPanelWidth || (panel_width == wide::kWidth && has_avx512()), "DecoderLayer: panel width ",
                panel_width, " is not one this CPU reads");
    TORCH_CHECK(!vnni || has_vnni(), "DecoderLayer: this CPU has no AVX-512 VNNI");
    TORCH_CHECK(!amx || has_amx(), "DecoderLayer: this CPU has no AMX (bfloat16)");
    TORCH_CHECK(norm_tensors.size() == 6 && matrix_tensors.size() == 21,
                "DecoderLayer: 3 norms (weight, bias) and 7 matrices (weight, scale, bias)");
    for (const auto& t : norm_tensors) norms.push_back(t);
    for (size_t i = 0; i < 21; i += 3) {
      const c10::optional<at::Tensor> weight = matrix_tensors.get(i);
      const bool tiles = amx && weight.has_value() && weight->scalar_type() == at::kBFloat16;  // quant.amx_panels
      matrices.push_back({weight.has_value() ? *weight : at::Tensor(), matrix_tensors.get(i + 1), matrix_tensors.get(i + 2),
                          tiles ? amx::kLayout : panel_width, vnni});
    }
    cross = matrices[kCrossQ].weight.defined();
    const std::vector<std::string> known{"relu", "gelu", "gelu_tanh", "silu", "swiglu"};
    TORCH_CHECK(std::find(known.begin(), known.end(), this->activation) != known.end(), "activation ",
                this->activation, " is not one of relu, gelu, gelu_tanh, silu, swiglu");
    for (int i : {kQKV, kOut, kUp, kDown})
      TORCH_CHECK(matrices[i].weight.defined(), "DecoderLayer: matrix ", i, " missing");
    TORCH_CHECK(!cross || matrices[kCrossOut].weight.defined(), "DecoderLayer: cross-attention output missing");
    TORCH_CHECK((this->activation == "swiglu") == matrices[kGate].weight.defined(), "DecoderLayer: gate iff swiglu");
  }

  at::Tensor norm(const at::Tensor& x, int which) const {
    if (rms_norm) return at::rms_norm(x, {x.size(-1)}, c10::nullopt, eps).mul(*norms[2 * which]);  // as layers.RMSNorm
    return at::layer_norm(x, {x.size(-1)}, norms[2 * which], norms[2 * which + 1], eps);
  }

  // layers.apply_rotary: x * cos + rotate_half(x) * sin
  static at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    const int64_t half = x.size(-1) / 2;
    return x.mul(cos).add(at::cat({x.narrow(-1, half, x.size(-1) - half).neg(), x.narrow(-1, 0, half)}, -1).mul(sin));
  }

  // One sublayer: x + f(norm(x)) or norm(x + f(x)); f adds its residual argument as it stores its output.
  template <class F>
  at::Tensor sublayer(const at::Tensor& x, int which, const F& f) const {
    return post_norm ? norm(f(x, x), which) : f(norm(x, which), x);
  }

  // x [B, 1, d_model] float32 -> the layer's output, same shape. Self-attention writes this token's keys and
  // values into slot `slot` of layer `layer` of the cache and reads slots [0, read) (cached_decode_attention),
  // after rotating queries and keys by rope_cos, rope_sin [B, 1, 1, head_dim] when given; cross-attention reads
  // cross_k, cross_v [sources, heads, S, head_dim] (the B rows are sources x beams).
  at::Tensor step(const at::Tensor& x_in, at::Tensor k_cache, at::Tensor v_cache, int64_t layer, int64_t slot,
                  int64_t read, const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& rows,
                  const c10::optional<at::Tensor>& cross_k, const c10::optional<at::Tensor>& cross_v,
                  const c10::optional<at::Tensor>& cross_mask, const c10::optional<at::Tensor>& rope_cos,
                  const c10::optional<at::Tensor>& rope_sin) const {
    TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1 && x_in.is_contiguous() && x_in.scalar_type() == at::kFloat,
                "x: contiguous float32 [batch, 1, d_model], got ", x_in.sizes());
    TORCH_CHECK(cross == cross_k.has_value() && cross == cross_v.has_value(),
                cross ? "this layer's cross-attention needs cross_k and cross_v" : "this layer has no cross-attention");
    const int64_t B = x_in.size(0);
    at::Tensor x = x_in.view({B, x_in.size(2)});
    TORCH_CHECK(rope_cos.has_value() == rope_sin.has_value(), "rope_cos and rope_sin: both or neither");
    x = sublayer(x, 0, [&](const at::Tensor& h, const at::Tensor& residual) {
      const at::Tensor qkv = matrices[kQKV](h);
      at::Tensor a;
      if (!rope_cos.has_value() && kv_heads == heads) {
        a = cached_decode_attention_fused(qkv, k_cache, v_cache, layer, slot, read, mask, rows);
      } else {  // q, k and v as [B, heads, 1, head_dim] views of the product, as layers.Attention takes them
        const at::Tensor parts = qkv.view({B, 1, heads + 2 * kv_heads, head_dim});
        at::Tensor q = parts.narrow(2, 0, heads).transpose(1, 2), k = parts.narrow(2, heads, kv_heads).transpose(1, 2);
        const at::Tensor v = parts.narrow(2, heads + kv_heads, kv_heads).transpose(1, 2);
        if (rope_cos.has_value()) {
          q = rotate(q, *rope_cos, *rope_sin);
          k = rotate(k, *rope_cos, *rope_sin);
        }
        a = cached_decode_attention(q, k, v, k_cache, v_cache, layer, slot, read, mask, rows);
      }
      return matrices[kOut](a.view({B, heads * head_dim}), residual);
    });
    if (cross)
      x = sublayer(x, 1, [&](const at::Tensor& h, const at::Tensor& residual) {
        const int64_t sources = cross_k->size(0);
        TORCH_CHECK(sources > 0 && B % sources == 0, "cross_k: ", sources, " sources for ", B, " rows");
        // the G rows (beams) of a source share its keys: folded into the query length, [sources, heads, G, hd]
        const at::Tensor q = matrices[kCrossQ](h).view({sources, B / sources, heads, head_dim}).transpose(1, 2);
        const at::Tensor a = decode_attention(q, *cross_k, *cross_v, cross_mask);
        return matrices[kCrossOut](a.view({B, heads * head_dim}), residual);
      });
    x = sublayer(x, 2, [&](const at::Tensor& h, const at::Tensor& residual) {
      at::Tensor u;
      if (activation == "swiglu") {
        const at::Tensor gate = matrices[kGate](h);
        u = at::silu(gate).mul(matrices[kUp](h));
      } else {
        u = matrices[kUp](h);
        if (activation == "relu") u = at::relu(u);
        else if (activation == "silu") u = at::silu(u);
        else u = at::gelu(u, activation == "gelu" ? "none" : "tanh");
      }
      return matrices[kDown](u, residual);
    });
    return x.view(x_in.sizes());
  }
};

// A decoder's layers stepped in turn in one call from Python (layers.DecodeStack): the Python between one layer's
// step and the next (module calls, checks, a method call each) was ~8% of a GPT-2 int8 decode step here. Layer i
// uses layer i of the KV cache and cross_k[i], cross_v[i] (empty lists: no cross-attention).
struct DecoderStack : torch::CustomClassHolder {
  static constexpr int64_t kSplitRows = 16;  // the fewest rows a thread for each thread to step its own (see step)
  std::vector<c10::intrusive_ptr<DecoderLayer>> layers;
  int64_t weight_bytes = 0, weight_size = 1;  // the matrices' bytes, and the widest element's (4 float32, 1 int8)
  bool tiles = false;  // some matrix runs on AMX, whose arithmetic never limits a decode step

  explicit DecoderStack(c10::List<c10::intrusive_ptr<DecoderLayer>> list) {
    for (const auto& layer : list) {
      layers.push_back(layer);
      for (const Matrix& m : layers.back()->matrices)
        if (m.weight.defined()) {
          weight_bytes += m.weight.nbytes();
          weight_size = std::max<int64_t>(weight_size, m.weight.element_size());
          tiles = tiles || m.width == amx::kLayout;
        }
    }
  }

  // Whether each thread should step its own rows: from kSplitRows rows a thread, when every thread's second read of
  // the weights comes from the last-level cache (they fit in half of it: an opus-mt-sized decoder's 104 MB float32,
  // batch-32 translation 1.10x greedy and beam 4, 9-10 of 10 alternating pairs), or when each weight byte read
  // does 16 or more FLOPs a thread anyway (GPT-2-124M bfloat16 at 32 rows, 1.05x; in float32, 8 FLOPs a byte
  // from memory, it measured 0.91x; at 8 rows 0.93x / 0.75x). Not for AMX matrices: GPT-2 bfloat16 on AMX at 32 /
  // 64 rows ran 1.028x / 1.015x faster unsplit (4 of 4 / 2 of 4 alternating pairs).
  bool split(int64_t rows_per_thread) const {
    static const int64_t cache = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
    return rows_per_thread >= kSplitRows &&
           (2 * weight_bytes <= cache || (!tiles && 2 * rows_per_thread >= 16 * weight_size));
  }

  at::Tensor step(at::Tensor x, at::Tensor k_cache, at::Tensor v_cache, int64_t slot, int64_t read,
                  const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& rows,
                  c10::List<c10::optional<at::Tensor>> cross_k, c10::List<c10::optional<at::Tensor>> cross_v,
                  const c10::optional<at::Tensor>& cross_mask, const c10::optional<at::Tensor>& rope_cos,
                  const c10::optional<at::Tensor>& rope_sin) const {
    const int64_t n = static_cast<int64_t>(layers.size());
    TORCH_CHECK(cross_k.size() == cross_v.size() && (cross_k.empty() || static_cast<int64_t>(cross_k.size()) == n),
                "cross_k, cross_v: one per layer (", n, ") or none");
    std::vector<c10::optional<at::Tensor>> ks, vs;
    for (int64_t i = 0; i < n; i++) {
      ks.push_back(cross_k.empty() ? c10::nullopt : cross_k.get(i));
      vs.push_back(cross_v.empty() ? c10::nullopt : cross_v.get(i));
    }
    const int64_t B = x.size(0), threads = at::get_num_threads();
    const int64_t sources = ks.empty() || !ks[0].has_value() ? B : ks[0]->size(0);
    if (threads < 2 || !split(B / threads) || sources < threads || B % sources != 0 || at::in_parallel_region())
      return run(x, k_cache, v_cache, slot, read, mask, rows, ks, vs, cross_mask, rope_cos, rope_sin);
    // Each thread steps whole sources' rows through every layer on its own: one parallel region a step instead of
    // one for each matrix, norm and activation (~75 at 32 rows, each waiting for the slower thread), and the small
    // ops between the matrices split across the threads too. Every row's result is the same bit for bit (each
    // op's rows are independent of the others). Each thread then reads every weight: see split().
    const int64_t group = B / sources;  // the rows (beams) of a source
    auto part = [](const c10::optional<at::Tensor>& t, int64_t dim, int64_t start, int64_t length) {
      return t.has_value() && t->size(dim) > 1 ? c10::optional<at::Tensor>(t->narrow(dim, start, length)) : t;
    };
    at::Tensor out = at::empty_like(x);
    const at::ThreadLocalState state;  // inference mode and the like, which OpenMP's threads do not inherit
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t t = begin; t < end; t++) {
        const int64_t s0 = sources * t / threads, s1 = sources * (t + 1) / threads, b0 = s0 * group,
                      count = (s1 - s0) * group;
        std::vector<c10::optional<at::Tensor>> k_part, v_part;
        for (int64_t i = 0; i < n; i++) {
          k_part.push_back(part(ks[i], 0, s0, s1 - s0));
          v_part.push_back(part(vs[i], 0, s0, s1 - s0));
        }
        // the row table names cache rows, which are rows of the same source: relative to this part's first row
        const c10::optional<at::Tensor> rows_part =
            rows.has_value() ? c10::optional<at::Tensor>(at::sub(rows->narrow(0, b0, count), b0)) : c10::nullopt;
        out.narrow(0, b0, count).copy_(
            run(x.narrow(0, b0, count), k_cache.narrow(1, b0, count), v_cache.narrow(1, b0, count), slot, read,
                part(mask, 0, b0, count), rows_part, k_part, v_part, part(cross_mask, 0, s0, s1 - s0),
                part(rope_cos, 0, b0, count), part(rope_sin, 0, b0, count)));
      }
    });
    return out;
  }

  at::Tensor run(at::Tensor x, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t slot, int64_t read,
                 const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& rows,
                 const std::vector<c10::optional<at::Tensor>>& cross_k,
                 const std::vector<c10::optional<at::Tensor>>& cross_v, const c10::optional<at::Tensor>& cross_mask,
                 const c10::optional<at::Tensor>& rope_cos, const c10::optional<at::Tensor>& rope_sin) const {
    for (size_t i = 0; i < layers.size(); i++)
      x = layers[i]->step(x, k_cache, v_cache, static_cast<int64_t>(i), slot, read, mask, rows, cross_k[i],
                          cross_v[i], cross_mask, rope_cos, rope_sin);
    return x;
  }
};

}  // namespace

TORCH_LIBRARY(tinyformer, m) {
  m.class_<DecoderLayer>("DecoderLayer")
      .def(torch::init<c10::List<c10::optional<at::Tensor>>, c10::List<c10::optional<at::Tensor>>, int64_t, int64_t,
                       int64_t, bool, bool, std::string, double, int64_t, bool, bool>())
      // a method, not an op taking the layer: an op's call from Python looks up __torch_function__ on each argument,
      // and on a custom-class object that lookup fails by throwing a C++ exception (~30 us a call here)
      .def("step", &DecoderLayer::step);
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<c10::List<c10::intrusive_ptr<DecoderLayer>>>())
      .def("step", &DecoderStack::step)
      .def("splits", [](const c10::intrusive_ptr<DecoderStack>& self, int64_t rows) {
        return at::get_num_threads() > 1 && self->split(rows / at::get_num_threads());
      });
  m.def("int8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias, Tensor? residual=None, bool vnni=False) -> Tensor",
        &int8_linear);
  m.def("has_vnni() -> bool", [] { return has_vnni(); });
  m.def("has_amx() -> bool", [] { return has_amx(); });
  m.def("panel_linear(Tensor x, Tensor w, int width, Tensor? bias, Tensor? residual=None) -> Tensor", &panel_linear);
  m.def("panel_widths() -> int[]", [] { return has_avx512() ? std::vector<int64_t>{8, 16} : std::vector<int64_t>{8}; });
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor", &decode_attention);
  m.def("cached_decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int layer, int slot, int read, Tensor? mask, Tensor? rows=None) -> Tensor", &cached_decode_attention);
  m.def("cached_decode_attention_fused(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, int slot, "
        "int read, Tensor? mask, Tensor? rows=None) -> Tensor", &cached_decode_attention_fused);
  m.def("argmax_rows(Tensor x) -> Tensor", &argmax_rows);
  m.def("topk_rows(Tensor x, int k) -> (Tensor, Tensor)", &topk_rows);
  m.def("beam_topk(Tensor x, Tensor scores, int group, int k, Tensor? banned) -> (Tensor, Tensor)", &beam_topk);
  m.def("packed_attention(Tensor qkv, Tensor starts, int heads) -> Tensor", &packed_attention);
}
