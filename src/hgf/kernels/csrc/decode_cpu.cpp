// The native decoder: one call runs a whole forward pass of a packed hgf model (one token at
// decode, a whole prompt at prefill) over its own KV cache, instead of ~2,500 eager PyTorch ops
// per token. hgf/infer/engine.py builds it from a packed model's tensors and checks it against the
// PyTorch Transformer (hgf/model/transformer.py, attention.py), which stays the one definition of
// the model. Per block, for m tokens at positions start..start+m-1:
//
//   a   = RMSNorm(x)                                 shared input of q, k, v: quantized once
//   q, k, v = T_q(a) + B'_q (A_q a), ...             one pool job over the rows of all three;
//                                                    A_qkv = [A_q; A_k; A_v] in one pass over a
//   q, k = RoPE(q, k) (tables from rope_cache);  k, v -> KV cache at their positions
//   std:   y_h = softmax(q_h K_hᵀ / sqrt(d_h)) V_h    single-query loop over the cache
//   diff:  y_i = RMSNorm_2dh((p1 - λ p2) V_i)·(1 - λ_init),  p1, p2 the two maps, one pass over V
//   x  += T_o(SubLN(y)) + B'_o (A_o SubLN(y))
//   b   = RMSNorm(x);  g, u = T_gate(b) + ..., T_up(b) + ...      one job, b quantized once
//   x  += T_down(SubLN(act(g) * u)) + ...             act = silu | relu²
//
// then logits = head · RMSNorm(x) (float32, fp16 or int8-per-row head, as the file stores it).
// T is the packed ternary GEMV of ternary_cpu.cpp (same int8 codes and scales, so the same
// integers as the reference; the correction B'(A a) runs in the GEMV's epilogue over the rows
// just written). λ, RoPE tables and every layout are prepared once, at construction (Python).
//
// Vector code: the ternary micro-kernels of ternary_cpu.cpp (AVX-512 VNNI, AVX2, portable);
// everything else here has AVX2+FMA+F16C loops (also used on AVX-512 CPUs) and portable loops.
// Threads: every op splits into chunks on the work-claiming pool of pool.h (no spin-collapse on an
// oversubscribed machine); at::get_num_threads() threads.
#include "ternary_cpu.cpp"  // one translation unit: the ternary kernels, their ops, and this
#include "sherry_cpu.cpp"   // the sherry packing's kernel and op (reuses ternary_cpu.cpp's parts)

#include <c10/util/Half.h>
#include <torch/custom_class.h>

#include <limits>
#include <memory>
#include <string>

namespace {
namespace decode {

// Ablation switches (Decoder.set_options): undo one fusion at a time, to measure what it buys.
constexpr int64_t OPT_SPLIT_PROJ = 1;     // q, k, v (gate, up) each quantize and run on their own
constexpr int64_t OPT_SPLIT_CORR = 2;     // the correction B'h as a second pass over the outputs
constexpr int64_t OPT_TWO_PASS_DIFF = 4;  // differential attention: o1 and o2 in two passes over V
constexpr int64_t OPT_NO_UNPACK = 8;      // prompts: no unpacking of row blocks (AVX2)
constexpr int64_t OPT_NO_PREFETCH = 16;   // decode: no extra prefetch ahead in the weights
constexpr int64_t OPT_HEAD_ROWS4 = 32;    // the head (and A x) four rows at once, not row by row
constexpr int64_t UNPACK_MIN = 4;     // prompt tokens from which unpacking pays (AVX2): tq1, 1.3x
constexpr int64_t UNPACK_MIN_I2 = 8;  // at 4 tokens; i2: even at 8, 1.15x at 16, 1.3x at 32
constexpr int64_t PREFETCH = 4096;  // bytes ahead  // tokens from which a call (a prompt) unpacks weights (AVX2)

enum Dt : int { F32 = 0, F16 = 1, I8 = 2 };

bool simd() {  // AVX2 + FMA + F16C, and the ternary kernels not forced to the portable path
#if HGF_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok && isa() != PORTABLE;
#else
  return false;
#endif
}

inline float to_f(float v) { return v; }
inline float to_f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline float to_f(int8_t v) { return float(v); }

// ---------------------------------------------------------------- float32 -> fp16 (the KV cache)
#if HGF_X86
__attribute__((target("avx2,fma,f16c"))) void to_half_v(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = c10::detail::fp16_ieee_from_fp32_value(x[i]);
}
#endif
void to_half(const float* x, uint16_t* y, int64_t n) {  // round to nearest even, as torch.half
#if HGF_X86
  if (simd()) return to_half_v(x, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] = c10::detail::fp16_ieee_from_fp32_value(x[i]);
}

// ---------------------------------------------------------------- AVX2 + FMA + F16C loops
#if HGF_X86
#define HGF_V __attribute__((target("avx2,fma,f16c")))

HGF_V inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
HGF_V inline __m256 ld8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
HGF_V inline __m256 ld8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

HGF_V inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

HGF_V inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

template <class T>
HGF_V float dot_v(const T* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(ld8(w + i), ld8(x + i), a0);
    a1 = _mm256_fmadd_ps(ld8(w + i + 8), ld8(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(ld8(w + i + 16), ld8(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(ld8(w + i + 24), ld8(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(ld8(w + i), ld8(x + i), a0);
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += to_f(w[i]) * x[i];
  return s;
}

// four rows at once (row stride ld): the activations are loaded once per step
template <class T>
HGF_V void dot4_v(const T* w, int64_t ld, const float* x, int64_t n, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = ld8(x + i);
    a0 = _mm256_fmadd_ps(ld8(w + i), xv, a0);
    a1 = _mm256_fmadd_ps(ld8(w + ld + i), xv, a1);
    a2 = _mm256_fmadd_ps(ld8(w + 2 * ld + i), xv, a2);
    a3 = _mm256_fmadd_ps(ld8(w + 3 * ld + i), xv, a3);
  }
  out[0] = hsum8(a0), out[1] = hsum8(a1), out[2] = hsum8(a2), out[3] = hsum8(a3);
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r) out[r] += to_f(w[r * ld + i]) * x[i];
}

// y[t, o] += sum_j h[t, j] · Bt[j, o] for t < m, o < n (the correction B'h of m tokens; Bt rows
// of stride ldb, h rows of stride ldh, y rows of stride ldy): ranks in blocks of 8 held in
// registers (converted once) across the m tokens, one pass over y per block
template <class T>
HGF_V void corr_v(const T* Bt, int64_t ldb, int64_t r, const float* h, int64_t ldh, float* y,
                  int64_t ldy, int64_t m, int64_t n) {
  for (int64_t j0 = 0; j0 < r; j0 += 8) {
    const int64_t nj = std::min<int64_t>(8, r - j0);
    int64_t o = 0;
    for (; o + 8 <= n; o += 8) {
      __m256 b[8];
      for (int64_t j = 0; j < nj; ++j) b[j] = ld8(Bt + (j0 + j) * ldb + o);
      for (int64_t t = 0; t < m; ++t) {
        const float* ht = h + t * ldh + j0;
        __m256 acc = _mm256_loadu_ps(y + t * ldy + o);
        for (int64_t j = 0; j < nj; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(ht[j]), b[j], acc);
        _mm256_storeu_ps(y + t * ldy + o, acc);
      }
    }
    for (; o < n; ++o)
      for (int64_t t = 0; t < m; ++t)
        for (int64_t j = 0; j < nj; ++j)
          y[t * ldy + o] += h[t * ldh + j0 + j] * to_f(Bt[(j0 + j) * ldb + o]);
  }
}

template <class T>
HGF_V void axpy_v(float a, const T* w, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, ld8(w + i), ld8(y + i)));
  for (; i < n; ++i) y[i] += a * to_f(w[i]);
}

// e^x, Cephes-style (range reduction by ln 2, degree-5 polynomial), about 1 ulp; x clamped to
// [-88, 88] (softmax inputs are <= 0; silu of |g| > 88 is 0 or g to float precision anyway)
HGF_V inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.f)), _mm256_set1_ps(88.f));
  __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// p = exp(s - max s) in place; returns the sum
HGF_V float exp_shift_v(float* s, int64_t n) {
  __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + i));
  float mx = hmax8(vm);
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  const __m256 m8 = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m8));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float tot = hsum8(sum);
  for (; i < n; ++i) tot += (s[i] = std::exp(s[i] - mx));
  return tot;
}

