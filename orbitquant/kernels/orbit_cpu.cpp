// OrbitQuant CPU kernels: the activation path fused into one pass per token, and packed-weight decode.
//
// rotate_quantize: for each row x of X (n, d) float32, in an L1-resident scratch buffer:
//   y = (x[perm] * signs), block Walsh-Hadamard of size h (the same butterfly sums as the torch
//   reference, so the rotated values are bit-identical), times 1/sqrt(h); s = ||y|| (double accumulation);
//   u = y / (s + eps) (activations) or y / max(s, eps) (weights);
//   idx = #{thresholds < u} (= torch.bucketize(u, thresholds) = Codebook.encode(u), exactly);
//   writes s * centroids[idx] (fake-quant output), or the uint8 codes and s, or the packed code stream and s.
// The torch reference makes ~20 passes over the tensor; this makes one.
//
// dequant_rows: unpack the little-endian b-bit stream of pack_codes and scale each row by its norm.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pack_row assumes a little-endian machine"
#endif

namespace {

#ifdef __AVX2__
// WHT stages s = 1, 2, 4 inside one 8-float register (shuffle + add/sub + blend): lane i gets the same
// sum/difference of the same two floats as the scalar butterfly
inline __m256 wht8(__m256 v) {
  __m256 sw = _mm256_permute_ps(v, 0xB1);  // neighbours swapped: (a1, a0, a3, a2, ...)
  v = _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xAA);
  sw = _mm256_permute_ps(v, 0x4E);  // pairs swapped within 128-bit lanes
  v = _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xCC);
  sw = _mm256_permute2f128_ps(v, v, 0x01);  // halves swapped
  return _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xF0);
}
#endif

// b = x[perm] * signs followed by the WHT stages below 8 (when h >= 8 and d % 8 == 0: gathered eight at a time
// and transformed in the register). Returns the first stage still to run.
inline int64_t permute_signs(const float* x, const int32_t* P, const float* S, float* b, int64_t d, int64_t h) {
#ifdef __AVX2__
  if (h >= 8 && d % 8 == 0) {
    for (int64_t j = 0; j < d; j += 8) {
      const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + j));
      _mm256_storeu_ps(b + j, wht8(_mm256_mul_ps(_mm256_i32gather_ps(x, i, 4), _mm256_loadu_ps(S + j))));
    }
    return 8;
  }
#endif
  for (int64_t j = 0; j < d; ++j) b[j] = x[P[j]] * S[j];
  return 1;
}

// Unnormalised WHT on blocks of h, from stage s0 on. Stages go two per pass (radix 4: four values in registers,
// the same four sums and differences as two radix-2 passes, so half the loads and stores). Every output is the
// same sum/difference of the same two floats as in the scalar butterfly (and the torch reference), so results
// are bit-identical.
inline void fwht_inplace(float* a, int64_t d, int64_t h, int64_t s0) {
  int64_t s = s0;
  for (; 4 * s <= h; s <<= 2) {  // stages s and 2s in one pass
    for (int64_t blk = 0; blk < d; blk += 4 * s) {
      float* p0 = a + blk;
      float* p1 = p0 + s;
      float* p2 = p1 + s;
      float* p3 = p2 + s;
      for (int64_t j = 0; j < s; ++j) {
        const float x0 = p0[j], x1 = p1[j], x2 = p2[j], x3 = p3[j];
        const float a0 = x0 + x1, a1 = x0 - x1, a2 = x2 + x3, a3 = x2 - x3;
        p0[j] = a0 + a2;
        p1[j] = a1 + a3;
        p2[j] = a0 - a2;
        p3[j] = a1 - a3;
      }
    }
  }
  for (; s < h; s <<= 1) {
    for (int64_t blk = 0; blk < d; blk += 2 * s) {
      float* lo = a + blk;
      float* hi = a + blk + s;
      for (int64_t j = 0; j < s; ++j) {
        const float u = lo[j], v = hi[j];
        lo[j] = u + v;
        hi[j] = u - v;
      }
    }
  }
}

