// OrbitQuant CPU kernels: the activation path fused into one pass per token, and packed-weight decode.
//
// rotate_quantize: for each row x of X (n, d) float32, in an L1-resident scratch buffer:
//   y = (x[perm] * signs), block Walsh-Hadamard of size h (the same butterfly order as the torch
//   reference, so the rotated values are bit-identical), times 1/sqrt(h); s = ||y|| (double accumulation);
//   u = y / (s + eps) (activations) or y / max(s, eps) (weights);
//   idx = #{thresholds < u} (branchless binary search = torch.bucketize(u, thresholds));
//   writes either s * centroids[idx] (fake-quant output) or the uint8 codes and s.
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
#include <vector>

namespace {

// Unnormalised WHT on blocks of h. Stages s = 1, 2, 4 run inside one 8-float AVX2 register (shuffle + add/sub
// + blend); the rest are plain strided loops the compiler vectorizes. Every output is the same sum/difference of
// the same two floats as in the scalar butterfly (and the torch reference), so results are bit-identical.
inline void fwht_inplace(float* a, int64_t d, int64_t h) {
  int64_t s = 1;
#ifdef __AVX2__
  if (h >= 8) {
    for (int64_t i = 0; i < d; i += 8) {
      __m256 v = _mm256_loadu_ps(a + i);
      __m256 sw = _mm256_permute_ps(v, 0xB1);  // neighbours swapped: (a1, a0, a3, a2, ...)
      v = _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xAA);
      sw = _mm256_permute_ps(v, 0x4E);         // pairs swapped within 128-bit lanes
      v = _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xCC);
      sw = _mm256_permute2f128_ps(v, v, 0x01);  // halves swapped
      v = _mm256_blend_ps(_mm256_add_ps(v, sw), _mm256_sub_ps(sw, v), 0xF0);
      _mm256_storeu_ps(a + i, v);
    }
    s = 8;
  }
#endif
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

// Nearest-centroid indices of u[0..d) (idx = #{thresholds < u}, what torch.bucketize returns).
// Small codebooks: count thresholds below u, one vectorizable pass per threshold over an L1-resident row.
// Large ones: the uniform-grid table of Codebook.encode (cell -> thresholds below it, the cell's own
// threshold, then a +-1 fix for rounding of the cell index) -- four loads instead of a binary search.
struct Grid {
  const float* t;       // levels - 1 thresholds
  int32_t levels;
  const int32_t* base;  // per cell: thresholds strictly below the cell's left edge
  const float* inside;  // per cell: the threshold inside it, +inf if none
  const float* tpad;    // -inf, thresholds..., +inf
  float lo, inv_width;
  int32_t n_cells;
};

inline void encode_row(const Grid& g, const float* u, int32_t* idx, int64_t d) {
  if (g.levels <= 32) {
    for (int64_t j = 0; j < d; ++j) idx[j] = 0;
    for (int32_t k = 0; k < g.levels - 1; ++k) {
      const float tk = g.t[k];
      for (int64_t j = 0; j < d; ++j) idx[j] += u[j] > tk ? 1 : 0;
    }
    return;
  }
  int64_t j = 0;
#ifdef __AVX2__
  // the same float arithmetic as the scalar loop below, eight lanes at a time with gathers
  const __m256 vlo = _mm256_set1_ps(g.lo), vinv = _mm256_set1_ps(g.inv_width), zero = _mm256_setzero_ps();
  const __m256 vmax = _mm256_set1_ps(static_cast<float>(g.n_cells - 1));
  const __m256i one = _mm256_set1_epi32(1), izero = _mm256_setzero_si256();
  for (; j + 8 <= d; j += 8) {
    const __m256 v = _mm256_loadu_ps(u + j);
    __m256 f = _mm256_floor_ps(_mm256_mul_ps(_mm256_sub_ps(v, vlo), vinv));
    f = _mm256_min_ps(_mm256_max_ps(f, zero), vmax);
    const __m256i c = _mm256_cvttps_epi32(f);
    __m256i i = _mm256_i32gather_epi32(g.base, c, 4);
    i = _mm256_sub_epi32(i, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_i32gather_ps(g.inside, c, 4), _CMP_GT_OQ)));
    i = _mm256_sub_epi32(i, _mm256_castps_si256(
                                _mm256_cmp_ps(v, _mm256_i32gather_ps(g.tpad, _mm256_add_epi32(i, one), 4), _CMP_GT_OQ)));
    const __m256i le = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_i32gather_ps(g.tpad, i, 4), _CMP_LE_OQ));
    i = _mm256_add_epi32(i, _mm256_and_si256(le, _mm256_cmpgt_epi32(i, izero)));  // -1 where le & i > 0
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j), i);
  }
