// Packed ternary linear on CPU (layout: hgf/kernels/packing.py).
//
//   s_x = 127 / max(max|x|, eps), x_int = clamp(rint(x * s_x), -128, 127)      per token
//   acc = sum_k c_k * x_int_k - sum_k x_int_k   (c = W_t + 1 in {0,1,2}, so acc = x_int . W_t)
//   y   = float(acc) / (s_x * s_w)
//
// The weights are read packed (never unpacked into memory). With AVX-512 VNNI, one 64-byte
// load of packed bytes yields, per digit k, the codes of 64 contiguous weights: i2 by masking
// the 2-bit field (c_k << 2k, its scale 4^k removed after the sum), tq1 by splitting off the top
// trit with two compares and looking up the other four with vpermt2b (AVX512_VBMI). vpdpbusd
// then multiplies the u8 codes by the s8 activations into int32 lanes. Without these ISA
// extensions a portable loop (auto-vectorised, AVX2 clone via target_clones) is used.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HGF_X86 1
#define HGF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define HGF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HGF_X86 0
#define HGF_CLONES
#endif

namespace {

constexpr int64_t GROUP = 64;  // bytes per interleave group
constexpr int ROWS = 4;        // output rows per micro-kernel call

int g_isa = -1;  // 0 portable, 1 AVX-512 VNNI+VBMI; -1 not yet detected

int detect_isa() {
#if HGF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi"))
    return 1;
#endif
  return 0;
}

int isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// ---------------------------------------------------------------- portable micro-kernels
// digit k (0..per-1) of every byte value, for the base of the packing
struct DigitTable {
  uint8_t d[2][5][256];  // [packing: 0 i2, 1 tq1][digit][byte]
  DigitTable() {
    for (int v = 0; v < 256; ++v) {
      for (int k = 0; k < 4; ++k) d[0][k][v] = (v >> (2 * k)) & 3;
      for (int k = 0, t = v; k < 5; ++k, t /= 3) d[1][k][v] = t % 3;
    }
  }
};
const DigitTable kDigits;

// sum over the row of code * x_int (codes from bytes w[0, nbytes))
HGF_CLONES int32_t dot_portable(const uint8_t* w, int64_t nbytes, const int8_t* x, int per) {
  const int p = per == 4 ? 0 : 1;
  int32_t acc = 0;
  for (int64_t b = 0; b < nbytes; b += GROUP) {
    const int64_t g = std::min(GROUP, nbytes - b);
    const int8_t* xg = x + per * b;
    for (int k = 0; k < per; ++k) {
      const uint8_t* table = kDigits.d[p][k];
      for (int64_t j = 0; j < g; ++j) acc += int32_t(table[w[b + j]]) * xg[k * g + j];
    }
  }
  return acc;
}

// ---------------------------------------------------------------- AVX-512 micro-kernels
#if HGF_X86
HGF_AVX512 inline int32_t hsum(__m512i v) { return _mm512_reduce_add_epi32(v); }

// i2, R rows at once. Per 64-byte chunk: lo = w & 0x03 (digit 0) and w & 0x0C (4·digit 1), the
// same on w >> 4 for digits 2, 3; two accumulators per row, the second holding 4·sum (every
// lane a multiple of 4, so an exact arithmetic shift combines them).
template <int R>
HGF_AVX512 inline __attribute__((always_inline)) void i2_step(__m512i (&acc)[R][2],
                                                              const uint8_t* w, int64_t ld,
                                                              const int8_t* x, int64_t g,
                                                              __mmask64 lanes) {
  const __m512i m03 = _mm512_set1_epi8(0x03), m0c = _mm512_set1_epi8(0x0C);
  const __m512i x0 = _mm512_maskz_loadu_epi8(lanes, x), x1 = _mm512_maskz_loadu_epi8(lanes, x + g),
                x2 = _mm512_maskz_loadu_epi8(lanes, x + 2 * g),
                x3 = _mm512_maskz_loadu_epi8(lanes, x + 3 * g);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512i wv = _mm512_maskz_loadu_epi8(lanes, w + r * ld);
    const __m512i hi = _mm512_srli_epi16(wv, 4);  // digits 2, 3 into bits 0-3 of each byte
    __m512i a = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(wv, m03), x0);
    __m512i c = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(wv, m0c), x1);
    acc[r][0] = _mm512_dpbusd_epi32(a, _mm512_and_si512(hi, m03), x2);
    acc[r][1] = _mm512_dpbusd_epi32(c, _mm512_and_si512(hi, m0c), x3);
  }
}

template <int R>
HGF_AVX512 void i2_rows_avx512(const uint8_t* w, int64_t ld, int64_t nbytes, const int8_t* x,
                               int32_t* out) {
  __m512i acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  const int64_t full = nbytes - nbytes % GROUP;
  for (int64_t b = 0; b < full; b += GROUP) i2_step<R>(acc, w + b, ld, x + 4 * b, GROUP, ~0ULL);
  if (full < nbytes) {
    const int64_t g = nbytes - full;
    i2_step<R>(acc, w + full, ld, x + 4 * full, g, (__mmask64(1) << g) - 1);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    out[r] = hsum(_mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)));
}

