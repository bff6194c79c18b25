// The sherry packing's CPU GEMV/GEMM: y = (x_int . W_t) / (s_x * s_w) on 3:4 sparse ternary
// weights stored in 5 bits per 4 weights (layout in hgf/kernels/sherry.py).
//
// Included by decode_cpu.cpp after ternary_cpu.cpp (one translation unit): it reuses that
// file's per-token int8 quantisation (quantize), ISA selection (isa) and thread pool, so the
// integers, the float32 scale and the division are those of the reference, bit for bit.
//
// AVX2, per block of 32 groups (128 weights, 20 bytes): the 16 index bytes, loaded into both
// lanes and shifted by 0 / 4 bits per lane, give the 4-bit indices of groups 0..31 in order;
// vpshufb of a 16-entry table per position k turns them into the sign-less weights u_k in
// {-1, 0, 1}; the 4 sign bytes expand to ±1 per group; the activations were permuted once per
// token into planes x_k[g] = x[4g + k], so vpsignb(vpsignb(x_k, sign), u_k) is the product,
// vpmaddubsw with ones sums pairs into int16 (16 blocks at most 16 · 4 · 2 · 127 per lane) and
// vpmaddwd with ones into int32. The tail block (in mod 128) and non-AVX2 CPUs use the scalar
// loop.

namespace {
namespace sherry {

constexpr int64_t BLOCK = 128;  // weights per full block
constexpr int64_t BLOCK_BYTES = 20;

// sign-less patterns: PAT[idx][k] (see hgf/kernels/sherry.py)
struct Patterns {
  int8_t v[16][4];
  Patterns() {
    for (int idx = 0; idx < 16; ++idx) {
      const int z = idx & 3;
      int nz[3], n = 0;
      for (int k = 0; k < 4; ++k)
        if (k != z) nz[n++] = k;
      for (int k = 0; k < 4; ++k) v[idx][k] = 0;
      v[idx][nz[0]] = 1;
      v[idx][nz[1]] = (idx & 4) ? -1 : 1;
      v[idx][nz[2]] = (idx & 8) ? -1 : 1;
    }
  }
};

const Patterns& patterns() {
  static const Patterns p;
  return p;
}

int64_t row_bytes(int64_t in) {
  const int64_t groups = in / 4, full = groups / 32, tail = groups % 32;
  return full * BLOCK_BYTES + (tail + 1) / 2 + (tail + 7) / 8;
}

// one block of gb groups at w (index bytes then sign bytes), activations x (original order)
int32_t block_dot_portable(const uint8_t* w, int64_t gb, const int8_t* x) {
  const Patterns& P = patterns();
  const int64_t h = (gb + 1) / 2;
  int32_t acc = 0;
  for (int64_t t = 0; t < gb; ++t) {
    const int idx = t < h ? (w[t] & 15) : (w[t - h] >> 4);
    const int s = (w[h + t / 8] >> (t % 8)) & 1;
    const int8_t* xt = x + 4 * t;
    const int32_t g = P.v[idx][0] * xt[0] + P.v[idx][1] * xt[1] + P.v[idx][2] * xt[2] +
                      P.v[idx][3] * xt[3];
    acc += s ? -g : g;
  }
  return acc;
}

int32_t row_dot_portable(const uint8_t* w, int64_t in, const int8_t* x) {
  const int64_t groups = in / 4;
  int32_t acc = 0;
  for (int64_t g0 = 0; g0 < groups; g0 += 32) {
    const int64_t gb = std::min<int64_t>(32, groups - g0);
    acc += block_dot_portable(w, gb, x + 4 * g0);
    w += (gb + 1) / 2 + (gb + 7) / 8;
  }
  return acc;
}

#if HGF_X86
struct Avx2Tables {
  __m256i lut[4], m4, one8, one16, bytesel, bitmask, nib_shift;
  HGF_AVX2 Avx2Tables() {
    const Patterns& P = patterns();
    for (int k = 0; k < 4; ++k) {
      alignas(16) int8_t t[16];
      for (int i = 0; i < 16; ++i) t[i] = P.v[i][k];
      lut[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
    }
    m4 = _mm256_set1_epi8(15);
    one8 = _mm256_set1_epi8(1);
    one16 = _mm256_set1_epi16(1);
    bytesel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                               2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    bitmask = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,  //
                               1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    nib_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);  // low lane: low nibbles, high: high
  }
};

// one block's 4-bit pattern indices of groups 0..31 (idx) and their signs (sgn: -1 or +1 per
// group): the 16 index bytes in both lanes, low lane the low nibbles (groups 0..15), high lane the
// high nibbles (groups 16..31); the 4 sign bytes expanded to one byte per group
HGF_AVX2 inline void block_codes(const Avx2Tables& T, const uint8_t* p, __m256i& idx,
                                 __m256i& sgn) {
  const __m256i v =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  idx = _mm256_and_si256(_mm256_srlv_epi32(v, T.nib_shift), T.m4);
  int32_t bits;
  std::memcpy(&bits, p + 16, 4);
  __m256i sb = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), T.bytesel);
  sb = _mm256_cmpeq_epi8(_mm256_and_si256(sb, T.bitmask), T.bitmask);  // -1 where s = 1
  sgn = _mm256_or_si256(sb, T.one8);                                    // -1 or +1
}