#endif
  for (; j < d; ++j) {
    const float v = u[j];
    float f = std::floor((v - g.lo) * g.inv_width);
    f = std::min(std::max(f, 0.0f), static_cast<float>(g.n_cells - 1));
    const int32_t c = static_cast<int32_t>(f);
    int32_t i = g.base[c] + (v > g.inside[c] ? 1 : 0);
    i += v > g.tpad[i + 1] ? 1 : 0;
    i -= (v <= g.tpad[i] && i > 0) ? 1 : 0;
    idx[j] = i;
  }
}

}  // namespace

// mode 0: returns {y (n, d) float32, finite flag (1,) uint8}; mode 1: returns {codes (n, d) uint8, norms (n,) float32}
std::vector<torch::Tensor> rotate_quantize(torch::Tensor x, torch::Tensor perm, torch::Tensor signs, int64_t h,
                                           torch::Tensor thresholds, torch::Tensor centroids, torch::Tensor base,
                                           torch::Tensor inside, torch::Tensor tpad, double lo, double inv_width,
                                           double eps, bool clamp_eps, int64_t mode) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous (n, d) float32");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(perm.numel() == d && signs.numel() == d && d % h == 0, "perm/signs/h do not fit d");
  const int32_t levels = static_cast<int32_t>(centroids.numel());
  TORCH_CHECK(levels >= 2 && (levels & (levels - 1)) == 0 && thresholds.numel() == levels - 1, "codebook size");
  auto perm_c = perm.to(torch::kInt64).contiguous();
  auto signs_c = signs.to(torch::kFloat32).contiguous();
  auto t_c = thresholds.to(torch::kFloat32).contiguous();
  auto c_c = centroids.to(torch::kFloat32).contiguous();
  const int64_t* P = perm_c.data_ptr<int64_t>();
  const float* S = signs_c.data_ptr<float>();
  const float* T = t_c.data_ptr<float>();
  const float* C = c_c.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  auto base_c = base.to(torch::kInt32).contiguous();
  auto inside_c = inside.to(torch::kFloat32).contiguous();
  auto tpad_c = tpad.to(torch::kFloat32).contiguous();
  TORCH_CHECK(tpad_c.numel() == levels + 1 && base_c.numel() == inside_c.numel(), "codebook grid tables");
  const Grid grid{T, levels, base_c.data_ptr<int32_t>(), inside_c.data_ptr<float>(), tpad_c.data_ptr<float>(),
                  static_cast<float>(lo), static_cast<float>(inv_width), static_cast<int32_t>(base_c.numel())};
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(h)));

  torch::Tensor out, norms;
  if (mode == 0) {
    out = torch::empty({n, d}, x.options());
    norms = torch::ones({1}, x.options().dtype(torch::kUInt8));
  } else {
    out = torch::empty({n, d}, x.options().dtype(torch::kUInt8));
    norms = torch::empty({n}, x.options());
  }
  float* Y = mode == 0 ? out.data_ptr<float>() : nullptr;
  uint8_t* Q = mode == 1 ? out.data_ptr<uint8_t>() : nullptr;
  float* N = mode == 1 ? norms.data_ptr<float>() : nullptr;
  std::atomic<bool> finite{true};

  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(d);
    std::vector<int32_t> ibuf(d);
    float* b = buf.data();
    int32_t* ix = ibuf.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = X + r * d;
      for (int64_t j = 0; j < d; ++j) b[j] = xr[P[j]] * S[j];
      fwht_inplace(b, d, h);
      const float s = static_cast<float>(std::sqrt(scale_sumsq(b, d, scale)));
      if (!std::isfinite(s)) {
        finite = false;
        continue;
      }
      const float den = clamp_eps ? std::max(s, static_cast<float>(eps)) : s + static_cast<float>(eps);
      for (int64_t j = 0; j < d; ++j) b[j] = b[j] / den;
      encode_row(grid, b, ix, d);
      if (mode == 0) {
        float* yr = Y + r * d;
        for (int64_t j = 0; j < d; ++j) yr[j] = s * C[ix[j]];
      } else {
        uint8_t* qr = Q + r * d;
        for (int64_t j = 0; j < d; ++j) qr[j] = static_cast<uint8_t>(ix[j]);
        N[r] = s;
      }
    }
  });
  if (mode == 0 && !finite) norms.fill_(0);
  if (mode == 1 && !finite) TORCH_CHECK(false, "non-finite row norm");
  return {out, norms};
}