// tq1, R rows at once. Byte q = c0 + 3c1 + 9c2 + 27c3 + 81c4: the top trit from two compares,
// c0..c3 of q - 81c4 (< 81) by one two-register byte permute each (128-entry table).
struct Tq1Tables {
  __m512i lo[4], hi[4];
};

template <int R>
HGF_AVX512 inline __attribute__((always_inline)) void tq1_step(__m512i (&acc)[R][2],
                                                               const Tq1Tables& t,
                                                               const uint8_t* w, int64_t ld,
                                                               const int8_t* x, int64_t g,
                                                               __mmask64 lanes) {
  const __m512i one = _mm512_set1_epi8(1), c81 = _mm512_set1_epi8(81),
                c80 = _mm512_set1_epi8(80), c161 = _mm512_set1_epi8(char(161));
  __m512i xv[5];
#pragma GCC unroll 5
  for (int k = 0; k < 5; ++k) xv[k] = _mm512_maskz_loadu_epi8(lanes, x + k * g);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m512i q = _mm512_maskz_loadu_epi8(lanes, w + r * ld);
    const __mmask64 k1 = _mm512_cmpgt_epu8_mask(q, c80), k2 = _mm512_cmpgt_epu8_mask(q, c161);
    const __m512i c4a = _mm512_maskz_mov_epi8(k1, one);
    const __m512i c4 = _mm512_mask_add_epi8(c4a, k2, c4a, one);
    q = _mm512_mask_sub_epi8(q, k1, q, c81);
    q = _mm512_mask_sub_epi8(q, k2, q, c81);
    __m512i a = _mm512_dpbusd_epi32(acc[r][0], c4, xv[4]);
    __m512i c = _mm512_dpbusd_epi32(acc[r][1], _mm512_permutex2var_epi8(t.lo[0], q, t.hi[0]), xv[0]);
    a = _mm512_dpbusd_epi32(a, _mm512_permutex2var_epi8(t.lo[1], q, t.hi[1]), xv[1]);
    c = _mm512_dpbusd_epi32(c, _mm512_permutex2var_epi8(t.lo[2], q, t.hi[2]), xv[2]);
    acc[r][0] = _mm512_dpbusd_epi32(a, _mm512_permutex2var_epi8(t.lo[3], q, t.hi[3]), xv[3]);
    acc[r][1] = c;
  }
}

template <int R>
HGF_AVX512 void tq1_rows_avx512(const uint8_t* w, int64_t ld, int64_t nbytes, const int8_t* x,
                                int32_t* out) {
  alignas(64) static const struct Tab {
    uint8_t d[4][128];
    Tab() {
      for (int v = 0; v < 128; ++v)
        for (int k = 0, t = v; k < 4; ++k, t /= 3) d[k][v] = t % 3;
    }
  } tab;
  Tq1Tables t;
  for (int k = 0; k < 4; ++k) {
    t.lo[k] = _mm512_load_si512(tab.d[k]);
    t.hi[k] = _mm512_load_si512(tab.d[k] + 64);
  }
  __m512i acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  const int64_t full = nbytes - nbytes % GROUP;
  for (int64_t b = 0; b < full; b += GROUP)
    tq1_step<R>(acc, t, w + b, ld, x + 5 * b, GROUP, ~0ULL);
  if (full < nbytes) {
    const int64_t g = nbytes - full;
    tq1_step<R>(acc, t, w + full, ld, x + 5 * full, g, (__mmask64(1) << g) - 1);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm512_add_epi32(acc[r][0], acc[r][1]));
}

// per-token quantisation of one row (see quantize)
HGF_AVX512 void quantize_row_avx512(const float* x, int64_t in, int64_t kp, float eps, int8_t* q,
                                    float* sx, int32_t* sumx) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 16) {
    const __mmask16 m = in - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - i)) - 1);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)));
  }
  const float s = (1.f / std::max(_mm512_reduce_max_ps(amax), eps)) * 127.f;
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < in; i += 16) {
    const __mmask16 m = in - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - i)) - 1);
    // cvtps rounds to nearest even (default MXCSR), like nearbyint / torch.round
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs));
    r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
    _mm512_mask_cvtepi32_storeu_epi8(q + i, m, r);
    sum = _mm512_add_epi32(sum, r);
  }
  std::memset(q + in, 0, kp - in);
  *sx = s;
  *sumx = _mm512_reduce_add_epi32(sum);
}
#endif

// codes . x for rows [0, R) of w (row stride ld)
template <int R>
void rows_dot(const uint8_t* w, int64_t ld, int64_t nbytes, const int8_t* x, int per,
              int32_t* out) {
#if HGF_X86
  if (isa() == 1) {
    if (per == 4) return i2_rows_avx512<R>(w, ld, nbytes, x, out);
    return tq1_rows_avx512<R>(w, ld, nbytes, x, out);
  }
#endif
  for (int r = 0; r < R; ++r) out[r] = dot_portable(w + r * ld, nbytes, x, per);
}

