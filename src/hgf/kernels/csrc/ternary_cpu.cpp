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
// extensions, AVX2 kernels on 32-byte halves of a group: i2 by shift+mask, tq1 by peeling the
// trits with compares, min and byte shuffles; both multiply with vpmaddubsw (u8 x s8 pairs into
// int16) and vpmaddwd. Without AVX2: a portable loop (auto-vectorised, with an AVX2 clone via
// target_clones).
//
//   ISA                      i2                    tq1
//   AVX-512 VNNI + VBMI      i2_rows_avx512        tq1_rows_avx512
//   AVX2                     rows_avx2<I2Avx2>     rows_avx2<Tq1Avx2>
//   otherwise                group_dot_i2          group_dot_tq1
//
// A row's last group of G < 64 bytes: masked loads (AVX-512); AVX2: the row's last 64 bytes
// with the first 64 - G activation lanes zeroed (a copy zero-padded to 64 bytes if the row has
// no full group).
//
// The weights stream from memory once per token: each step prefetches the same bytes two row
// blocks ahead into L2 (prefetches past the end are harmless; AVX-512 and AVX2 kernels); on
// the Zen 4 dev machine this lifts one core's DRAM stream from ~9 to ~20 GB/s (four
// interleaved row streams defeat the hardware prefetcher).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "pool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HGF_X86 1
#define HGF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#define HGF_AVX2 __attribute__((target("avx2")))
#define HGF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HGF_X86 0
#define HGF_CLONES
#endif

namespace {

constexpr int64_t GROUP = 64;  // bytes per interleave group
constexpr int ROWS = 4;        // output rows per micro-kernel call

constexpr int PORTABLE = 0, AVX2 = 1, AVX512 = 2;
int g_isa = -1;  // PORTABLE, AVX2 or AVX512 (VNNI + VBMI); -1 not yet detected

int detect_isa() {
#if HGF_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi"))
    return AVX512;
  if (__builtin_cpu_supports("avx2")) return AVX2;
#endif
  return PORTABLE;
}

int isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// ---------------------------------------------------------------- portable micro-kernels
// sum over one interleave group of code * x_int; compare/shift only, so the loops vectorise
HGF_CLONES int32_t group_dot_i2(const uint8_t* w, const int8_t* x, int64_t g) {
  int32_t acc = 0;
  for (int64_t j = 0; j < g; ++j) {
    const int v = w[j];
    acc += (v & 3) * x[j] + ((v >> 2) & 3) * x[g + j] + ((v >> 4) & 3) * x[2 * g + j] +
           (v >> 6) * x[3 * g + j];
  }
  return acc;
}

HGF_CLONES int32_t group_dot_tq1(const uint8_t* w, const int8_t* x, int64_t g) {
  int32_t acc = 0;
  for (int64_t j = 0; j < g; ++j) {
    int v = w[j];  // peel trits from the top: d = [v >= 2·3^k] + [v >= 3^k]
    const int d4 = (v >= 162) + (v >= 81);
    v -= 81 * d4;
    const int d3 = (v >= 54) + (v >= 27);
    v -= 27 * d3;
    const int d2 = (v >= 18) + (v >= 9);
    v -= 9 * d2;
    const int d1 = (v >= 6) + (v >= 3);
    v -= 3 * d1;
    acc += v * x[j] + d1 * x[g + j] + d2 * x[2 * g + j] + d3 * x[3 * g + j] + d4 * x[4 * g + j];
  }
  return acc;
}

int32_t dot_portable(const uint8_t* w, int64_t nbytes, const int8_t* x, int per) {
  int32_t acc = 0;
  for (int64_t b = 0; b < nbytes; b += GROUP) {
    const int64_t g = std::min(GROUP, nbytes - b);
    acc += per == 4 ? group_dot_i2(w + b, x + 4 * b, g) : group_dot_tq1(w + b, x + 5 * b, g);
  }
  return acc;
}

// ---------------------------------------------------------------- AVX2 micro-kernels
#if HGF_X86
HGF_AVX2 inline int32_t hsum(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

// A packing's AVX2 decoder: PER codes per byte and dot32(q, xv), the int16 sums of codes times
// activations of 32 packed bytes q (digit k's activations in xv[k]): u8 codes times s8
// activations by vpmaddubsw (pairs into int16), summed over the digits. group_avx2 adds one
// 64-byte group of R rows (row stride ld; the activations of digit k start at x + k·g, and if
// keep is given, activation lane L of half h is zeroed where byte L of keep[h] is 0) into R int32
// accumulators: dot32 of both 32-byte halves summed in int16, then vpmaddwd with ones into int32.

// i2: byte q = c0 + 4c1 + 16c2 + 64c3, c_k = (q >> 2k) & 3 (vpsrlw shifts 16-bit lanes; the
// mask drops the bits shifted in from the neighbouring byte). int16 lanes reach at most
// 2·4·2·2·128 = 4096 (halves · digits · pair · code · |x_int|): no saturation.
struct I2Avx2 {
  static constexpr int PER = 4;
  __m256i m3;
  HGF_AVX2 I2Avx2() : m3(_mm256_set1_epi8(3)) {}

  HGF_AVX2 inline __attribute__((always_inline)) __m256i dot32(__m256i q,
                                                               const __m256i (&xv)[PER]) const {
    __m256i s = _mm256_add_epi16(
        _mm256_maddubs_epi16(_mm256_and_si256(q, m3), xv[0]),
        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 2), m3), xv[1]));
    s = _mm256_add_epi16(
        s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m3), xv[2]));
    return _mm256_add_epi16(
        s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 6), m3), xv[3]));
  }
};