// g = act(g) * u: silu(g) = g / (1 + e^-g) or relu(g)²
HGF_V void gate_v(float* g, const float* u, int64_t n, bool relu2) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    __m256 a;
    if (relu2) {
      const __m256 r = _mm256_max_ps(x, zero);
      a = _mm256_mul_ps(r, r);
    } else {
      a = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, x))));
    }
    _mm256_storeu_ps(g + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) {
    const float x = g[i];
    const float a = relu2 ? std::max(x, 0.f) * std::max(x, 0.f) : x / (1.f + std::exp(-x));
    g[i] = a * u[i];
  }
}

// per-token int8 quantisation of one row, the same codes and scale as quantize() above
HGF_V void quantize_row_avx2(const float* x, int64_t in, int64_t kp, float eps, int8_t* q,
                             float* sx, int32_t* sumx) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
  float amax = hmax8(vmax);
  for (; i < in; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = (1.f / std::max(amax, eps)) * 127.f;
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vsum = _mm256_setzero_si256();
  for (i = 0; i + 32 <= in; i += 32) {
    __m256i r[4];
    for (int k = 0; k < 4; ++k) {  // cvtps rounds to nearest even (default MXCSR), like nearbyint
      r[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vs));
      r[k] = _mm256_min_epi32(_mm256_max_epi32(r[k], lo), hi);
      vsum = _mm256_add_epi32(vsum, r[k]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]),
                                         _mm256_packs_epi32(r[2], r[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
  }
  int32_t sum = hsum(vsum);
  for (; i < in; ++i) {
    const float v = std::min(std::max(std::nearbyint(x[i] * s), -128.f), 127.f);
    q[i] = int8_t(v);
    sum += int32_t(v);
  }
  std::memset(q + in, 0, kp - in);
  *sx = s;
  *sumx = sum;
}

// ---- prefill on AVX2 CPUs: a row block's packed weights unpacked once into u8 codes (natural
// order, c = W_t + 1), then every token's dot product is two vpmaddubsw per 64 weights; the
// packed decode (cheap for i2, ~20 ops per 32 bytes for tq1) is paid once per row, not per token

// codes of one packed row (nbytes bytes, P codes per byte) -> c[0 .. P·nbytes); writes up to 64
// bytes past the end (the tail's spill)
template <class D>
HGF_V void unpack_row_avx2(const D& d, const uint8_t* w, int64_t nbytes, uint8_t* c);

HGF_V inline void i2_codes(const I2Avx2& d, __m256i q, __m256i (&c)[4]) {
  c[0] = _mm256_and_si256(q, d.m3);
  c[1] = _mm256_and_si256(_mm256_srli_epi16(q, 2), d.m3);
  c[2] = _mm256_and_si256(_mm256_srli_epi16(q, 4), d.m3);
  c[3] = _mm256_and_si256(_mm256_srli_epi16(q, 6), d.m3);
}

HGF_V inline void tq1_codes(const Tq1Avx2& d, __m256i q, __m256i (&c)[5]) {  // as Tq1Avx2::dot32
  const __m256i q81 = _mm256_min_epu8(
      q, _mm256_min_epu8(_mm256_sub_epi8(q, d.c81), _mm256_sub_epi8(q, d.c162)));
  c[4] = _mm256_and_si256(_mm256_srli_epi16(_mm256_sub_epi8(q, q81), 6), d.m3);
  q = q81;
  c[3] = tq1_peel(q, d.c26, d.c53, d.t27);
  c[2] = tq1_peel(q, d.c8, d.c17, d.t9);
  c[1] = _mm256_shuffle_epi8(d.div3, q);
  c[0] = _mm256_shuffle_epi8(d.mod3, q);
}

template <class D>
HGF_V void unpack_row_avx2(const D& d, const uint8_t* w, int64_t nbytes, uint8_t* c) {
  constexpr int P = D::PER;
  const int64_t full = nbytes - nbytes % GROUP;
  for (int64_t b = 0; b < full; b += GROUP)
    for (int64_t h = 0; h < GROUP; h += 32) {  // byte j of the group: digit k is code P·b + k·64 + j
      __m256i v[P];
      if constexpr (P == 4) i2_codes(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b + h)), v);
      else tq1_codes(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b + h)), v);
      for (int k = 0; k < P; ++k)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + P * b + k * GROUP + h), v[k]);
    }
  const int64_t g = nbytes - full;  // the tail group of g < 64 bytes: digit k is code P·full + k·g + j
  if (g > 0) {  // decoded from a zero-padded copy (byte 0: all codes 0); digit k's 64 codes are
    // stored at P·full + k·g in increasing k, so digit k + 1 overwrites digit k's lanes j >= g,
    // and the last digit's spill (< 64 bytes past P·nbytes) lands in the caller's slack
    alignas(32) uint8_t tail[GROUP] = {};
    std::memcpy(tail, w + full, size_t(g));
    __m256i v0[P], v1[P];
    if constexpr (P == 4) {
      i2_codes(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), v0);
      i2_codes(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(tail + 32)), v1);
    } else {
      tq1_codes(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(tail)), v0);
      tq1_codes(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(tail + 32)), v1);
    }
    for (int k = 0; k < P; ++k) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + P * full + k * g), v0[k]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + P * full + k * g + 32), v1[k]);
    }
  }
}