// scale in place by c and return the squared norm (double, 8 independent partial sums: no serial chain)
inline double scale_sumsq(float* b, int64_t d, float c) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int k = 0; k < 8; ++k) {
      b[j + k] *= c;
      acc[k] += static_cast<double>(b[j + k]) * b[j + k];
    }
  }
  for (; j < d; ++j) {
    b[j] *= c;
    acc[0] += static_cast<double>(b[j]) * b[j];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The codebook as the kernel searches it (the answers are those of Codebook.encode in codebook.py, exactly).
// Symmetric codebooks (Lloyd-Max tables are: t_k = -t_{L-2-k}, middle threshold 0) of up to 32 levels: with
// m = L/2 and p_1 < ... < p_{m-1} the positive thresholds, #{t < u} = m + #{p < |u|} for u > 0 and
// m - 1 - #{p <= |u|} otherwise, and #{p <= a} = #{p < nextup(a)}; so one branchless binary search of |u| (or
// its next float up) over p (+inf padded, in one or two registers: lookups are in-register permutes), and the
// centroid is +-cpos[count]. Other codebooks up to 16 levels: the same search over all thresholds. More levels:
// the uniform grid of Codebook.encode, idx = base[c] + (u > inside[c]), c = clamp(floor((u - lo) * inv_width))
// in float32 (exact; two gathers).
struct Book {
  int32_t levels;
  bool sym;             // symmetric and levels <= 32: the |u| search
  float tab[16];        // sym: p_1..p_{m-1}, +inf padded; else (levels <= 16) the thresholds, +inf padded
  float ctab[16];       // sym: centroids c_m..c_{2m-1}; else (levels <= 16) the centroids
  const float* C;       // centroids
  const float* T;       // thresholds
  const int32_t* base;  // grid, per cell: thresholds in earlier cells
  const float* inside;  // grid, per cell: its threshold, +inf if none
  float lo, inv_width;
  int32_t n_cells;
};

inline int32_t encode_one(const Book& k, float v) {
  if (k.levels <= 32 && (k.sym || k.levels <= 16)) {  // branchless binary search over all thresholds
    int32_t i = 0;
    for (int32_t s = k.levels / 2; s >= 1; s /= 2) i += (i + s - 1 < k.levels - 1 && v > k.T[i + s - 1]) ? s : 0;
    return i;
  }
  float f = std::floor((v - k.lo) * k.inv_width);
  f = std::min(std::max(f, 0.0f), static_cast<float>(k.n_cells - 1));
  const int32_t c = static_cast<int32_t>(f);
  return k.base[c] + (v > k.inside[c] ? 1 : 0);
}

#ifdef __AVX2__
// table[i] for i in 0..15 (two registers lo/hi): permute within each, pick by bit 3 of i
inline __m256 lut16(__m256 lo, __m256 hi, __m256i i) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, i), _mm256_permutevar8x32_ps(hi, i),
                          _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}

// #{tab[j] < a} for a table of `n` (power of two, <= 16) sorted entries, the last +inf
inline __m256i search8(__m256 a, int32_t n, __m256 tlo, __m256 thi) {
  __m256i i = _mm256_setzero_si256();
  for (int32_t s = n / 2; s >= 1; s /= 2) {
    const __m256i cand = _mm256_add_epi32(i, _mm256_set1_epi32(s - 1));
    const __m256 t = n <= 8 ? _mm256_permutevar8x32_ps(tlo, cand) : lut16(tlo, thi, cand);
    i = _mm256_add_epi32(i, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(a, t, _CMP_GT_OQ)),
                                             _mm256_set1_epi32(s)));
  }
  return i;
}