// per-token int8 quantisation; x_int rows padded with zeros to kp
void quantize(const float* x, int64_t m, int64_t in, int64_t kp, float eps, int8_t* xq,
              float* sx, int32_t* sumx) {
  constexpr int64_t TOKENS = 16;  // tokens per chunk
  hgf::Pool::get().run((m + TOKENS - 1) / TOKENS, at::get_num_threads(), [&](int64_t c) {
    for (int64_t t = c * TOKENS; t < std::min(m, (c + 1) * TOKENS); ++t) {
#if HGF_X86
      if (isa() == 1) {
        quantize_row_avx512(x + t * in, in, kp, eps, xq + t * kp, sx + t, sumx + t);
        continue;
      }
#endif
      const float* xt = x + t * in;
      float amax = 0.f;
      for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(xt[i]));
      const float s = (1.f / std::max(amax, eps)) * 127.f;  // as torch's 127 / t: reciprocal * 127
      int8_t* q = xq + t * kp;
      int32_t sum = 0;
      for (int64_t i = 0; i < in; ++i) {
        const float v = std::min(std::max(std::nearbyint(xt[i] * s), -128.f), 127.f);
        q[i] = int8_t(v);
        sum += int32_t(v);
      }
      std::memset(q + in, 0, kp - in);
      sx[t] = s;
      sumx[t] = sum;
    }
  });
}

at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& w_scale, c10::string_view packing,
                              int64_t out_features, int64_t in_features, double act_eps) {
  TORCH_CHECK(packing == "i2" || packing == "tq1", "packing must be i2 or tq1");
  const int per = packing == "i2" ? 4 : 5;  // codes per byte
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.size(0) == out_features,
              "packed must be uint8 [out, nbytes]");
  const int64_t nbytes = packed.size(1);
  TORCH_CHECK(nbytes == (in_features + per - 1) / per, "packed has the wrong row length");
  TORCH_CHECK(x.size(-1) == in_features, "x must be [..., in_features]");
  const at::Tensor xf = x.reshape({-1, in_features}).to(at::kFloat).contiguous();  // [M, in]
  const at::Tensor wp = packed.contiguous();
  const int64_t m = xf.size(0), kp = per * nbytes + GROUP;
  const float s_w = w_scale.to(at::kFloat).item<float>();
  at::Tensor xq = at::empty({m, kp}, xf.options().dtype(at::kChar));
  at::Tensor sx = at::empty({m}, xf.options());
  at::Tensor sumx = at::empty({m}, xf.options().dtype(at::kInt));
  quantize(xf.data_ptr<float>(), m, in_features, kp, float(act_eps), xq.data_ptr<int8_t>(),
           sx.data_ptr<float>(), sumx.data_ptr<int32_t>());
  at::Tensor y = at::empty({m, out_features}, xf.options());  // [M, out]
  const uint8_t* w = wp.data_ptr<uint8_t>();
  const int8_t* q = xq.data_ptr<int8_t>();
  const float* s = sx.data_ptr<float>();
  const int32_t* sum = sumx.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  // chunks of row blocks with about 32 KiB of (weight bytes x tokens) each
  const int64_t nblk = (out_features + ROWS - 1) / ROWS;
  const int64_t per_chunk = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, ROWS * nbytes * m));
  hgf::Pool::get().run((nblk + per_chunk - 1) / per_chunk, at::get_num_threads(), [&](int64_t c) {
    int32_t acc[ROWS];
    for (int64_t blk = c * per_chunk; blk < std::min(nblk, (c + 1) * per_chunk); ++blk) {
      const int64_t r0 = blk * ROWS, nr = std::min<int64_t>(ROWS, out_features - r0);
      for (int64_t t = 0; t < m; ++t) {  // weights of these rows stay in L1 across tokens
        if (nr == ROWS)
          rows_dot<ROWS>(w + r0 * nbytes, nbytes, nbytes, q + t * kp, per, acc);
        else
          for (int64_t r = 0; r < nr; ++r)
            rows_dot<1>(w + (r0 + r) * nbytes, nbytes, nbytes, q + t * kp, per, acc + r);
        const float denom = s[t] * s_w;
        for (int64_t r = 0; r < nr; ++r)
          yp[t * out_features + r0 + r] = float(acc[r] - sum[t]) / denom;
      }
    }
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return y.view(shape).to(x.scalar_type());
}

// request < 0: query; otherwise select min(request, best supported). Returns the active level.
int64_t ternary_cpu_isa(int64_t request) {
  if (request >= 0) g_isa = std::min<int>(int(request), detect_isa());
  return isa();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hgf, m) {
  m.def("ternary_linear_cpu(Tensor x, Tensor packed, Tensor w_scale, str packing, int out_features, "
        "int in_features, float act_eps) -> Tensor");
  m.def("ternary_cpu_isa(int request) -> int", &ternary_cpu_isa);
}

TORCH_LIBRARY_IMPL(hgf, CPU, m) { m.impl("ternary_linear_cpu", &ternary_linear_cpu); }