// tq1: byte q = c0 + 3c1 + 9c2 + 27c3 + 81c4 (< 243), its trits peeled from the top on 32 bytes:
//   c4: q mod 81 = min(q, q - 81, q - 162) as wrapping u8 (a wrapped negative is at least
//       256 - 162 = 94 > q mod 81), and q - q mod 81 in {0, 81, 162} = {0, 01010001b,
//       10100010b} holds c4 in bits 6-7;
//   c3, c2 of q < 3t < 128 (t = 27, 9): c = [q > t - 1] + [q > 2t - 1] by signed compares
//       (masks 0 / -1, so c = |sum|), then q -= t·c with t·c a byte shuffle of {0, t, 2t};
//   c1, c0 of q < 9: a byte shuffle each (q div 3, q mod 3).
// int16 lanes reach at most 2·5·2·2·128 = 5120: no saturation.
HGF_AVX2 inline __attribute__((always_inline)) __m256i tq1_peel(__m256i& q, __m256i t1,
                                                                __m256i t2, __m256i tc) {
  const __m256i c = _mm256_abs_epi8(_mm256_add_epi8(_mm256_cmpgt_epi8(q, t1),
                                                    _mm256_cmpgt_epi8(q, t2)));
  q = _mm256_sub_epi8(q, _mm256_shuffle_epi8(tc, c));
  return c;
}

struct Tq1Avx2 {
  static constexpr int PER = 5;
  __m256i t27, t9, div3, mod3, c81, c162, c26, c53, c8, c17, m3;
  HGF_AVX2 Tq1Avx2() {
    // byte shuffle tables (vpshufb looks up 16 bytes per 128-bit lane): 27c, 9c, q div 3, q mod 3
    alignas(16) static constexpr uint8_t tab[4][16] = {
        {0, 27, 54}, {0, 9, 18}, {0, 0, 0, 1, 1, 1, 2, 2, 2}, {0, 1, 2, 0, 1, 2, 0, 1, 2}};
    const auto* tv = reinterpret_cast<const __m128i*>(tab);
    t27 = _mm256_broadcastsi128_si256(tv[0]);
    t9 = _mm256_broadcastsi128_si256(tv[1]);
    div3 = _mm256_broadcastsi128_si256(tv[2]);
    mod3 = _mm256_broadcastsi128_si256(tv[3]);
    c81 = _mm256_set1_epi8(81), c162 = _mm256_set1_epi8(char(162));
    c26 = _mm256_set1_epi8(26), c53 = _mm256_set1_epi8(53);
    c8 = _mm256_set1_epi8(8), c17 = _mm256_set1_epi8(17);
    m3 = _mm256_set1_epi8(3);
  }

