// mlbreg native CPU kernels: sparse conv / linear over a fixed support, and fused BatchNorm(+add)(+ReLU),
// all on activations in the batch-innermost layout CHWB (a contiguous (C, H, W, B) float32 tensor; seen
// from torch as the NCHW view x.permute(3, 0, 1, 2)).
//
// Sparse weights ("gather structure"): per output channel co and kernel position (u, v), a bucket of
// non-zeros [bptr[(co*K+u)*K+v], bptr[...+1]) with their input channels chan[j] and values val[j].
// Buckets let every output position run over exactly the kernel positions that fall inside the input,
// with no padding copy and no per-weight bounds check.
//
// Vector path: chosen at build time from the compiler's target (-march=native): AVX-512, AVX2+FMA, or a
// plain C++ fallback (MLBREG_FORCE_PLAIN / MLBREG_FORCE_AVX2 select a narrower one). simd_path() says
// which one was built.
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if !defined(MLBREG_FORCE_PLAIN) && !defined(MLBREG_FORCE_AVX2) && defined(__AVX512F__)
#include <immintrin.h>
#define MLBREG_PATH "avx512"
namespace simd {
using V = __m512;
constexpr int W = 16;
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float a) { return _mm512_set1_ps(a); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(V a) { return _mm512_reduce_add_ps(a); }
}  // namespace simd
constexpr int NP = 6;  // output positions per register tile (NP * BT / W = 12 accumulators)
#elif !defined(MLBREG_FORCE_PLAIN) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MLBREG_PATH "avx2"
namespace simd {
using V = __m256;
constexpr int W = 8;
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float a) { return _mm256_set1_ps(a); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
}  // namespace simd
constexpr int NP = 3;
#else
#define MLBREG_PATH "plain"
namespace simd {
struct V { float v[4]; };
constexpr int W = 4;
inline V zero() { return V{{0.f, 0.f, 0.f, 0.f}}; }
inline V set1(float a) { return V{{a, a, a, a}}; }
inline V load(const float* p) { return V{{p[0], p[1], p[2], p[3]}}; }
inline void store(float* p, V a) { for (int i = 0; i < 4; ++i) p[i] = a.v[i]; }
inline V fma(V a, V b, V c) { V r; for (int i = 0; i < 4; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r; }
inline float hsum(V a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
}  // namespace simd
constexpr int NP = 2;
#endif

using simd::V;
constexpr int BT = 32;             // batch lanes per tile (a full tile is BT / W vectors)
constexpr int NV = BT / simd::W;

namespace {

struct Geom {
  int64_t ci, hi, wi, co, ho, wo, k, s, p, b;
  int64_t in_plane() const { return hi * wi * b; }
  int64_t out_plane() const { return ho * wo * b; }
};

void check_chwb(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.device().is_cpu() && t.is_contiguous() && t.dim() == 4,
              name, " must be a contiguous float32 CPU (C, H, W, B) tensor");
}

// ---------------------------------------------------------------------------------------------------
// gather: out[co][y][x][b] = sum over buckets (u, v) valid at (y, x) of sum_j val[j] * in[chan[j]][y*s-p+u][x*s-p+v][b]
// One register tile: TP output positions (x0, x0+1, ...) x NV vectors of a full batch tile at lane b0.
template <int TP>
inline void gather_tile(const float* in, float* out, const int32_t* bptr, const int32_t* chan, const float* val,
                        const Geom& g, int64_t co, int64_t y, int64_t x0, int64_t u_lo, int64_t u_hi, int64_t v_lo,
                        int64_t v_hi, int64_t b0) {
  V acc[TP][NV];
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) acc[t][n] = simd::zero();
  const int64_t plane = g.in_plane(), step = g.s * g.b;
  for (int64_t u = u_lo; u < u_hi; ++u) {
    const float* row = in + (y * g.s - g.p + u) * g.wi * g.b + b0;
    for (int64_t v = v_lo; v < v_hi; ++v) {
      const int64_t bucket = (co * g.k + u) * g.k + v;
      const float* base = row + (x0 * g.s - g.p + v) * g.b;
      for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) {
        const V w = simd::set1(val[j]);
        const float* q = base + chan[j] * plane;
        for (int t = 0; t < TP; ++t)
          for (int n = 0; n < NV; ++n) acc[t][n] = simd::fma(w, simd::load(q + t * step + n * simd::W), acc[t][n]);
      }
    }
  }
  float* o = out + ((co * g.ho + y) * g.wo + x0) * g.b + b0;
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) simd::store(o + t * g.b + n * simd::W, acc[t][n]);
}