// out[t][r] = sum_i c[r][i] · x_t[i] for 4 rows of codes (row stride ldc) and T = 1 or 2 tokens
// (rows of stride ldx), n a multiple of 64. vpmaddubsw pairs of code · x_int: at most
// 2·2·128 = 512 per int16 lane, two per step, so 16 steps (1024 weights) sum in int16 before
// vpmaddwd widens them; each code vector serves both tokens.
template <int T>
HGF_V void codes_dot4_avx2(const uint8_t* c, int64_t ldc, const int8_t* x, int64_t ldx, int64_t n,
                           int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[T][4];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm256_setzero_si256();
  for (int64_t i = 0; i < n;) {
    const int64_t end = std::min(n, i + 1024);
    __m256i s[T][4];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < 4; ++r) s[t][r] = _mm256_setzero_si256();
    for (; i < end; i += 64) {
      __m256i x0[T], x1[T];
      for (int t = 0; t < T; ++t) {
        x0[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ldx + i));
        x1[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ldx + i + 32));
      }
      for (int r = 0; r < 4; ++r) {
        const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * ldc + i));
        const __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * ldc + i + 32));
        for (int t = 0; t < T; ++t)
          s[t][r] = _mm256_add_epi16(s[t][r], _mm256_add_epi16(_mm256_maddubs_epi16(c0, x0[t]),
                                                               _mm256_maddubs_epi16(c1, x1[t])));
      }
    }
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < 4; ++r) acc[t][r] = _mm256_add_epi32(acc[t][r], _mm256_madd_epi16(s[t][r], ones));
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < 4; ++r) out[4 * t + r] = hsum(acc[t][r]);
}
#endif

// ---------------------------------------------------------------- dispatch over ISA and dtype
template <class T>
float dot(const T* w, const float* x, int64_t n) {
#if HGF_X86
  if (simd()) return dot_v(w, x, n);
#endif
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += to_f(w[i]) * x[i];
  return s;
}

template <class T>
void dot4(const T* w, int64_t ld, const float* x, int64_t n, float* out) {
#if HGF_X86
  if (simd()) return dot4_v(w, ld, x, n, out);
#endif
  for (int r = 0; r < 4; ++r) out[r] = dot(w + r * ld, x, n);
}

template <class T>
void axpy(float a, const T* w, float* y, int64_t n) {
#if HGF_X86
  if (simd()) return axpy_v(a, w, y, n);
#endif
  for (int64_t i = 0; i < n; ++i) y[i] += a * to_f(w[i]);
}

template <class T>
void corr(const T* Bt, int64_t ldb, int64_t r, const float* h, int64_t ldh, float* y,
          int64_t ldy, int64_t m, int64_t n) {
#if HGF_X86
  if (simd()) return corr_v(Bt, ldb, r, h, ldh, y, ldy, m, n);
#endif
  for (int64_t t = 0; t < m; ++t)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t o = 0; o < n; ++o) y[t * ldy + o] += h[t * ldh + j] * to_f(Bt[j * ldb + o]);
}

float exp_shift(float* s, int64_t n) {
#if HGF_X86
  if (simd()) return exp_shift_v(s, n);
#endif
  float mx = -std::numeric_limits<float>::infinity(), tot = 0.f;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  for (int64_t i = 0; i < n; ++i) tot += (s[i] = std::exp(s[i] - mx));
  return tot;
}

void gate(float* g, const float* u, int64_t n, bool relu2) {
#if HGF_X86
  if (simd()) return gate_v(g, u, n, relu2);
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float x = g[i];
    const float a = relu2 ? std::max(x, 0.f) * std::max(x, 0.f) : x / (1.f + std::exp(-x));
    g[i] = a * u[i];
  }
}

void quantize_row(const float* x, int64_t in, int64_t kp, float eps, int8_t* q, float* sx,
                  int32_t* sumx) {
#if HGF_X86
  if (isa() == AVX512) return quantize_row_avx512(x, in, kp, eps, q, sx, sumx);
  if (simd()) return quantize_row_avx2(x, in, kp, eps, q, sx, sumx);
#endif
  float amax = 0.f;  // the portable path of quantize()
  for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = (1.f / std::max(amax, eps)) * 127.f;
  int32_t sum = 0;
  for (int64_t i = 0; i < in; ++i) {
    const float v = std::min(std::max(std::nearbyint(x[i] * s), -128.f), 127.f);
    q[i] = int8_t(v);
    sum += int32_t(v);
  }
  std::memset(q + in, 0, kp - in);
  *sx = s;
  *sumx = sum;
}

// y = x · rsqrt(mean(x²) + eps) · w · post   (nn.RMSNorm, then an optional scalar factor)
void rmsnorm(const float* x, int64_t n, const float* w, float eps, float* y, float post = 1.f) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) part[k] += x[i + k] * x[i + k];
  float ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / float(n) + eps);
  if (post == 1.f)
    for (i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
  else
    for (i = 0; i < n; ++i) y[i] = x[i] * r * w[i] * post;
}

// ---------------------------------------------------------------- model pieces
struct Mat {  // [rows, cols] row-major float32 / fp16 / int8 (times a per-row scale)
  const void* p = nullptr;
  int dt = F32;
  int64_t rows = 0, cols = 0;
  const float* scale = nullptr;

  template <class F>
  auto visit(F&& f) const {
    if (dt == F16) return f(static_cast<const uint16_t*>(p));
    if (dt == I8) return f(static_cast<const int8_t*>(p));
    return f(static_cast<const float*>(p));
  }
  // y[r - r0] = row r · x. One row after another: a single sequential stream, which the
  // hardware prefetcher follows; four rows at once (four streams a row apart, ``four``) read a
  // 4096 x 768 fp16 head at 0.6x the speed on a Zen 4 VM (5.1 vs 8.2 GB/s, one thread).
  void dot_rows(int64_t r0, int64_t r1, const float* x, float* y, bool four = false) const {
    visit([&](auto* w) {
      int64_t r = r0;
      if (four)
        for (; r + 4 <= r1; r += 4) dot4(w + r * cols, cols, x, cols, y + (r - r0));
      for (; r < r1; ++r) y[r - r0] = dot(w + r * cols, x, cols);
      return 0;
    });
    if (scale)
      for (int64_t r = r0; r < r1; ++r) y[r - r0] *= scale[r];
  }
  // y[t, 0:n] += sum_j h[t, j] · this[j, c0:c0+n] for m tokens (the correction B'h over columns
  // c0.., this = B'ᵀ)
  void corr_cols(int64_t c0, int64_t n, const float* h, int64_t ldh, float* y, int64_t ldy,
                 int64_t m) const {
    visit([&](auto* w) {
      corr(w + c0, cols, rows, h, ldh, y, ldy, m, n);
      return 0;
    });
  }
  void row(int64_t r, float* out) const {  // out = row · scale
    visit([&](auto* w) {
      for (int64_t i = 0; i < cols; ++i) out[i] = to_f(w[r * cols + i]);
      return 0;
    });
    if (scale)
      for (int64_t i = 0; i < cols; ++i) out[i] *= scale[r];
  }
};