  HGF_AVX2 inline __attribute__((always_inline)) __m256i dot32(__m256i q,
                                                               const __m256i (&xv)[PER]) const {
    const __m256i q81 =
        _mm256_min_epu8(q, _mm256_min_epu8(_mm256_sub_epi8(q, c81), _mm256_sub_epi8(q, c162)));
    const __m256i c4 = _mm256_and_si256(_mm256_srli_epi16(_mm256_sub_epi8(q, q81), 6), m3);
    q = q81;
    const __m256i c3 = tq1_peel(q, c26, c53, t27), c2 = tq1_peel(q, c8, c17, t9);
    __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi8(mod3, q), xv[0]),
                                 _mm256_maddubs_epi16(_mm256_shuffle_epi8(div3, q), xv[1]));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c2, xv[2]));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c3, xv[3]));
    return _mm256_add_epi16(s, _mm256_maddubs_epi16(c4, xv[4]));
  }
};

template <int R, class D>
HGF_AVX2 inline __attribute__((always_inline)) void group_avx2(const D& d, __m256i (&acc)[R],
                                                               const uint8_t* w, int64_t ld,
                                                               const int8_t* x, int64_t g,
                                                               const __m256i* keep = nullptr) {
  __m256i s16[R];
  for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
  for (int64_t h = 0; h < GROUP; h += 32) {
    __m256i xv[D::PER];
    for (int k = 0; k < D::PER; ++k) {
      xv[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k * g + h));
      if (keep) xv[k] = _mm256_and_si256(xv[k], keep[h / 32]);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ld + h));
      s16[r] = _mm256_add_epi16(s16[r], d.dot32(q, xv));
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(s16[r], ones));
}

// codes . x_int for R rows with decoder D (I2Avx2 or Tq1Avx2), prefetching the bytes each step
// reads two row blocks ahead. Full groups in place. The tail group of G < 64 bytes (byte j holds
// digit k of activation P·full + k·G + j):
//   full > 0: the 64 bytes ending at the row's end, lane L = j + 64 - G, so its activations start
//     at x + P·full - (64 - G) (reads in [x + P·full - 64, x + P·nbytes), inside the row); lanes
//     L < 64 - G (bytes of the previous group) get their activations zeroed;
//   full = 0: a copy zero-padded to 64 bytes; byte 0 has all codes 0 in both packings, so lanes
//     j >= G add 0 times whatever int8 they read; those reads end at x + (P-1)·G + 64 <=
//     x + P·nbytes + GROUP, inside the x_int row (kp = P·nbytes + GROUP, zeros past P·nbytes).
template <int R, class D>
HGF_AVX2 void rows_avx2(const uint8_t* w, int64_t ld, int64_t nbytes, const int8_t* x,
                        int32_t* out) {
  const D d;
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  const int64_t full = nbytes - nbytes % GROUP, g = nbytes - full;
  for (int64_t b = 0; b < full; b += GROUP) {
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * ld + b), _MM_HINT_T1);
    group_avx2<R>(d, acc, w + b, ld, x + D::PER * b, GROUP);
  }
  if (g > 0) {
    for (int r = 0; r < R; ++r) {  // the tail's first and last bytes (one or two lines)
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * ld + full), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * ld + nbytes - 1), _MM_HINT_T1);
    }
    if (full > 0) {
      const __m256i lane = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                            16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                            29, 30, 31);
      const __m256i cut = _mm256_set1_epi8(char(GROUP - 1 - g));  // keep L > 63 - G
      const __m256i keep[2] = {
          _mm256_cmpgt_epi8(lane, cut),
          _mm256_cmpgt_epi8(_mm256_add_epi8(lane, _mm256_set1_epi8(32)), cut)};
      group_avx2<R>(d, acc, w + nbytes - GROUP, ld, x + D::PER * full - (GROUP - g), g, keep);
    } else {
      alignas(32) uint8_t tail[R][GROUP] = {};
      for (int r = 0; r < R; ++r) std::memcpy(tail[r], w + r * ld, g);
      group_avx2<R>(d, acc, tail[0], GROUP, x, g);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}