// u = b[j..j+8) / den, then idx (idx != nullptr) or s * centroid (y != nullptr), eight lanes
struct Lanes8 {
  __m256 tlo, thi, clo, chi;
  explicit Lanes8(const Book& k)
      : tlo(_mm256_loadu_ps(k.tab)), thi(_mm256_loadu_ps(k.tab + 8)), clo(_mm256_loadu_ps(k.ctab)),
        chi(_mm256_loadu_ps(k.ctab + 8)) {}
};

// idx != nullptr: store the eight codes; else return s * centroid[code]
inline __m256 quantize8(const Book& k, const Lanes8& r, __m256 u, __m256 vs, int32_t* idx) {
  if (k.sym) {
    const int32_t m = k.levels / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 pos = _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_GT_OQ);
    const __m256i notpos = _mm256_castps_si256(_mm256_xor_ps(pos, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
    // |u|, one float up where u <= 0 (integer +1 on the bits of a non-negative float = next float up; +inf stays)
    const __m256i next = _mm256_sub_epi32(_mm256_castps_si256(_mm256_andnot_ps(sign, u)), notpos);
    const __m256 a = _mm256_castsi256_ps(_mm256_min_epi32(next, _mm256_set1_epi32(0x7f800000)));
    const __m256i c = search8(a, m, r.tlo, r.thi);
    if (idx == nullptr) {
      const __m256 cv = m <= 8 ? _mm256_permutevar8x32_ps(r.clo, c) : lut16(r.clo, r.chi, c);
      return _mm256_mul_ps(vs, _mm256_xor_ps(cv, _mm256_and_ps(_mm256_castsi256_ps(notpos), sign)));
    }
    const __m256i up = _mm256_add_epi32(_mm256_set1_epi32(m), c), down = _mm256_sub_epi32(_mm256_set1_epi32(m - 1), c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx), _mm256_blendv_epi8(up, down, notpos));
    return vs;
  }
  __m256i i;
  if (k.levels <= 16) {
    i = search8(u, k.levels, r.tlo, r.thi);
  } else {
    __m256 f = _mm256_floor_ps(_mm256_mul_ps(_mm256_sub_ps(u, _mm256_set1_ps(k.lo)), _mm256_set1_ps(k.inv_width)));
    f = _mm256_min_ps(_mm256_max_ps(f, _mm256_setzero_ps()), _mm256_set1_ps(static_cast<float>(k.n_cells - 1)));
    const __m256i c = _mm256_cvttps_epi32(f);
    const __m256 gt = _mm256_cmp_ps(u, _mm256_i32gather_ps(k.inside, c, 4), _CMP_GT_OQ);
    i = _mm256_sub_epi32(_mm256_i32gather_epi32(k.base, c, 4), _mm256_castps_si256(gt));  // mask is -1 where above
  }
  if (idx == nullptr)
    return _mm256_mul_ps(vs, k.levels <= 16 ? lut16(r.clo, r.chi, i) : _mm256_i32gather_ps(k.C, i, 4));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx), i);
  return vs;
}

inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }

// float -> bfloat16, round to nearest even (what Tensor.to(torch.bfloat16) does for finite values)
inline void store8(uint16_t* y, __m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);  // the two packed halves, in order
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(p));
}
#endif