// full blocks [0, nfull) of R rows (row stride ld); xp: the token's activation planes. A block
// adds at most 4 · 2 · 127 = 1016 to an int16 lane, so 16 blocks sum in int16 (< 32767) before
// one vpmaddwd widens them into the int32 accumulators. Prefetch: the bytes two row blocks ahead.
template <int R>
HGF_AVX2 void rows_dot_avx2(const Avx2Tables& T, const uint8_t* w, int64_t ld, int64_t nfull,
                            const int8_t* xp, int32_t* out) {
  constexpr int64_t SPAN = 16;  // blocks per int16 partial sum
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < nfull; b0 += SPAN) {
    __m256i s16[R];
    for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
    for (int64_t b = b0; b < std::min(nfull, b0 + SPAN); ++b) {
      if ((b & 3) == 0)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * ld + BLOCK_BYTES * b),
                       _MM_HINT_T1);
      __m256i xk[4];
      for (int k = 0; k < 4; ++k)
        xk[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + BLOCK * b + 32 * k));
      for (int r = 0; r < R; ++r) {
        __m256i idx, sgn;
        block_codes(T, w + r * ld + BLOCK_BYTES * b, idx, sgn);
        for (int k = 0; k < 4; ++k) {
          const __m256i u = _mm256_shuffle_epi8(T.lut[k], idx);
          const __m256i pr = _mm256_sign_epi8(_mm256_sign_epi8(xk[k], sgn), u);
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(T.one8, pr));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(s16[r], T.one16));
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

const Avx2Tables& avx2_tables() {
  static const Avx2Tables t;
  return t;
}

// the codes c = W_t + 1 of one row's full blocks, in the planes' order (c[128b + 32k + g] is the
// weight at 128b + 4g + k, matching permute()'s x planes): the native decoder's prompt path dots
// them with vpmaddubsw as it does unpacked i2/tq1 rows (decode_cpu.cpp, codes_dot4_avx2)
HGF_AVX2 void unpack_planes_avx2(const uint8_t* w, int64_t nfull, uint8_t* c) {
  const Avx2Tables& T = avx2_tables();
  for (int64_t b = 0; b < nfull; ++b) {
    __m256i idx, sgn;
    block_codes(T, w + BLOCK_BYTES * b, idx, sgn);
    for (int k = 0; k < 4; ++k) {
      const __m256i u = _mm256_sign_epi8(_mm256_shuffle_epi8(T.lut[k], idx), sgn);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + BLOCK * b + 32 * k),
                          _mm256_add_epi8(u, T.one8));
    }
  }
}
#endif

// x_int [m, in] -> planes: per full block b, xp[128b + 32k + g] = x[128b + 4g + k]
void permute(const int8_t* xq, int64_t m, int64_t in, int8_t* xp) {
  const int64_t nfull = in / BLOCK;
  for (int64_t t = 0; t < m; ++t)
    for (int64_t b = 0; b < nfull; ++b) {
      const int8_t* s = xq + t * in + BLOCK * b;
      int8_t* d = xp + t * in + BLOCK * b;
      for (int64_t g = 0; g < 32; ++g)
        for (int k = 0; k < 4; ++k) d[32 * k + g] = s[4 * g + k];
    }
}

constexpr int R = 4;  // rows per micro-kernel call

// acc[r] = W_t[r] . x_int for the nr <= R rows at w (row stride nbytes); xt: the token's x_int
// (original order), xpt: its planes (permute). Also the native decoder's sherry projections.
void rows_dot(const uint8_t* w, int64_t nbytes, int64_t in, int64_t nr, const int8_t* xt,
              const int8_t* xpt, int32_t* acc) {
#if HGF_X86
  if (isa() >= AVX2) {
    const int64_t nfull = in / BLOCK, tail_groups = (in / 4) % 32;
    const Avx2Tables& tb = avx2_tables();
    if (nr == R)
      rows_dot_avx2<R>(tb, w, nbytes, nfull, xpt, acc);
    else
      for (int64_t r = 0; r < nr; ++r)
        rows_dot_avx2<1>(tb, w + r * nbytes, nbytes, nfull, xpt, acc + r);
    if (tail_groups)
      for (int64_t r = 0; r < nr; ++r)
        acc[r] += block_dot_portable(w + r * nbytes + nfull * BLOCK_BYTES, tail_groups,
                                     xt + nfull * BLOCK);
    return;
  }
#endif
  for (int64_t r = 0; r < nr; ++r) acc[r] = row_dot_portable(w + r * nbytes, in, xt);
}