// Interior positions (every kernel column inside the input): the non-zeros of rows [u_lo, u_hi) form the one
// range [j0, j1) (buckets are ordered by (u, v)), each at a precomputed offset from the tile's corner.
template <int TP>
inline void gather_flat(const float* in, float* out, const int64_t* off, const float* val, const Geom& g, int64_t co,
                        int64_t y, int64_t x0, int32_t j0, int32_t j1, int64_t b0) {
  V acc[TP][NV];
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) acc[t][n] = simd::zero();
  const int64_t step = g.s * g.b;
  const float* base = in + ((y * g.s - g.p) * g.wi + (x0 * g.s - g.p)) * g.b + b0;
  for (int32_t j = j0; j < j1; ++j) {
    const V w = simd::set1(val[j]);
    const float* q = base + off[j];
    for (int t = 0; t < TP; ++t)
      for (int n = 0; n < NV; ++n) acc[t][n] = simd::fma(w, simd::load(q + t * step + n * simd::W), acc[t][n]);
  }
  float* o = out + ((co * g.ho + y) * g.wo + x0) * g.b + b0;
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) simd::store(o + t * g.b + n * simd::W, acc[t][n]);
}

// offset of every non-zero from the corner (y*s-p, x*s-p) of its window: chan*plane + (u*wi + v)*b
std::vector<int64_t> offsets(const int32_t* bptr, const int32_t* chan, int64_t groups, const Geom& g, int64_t plane) {
  std::vector<int64_t> off(bptr[groups * g.k * g.k]);
  for (int64_t bucket = 0; bucket < groups * g.k * g.k; ++bucket) {
    const int64_t uv = bucket % (g.k * g.k), u = uv / g.k, v = uv % g.k;
    for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) off[j] = chan[j] * plane + (u * g.wi + v) * g.b;
  }
  return off;
}

// the same for the lanes [b0, b1) of a partial batch tile, one position, scalar
inline void gather_lanes(const float* in, float* out, const int32_t* bptr, const int32_t* chan, const float* val,
                         const Geom& g, int64_t co, int64_t y, int64_t x, int64_t u_lo, int64_t u_hi, int64_t v_lo,
                         int64_t v_hi, int64_t b0, int64_t b1) {
  float acc[BT] = {0};
  const int64_t plane = g.in_plane(), nl = b1 - b0;
  for (int64_t u = u_lo; u < u_hi; ++u) {
    const float* row = in + (y * g.s - g.p + u) * g.wi * g.b + b0;
    for (int64_t v = v_lo; v < v_hi; ++v) {
      const int64_t bucket = (co * g.k + u) * g.k + v;
      const float* base = row + (x * g.s - g.p + v) * g.b;
      for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) {
        const float w = val[j];
        const float* q = base + chan[j] * plane;
        for (int64_t l = 0; l < nl; ++l) acc[l] = std::fma(w, q[l], acc[l]);
      }
    }
  }
  float* o = out + ((co * g.ho + y) * g.wo + x) * g.b + b0;
  for (int64_t l = 0; l < nl; ++l) o[l] = acc[l];
}