inline void store1(float* y, float v) { *y = v; }
inline void store1(uint16_t* y, float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  *y = static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline float load_bf16(uint16_t v) {
  const uint32_t b = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// u = b / den; idx[j] = #{t < u_j} (idx != nullptr) or y[j] = s * C[that index] (y: float or bf16 bits)
template <typename Out>
inline void quantize_row(const Book& k, const float* b, float den, float s, int32_t* idx, Out* y, int64_t d) {
  int64_t j = 0;
#ifdef __AVX2__
  const Lanes8 r(k);
  const __m256 vden = _mm256_set1_ps(den), vs = _mm256_set1_ps(s);
  for (; j + 8 <= d; j += 8) {
    const __m256 v = quantize8(k, r, _mm256_div_ps(_mm256_loadu_ps(b + j), vden), vs, idx ? idx + j : nullptr);
    if (idx == nullptr) store8(y + j, v);
  }
#endif
  for (; j < d; ++j) {
    const int32_t i = encode_one(k, b[j] / den);
    if (idx == nullptr) store1(y + j, s * k.C[i]);
    else idx[j] = i;
  }
}

// codes idx[0..d) -> the little-endian b-bit stream of pack_codes, written from a byte boundary: ceil(d * bits / 8)
// bytes, the last one zero-padded
template <int BITS, typename Code>
inline void pack_row_aligned(const Code* idx, uint8_t* out, int64_t d) {
  constexpr int PER = 8 / BITS;
  int64_t byte = 0;
  for (; byte < d / PER; ++byte) {
    uint32_t acc = 0;
    for (int k = 0; k < PER; ++k) acc |= static_cast<uint32_t>(idx[byte * PER + k]) << (k * BITS);
    out[byte] = static_cast<uint8_t>(acc);
  }
  if (d % PER) {
    uint32_t acc = 0;
    for (int64_t k = 0; k < d % PER; ++k) acc |= static_cast<uint32_t>(idx[byte * PER + k]) << (k * BITS);
    out[byte] = static_cast<uint8_t>(acc);
  }
}

template <typename Code>
inline void pack_row(const Code* idx, uint8_t* out, int64_t d, int bits) {
  switch (bits) {
    case 1: return pack_row_aligned<1>(idx, out, d);
    case 2: return pack_row_aligned<2>(idx, out, d);
    case 4: return pack_row_aligned<4>(idx, out, d);
    case 8: return pack_row_aligned<8>(idx, out, d);
    default: break;
  }
  // 3, 5, 6, 7 bits: eight codes fill exactly `bits` bytes; build them in one 64-bit word (little-endian)
  int64_t j = 0;
  for (; j + 8 <= d; j += 8, out += bits) {
    uint64_t acc = 0;
    for (int k = 0; k < 8; ++k) acc |= static_cast<uint64_t>(idx[j + k]) << (k * bits);
    std::memcpy(out, &acc, bits);
  }
  uint64_t acc = 0;  // the d % 8 codes left: shift into an accumulator, flush whole bytes, then the partial one
  int filled = 0;
  for (; j < d; ++j) {
    acc |= static_cast<uint64_t>(idx[j]) << filled;
    filled += bits;
    while (filled >= 8) {
      *out++ = static_cast<uint8_t>(acc);
      acc >>= 8;
      filled -= 8;
    }
  }
  if (filled > 0) *out = static_cast<uint8_t>(acc);
}

}  // namespace

// The codebook tables as float32/int32 tensors and the Book that points into them.
struct OwnedBook {
  torch::Tensor t, c, base, inside;
  Book book;
  OwnedBook(torch::Tensor thresholds, torch::Tensor centroids, torch::Tensor base_, torch::Tensor inside_, double lo,
            double inv_width)
      : t(thresholds.to(torch::kFloat32).contiguous()), c(centroids.to(torch::kFloat32).contiguous()),
        base(base_.to(torch::kInt32).contiguous()), inside(inside_.to(torch::kFloat32).contiguous()) {
    const int32_t levels = static_cast<int32_t>(c.numel());
    TORCH_CHECK(levels >= 2 && levels <= 256 && (levels & (levels - 1)) == 0 && t.numel() == levels - 1,
                "codebook size");
    TORCH_CHECK(base.numel() == inside.numel() && base.numel() >= 1, "codebook grid tables");
    const float* T = t.data_ptr<float>();
    const float* C = c.data_ptr<float>();
    book = Book{levels, levels <= 32, {}, {}, C, T, base.data_ptr<int32_t>(), inside.data_ptr<float>(),
                static_cast<float>(lo), static_cast<float>(inv_width), static_cast<int32_t>(base.numel())};
    const int32_t m = levels / 2;
    for (int32_t i = 0; i < levels - 1 && book.sym; ++i) book.sym = T[i] == -T[levels - 2 - i];
    book.sym = book.sym && T[m - 1] == 0.0f;
    for (int32_t i = 0; i < m && book.sym; ++i) book.sym = C[m + i] == -C[m - 1 - i];
    for (int i = 0; i < 16; ++i) {
      if (book.sym) {
        book.tab[i] = i < m - 1 ? T[m + i] : INFINITY;
        book.ctab[i] = i < m ? C[m + i] : 0.0f;
      } else {
        book.tab[i] = i < levels - 1 && levels <= 16 ? T[i] : INFINITY;
        book.ctab[i] = i < levels && levels <= 16 ? C[i] : 0.0f;
      }
    }
  }
};

// u (any shape) float32 -> int32 codes #{t < u} (values = false) or centroids[codes] (values = true): the
// kernel's search on its own, for testing it against torch.bucketize on chosen values (ties, +-0, +-inf)
torch::Tensor encode(torch::Tensor u, torch::Tensor thresholds, torch::Tensor centroids, torch::Tensor base,
                     torch::Tensor inside, double lo, double inv_width, bool values) {
  TORCH_CHECK(u.scalar_type() == torch::kFloat32, "u: float32");
  const OwnedBook owned(thresholds, centroids, base, inside, lo, inv_width);
  auto uc = u.contiguous();
  auto out = torch::empty(u.sizes(), u.options().dtype(values ? torch::kFloat32 : torch::kInt32));
  quantize_row<float>(owned.book, uc.data_ptr<float>(), 1.0f, 1.0f, values ? nullptr : out.data_ptr<int32_t>(),
               values ? out.data_ptr<float>() : nullptr, uc.numel());  // u / 1 and 1 * c are exact
  return out;
}

// x: (n, d) float32 or bfloat16. mode 0: returns {y (n, d) float32, finite flag (1,) uint8}; mode 3: the same with
// y in bfloat16 (rounded to nearest even, = y.to(torch.bfloat16)); mode 1: returns {codes (n, d) uint8, norms (n,)
// float32}; mode 2: returns {packed (n, d * bits / 8) uint8 = pack_codes of the codes, norms (n,) float32}
std::vector<torch::Tensor> rotate_quantize(torch::Tensor x, torch::Tensor perm, torch::Tensor signs, int64_t h,
                                           torch::Tensor thresholds, torch::Tensor centroids, torch::Tensor base,
                                           torch::Tensor inside, double lo, double inv_width, double eps,
                                           bool clamp_eps, int64_t mode) {
  const bool x16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (x16 || x.scalar_type() == torch::kFloat32) && x.is_contiguous(),
              "x: contiguous (n, d) float32 or bfloat16");
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode in 0..3");
  const bool fake = mode == 0 || mode == 3;
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(perm.numel() == d && signs.numel() == d && d % h == 0, "perm/signs/h do not fit d");
  const int bits = __builtin_ctz(static_cast<unsigned>(centroids.numel()));
  TORCH_CHECK(mode != 2 || (d * bits) % 8 == 0, "mode 2 needs whole bytes per row (d * bits % 8 == 0)");
  auto perm_c = perm.to(torch::kInt32).contiguous();
  auto signs_c = signs.to(torch::kFloat32).contiguous();
  const OwnedBook owned(thresholds, centroids, base, inside, lo, inv_width);
  const Book& book = owned.book;
  const int32_t* P = perm_c.data_ptr<int32_t>();
  const float* S = signs_c.data_ptr<float>();
  const float* X = x16 ? nullptr : x.data_ptr<float>();
  const uint16_t* X16 = x16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(h)));

  torch::Tensor out, norms;
  if (fake) {
    out = torch::empty({n, d}, x.options().dtype(mode == 0 ? torch::kFloat32 : torch::kBFloat16));
    norms = torch::ones({1}, x.options().dtype(torch::kUInt8));
  } else {
    out = torch::empty({n, mode == 1 ? d : d * bits / 8}, x.options().dtype(torch::kUInt8));
    norms = torch::empty({n}, x.options().dtype(torch::kFloat32));
  }
  float* Y = mode == 0 ? out.data_ptr<float>() : nullptr;
  uint16_t* Y16 = mode == 3 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  uint8_t* Q = fake ? nullptr : out.data_ptr<uint8_t>();
  float* N = fake ? nullptr : norms.data_ptr<float>();
  const int64_t row_bytes = mode == 1 ? d : d * bits / 8;
  std::atomic<bool> finite{true};

  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(d);
    std::vector<int32_t> ibuf(d);
    std::vector<float> xbuf(x16 ? d : 0);
    float* b = buf.data();
    int32_t* ix = ibuf.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = X16 == nullptr ? X + r * d : xbuf.data();
      if (X16 != nullptr)  // widen the bf16 row once (exact), then the same float path
        for (int64_t j = 0; j < d; ++j) xbuf[j] = load_bf16(X16[r * d + j]);
      fwht_inplace(b, d, h, permute_signs(xr, P, S, b, d, h));
      const float s = static_cast<float>(std::sqrt(scale_sumsq(b, d, scale)));
      if (!std::isfinite(s)) {
        finite = false;
        continue;
      }
      const float den = clamp_eps ? std::max(s, static_cast<float>(eps)) : s + static_cast<float>(eps);
      if (mode == 0) {
        quantize_row<float>(book, b, den, s, nullptr, Y + r * d, d);
        continue;
      }
      if (mode == 3) {
        quantize_row<uint16_t>(book, b, den, s, nullptr, Y16 + r * d, d);
        continue;
      }
      quantize_row<float>(book, b, den, s, ix, nullptr, d);
      uint8_t* qr = Q + r * row_bytes;
      if (mode == 1)
        for (int64_t j = 0; j < d; ++j) qr[j] = static_cast<uint8_t>(ix[j]);
      else
        pack_row(ix, qr, d, bits);
      N[r] = s;
    }
  });
  if (fake && !finite) norms.fill_(0);
  if (!fake && !finite) TORCH_CHECK(false, "non-finite row norm");
  return {out, norms};
}