template <class T>
void matmul_rows(const uint8_t* w, int64_t nbytes, int64_t in, int64_t out_features, int64_t m,
                 const int8_t* xq, const int8_t* xp, const float* s, float s_w, T* y) {
  const int64_t nblk = (out_features + R - 1) / R;
  const int64_t per_chunk = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, R * nbytes * m));
  hgf::Pool::get().run((nblk + per_chunk - 1) / per_chunk, at::get_num_threads(), [&](int64_t c) {
    int32_t acc[R];
    for (int64_t blk = c * per_chunk; blk < std::min(nblk, (c + 1) * per_chunk); ++blk) {
      const int64_t r0 = blk * R, nr = std::min<int64_t>(R, out_features - r0);
      for (int64_t t = 0; t < m; ++t) {
        rows_dot(w + r0 * nbytes, nbytes, in, nr, xq + t * in, xp + t * in, acc);
        const float denom = s[t] * s_w;
        for (int64_t r = 0; r < nr; ++r)
          y[t * out_features + r0 + r] = T(float(acc[r]) / denom);
      }
    }
  });
}

at::Tensor sherry_linear_cpu(const at::Tensor& x, const at::Tensor& packed,
                             const at::Tensor& w_scale, c10::string_view packing,
                             int64_t out_features, int64_t in_features, double act_eps) {
  TORCH_CHECK(packing == "sherry", "sherry_linear_cpu: packing must be sherry");
  TORCH_CHECK(in_features % 4 == 0, "sherry: in_features must be a multiple of 4");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.size(0) == out_features,
              "packed must be uint8 [out, nbytes]");
  const int64_t nbytes = packed.size(1);
  TORCH_CHECK(nbytes == row_bytes(in_features), "packed has the wrong row length");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "x must be [..., in_features]");
  TORCH_CHECK(w_scale.numel() == 1, "w_scale must be a scalar");
  const bool fast = x.scalar_type() == at::kFloat && x.is_contiguous();
  const at::Tensor xf = fast ? x : x.to(at::kFloat).contiguous();  // [..., in] float32
  const at::Tensor wp = packed.contiguous();
  const int64_t m = xf.numel() / std::max<int64_t>(1, in_features);
  const float s_w = w_scale.scalar_type() == at::kFloat && w_scale.is_cpu()
                        ? *w_scale.const_data_ptr<float>()
                        : w_scale.item<float>();
  thread_local std::vector<int8_t> xq, xp;
  thread_local std::vector<float> sx;
  thread_local std::vector<int32_t> sumx;
  xq.resize(m * in_features + 64);
  xp.resize(m * in_features + 64);
  sx.resize(m);
  sumx.resize(m);
  quantize(xf.const_data_ptr<float>(), m, in_features, in_features, float(act_eps), xq.data(),
             sx.data(), sumx.data());
  permute(xq.data(), m, in_features, xp.data());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty(shape, x.options());
  const uint8_t* w = wp.const_data_ptr<uint8_t>();
  switch (y.scalar_type()) {
    case at::kFloat:
      matmul_rows(w, nbytes, in_features, out_features, m, xq.data(), xp.data(), sx.data(), s_w,
                  y.mutable_data_ptr<float>());
      break;
    case at::kBFloat16:
      matmul_rows(w, nbytes, in_features, out_features, m, xq.data(), xp.data(), sx.data(), s_w,
                  y.mutable_data_ptr<c10::BFloat16>());
      break;
    case at::kHalf:
      matmul_rows(w, nbytes, in_features, out_features, m, xq.data(), xp.data(), sx.data(), s_w,
                  y.mutable_data_ptr<c10::Half>());
      break;
    default:
      TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  return y;
}

}  // namespace sherry

}  // namespace

TORCH_LIBRARY_FRAGMENT(hgf, m) {
  m.def("sherry_linear_cpu(Tensor x, Tensor packed, Tensor w_scale, str packing, "
        "int out_features, int in_features, float act_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(hgf, CPU, m) { m.impl("sherry_linear_cpu", &sherry::sherry_linear_cpu); }