void gather_conv(const float* in, float* out, const int32_t* bptr, const int32_t* chan, const float* val,
                 const Geom& g) {
  const int64_t tiles = (g.b + BT - 1) / BT;
  // x positions where every kernel column lies inside the input (interior): register tiles of NP there
  int64_t x_in_lo = (g.p + g.s - 1) / g.s;
  int64_t x_in_hi = (g.wi + g.p - g.k) >= 0 ? (g.wi + g.p - g.k) / g.s + 1 : 0;
  x_in_lo = std::min(x_in_lo, g.wo);
  x_in_hi = std::max(x_in_lo, std::min(x_in_hi, g.wo));
  const std::vector<int64_t> off = offsets(bptr, chan, g.co, g, g.in_plane());
  // threads take contiguous runs of (batch tile, output row): consecutive rows share input rows in cache
  at::parallel_for(0, tiles * g.ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t tile = it / g.ho, y = it % g.ho;
      const int64_t b0 = tile * BT, b1 = std::min(g.b, b0 + BT);
      const bool full = b1 - b0 == BT;
      const int64_t u_lo = std::max<int64_t>(0, g.p - y * g.s), u_hi = std::min(g.k, g.hi + g.p - y * g.s);
      for (int64_t co = 0; co < g.co; ++co) {
        auto one = [&](int64_t x) {
          const int64_t v_lo = std::max<int64_t>(0, g.p - x * g.s), v_hi = std::min(g.k, g.wi + g.p - x * g.s);
          if (full)
            gather_tile<1>(in, out, bptr, chan, val, g, co, y, x, u_lo, u_hi, v_lo, v_hi, b0);
          else
            gather_lanes(in, out, bptr, chan, val, g, co, y, x, u_lo, u_hi, v_lo, v_hi, b0, b1);
        };
        for (int64_t x = 0; x < x_in_lo; ++x) one(x);
        int64_t x = x_in_lo;
        if (full) {
          const int32_t j0 = bptr[(co * g.k + u_lo) * g.k], j1 = bptr[(co * g.k + std::max(u_lo, u_hi)) * g.k];
          for (; x + NP <= x_in_hi; x += NP) gather_flat<NP>(in, out, off.data(), val, g, co, y, x, j0, j1, b0);
          for (; x < x_in_hi; ++x) gather_flat<1>(in, out, off.data(), val, g, co, y, x, j0, j1, b0);
        }
        for (; x < g.wo; ++x) one(x);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// transposed gather (input gradient of a strided conv, stride s > 1):
//   din[ci][Y][X][b] = sum over (u, v) with Y + p - u = s*y, X + p - v = s*x (y, x inside dout) of
//                      sum_j val[j] * dout[chan[j]][y][x][b]
// over the transposed structure (per input channel ci, buckets (u, v) of output channels). Positions of
// one parity class (X, X + s, ...) read consecutive x: a register tile of TP of them.
template <int TP>
inline void tgather_tile(const float* dout, float* din, const int32_t* bptr, const int32_t* chan, const float* val,
                         const Geom& g, int64_t ci, int64_t Y, int64_t X0, int64_t b0) {
  V acc[TP][NV];
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) acc[t][n] = simd::zero();
  const int64_t plane = g.out_plane();
  for (int64_t u = 0; u < g.k; ++u) {
    const int64_t ty = Y + g.p - u;
    if (ty < 0 || ty % g.s != 0 || ty / g.s >= g.ho) continue;
    const float* row = dout + (ty / g.s) * g.wo * g.b + b0;
    for (int64_t v = 0; v < g.k; ++v) {
      const int64_t tx = X0 + g.p - v;
      if (tx < 0 || tx % g.s != 0 || tx / g.s + TP > g.wo) continue;   // callers make whole tiles valid
      const int64_t bucket = (ci * g.k + u) * g.k + v;
      const float* base = row + (tx / g.s) * g.b;
      for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) {
        const V w = simd::set1(val[j]);
        const float* q = base + chan[j] * plane;
        for (int t = 0; t < TP; ++t)
          for (int n = 0; n < NV; ++n) acc[t][n] = simd::fma(w, simd::load(q + t * g.b + n * simd::W), acc[t][n]);
      }
    }
  }
  float* o = din + ((ci * g.hi + Y) * g.wi + X0) * g.b + b0;
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) simd::store(o + t * g.s * g.b + n * simd::W, acc[t][n]);
}

// a tile of TP positions X0, X0 + s, ... is valid when every kernel column of X0's parity class maps
// inside dout for all of them (else its positions go one by one, each checking its own columns)
inline bool tile_inside(const Geom& g, int64_t X0, int64_t tp) {
  if (X0 + (tp - 1) * g.s >= g.wi) return false;
  for (int64_t v = 0; v < g.k; ++v) {
    const int64_t tx = X0 + g.p - v;
    if (tx >= 0 && tx % g.s == 0) {
      if (tx / g.s + tp > g.wo) return false;
    } else if (tx < 0 && (-tx) % g.s == 0) {
      return false;                  // the column is of this parity but before dout's start for X0
    }
  }
  return true;
}