struct Proj {  // a packed ternary projection and its folded correction B' (held as B'ᵀ [r, out])
  const uint8_t* w = nullptr;
  int64_t out = 0, nbytes = 0, rank = 0, h_off = 0;
  int64_t rows = 0;  // packed rows the GEMV runs: out, or 2·out for PTQTP's stacked planes
  float s_w = 1.f;
  Mat Bt;
  const float* bias = nullptr;   // Tequila's folded dead-zone bias [out], or none
  const float* alpha = nullptr;  // PTQTP: the planes' row scales [2, out]: y = α₁z₁ + α₂z₂
};

struct Group {  // projections that read the same input: its codes and A·x are computed once
  std::vector<Proj> p;
  Mat A;  // [sum of ranks, in]: the A of every corrected projection, in order
  int64_t in = 0, kp = 0;
};

struct Layer {
  const float *attn_norm = nullptr, *attn_subln = nullptr, *head_norm = nullptr;
  const float *mlp_norm = nullptr, *mlp_subln = nullptr;
  float lam = 0.f, lam_scale = 1.f;  // differential attention: λ and 1 - λ_init
  Group qkv, o, gu, down;
};

struct Chunk {
  int p;
  int64_t b0, b1;  // row blocks [b0, b1) of projection p
};

const float* f32_or_null(const at::Tensor& t, int64_t n, const char* what) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, what,
              ": expected a contiguous float32 tensor of ", n, " elements, got ", t.sizes());
  return t.const_data_ptr<float>();
}

Mat mat_of(const at::Tensor& t, const at::Tensor& scale, const char* what) {
  Mat m;
  if (!t.defined() || t.numel() == 0) return m;
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), what, ": expected a contiguous 2-D tensor");
  switch (t.scalar_type()) {
    case at::kFloat: m.dt = F32; break;
    case at::kHalf: m.dt = F16; break;
    case at::kChar: m.dt = I8; break;
    default: TORCH_CHECK(false, what, ": dtype must be float32, float16 or int8");
  }
  m.p = t.const_data_ptr();
  m.rows = t.size(0), m.cols = t.size(1);
  if (m.dt == I8) m.scale = f32_or_null(scale, m.rows, what);
  TORCH_CHECK(m.dt != I8 || m.scale, what, ": int8 rows need a row scale");
  return m;
}

}  // namespace decode

// Slots of the constructor's tensor list (hgf/infer/engine.py builds it; empty = absent):
//   7 global:  emb, emb_scale, final_norm, head, head_scale, rope_cos, rope_sin
//   23 per layer:  attn_norm, A_qkv, q_w, q_Bt, k_w, k_Bt, v_w, v_Bt, attn_subln, head_norm,
//                  A_o, o_w, o_Bt, mlp_norm, A_gu, gate_w, gate_Bt, up_w, up_Bt, mlp_subln,
//                  A_down, down_w, down_Bt
//   then, when ints[10] = 1 (Tequila), 7 per layer: the biases of q, k, v, o, gate, up, down
//   (float32 [out] each, empty = none); then, when ints[11] = 1 (PTQTP), 7 per layer: the row
//   scales [2, out] of q, k, v, o, gate, up, down, whose packed weights are the two trit-planes
//   stacked [2·out, nbytes] (hgf/infer/ptqtp.py; s_w = 1)
// ints:   vocab, d_model, n_layers, n_heads, d_ff, differential (0/1), relu2 (0/1),
//         codes per byte (4 = i2, 5 = tq1), max_seq_len, n_kv_heads (standard attention: fewer
//         than n_heads is grouped-query, query head j reads K/V head j / (n_heads / n_kv_heads)),
//         optionally biases (0/1), then optionally PTQTP planes (0/1)
// floats: norm_eps, act_eps, then per layer s_q, s_k, s_v, s_o, s_gate, s_up, s_down, λ, 1 - λ_init
constexpr int GLOBAL_SLOTS = 7, LAYER_SLOTS = 23, LAYER_FLOATS = 9;
constexpr int SHERRY = 0;  // ints[7] of the sherry packing (3:4 sparse, sherry_cpu.cpp)

struct Decoder : torch::CustomClassHolder {
  std::vector<at::Tensor> keep;  // the tensors the pointers below point into
  int64_t vocab, d, n_layers, n_heads, n_kv, hd, dff, max_seq;
  bool diff, relu2;
  int per;
  float norm_eps, act_eps;
  decode::Mat emb, head;
  const float *final_norm, *rope_cos, *rope_sin;
  std::vector<decode::Layer> layers;
  int64_t opts = 0;
  int64_t Hk, dk, Hv, dv;  // KV cache heads and dims
  int64_t cache_len = 0;
  // [layer][head][cache_len][dim] of float32, or fp16 (kv_half: set_kv_half, half the bytes, as
  // llama.cpp's default f16 cache; not bit-equal to the reference path); kept (uninitialised: only
  // written positions are read) across sequences while it is big enough, as llama.cpp keeps its
  // context; release() frees it
  std::unique_ptr<uint8_t[]> kc, vc;
  bool kv_half = false;
  int64_t kv_capacity = 0;  // elements of kc (and of vc)
  size_t kv_elt() const { return kv_half ? 2 : 4; }
  // scratch, sized by the longest call so far
  std::vector<float> x, a, q, k, v, y, g, u, t, h, sx, a32, zs;
  std::vector<int8_t> xq, xp;  // x_int per token; sherry: also its planes (sherry::permute)
  std::vector<int32_t> sumx;
  std::vector<decode::Chunk> chunks;