// packed (ceil(rows * cols * bits / 8),) uint8 -> (rows, cols) float32 = norms[:, None] * centroids[codes]
torch::Tensor dequant_rows(torch::Tensor packed, int64_t bits, int64_t rows, int64_t cols, torch::Tensor centroids,
                           torch::Tensor norms) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits in 1..8");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed: contiguous uint8");
  TORCH_CHECK(packed.numel() == (rows * cols * bits + 7) / 8, "packed size does not fit rows x cols x bits");
  auto c_c = centroids.to(torch::kFloat32).contiguous();
  auto n_c = norms.to(torch::kFloat32).contiguous();
  const uint8_t* B = packed.data_ptr<uint8_t>();
  const float* C = c_c.data_ptr<float>();
  const float* Nr = n_c.data_ptr<float>();
  const int64_t nbytes = packed.numel();
  auto out = torch::empty({rows, cols}, torch::dtype(torch::kFloat32));
  float* Y = out.data_ptr<float>();
  const uint32_t mask = (1u << bits) - 1u;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    float lut[256];
    for (int64_t r = begin; r < end; ++r) {
      const float nr = Nr[r];
      for (int32_t k = 0; k <= static_cast<int32_t>(mask); ++k) lut[k] = nr * C[k];
      float* yr = Y + r * cols;
      int64_t p = r * cols * bits;
      if (8 % bits == 0 && (p & 7) == 0 && (cols * bits) % 8 == 0) {  // byte-aligned row: whole bytes
        const int64_t per = 8 / bits;
        const uint8_t* src = B + (p >> 3);
        for (int64_t byte = 0; byte < cols / per; ++byte) {
          uint32_t w = src[byte];
          for (int64_t k = 0; k < per; ++k, w >>= bits) yr[byte * per + k] = lut[w & mask];
        }
        continue;
      }
      for (int64_t j = 0; j < cols; ++j, p += bits) {
        const int64_t byte = p >> 3;
        uint32_t w = B[byte];
        if (byte + 1 < nbytes) w |= static_cast<uint32_t>(B[byte + 1]) << 8;
        yr[j] = lut[(w >> (p & 7)) & mask];
      }
    }
  });
  return out;
}

// codes (n,) integer in [0, 2^bits) -> the little-endian bit stream of pack_codes
torch::Tensor pack_bits(torch::Tensor codes, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits in 1..8");
  auto c = codes.reshape({-1}).to(torch::kUInt8).contiguous();
  const int64_t n = c.numel();
  const int64_t nbytes = (n * bits + 7) / 8;
  auto out = torch::zeros({nbytes}, torch::dtype(torch::kUInt8));
  const uint8_t* Cd = c.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  if (8 % bits == 0) {  // whole codes per byte: out[i] = c[k i] | c[k i + 1] << bits | ...
    const int64_t per = 8 / bits;
    at::parallel_for(0, nbytes, 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t byte = begin; byte < end; ++byte) {
        uint32_t acc = 0;
        for (int64_t k = 0; k < per; ++k) {
          const int64_t i = byte * per + k;
          acc |= (i < n ? static_cast<uint32_t>(Cd[i]) : 0u) << (k * bits);
        }
        O[byte] = static_cast<uint8_t>(acc);
      }
    });
    return out;
  }
  // each output byte gathers the codes overlapping it: parallel over bytes, no write conflicts
  at::parallel_for(0, nbytes, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) {
      const int64_t bit0 = byte * 8;
      int64_t k = bit0 / bits;
      uint32_t acc = 0;
      for (; k < n && k * bits < bit0 + 8; ++k) {
        const int64_t shift = k * bits - bit0;  // may be negative for the code straddling the byte start
        const uint32_t v = Cd[k];
        acc |= shift >= 0 ? (v << shift) : (v >> (-shift));
      }
      O[byte] = static_cast<uint8_t>(acc & 0xFF);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rotate_quantize", &rotate_quantize, "RPBH rotation + norm + Lloyd-Max quantization, one pass per row");
  m.def("dequant_rows", &dequant_rows, "packed b-bit codes -> rows scaled by their norms");
  m.def("pack_bits", &pack_bits, "codes -> little-endian b-bit stream");
}