inline void tgather_lanes(const float* dout, float* din, const int32_t* bptr, const int32_t* chan, const float* val,
                          const Geom& g, int64_t ci, int64_t Y, int64_t X, int64_t b0, int64_t b1) {
  float acc[BT] = {0};
  const int64_t plane = g.out_plane(), nl = b1 - b0;
  for (int64_t u = 0; u < g.k; ++u) {
    const int64_t ty = Y + g.p - u;
    if (ty < 0 || ty % g.s != 0 || ty / g.s >= g.ho) continue;
    for (int64_t v = 0; v < g.k; ++v) {
      const int64_t tx = X + g.p - v;
      if (tx < 0 || tx % g.s != 0 || tx / g.s >= g.wo) continue;
      const int64_t bucket = (ci * g.k + u) * g.k + v;
      const float* base = dout + ((ty / g.s) * g.wo + tx / g.s) * g.b + b0;
      for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) {
        const float w = val[j];
        const float* q = base + chan[j] * plane;
        for (int64_t l = 0; l < nl; ++l) acc[l] = std::fma(w, q[l], acc[l]);
      }
    }
  }
  float* o = din + ((ci * g.hi + Y) * g.wi + X) * g.b + b0;
  for (int64_t l = 0; l < nl; ++l) o[l] = acc[l];
}