#ifdef __AVX2__
// Eight codes of BITS in {1, 2, 4, 8} are BITS whole bytes: spread them over the lanes, then an in-register
// (<= 16 levels) or gathered (8 bits) table lookup. Returns the codes done (a multiple of 8).
template <int BITS, typename Out>
inline int64_t dequant_aligned8(const uint8_t* src, int64_t cols, const float* lut, Out* yr) {
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  const __m256i vmask = _mm256_set1_epi32((1 << BITS) - 1);
  const __m256 llo = _mm256_loadu_ps(lut), lhi = _mm256_loadu_ps(lut + 8);
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8, src += BITS) {
    __m256 v;
    if (BITS == 8) {
      v = _mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))), 4);
    } else {
      uint32_t w = 0;
      std::memcpy(&w, src, BITS);  // a compile-time size: one load
      const __m256i i = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)), shifts), vmask);
      v = lut16(llo, lhi, i);
    }
    store8(yr + j, v);
  }
  return j;
}
#endif

// One row of the packed stream (starting at bit p) -> yr[0..cols) = lut[code] (lut = norm * centroids).
template <typename Out>
inline void dequant_row(const uint8_t* B, int64_t nbytes, int64_t p, int64_t cols, int bits, const float* lut,
                        Out* yr) {
  const uint32_t mask = (1u << bits) - 1u;
  int64_t j = 0;
#ifdef __AVX2__
  if ((p & 7) == 0) {
    const uint8_t* src = B + (p >> 3);
    switch (bits) {
      case 1: j = dequant_aligned8<1>(src, cols, lut, yr); break;
      case 2: j = dequant_aligned8<2>(src, cols, lut, yr); break;
      case 4: j = dequant_aligned8<4>(src, cols, lut, yr); break;
      case 8: j = dequant_aligned8<8>(src, cols, lut, yr); break;
      default: break;
    }
    p += j * bits;
  }
#endif
  for (; j < cols; ++j, p += bits) {
    const int64_t byte = p >> 3;
    uint32_t w = B[byte];
    if (byte + 1 < nbytes) w |= static_cast<uint32_t>(B[byte + 1]) << 8;
    store1(yr + j, lut[(w >> (p & 7)) & mask]);
  }
}