  Decoder(std::vector<at::Tensor> ts, std::vector<int64_t> ints, std::vector<double> fl)
      : keep(std::move(ts)) {
    using namespace decode;
    TORCH_CHECK(ints.size() >= 10 && ints.size() <= 12, "Decoder: 10 to 12 ints expected");
    const bool biases = ints.size() >= 11 && ints[10] != 0;
    const bool planes = ints.size() == 12 && ints[11] != 0;
    vocab = ints[0], d = ints[1], n_layers = ints[2], n_heads = ints[3], dff = ints[4];
    diff = ints[5] != 0, relu2 = ints[6] != 0, per = int(ints[7]), max_seq = ints[8];
    n_kv = ints[9];
    TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0 && (!diff || n_kv == n_heads),
                "Decoder: n_kv_heads must divide n_heads (and equal it for differential attention)");
    TORCH_CHECK(per == 4 || per == 5 || per == SHERRY,
                "Decoder: codes per byte must be 4 or 5 (or 0: the sherry packing)");
    TORCH_CHECK(d % n_heads == 0 && (!diff || n_heads % 2 == 0), "Decoder: bad head count");
    hd = d / n_heads;
    TORCH_CHECK(hd % 2 == 0, "Decoder: odd head dim");
    TORCH_CHECK(int64_t(keep.size()) ==
                    GLOBAL_SLOTS + (LAYER_SLOTS + (biases ? 7 : 0) + (planes ? 7 : 0)) * n_layers,
                "Decoder: wrong number of tensors");
    TORCH_CHECK(int64_t(fl.size()) == 2 + LAYER_FLOATS * n_layers, "Decoder: wrong number of floats");
    norm_eps = float(fl[0]), act_eps = float(fl[1]);
    const auto& T = keep;
    emb = mat_of(T[0], T[1], "emb");
    TORCH_CHECK(emb.rows == vocab && emb.cols == d, "Decoder: emb must be [vocab, d]");
    final_norm = f32_or_null(T[2], d, "final_norm");
    head = mat_of(T[3], T[4], "head");
    TORCH_CHECK(head.rows == vocab && head.cols == d && final_norm, "Decoder: head must be [vocab, d]");
    rope_cos = f32_or_null(T[5], max_seq * hd, "rope_cos");
    rope_sin = f32_or_null(T[6], max_seq * hd, "rope_sin");
    TORCH_CHECK(rope_cos && rope_sin, "Decoder: RoPE tables missing");
    Hk = n_kv, dk = hd;
    Hv = diff ? n_heads / 2 : n_kv, dv = diff ? 2 * hd : hd;
    layers.resize(n_layers);
    for (int64_t l = 0; l < n_layers; ++l) {
      const at::Tensor* s = &T[GLOBAL_SLOTS + LAYER_SLOTS * l];
      const double* f = &fl[2 + LAYER_FLOATS * l];
      at::Tensor bz[7], az[7];  // the biases, the PTQTP row scales (undefined = none)
      const int64_t extra = GLOBAL_SLOTS + LAYER_SLOTS * n_layers;
      for (int i = 0; biases && i < 7; ++i) bz[i] = T[extra + 7 * l + i];
      for (int i = 0; planes && i < 7; ++i) az[i] = T[extra + (biases ? 7 * n_layers : 0) + 7 * l + i];
      Layer& L = layers[l];
      L.attn_norm = f32_or_null(s[0], d, "attn_norm");
      L.qkv = group(s[1], {{s[2], s[3], f[0], bz[0], az[0]}, {s[4], s[5], f[1], bz[1], az[1]},
                           {s[6], s[7], f[2], bz[2], az[2]}}, d);
      L.attn_subln = f32_or_null(s[8], d, "attn_subln");
      L.head_norm = f32_or_null(s[9], dv, "head_norm");
      TORCH_CHECK(L.head_norm || !diff, "Decoder: differential attention needs head_norm");
      L.o = group(s[10], {{s[11], s[12], f[3], bz[3], az[3]}}, d);
      L.mlp_norm = f32_or_null(s[13], d, "mlp_norm");
      L.gu = group(s[14], {{s[15], s[16], f[4], bz[4], az[4]}, {s[17], s[18], f[5], bz[5], az[5]}},
                   d);
      L.mlp_subln = f32_or_null(s[19], dff, "mlp_subln");
      L.down = group(s[20], {{s[21], s[22], f[6], bz[6], az[6]}}, dff);
      L.lam = float(f[7]), L.lam_scale = float(f[8]);
      TORCH_CHECK(L.attn_norm && L.mlp_norm, "Decoder: block norms missing");
      const int64_t outs[] = {d, Hk * dk, Hv * dv};
      for (int i = 0; i < 3; ++i)
        TORCH_CHECK(L.qkv.p[i].out == outs[i], "Decoder: q/k/v projection ", i, " has ",
                    L.qkv.p[i].out, " outputs, the config needs ", outs[i]);
      TORCH_CHECK(L.o.p[0].out == d && L.gu.p[0].out == dff && L.gu.p[1].out == dff &&
                      L.down.p[0].out == d, "Decoder: projection shapes do not match the config");
    }
  }

  struct ProjArgs {
    at::Tensor w, Bt;
    double s_w;
    at::Tensor bias, alpha;
  };

  decode::Group group(const at::Tensor& A, std::initializer_list<ProjArgs> ps, int64_t in) {
    using namespace decode;
    Group G;
    G.in = in;
    TORCH_CHECK(per != SHERRY || in % 4 == 0, "Decoder: sherry needs inputs in groups of 4");
    const int64_t nbytes = per == SHERRY ? sherry::row_bytes(in) : (in + per - 1) / per;
    G.kp = per == SHERRY ? in + GROUP : per * nbytes + GROUP;
    G.A = mat_of(A, {}, "A");
    TORCH_CHECK(G.A.rows == 0 || (G.A.cols == in && G.A.dt != I8), "Decoder: A must be [r, in]");
    int64_t off = 0;
    for (const auto& a : ps) {
      Proj P;
      TORCH_CHECK(a.w.scalar_type() == at::kByte && a.w.dim() == 2 && a.w.is_contiguous() &&
                      a.w.size(1) == nbytes, "Decoder: packed weight must be uint8 [out, ", nbytes, "]");
      P.w = a.w.const_data_ptr<uint8_t>();
      P.rows = a.w.size(0), P.nbytes = nbytes, P.s_w = float(a.s_w);
      if (a.alpha.defined() && a.alpha.numel()) {  // PTQTP: [T₁; T₂] stacked, no correction
        TORCH_CHECK(per != SHERRY && P.rows % 2 == 0, "Decoder: PTQTP planes must be [2·out, ",
                    nbytes, "] in i2 or tq1");
        P.out = P.rows / 2;
        P.alpha = f32_or_null(a.alpha, 2 * P.out, "PTQTP row scales");
      } else {
        P.out = P.rows;
      }
      P.Bt = mat_of(a.Bt, {}, "B'ᵀ");
      P.rank = P.Bt.rows, P.h_off = off;
      P.bias = f32_or_null(a.bias, P.out, "bias");
      TORCH_CHECK(P.rank == 0 || (P.Bt.cols == P.out && P.Bt.dt != I8), "Decoder: B'ᵀ must be [r, out]");
      off += P.rank;
      G.p.push_back(P);
    }
    TORCH_CHECK(off == G.A.rows, "Decoder: A has ", G.A.rows, " rows, the B'ᵀ ranks sum to ", off);
    return G;
  }

  void setup(int64_t max_len) {
    TORCH_CHECK(max_len > 0 && max_len <= max_seq, "Decoder.setup: max_len must be in [1, ",
                max_seq, "], got ", max_len);
    cache_len = max_len;
    const int64_t need = n_layers * std::max(Hk * dk, Hv * dv) * cache_len;
    if (need > kv_capacity) {
      kc.reset();
      vc.reset();
      kc.reset(new uint8_t[size_t(need) * kv_elt()]);
      vc.reset(new uint8_t[size_t(need) * kv_elt()]);
      kv_capacity = need;
    }
  }

  void clear() {
    cache_len = 0;
  }

  void release() {
    clear();
    kc.reset();
    vc.reset();
    kv_capacity = 0;
  }

  void set_options(int64_t o) { opts = o; }

  // the KV cache's element type: fp16 (true) or float32; a change frees the cache (setup again)
  void set_kv_half(bool on) {
    if (on != kv_half) release();
    kv_half = on;
  }
  bool kv_is_half() { return kv_half; }

  // n values of src into the cache buffer at element index idx
  void store_kv(uint8_t* buf, int64_t idx, const float* src, int64_t n) {
    if (kv_half) decode::to_half(src, reinterpret_cast<uint16_t*>(buf) + idx, n);
    else std::memcpy(reinterpret_cast<float*>(buf) + idx, src, sizeof(float) * size_t(n));
  }
  int64_t options() { return opts; }

  int64_t cache_bytes() { return 2 * kv_capacity * int64_t(kv_elt()); }

  // outs[i] = projection i of G applied to the m rows of xin (row stride G.in); out row stride ld[i]
  void run_group(const decode::Group& G, int64_t m, const float* xin, float* const* outs,
                 const int64_t* ld, int threads) {
    using namespace decode;
    if ((opts & OPT_SPLIT_PROJ) && G.p.size() > 1) {  // ablation: one projection at a time
      for (size_t i = 0; i < G.p.size(); ++i) {
        Group one;
        one.p = {G.p[i]};
        one.in = G.in, one.kp = G.kp;
        if (G.p[i].rank) {
          one.A = G.A;
          one.A.p = static_cast<const char*>(G.A.p) +
                    G.p[i].h_off * G.A.cols * (G.A.dt == F16 ? 2 : 4);
          one.A.rows = G.p[i].rank;
          one.p[0].h_off = 0;
        }
        run_group(one, m, xin, outs + i, ld + i, threads);
      }
      return;
    }
    const int64_t in = G.in, kp = G.kp, R = G.A.rows;
    xq.resize(size_t(m * kp));
    if (per == SHERRY) xp.resize(size_t(m * kp));
    sx.resize(size_t(m));
    sumx.resize(size_t(m));
    h.resize(size_t(std::max<int64_t>(1, m * R)));
    Mat A = G.A;
    if (R && m >= UNPACK_MIN && A.dt != F32) {  // a prompt: convert A to float32 once
      a32.resize(size_t(R * in));
      for (int64_t j = 0; j < R; ++j) A.row(j, a32.data() + j * in);
      A.p = a32.data(), A.dt = F32;
    }
    hgf::Pool::get().run(m, m > 1 ? threads : 1, [&](int64_t t) {  // input stage, per token
      quantize_row(xin + t * in, in, kp, act_eps, xq.data() + t * kp, sx.data() + t,
                   sumx.data() + t);
      if (per == SHERRY) sherry::permute(xq.data() + t * kp, 1, in, xp.data() + t * kp);
      if (R) A.dot_rows(0, R, xin + t * in, h.data() + t * R, opts & OPT_HEAD_ROWS4);
    });
    // PTQTP projections: the GEMV writes both planes' outputs z [m, 2·out] here, combined after
    std::vector<int64_t> zoff(G.p.size(), -1);
    int64_t zn = 0;
    for (size_t i = 0; i < G.p.size(); ++i)
      if (G.p[i].alpha) zoff[i] = zn, zn += m * G.p[i].rows;
    if (zn) zs.resize(size_t(std::max<int64_t>(int64_t(zs.size()), zn)));
    chunks.clear();
    for (size_t i = 0; i < G.p.size(); ++i) {  // about 32 KiB of (weight bytes x tokens) each
      const Proj& P = G.p[i];
      const int64_t nblk = (P.rows + ROWS - 1) / ROWS;
      const int64_t per_chunk =  // >= 16 rows: the epilogue runs on 8-wide vectors
          std::max<int64_t>(4, (1 << 15) / std::max<int64_t>(1, ROWS * P.nbytes * m));
      for (int64_t b = 0; b < nblk; b += per_chunk)
        chunks.push_back({int(i), b, std::min(nblk, b + per_chunk)});
    }
    const bool fused_corr = !(opts & OPT_SPLIT_CORR);
    const bool prefetch = m == 1 && !(opts & OPT_NO_PREFETCH);
    hgf::Pool::get().run(int64_t(chunks.size()), threads, [&](int64_t c) {
      const Chunk ch = chunks[size_t(c)];
      const Proj& P = G.p[size_t(ch.p)];
      float* out = P.alpha ? zs.data() + zoff[size_t(ch.p)] : outs[ch.p];
      const int64_t ldo = P.alpha ? P.rows : ld[ch.p];
      int32_t acc[ROWS];
#if HGF_X86
      // sherry: codes in its planes' order, dotted with the permuted x planes; full blocks only
      if ((per != SHERRY || in % sherry::BLOCK == 0) &&
          m >= (per == 4 ? UNPACK_MIN_I2 : UNPACK_MIN) && isa() == AVX2 &&
          simd() && !(opts & OPT_NO_UNPACK)) {  // a prompt: unpack each row block once
        const int64_t nc = per == SHERRY ? in : per * P.nbytes;
        const int64_t ldc = (nc + 63) / 64 * 64;  // x_int rows reach kp >= ldc
        const int8_t* xs = per == SHERRY ? xp.data() : xq.data();  // sherry: its x planes
        thread_local std::vector<uint8_t> codes;
        if (int64_t(codes.size()) < ROWS * ldc + GROUP) codes.resize(size_t(ROWS * ldc + GROUP));
        const I2Avx2 di2;
        const Tq1Avx2 dtq1;
        for (int64_t blk = ch.b0; blk < ch.b1; ++blk) {
          const int64_t r0 = blk * ROWS, nr = std::min<int64_t>(ROWS, P.rows - r0);
          for (int64_t r = 0; r < nr; ++r) {
            uint8_t* cr = codes.data() + r * ldc;
            if (per == 4) unpack_row_avx2(di2, P.w + (r0 + r) * P.nbytes, P.nbytes, cr);
            else if (per == SHERRY) sherry::unpack_planes_avx2(P.w + (r0 + r) * P.nbytes, in / sherry::BLOCK, cr);
            else unpack_row_avx2(dtq1, P.w + (r0 + r) * P.nbytes, P.nbytes, cr);
            std::memset(cr + nc, 0, size_t(ldc - nc));
          }
          int32_t acc2[2 * ROWS];
          for (int64_t t = 0; t < m; t += 2) {
            const int T = m - t >= 2 ? 2 : 1;
            if (T == 2) codes_dot4_avx2<2>(codes.data(), ldc, xs + t * kp, kp, ldc, acc2);
            else codes_dot4_avx2<1>(codes.data(), ldc, xs + t * kp, kp, ldc, acc2);
            for (int u = 0; u < T; ++u) {
              const float denom = sx[size_t(t + u)] * P.s_w;
              float* yt = out + (t + u) * ldo;
              for (int64_t r = 0; r < nr; ++r)
                yt[r0 + r] = float(acc2[4 * u + r] - sumx[size_t(t + u)]) / denom;
            }
          }
        }
      } else
#endif
      for (int64_t blk = ch.b0; blk < ch.b1; ++blk) {
        const int64_t r0 = blk * ROWS, nr = std::min<int64_t>(ROWS, P.rows - r0);
#if HGF_X86
        if (prefetch) {  // the projection's bytes PREFETCH ahead (the kernels' own prefetch runs
          // two row blocks ahead: < 2 KiB for rows of a few hundred bytes)
          const uint8_t* ahead = P.w + r0 * P.nbytes + PREFETCH;
          for (int64_t b = 0; b < ROWS * P.nbytes; b += 64)
            _mm_prefetch(reinterpret_cast<const char*>(ahead + b), _MM_HINT_T1);
        }
#endif
        for (int64_t t = 0; t < m; ++t) {  // these rows' weights stay in L1 across tokens
          const int8_t* xt = xq.data() + t * kp;
          if (per == SHERRY) {  // signed weights: no code offset to subtract
            sherry::rows_dot(P.w + r0 * P.nbytes, P.nbytes, in, nr, xt, xp.data() + t * kp, acc);
            const float denom = sx[size_t(t)] * P.s_w;
            float* yt = out + t * ldo;
            for (int64_t r = 0; r < nr; ++r) yt[r0 + r] = float(acc[r]) / denom;
            continue;
          }
          if (nr == ROWS)
            rows_dot<ROWS>(P.w + r0 * P.nbytes, P.nbytes, P.nbytes, xt, per, acc);
          else
            for (int64_t r = 0; r < nr; ++r)
              rows_dot<1>(P.w + (r0 + r) * P.nbytes, P.nbytes, P.nbytes, xt, per, acc + r);
          const float denom = sx[size_t(t)] * P.s_w;
          float* yt = out + t * ldo;
          for (int64_t r = 0; r < nr; ++r) yt[r0 + r] = float(acc[r] - sumx[size_t(t)]) / denom;
        }
      }
      if (P.bias) {  // y[rows] += b[rows] (Tequila), before the correction as in the reference
        const int64_t o0 = ch.b0 * ROWS, o1 = std::min(P.out, ch.b1 * ROWS);
        for (int64_t t = 0; t < m; ++t)
          for (int64_t o = o0; o < o1; ++o) out[t * ldo + o] += P.bias[o];
      }
      if (P.rank && fused_corr) {  // epilogue: y[rows] += B'[rows] h, rows still in cache
        const int64_t o0 = ch.b0 * ROWS, o1 = std::min(P.out, ch.b1 * ROWS);
        P.Bt.corr_cols(o0, o1 - o0, h.data() + P.h_off, R, out + o0, ldo, m);
      }
    });
    for (size_t i = 0; i < G.p.size(); ++i) {  // PTQTP: y = α₁ ⊙ z[:out] + α₂ ⊙ z[out:]
      const Proj& P = G.p[i];
      if (!P.alpha) continue;
      for (int64_t t = 0; t < m; ++t) {
        const float* z = zs.data() + zoff[i] + t * P.rows;
        float* yt = outs[i] + t * ld[i];
        for (int64_t o = 0; o < P.out; ++o) yt[o] = P.alpha[o] * z[o] + P.alpha[P.out + o] * z[P.out + o];
      }
    }
    if (!fused_corr)
      for (size_t i = 0; i < G.p.size(); ++i)
        if (G.p[i].rank)
          G.p[i].Bt.corr_cols(0, G.p[i].out, h.data() + G.p[i].h_off, R, outs[i], ld[i], m);
  }

  void rope(float* v, int64_t heads, int64_t pos) const {  // [heads, hd] in place, half-split
    const float* c = rope_cos + pos * hd;
    const float* s = rope_sin + pos * hd;
    const int64_t half = hd / 2;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* x = v + hh * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] + (-x2) * s[i];
        x[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  }

  // y rows [m, d] = attention of q rows (positions start..start+m-1) over the cache of layer l
  void attention(const decode::Layer& L, int64_t l, int64_t m, int64_t start, int threads) {
    if (kv_half)
      attend(L, l, m, start, threads, reinterpret_cast<const uint16_t*>(kc.get()),
             reinterpret_cast<const uint16_t*>(vc.get()));
    else
      attend(L, l, m, start, threads, reinterpret_cast<const float*>(kc.get()),
             reinterpret_cast<const float*>(vc.get()));
  }

  template <class T>  // T: the cache's element type (float, or uint16_t holding fp16)
  void attend(const decode::Layer& L, int64_t l, int64_t m, int64_t start, int threads,
              const T* kcache, const T* vcache) {
    using namespace decode;
    const int64_t H = diff ? Hv : n_heads;  // output heads
    const int64_t group = n_heads / n_kv;   // query heads per K/V head (standard attention)
    const float scale = float(1.0 / std::sqrt(double(hd)));
    const bool two_pass = (opts & OPT_TWO_PASS_DIFF) != 0;
    hgf::Pool::get().run(m * H, threads, [&](int64_t job) {
      const int64_t i = job / H, hh = job % H, n = start + i + 1;
      thread_local std::vector<float> s1, s2, tmp;
      s1.resize(size_t(n));
      float* out = y.data() + i * d + hh * dv;
      std::fill(out, out + dv, 0.f);
      if (!diff) {
        const float* qh = q.data() + i * d + hh * hd;
        const T* K = kcache + ((l * Hk + hh / group) * cache_len) * dk;
        const T* V = vcache + ((l * Hv + hh / group) * cache_len) * dv;
        for (int64_t j = 0; j < n; ++j) s1[size_t(j)] = dot(K + j * dk, qh, hd) * scale;
        const float inv = 1.f / exp_shift(s1.data(), n);
        for (int64_t j = 0; j < n; ++j) axpy(s1[size_t(j)] * inv, V + j * dv, out, dv);
        return;
      }
      s2.resize(size_t(n));
      const float* qa = q.data() + i * d + 2 * hh * hd;
      const T* Ka = kcache + ((l * Hk + 2 * hh) * cache_len) * dk;
      const T* Kb = Ka + cache_len * dk;
      const T* V = vcache + ((l * Hv + hh) * cache_len) * dv;
      for (int64_t j = 0; j < n; ++j) {
        s1[size_t(j)] = dot(Ka + j * dk, qa, hd) * scale;
        s2[size_t(j)] = dot(Kb + j * dk, qa + hd, hd) * scale;
      }
      const float inv1 = 1.f / exp_shift(s1.data(), n), inv2 = 1.f / exp_shift(s2.data(), n);
      if (!two_pass) {  // (p1 - λ p2) V in one pass
        for (int64_t j = 0; j < n; ++j)
          axpy(s1[size_t(j)] * inv1 - L.lam * (s2[size_t(j)] * inv2), V + j * dv, out, dv);
      } else {  // o1 - λ o2, as the reference computes it
        tmp.assign(size_t(dv), 0.f);
        for (int64_t j = 0; j < n; ++j) axpy(s1[size_t(j)] * inv1, V + j * dv, out, dv);
        for (int64_t j = 0; j < n; ++j) axpy(s2[size_t(j)] * inv2, V + j * dv, tmp.data(), dv);
        for (int64_t e = 0; e < dv; ++e) out[e] -= L.lam * tmp[size_t(e)];
      }
      rmsnorm(out, dv, L.head_norm, norm_eps, out, L.lam_scale);
    });
  }

  at::Tensor run(std::vector<int64_t> ids, int64_t start, bool all_logits) {
    using namespace decode;
    const int64_t m = int64_t(ids.size());
    TORCH_CHECK(m > 0, "Decoder.run: no tokens");
    TORCH_CHECK(cache_len > 0, "Decoder.run: call setup(max_len) first");
    TORCH_CHECK(start >= 0 && start + m <= cache_len, "Decoder.run: positions ", start, "..",
                start + m - 1, " do not fit the cache of ", cache_len);
    for (int64_t id : ids) TORCH_CHECK(id >= 0 && id < vocab, "Decoder.run: token id ", id, " out of range");
    const int threads = std::max(1, at::get_num_threads());
    auto sz = [](std::vector<float>& b, int64_t n) { if (int64_t(b.size()) < n) b.resize(size_t(n)); };
    sz(x, m * d), sz(a, m * d), sz(q, m * d), sz(k, m * d), sz(v, m * d), sz(y, m * d);
    sz(g, m * dff), sz(u, m * dff), sz(t, m * d);
    for (int64_t i = 0; i < m; ++i) emb.row(ids[size_t(i)], x.data() + i * d);
    for (int64_t l = 0; l < n_layers; ++l) {
      const Layer& L = layers[size_t(l)];
      for (int64_t i = 0; i < m; ++i) rmsnorm(x.data() + i * d, d, L.attn_norm, norm_eps, a.data() + i * d);
      {
        float* outs[] = {q.data(), k.data(), v.data()};
        const int64_t ld[] = {d, d, d};
        run_group(L.qkv, m, a.data(), outs, ld, threads);
      }
      for (int64_t i = 0; i < m; ++i) {  // RoPE, then k and v into the cache
        const int64_t pos = start + i;
        rope(q.data() + i * d, n_heads, pos);
        rope(k.data() + i * d, Hk, pos);
        for (int64_t hh = 0; hh < Hk; ++hh)
          store_kv(kc.get(), ((l * Hk + hh) * cache_len + pos) * dk, k.data() + i * d + hh * dk, dk);
        for (int64_t hh = 0; hh < Hv; ++hh)
          store_kv(vc.get(), ((l * Hv + hh) * cache_len + pos) * dv, v.data() + i * d + hh * dv, dv);
      }
      attention(L, l, m, start, threads);
      if (L.attn_subln)
        for (int64_t i = 0; i < m; ++i) rmsnorm(y.data() + i * d, d, L.attn_subln, norm_eps, y.data() + i * d);
      {
        float* outs[] = {t.data()};
        const int64_t ld[] = {d};
        run_group(L.o, m, y.data(), outs, ld, threads);
      }
      for (int64_t e = 0; e < m * d; ++e) x[size_t(e)] += t[size_t(e)];
      for (int64_t i = 0; i < m; ++i) rmsnorm(x.data() + i * d, d, L.mlp_norm, norm_eps, a.data() + i * d);
      {
        float* outs[] = {g.data(), u.data()};
        const int64_t ld[] = {dff, dff};
        run_group(L.gu, m, a.data(), outs, ld, threads);
      }
      for (int64_t i = 0; i < m; ++i) {
        gate(g.data() + i * dff, u.data() + i * dff, dff, relu2);
        if (L.mlp_subln) rmsnorm(g.data() + i * dff, dff, L.mlp_subln, norm_eps, g.data() + i * dff);
      }
      {
        float* outs[] = {t.data()};
        const int64_t ld[] = {d};
        run_group(L.down, m, g.data(), outs, ld, threads);
      }
      for (int64_t e = 0; e < m * d; ++e) x[size_t(e)] += t[size_t(e)];
    }
    const int64_t first = all_logits ? 0 : m - 1, rows = m - first;
    for (int64_t i = 0; i < rows; ++i)
      rmsnorm(x.data() + (first + i) * d, d, final_norm, norm_eps, a.data() + i * d);
    at::Tensor logits = at::empty({rows, vocab}, at::TensorOptions().dtype(at::kFloat));
    float* lp = logits.mutable_data_ptr<float>();
    constexpr int64_t VCHUNK = 256;  // vocab rows per job
    const int64_t nv = (vocab + VCHUNK - 1) / VCHUNK;
    hgf::Pool::get().run(nv, threads, [&](int64_t c) {
      const int64_t r0 = c * VCHUNK, r1 = std::min(vocab, r0 + VCHUNK);
      for (int64_t i = 0; i < rows; ++i)
        head.dot_rows(r0, r1, a.data() + i * d, lp + i * vocab + r0, opts & OPT_HEAD_ROWS4);
    });
    return logits;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(hgf, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("setup", &Decoder::setup)
      .def("clear", &Decoder::clear)
      .def("release", &Decoder::release)
      .def("run", &Decoder::run)
      .def("set_options", &Decoder::set_options)
      .def("set_kv_half", &Decoder::set_kv_half)
      .def("kv_is_half", &Decoder::kv_is_half)
      .def("options", &Decoder::options)
      .def("cache_bytes", &Decoder::cache_bytes);
}