void tgather_conv(const float* dout, float* din, const int32_t* bptr, const int32_t* chan, const float* val,
                  const Geom& g) {
  const int64_t tiles = (g.b + BT - 1) / BT;
  at::parallel_for(0, tiles * g.hi, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t tile = it / g.hi, Y = it % g.hi;
      const int64_t b0 = tile * BT, b1 = std::min(g.b, b0 + BT);
      const bool full = b1 - b0 == BT;
      for (int64_t ci = 0; ci < g.ci; ++ci) {
        for (int64_t r = 0; r < g.s; ++r) {            // parity class of X
          int64_t X = r;
          while (X < g.wi) {
            if (full && tile_inside(g, X, NP)) {
              tgather_tile<NP>(dout, din, bptr, chan, val, g, ci, Y, X, b0);
              X += NP * g.s;
            } else {
              if (full)
                tgather_tile<1>(dout, din, bptr, chan, val, g, ci, Y, X, b0);
              else
                tgather_lanes(dout, din, bptr, chan, val, g, ci, Y, X, b0, b1);
              X += g.s;
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// sddmm (weight gradient on the support): dval[j] = sum_{y, x valid, b} dout[co][y][x][b] * in[chan[j]][y*s-p+u][x*s-p+v][b]
// G non-zeros of one bucket share the dout loads.
template <int G>
inline void sddmm_group(const float* dout, const float* in, const int32_t* chan, float* dval, const Geom& g,
                        int64_t co, int64_t u, int64_t v, int32_t j0) {
  constexpr int A = 8 / G;             // accumulators per non-zero: G * A = 8 independent FMA chains
  const int64_t y_lo = std::max<int64_t>(0, (g.p - u + g.s - 1) / g.s);
  const int64_t y_hi = std::min(g.ho, (g.hi + g.p - u - 1) >= 0 ? (g.hi + g.p - u - 1) / g.s + 1 : 0);
  const int64_t x_lo = std::max<int64_t>(0, (g.p - v + g.s - 1) / g.s);
  const int64_t x_hi = std::min(g.wo, (g.wi + g.p - v - 1) >= 0 ? (g.wi + g.p - v - 1) / g.s + 1 : 0);
  const int64_t plane = g.in_plane(), bv = g.b / simd::W * simd::W;
  V acc[G][A];
  double tail[G];
  for (int i = 0; i < G; ++i) {
    tail[i] = 0.0;
    for (int a = 0; a < A; ++a) acc[i][a] = simd::zero();
  }
  const float* inp[G];
  for (int i = 0; i < G; ++i) inp[i] = in + chan[j0 + i] * plane;
  for (int64_t y = y_lo; y < y_hi; ++y) {
    for (int64_t x = x_lo; x < x_hi; ++x) {
      const float* d = dout + ((co * g.ho + y) * g.wo + x) * g.b;
      const int64_t off = ((y * g.s - g.p + u) * g.wi + (x * g.s - g.p + v)) * g.b;
      int64_t b = 0;
      for (; b + A * simd::W <= bv; b += A * simd::W) {
        V dv[A];
        for (int a = 0; a < A; ++a) dv[a] = simd::load(d + b + a * simd::W);
        for (int i = 0; i < G; ++i)
          for (int a = 0; a < A; ++a)
            acc[i][a] = simd::fma(dv[a], simd::load(inp[i] + off + b + a * simd::W), acc[i][a]);
      }
      for (; b < bv; b += simd::W) {
        const V dv = simd::load(d + b);
        for (int i = 0; i < G; ++i) acc[i][0] = simd::fma(dv, simd::load(inp[i] + off + b), acc[i][0]);
      }
      for (b = bv; b < g.b; ++b)
        for (int i = 0; i < G; ++i) tail[i] += double(d[b]) * double(inp[i][off + b]);
    }
  }
  for (int i = 0; i < G; ++i) {
    double sum = tail[i];
    for (int a = 0; a < A; ++a) sum += double(simd::hsum(acc[i][a]));
    dval[j0 + i] = float(sum);
  }
}

void sddmm_conv(const float* dout, const float* in, const int32_t* bptr, const int32_t* chan, float* dval,
                const Geom& g) {
  const int64_t kk = g.k * g.k;
  at::parallel_for(0, g.co, 1, [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co) {
      for (int64_t uv = 0; uv < kk; ++uv) {
        const int64_t u = uv / g.k, v = uv % g.k;
        int32_t j = bptr[co * kk + uv];
        const int32_t j1 = bptr[co * kk + uv + 1];
        for (; j + 8 <= j1; j += 8) sddmm_group<8>(dout, in, chan, dval, g, co, u, v, j);
        for (; j + 4 <= j1; j += 4) sddmm_group<4>(dout, in, chan, dval, g, co, u, v, j);
        for (; j + 2 <= j1; j += 2) sddmm_group<2>(dout, in, chan, dval, g, co, u, v, j);
        for (; j < j1; ++j) sddmm_group<1>(dout, in, chan, dval, g, co, u, v, j);
      }
    }
  });
}

// Outputs are allocated in torch's shape, batch first, with batch-innermost strides: (B, C, H, W) with strides
// (1, H*W*B, W*B, B). The memory is the same as a contiguous (C, H, W, B) tensor, and torch sees a plain tensor
// (not a view of one).
at::Tensor alloc_bfirst(int64_t c, int64_t h, int64_t w, int64_t b, const at::TensorOptions& opts) {
  return at::empty_strided({b, c, h, w}, {1, h * w * b, w * b, b}, opts);
}

Geom geom(const at::Tensor& in, int64_t co, int64_t ho, int64_t wo, int64_t k, int64_t s, int64_t p) {
  return Geom{in.size(0), in.size(1), in.size(2), co, ho, wo, k, s, p, in.size(3)};
}

void check_struct(const at::Tensor& bptr, const at::Tensor& chan, const at::Tensor& val, int64_t groups_out,
                  int64_t k, int64_t c_in) {
  TORCH_CHECK(bptr.dtype() == at::kInt && chan.dtype() == at::kInt && val.dtype() == at::kFloat,
              "structure dtypes must be int32 / int32 / float32");
  TORCH_CHECK(bptr.is_contiguous() && chan.is_contiguous() && val.is_contiguous(), "structure must be contiguous");
  TORCH_CHECK(bptr.numel() == groups_out * k * k + 1, "bucket pointer has ", bptr.numel(), " entries, expected ",
              groups_out * k * k + 1);
  TORCH_CHECK(chan.numel() == val.numel(), "channel and value arrays differ in length");
  const int32_t* b = bptr.data_ptr<int32_t>();
  TORCH_CHECK(b[0] == 0 && b[bptr.numel() - 1] == chan.numel(), "bucket pointer does not span the non-zeros");
  if (chan.numel()) {
    auto mm = at::aminmax(chan);
    TORCH_CHECK(std::get<0>(mm).item<int32_t>() >= 0 && std::get<1>(mm).item<int32_t>() < c_in,
                "channel index out of range");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Python entry points
at::Tensor conv_gather(at::Tensor in, at::Tensor bptr, at::Tensor chan, at::Tensor val, int64_t co,
                          int64_t k, int64_t s, int64_t p) {
  check_chwb(in, "input");
  TORCH_CHECK(s >= 1 && p >= 0 && p < k, "need stride >= 1 and 0 <= padding < kernel");
  check_struct(bptr, chan, val, co, k, in.size(0));
  const int64_t ho = (in.size(1) + 2 * p - k) / s + 1, wo = (in.size(2) + 2 * p - k) / s + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "output would be empty");
  auto out = alloc_bfirst(co, ho, wo, in.size(3), in.options());
  Geom g = geom(in, co, ho, wo, k, s, p);
  gather_conv(in.data_ptr<float>(), out.data_ptr<float>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
              val.data_ptr<float>(), g);
  return out;
}

at::Tensor conv_tgather(at::Tensor dout, at::Tensor bptr, at::Tensor chan, at::Tensor val, int64_t ci,
                        int64_t hi, int64_t wi, int64_t k, int64_t s, int64_t p) {
  check_chwb(dout, "output gradient");
  TORCH_CHECK(s >= 1 && p >= 0 && p < k, "need stride >= 1 and 0 <= padding < kernel");
  check_struct(bptr, chan, val, ci, k, dout.size(0));
  TORCH_CHECK(dout.size(1) == (hi + 2 * p - k) / s + 1 && dout.size(2) == (wi + 2 * p - k) / s + 1,
              "output gradient shape does not match the input size");
  auto din = alloc_bfirst(ci, hi, wi, dout.size(3), dout.options());
  Geom g{ci, hi, wi, dout.size(0), dout.size(1), dout.size(2), k, s, p, dout.size(3)};
  tgather_conv(dout.data_ptr<float>(), din.data_ptr<float>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
               val.data_ptr<float>(), g);
  return din;
}

at::Tensor conv_sddmm(at::Tensor dout, at::Tensor in, at::Tensor bptr, at::Tensor chan, int64_t k,
                         int64_t s, int64_t p) {
  check_chwb(dout, "output gradient");
  check_chwb(in, "input");
  TORCH_CHECK(dout.size(3) == in.size(3), "batch sizes differ");
  TORCH_CHECK(dout.size(1) == (in.size(1) + 2 * p - k) / s + 1 && dout.size(2) == (in.size(2) + 2 * p - k) / s + 1,
              "output gradient shape does not match the input");
  auto dval = at::empty({chan.numel()}, in.options());
  check_struct(bptr, chan, dval, dout.size(0), k, in.size(0));
  Geom g = geom(in, dout.size(0), dout.size(1), dout.size(2), k, s, p);
  sddmm_conv(dout.data_ptr<float>(), in.data_ptr<float>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
             dval.data_ptr<float>(), g);
  return dval;
}

// ---------------------------------------------------------------------------------------------------
// BatchNorm over CHWB: channel c is the contiguous block x[c]. y = act(gamma * (x - mean) * invstd + beta [+ res]).
// Sums are taken in float blocks of 1024 added in double (accurate like torch's cascade sums).
namespace {
inline double block_sum(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t i1 = std::min(n, i0 + 1024);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += x[i];
    total += s;
  }
  return total;
}
inline double block_sq_dev(const float* x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t i1 = std::min(n, i0 + 1024);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) { const float d = x[i] - mean; s += d * d; }
    total += s;
  }
  return total;
}
}  // namespace

// x, res: physical (C, H, W, B). Returns (y, mean, var), y batch-first with CHWB strides, where mean/var are the batch statistics used (training) or the given ones (eval);
// var is the biased batch variance in training.
std::vector<at::Tensor> bn_forward(at::Tensor x, at::Tensor gamma, at::Tensor beta, c10::optional<at::Tensor> res,
                                      c10::optional<at::Tensor> mean_in, c10::optional<at::Tensor> var_in,
                                      double eps, bool relu) {
  check_chwb(x, "input");
  const int64_t c = x.size(0), n = x.numel() / std::max<int64_t>(c, 1);
  TORCH_CHECK(gamma.numel() == c && beta.numel() == c, "affine parameters must have one entry per channel");
  auto g = gamma.contiguous().to(at::kFloat), bt = beta.contiguous().to(at::kFloat);
  const bool training = !mean_in.has_value();
  at::Tensor mean = training ? at::empty({c}, x.options().dtype(at::kDouble))
                                : mean_in->to(at::kDouble).contiguous();
  at::Tensor var = training ? at::empty({c}, x.options().dtype(at::kDouble))
                               : var_in->to(at::kDouble).contiguous();
  const float* rp = nullptr;
  if (res.has_value()) {
    check_chwb(*res, "residual");
    TORCH_CHECK(res->sizes() == x.sizes(), "residual shape differs from the input");
    rp = res->data_ptr<float>();
  }
  auto y = alloc_bfirst(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  const float* gp = g.data_ptr<float>();
  const float* bp = bt.data_ptr<float>();
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const float* xc = xp + ch * n;
      if (training) {
        mp[ch] = block_sum(xc, n) / double(n);
        vp[ch] = block_sq_dev(xc, n, float(mp[ch])) / double(n);
      }
      const double invstd = 1.0 / std::sqrt(vp[ch] + eps);
      const float scale = float(gp[ch] * invstd), shift = float(bp[ch] - mp[ch] * gp[ch] * invstd);
      float* yc = yp + ch * n;
      const float* rc = rp ? rp + ch * n : nullptr;
      if (rc && relu) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = std::max(0.f, std::fma(xc[i], scale, shift) + rc[i]);
      } else if (rc) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = std::fma(xc[i], scale, shift) + rc[i];
      } else if (relu) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = std::max(0.f, std::fma(xc[i], scale, shift));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = std::fma(xc[i], scale, shift);
      }
    }
  });
  return {y, mean, var};
}