// packed (ceil(rows * cols * bits / 8),) uint8 -> (rows, cols) float32 (or bfloat16, rounded to nearest even) =
// norms[:, None] * centroids[codes]
// out (optional): a contiguous buffer of that dtype with at least rows * cols elements to decode into (a reused
// workspace: no fresh allocation to fault in); the result is then a view of it.
torch::Tensor dequant_rows(torch::Tensor packed, int64_t bits, int64_t rows, int64_t cols, torch::Tensor centroids,
                           torch::Tensor norms, bool bf16, std::optional<torch::Tensor> out_buf) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits in 1..8");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(packed.numel() == (rows * cols * bits + 7) / 8, "packed size does not fit rows x cols x bits");
  TORCH_CHECK(centroids.numel() == (1 << bits) && norms.numel() == rows, "centroids / norms do not fit");
  auto c_c = centroids.to(torch::kFloat32).contiguous();
  auto n_c = norms.to(torch::kFloat32).contiguous();
  const uint8_t* B = packed.data_ptr<uint8_t>();
  const float* C = c_c.data_ptr<float>();
  const float* Nr = n_c.data_ptr<float>();
  const int64_t nbytes = packed.numel();
  const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat32;
  torch::Tensor out;
  if (out_buf.has_value()) {
    TORCH_CHECK(out_buf->scalar_type() == dtype && out_buf->is_contiguous() && out_buf->device().is_cpu() &&
                    out_buf->numel() >= rows * cols, "out: a contiguous CPU buffer of the output dtype, large enough");
    out = out_buf->reshape({-1}).narrow(0, 0, rows * cols).view({rows, cols});
  } else {
    out = torch::empty({rows, cols}, torch::dtype(dtype));
  }
  float* Y = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* Y16 = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float lut[256] = {};
    for (int64_t r = begin; r < end; ++r) {
      for (int32_t k = 0; k < (1 << bits); ++k) lut[k] = Nr[r] * C[k];
      if (bf16) dequant_row(B, nbytes, r * cols * bits, cols, bits, lut, Y16 + r * cols);
      else dequant_row(B, nbytes, r * cols * bits, cols, bits, lut, Y + r * cols);
    }
  });
  return out;
}

// codes (n,) integer in [0, 2^bits) -> the little-endian bit stream of pack_codes
torch::Tensor pack_bits(torch::Tensor codes, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits in 1..8");
  auto c = codes.reshape({-1}).to(torch::kUInt8).contiguous();
  const int64_t n = c.numel();
  auto out = torch::empty({(n * bits + 7) / 8}, torch::dtype(torch::kUInt8));
  const uint8_t* Cd = c.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  // groups of eight codes fill `bits` whole bytes, so chunks of groups pack independently
  at::parallel_for(0, (n + 7) / 8, 1 << 14, [&](int64_t g0, int64_t g1) {
    pack_row(Cd + 8 * g0, O + g0 * bits, std::min(n, 8 * g1) - 8 * g0, static_cast<int>(bits));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotate_quantize", &rotate_quantize, "RPBH rotation + norm + Lloyd-Max quantization, one pass per row");
  m.def("encode", &encode, "the codebook search alone: codes or centroid values of u (testing)");
  m.def("dequant_rows", &dequant_rows, "packed b-bit codes -> rows scaled by their norms");
  m.def("pack_bits", &pack_bits, "codes -> little-endian b-bit stream");
}