#endif

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
    _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * ld), _MM_HINT_T1);
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
    _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * ld), _MM_HINT_T1);
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
  if (isa() == AVX512) {
    if (per == 4) return i2_rows_avx512<R>(w, ld, nbytes, x, out);
    return tq1_rows_avx512<R>(w, ld, nbytes, x, out);
  }
  if (isa() == AVX2) {
    if (per == 4) return rows_avx2<R, I2Avx2>(w, ld, nbytes, x, out);
    return rows_avx2<R, Tq1Avx2>(w, ld, nbytes, x, out);
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
      if (isa() == AVX512) {
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

// y[t, r] for rows [r0, r0 + nr): acc - sum x_int, divided by s_x * s_w, cast to T (round to
// nearest even for bfloat16/half, as torch's .to()).
template <class T>
void matmul_rows(const uint8_t* w, int64_t nbytes, int per, int64_t out_features, int64_t m,
                 const int8_t* q, int64_t kp, const float* s, const int32_t* sum, float s_w,
                 T* y) {
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
          y[t * out_features + r0 + r] = T(float(acc[r] - sum[t]) / denom);
      }
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
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x must be [..., in_features]");
  TORCH_CHECK(w_scale.numel() == 1, "w_scale must be a scalar");
  const bool fast = x.scalar_type() == at::kFloat && x.is_contiguous();
  const at::Tensor xf = fast ? x : x.to(at::kFloat).contiguous();  // [..., in] float32
  const at::Tensor wp = packed.contiguous();
  const int64_t m = xf.numel() / std::max<int64_t>(1, in_features), kp = per * nbytes + GROUP;
  const float s_w = w_scale.scalar_type() == at::kFloat && w_scale.is_cpu()
                        ? *w_scale.const_data_ptr<float>()
                        : w_scale.item<float>();
  thread_local std::vector<int8_t> xq;  // per-call scratch, reused
  thread_local std::vector<float> sx;
  thread_local std::vector<int32_t> sumx;
  xq.resize(m * kp);
  sx.resize(m);
  sumx.resize(m);
  quantize(xf.const_data_ptr<float>(), m, in_features, kp, float(act_eps), xq.data(), sx.data(),
           sumx.data());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty(shape, x.options());  // [..., out] in x's dtype
  const uint8_t* w = wp.const_data_ptr<uint8_t>();
  switch (y.scalar_type()) {
    case at::kFloat:
      matmul_rows(w, nbytes, per, out_features, m, xq.data(), kp, sx.data(), sumx.data(), s_w,
                  y.mutable_data_ptr<float>());
      break;
    case at::kBFloat16:
      matmul_rows(w, nbytes, per, out_features, m, xq.data(), kp, sx.data(), sumx.data(), s_w,
                  y.mutable_data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      matmul_rows(w, nbytes, per, out_features, m, xq.data(), kp, sx.data(), sumx.data(), s_w,
                  y.mutable_data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return y;
}

// Sum of the bytes of a uint8 tensor, streamed like the GEMV weights (prefetch into L2, all
// threads): the read-bandwidth probe of bench.py, a fairer peak than torch's reductions.
int64_t sum_bytes_portable(const uint8_t* p, int64_t n) {
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

#if HGF_X86
HGF_AVX512 int64_t sum_bytes_avx512(const uint8_t* p, int64_t n) {
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 8192), _MM_HINT_T1);
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_loadu_si512(p + i), _mm512_setzero_si512()));
  }
  return _mm512_reduce_add_epi64(acc) + sum_bytes_portable(p + i, n - i);
}
#endif

int64_t sum_bytes(const uint8_t* p, int64_t n) {
#if HGF_X86
  if (isa() == AVX512) return sum_bytes_avx512(p, n);
#endif
  return sum_bytes_portable(p, n);
}

int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous(), "expects a contiguous uint8");
  constexpr int64_t CHUNK = 1 << 16;
  const uint8_t* p = t.const_data_ptr<uint8_t>();
  const int64_t n = t.numel();
  std::atomic<int64_t> total{0};
  hgf::Pool::get().run((n + CHUNK - 1) / CHUNK, at::get_num_threads(), [&](int64_t c) {
    total += sum_bytes(p + c * CHUNK, std::min(CHUNK, n - c * CHUNK));
  });
  return total.load();
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
  m.def("stream_read(Tensor t) -> int");
}

TORCH_LIBRARY_IMPL(hgf, CPU, m) {
  m.impl("ternary_linear_cpu", &ternary_linear_cpu);
  m.impl("stream_read", &stream_read);
}