// gradients of bn_forward: (dx, dgamma, dbeta, dres) with dres = the incoming gradient after the ReLU
// (undefined when there is no residual). `y` is the forward output (its sign gives the ReLU mask).
std::vector<at::Tensor> bn_backward(at::Tensor dy, at::Tensor x, at::Tensor y, at::Tensor gamma,
                                       at::Tensor mean, at::Tensor var, double eps, bool relu, bool training,
                                       bool has_res) {
  check_chwb(dy, "output gradient");
  check_chwb(x, "input");
  const int64_t c = x.size(0), n = x.numel() / std::max<int64_t>(c, 1);
  auto g = gamma.contiguous().to(at::kFloat);
  auto m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  auto dx = alloc_bfirst(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  at::Tensor dres;
  if (has_res && relu) dres = alloc_bfirst(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  auto dgamma = at::empty({c}, x.options()), dbeta = at::empty({c}, x.options());
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *ypp = y.data_ptr<float>(), *gp = g.data_ptr<float>();
  const double *mp = m.data_ptr<double>(), *vp = v.data_ptr<double>();
  float *dxp = dx.data_ptr<float>(), *dgp = dgamma.data_ptr<float>(), *dbp = dbeta.data_ptr<float>();
  float* drp = dres.defined() ? dres.data_ptr<float>() : nullptr;
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t ch = begin; ch < end; ++ch) {
      const float* dyc = dyp + ch * n;
      const float* xc = xp + ch * n;
      const float* g_eff = dyc;                      // the gradient reaching the normalization
      if (relu) {
        float* dst = drp ? drp + ch * n : (buf.resize(n), buf.data());
        const float* yc = ypp + ch * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dst[i] = yc[i] > 0.f ? dyc[i] : 0.f;
        g_eff = dst;
      }
      const float mu = float(mp[ch]);
      const double invstd = 1.0 / std::sqrt(vp[ch] + eps);
      double sum_g = 0.0, sum_gx = 0.0;
      for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        const int64_t i1 = std::min(n, i0 + 1024);
        float s = 0.f, sx = 0.f;
#pragma omp simd reduction(+ : s, sx)
        for (int64_t i = i0; i < i1; ++i) { s += g_eff[i]; sx += g_eff[i] * (xc[i] - mu); }
        sum_g += s;
        sum_gx += sx;
      }
      dbp[ch] = float(sum_g);
      dgp[ch] = float(sum_gx * invstd);
      float* dxc = dxp + ch * n;
      if (training) {
        // dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))
        const float a = float(gp[ch] * invstd);
        const float mg = float(sum_g / double(n));
        const float k = float(sum_gx * invstd * invstd / double(n));
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxc[i] = a * (g_eff[i] - mg - (xc[i] - mu) * k);
      } else {
        const float a = float(gp[ch] * invstd);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxc[i] = a * g_eff[i];
      }
    }
  });
  return {dx, dgamma, dbeta, dres};
}

std::string simd_path() { return MLBREG_PATH; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_gather", &conv_gather, "sparse conv, gather form (forward; stride-1 input gradient)");
  m.def("conv_tgather", &conv_tgather, "sparse conv input gradient, gather over the transposed structure (any stride)");
  m.def("conv_sddmm", &conv_sddmm, "sparse conv weight gradient on the support");
  m.def("bn_forward", &bn_forward, "BatchNorm (+ residual) (+ ReLU) over CHWB");
  m.def("bn_backward", &bn_backward, "gradients of bn_forward");
  m.def("simd_path", &simd_path);
}
