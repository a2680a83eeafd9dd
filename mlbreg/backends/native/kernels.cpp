// mlbreg native CPU kernels: sparse conv / linear over a fixed support, and fused BatchNorm(+add)(+ReLU),
// all on activations in the batch-innermost layout CHWB (a contiguous (C, H, W, B) tensor, float32 or, with
// precision=bf16, bfloat16; seen from torch as the NCHW view x.permute(3, 0, 1, 2)). Arithmetic is fp32.
//
// Sparse weights ("gather structure"): per output channel co and kernel position (u, v), a bucket of
// non-zeros [bptr[(co*K+u)*K+v], bptr[...+1]) with their input channels chan[j] and values val[j]. The conv
// kernels read zero-padded fp32 planes of their input (pad_chwb), so each non-zero is one precomputed offset
// from a tile's corner and no output position needs a border case.
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
#include <type_traits>
#include <vector>
#include <cstdlib>

#if !defined(MLBREG_FORCE_PLAIN) && !defined(MLBREG_FORCE_AVX2) && defined(__AVX512F__)
#include <immintrin.h>
#define MLBREG_PATH "avx512"
#define NVMAX_IS_8 1
namespace simd {
using V = __m512;
constexpr int W = 16;
inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float a) { return _mm512_set1_ps(a); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline float hsum(V a) { return _mm512_reduce_add_ps(a); }
}  // namespace simd
#elif !defined(MLBREG_FORCE_PLAIN) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MLBREG_PATH "avx2"
#define NVMAX_IS_8 0
namespace simd {
using V = __m256;
constexpr int W = 8;
inline V zero() { return _mm256_setzero_ps(); }
inline V set1(float a) { return _mm256_set1_ps(a); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline float hsum(V a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
}  // namespace simd
#else
#define MLBREG_PATH "plain"
#define NVMAX_IS_8 0
namespace simd {
struct V { float v[4]; };
constexpr int W = 4;
inline V zero() { return V{{0.f, 0.f, 0.f, 0.f}}; }
inline V set1(float a) { return V{{a, a, a, a}}; }
inline V load(const float* p) { return V{{p[0], p[1], p[2], p[3]}}; }
inline void store(float* p, V a) { for (int i = 0; i < 4; ++i) p[i] = a.v[i]; }
inline V fma(V a, V b, V c) { V r; for (int i = 0; i < 4; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r; }
inline V add(V a, V b) { V r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
inline float hsum(V a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
}  // namespace simd
#endif

using simd::V;
namespace simd {
// the lanes of a vector summed in double, lane by lane (a fixed order)
inline double hsum_d(V a) {
  alignas(64) float t[W];
  store(t, a);
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += t[i];
  return s;
}
}  // namespace simd

// bf16 storage (precision=bf16): activations and their gradients may be stored as bf16; every kernel computes
// in fp32 (a bf16 value widened exactly; results rounded to nearest even when stored).
using bf16 = at::BFloat16;
inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return T(x); }
template <typename T> inline V loadv(const T* p);
template <> inline V loadv<float>(const float* p) { return simd::load(p); }
template <> inline V loadv<bf16>(const bf16* p) {
#if NVMAX_IS_8
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(__AVX2__) && !defined(MLBREG_FORCE_PLAIN)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
  alignas(64) float t[simd::W];
  for (int i = 0; i < simd::W; ++i) t[i] = static_cast<float>(p[i]);
  return simd::load(t);
#endif
}
template <typename T> inline void storev(T* p, V a);
template <> inline void storev<float>(float* p, V a) { simd::store(p, a); }
template <> inline void storev<bf16>(bf16* p, V a) {
#if NVMAX_IS_8 && defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a));   // round to nearest even
#else
  alignas(64) float t[simd::W];
  simd::store(t, a);
  for (int i = 0; i < simd::W; ++i) p[i] = bf16(t[i]);                                  // round to nearest even
#endif
}

// Register budget: accumulators per tile (32 zmm on AVX-512, 16 ymm on AVX2; the rest hold the broadcast
// weight and scratch). A lane chunk is NV vectors of the batch (NV in 8, 4, 2, 1); the tile holds TP = ACC / NV
// output positions of it, so the full batch of 128 on AVX-512 is 3 positions x 8 vectors.
constexpr int ACC = simd::W == 16 ? 24 : 12;
constexpr int NVMAX = simd::W == 16 ? 8 : 4;
constexpr int tp_for(int nv) { return ACC / nv > 12 ? 12 : ACC / nv; }

namespace {


void check_chwb(const at::Tensor& t, const char* name, bool bf16_ok = false) {
  TORCH_CHECK((t.dtype() == at::kFloat || (bf16_ok && t.dtype() == at::kBFloat16)) && t.device().is_cpu() &&
              t.is_contiguous() && t.dim() == 4, name, " must be a contiguous ", bf16_ok ? "float32 or bfloat16" : "float32",
              " CPU (C, H, W, B) tensor");
}

// Lanes go in chunks of NVMAX, 4, 2, 1 full vectors; the lanes past the last full vector (fewer than W) go
// through a scalar loop.
inline int64_t vector_lanes(int64_t b) { return b / simd::W * simd::W; }

// ---------------------------------------------------------------------------------------------------
// Padded planes. A sparse kernel reads, for one output tile, the same spatial window of many input channels.
// In a plain CHWB tensor the channel planes lie H*W*B floats apart, a multiple of 4 KiB for any batch that is a
// multiple of 8: every channel's window then falls into the same cache sets and evicts the others (measured: the
// same kernel ran between 30 and 90 GFLOP/s from one process to the next, with the physical page placement).
// The kernels therefore read a copy of their input with a zero border of `p` (no border cases: every output
// position is "interior") and a channel stride of an odd number of cache lines.
struct Padded {
  int64_t c, hp, wp, b, cs;     // channels, padded height / width, batch, channel stride (floats)
};
inline int64_t channel_stride(int64_t hp, int64_t wp, int64_t b) {
  int64_t lines = (hp * wp * b + 15) / 16;
  if (lines % 2 == 0) ++lines;
  return lines * 16;
}

// x (C, H, W, B) -> (C, cs) holding the padded planes (H + 2p) x (W + 2p) x B, zeros around
template <typename T>
void pad_planes(const T* x, float* out, int64_t c, int64_t h, int64_t w, int64_t b, int64_t p, int64_t cs) {
  const int64_t hp = h + 2 * p, wp = w + 2 * p;
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      float* o = out + ch * cs;
      const T* xi = x + ch * h * w * b;
      std::fill(o, o + p * wp * b, 0.f);
      for (int64_t y = 0; y < h; ++y) {
        float* row = o + (y + p) * wp * b;
        std::fill(row, row + p * b, 0.f);
        const T* src = xi + y * w * b;
        float* dst = row + p * b;
#pragma omp simd
        for (int64_t i = 0; i < w * b; ++i) dst[i] = to_f(src[i]);
        std::fill(row + (p + w) * b, row + wp * b, 0.f);
      }
      std::fill(o + (h + p) * wp * b, o + cs, 0.f);
    }
  });
}

// Work items of a row-parallel loop: rows x blocks of channels, so that a layer with few rows (the last ResNet
// stage, a linear layer's single row) still gives every thread work. Each output element is computed by exactly
// one item, always in the same order: the result does not depend on the thread count.
int64_t channel_blocks(int64_t rows, int64_t channels) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(channels, (want + rows - 1) / rows));
}

// Output positions per cache block along a row: the block's input window for every input channel (kr rows x
// (block * s + k) columns x B lanes) is kept near 1 MiB, inside a core's L2, so the output channels that follow
// one another reuse it instead of streaming the whole plane from L3.
int64_t block_positions(int64_t channels, int64_t kr, int64_t k, int64_t s, int64_t lanes, int64_t width, int64_t tp) {
  const int64_t per_col = std::max<int64_t>(1, channels * kr * lanes * 4);
  const int64_t cols = (int64_t(1) << 20) / per_col;
  const int64_t pos = (cols - k) / std::max<int64_t>(1, s);
  return std::max<int64_t>(std::max<int64_t>(tp, 4), std::min(width, pos / tp * tp));
}

// ---------------------------------------------------------------------------------------------------
// gather over a padded input: out[co][y][x][b] = sum_j val[j] * in[chan[j]][y*s + u_j][x*s + v_j][b]
// (padded coordinates), each non-zero at the precomputed offset off[j] = chan*cs + (u*wp + v)*B from the tile's
// corner. One register tile: TP output positions x NV vectors of lanes from b0; non-zeros [j0, j1).
template <int TP, int NV, typename OT>
inline void gather_tile(const float* base, OT* o, const int64_t* off, const float* val, int32_t j0, int32_t j1,
                        int64_t step, int64_t ostep) {
  V acc[TP][NV];
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) acc[t][n] = simd::zero();
  for (int32_t j = j0; j < j1; ++j) {
    const V w = simd::set1(val[j]);
    const float* q = base + off[j];
    for (int t = 0; t < TP; ++t)
      for (int n = 0; n < NV; ++n) acc[t][n] = simd::fma(w, simd::load(q + t * step + n * simd::W), acc[t][n]);
  }
  for (int t = 0; t < TP; ++t)
    for (int n = 0; n < NV; ++n) storev(o + t * ostep + n * simd::W, acc[t][n]);
}

// the scalar lanes [b0, B) of one position
template <typename OT>
inline void gather_lanes(const float* base, OT* o, const int64_t* off, const float* val, int32_t j0, int32_t j1,
                         int64_t nl) {
  float acc[simd::W] = {0};
  for (int32_t j = j0; j < j1; ++j) {
    const float* q = base + off[j];
    for (int64_t l = 0; l < nl; ++l) acc[l] = std::fma(val[j], q[l], acc[l]);
  }
  for (int64_t l = 0; l < nl; ++l) o[l] = from_f<OT>(acc[l]);
}

// a row segment of TP-position tiles (then single positions) for one lane chunk; positions pos0 + t, input
// columns (pos0 + t) * in_step apart in floats, outputs out_step apart
template <int NV, typename OT>
void gather_run(const float* base, OT* o, const int64_t* off, const float* val, int32_t j0, int32_t j1,
                int64_t n, int64_t in_step, int64_t out_step) {
  constexpr int TP = tp_for(NV);
  int64_t t = 0;
  for (; t + TP <= n; t += TP) gather_tile<TP, NV, OT>(base + t * in_step, o + t * out_step, off, val, j0, j1, in_step, out_step);
  // short rows (the last stages' 4 or 8 positions) still get tiles of several positions
  if constexpr (TP > 4)
    for (; t + 4 <= n; t += 4) gather_tile<4, NV, OT>(base + t * in_step, o + t * out_step, off, val, j0, j1, in_step, out_step);
  if constexpr (TP > 2)
    for (; t + 2 <= n; t += 2) gather_tile<2, NV, OT>(base + t * in_step, o + t * out_step, off, val, j0, j1, in_step, out_step);
  for (; t < n; ++t) gather_tile<1, NV, OT>(base + t * in_step, o + t * out_step, off, val, j0, j1, in_step, out_step);
}

// the lanes [lo, hi) of a run of n positions: full-vector chunks, then the scalar lanes (at the batch's end)
template <typename OT>
void run_lanes(int64_t lo, int64_t hi, const float* base, OT* o, const int64_t* off, const float* val, int32_t j0,
               int32_t j1, int64_t n, int64_t in_step, int64_t out_step) {
  int64_t b0 = lo;
  for (int nv = NVMAX; nv >= 1; nv /= 2)
    for (; b0 + nv * simd::W <= hi; b0 += nv * simd::W) switch (nv) {
#define MLBREG_RUN(N) case N: gather_run<N, OT>(base + b0, o + b0, off, val, j0, j1, n, in_step, out_step); break;
      MLBREG_RUN(1) MLBREG_RUN(2) MLBREG_RUN(4)
#if NVMAX_IS_8
      MLBREG_RUN(8)
#endif
#undef MLBREG_RUN
    }
  const int64_t bv = lo + vector_lanes(hi - lo);
  if (bv < hi)
    for (int64_t t = 0; t < n; ++t) gather_lanes(base + t * in_step + bv, o + t * out_step + bv, off, val, j0, j1, hi - bv);
}

// Lanes per batch block: the widest of NVMAX, ..., 1 vectors whose input window (channels x kr rows x cols x
// lanes) fits near 2 MiB (one core's L2 on the CPUs measured), so deep layers (512 channels) work on a slice
// of the batch at a time.
int64_t batch_block(int64_t channels, int64_t kr, int64_t cols, int64_t b) {
  int64_t lanes = NVMAX * simd::W;
  while (lanes > simd::W && channels * kr * cols * lanes * 4 > (int64_t(2) << 20)) lanes /= 2;
  return std::max<int64_t>(1, std::min(lanes, b));
}

// off[j] = chan*cs + (u*wp + v)*B for the kernel-ordered structure (buckets (group, u, v))
std::vector<int64_t> offsets(const int32_t* bptr, const int32_t* chan, int64_t groups, int64_t k, const Padded& in) {
  std::vector<int64_t> off(bptr[groups * k * k]);
  for (int64_t bucket = 0; bucket < groups * k * k; ++bucket) {
    const int64_t uv = bucket % (k * k), u = uv / k, v = uv % k;
    for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) off[j] = chan[j] * in.cs + (u * in.wp + v) * in.b;
  }
  return off;
}

template <typename OT>
void gather_conv(const float* in, const Padded& pin, OT* out, const int32_t* bptr, const int32_t* chan,
                 const float* val, int64_t co, int64_t k, int64_t s) {
  const int64_t ho = (pin.hp - k) / s + 1, wo = (pin.wp - k) / s + 1, b = pin.b;
  const std::vector<int64_t> off = offsets(bptr, chan, co, k, pin);
  const int64_t lanes = batch_block(pin.c, k, std::min(pin.wp, 4 * s + k), b), nbb = (b + lanes - 1) / lanes;
  const int64_t xblock = block_positions(pin.c, k, k, s, lanes, wo, tp_for(std::max<int64_t>(1, lanes / simd::W)));
  const int64_t ncb = channel_blocks(ho * nbb, co), cob = (co + ncb - 1) / ncb;
  // threads take contiguous runs of (batch block, output row, channel block); inside a run, column blocks go
  // outermost so one block's input window stays in cache across the run's rows and output channels
  at::parallel_for(0, nbb * ho * ncb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t xa = 0; xa < wo; xa += xblock) {
      const int64_t n = std::min(wo, xa + xblock) - xa;
      for (int64_t it = begin; it < end; ++it) {
        const int64_t bb = it / (ho * ncb), y = (it / ncb) % ho, cb = it % ncb;
        const float* base = in + (y * s * pin.wp + xa * s) * b;
        for (int64_t c = cb * cob; c < std::min(co, (cb + 1) * cob); ++c) {
          OT* o = out + ((c * ho + y) * wo + xa) * b;
          run_lanes(bb * lanes, std::min(b, (bb + 1) * lanes), base, o, off.data(), val, bptr[c * k * k],
                    bptr[(c + 1) * k * k], n, s * b, b);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// transposed gather (input gradient of a strided conv, stride s > 1):
//   din[ci][Y][X][b] = sum over (u, v) with Y + p - u = s*y, X + p - v = s*x (y, x inside dout) of
//                      sum_j val[j] * dout[chan[j]][y][x][b]
// over the transposed structure (per input channel ci, buckets (u, v) of output channels). The input positions
// split into s*s parity classes (Y = ry + s*i, X = rx + s*jx); within one class the kernel rows that contribute
// are the u with (ry + p - u) divisible by s, each at a fixed dout row offset du = (ry + p - u) / s from i
// (likewise columns). So a class is a stride-1 gather over dout, padded by P so that every offset stays inside:
// the same register tiles as the forward, over consecutive jx, stored s columns apart.
inline bool divides(int64_t a, int64_t s) { return ((a % s) + s) % s == 0; }

template <typename DT, typename OT>
void tgather_conv(const DT* dout, OT* din, const int32_t* bptr, const int32_t* chan, const float* val,
                  int64_t co, int64_t ho, int64_t wo, int64_t ci, int64_t hi, int64_t wi, int64_t b, int64_t k,
                  int64_t s, int64_t p) {
  // the pad P: every (class position i, offset du) lands in [-P, ho + P)
  int64_t P = 0;
  for (int64_t r = 0; r < s; ++r)
    for (int64_t u = 0; u < k; ++u)
      if (divides(r + p - u, s)) {
        const int64_t du = (r + p - u) / s, imax = std::max<int64_t>(0, (std::max(hi, wi) - 1 - r) / s);
        P = std::max(P, std::max(-du, imax + du - (std::min(ho, wo) - 1)));
      }
  // a copy (padded, widened to fp32) unless dout is fp32 and needs no border
  const bool copy = P > 0 || !std::is_same<DT, float>::value;
  const Padded pd{co, ho + 2 * P, wo + 2 * P, b, copy ? channel_stride(ho + 2 * P, wo + 2 * P, b) : ho * wo * b};
  std::vector<float> padded(copy ? size_t(co * pd.cs) : 0);
  if (copy) pad_planes(dout, padded.data(), co, ho, wo, b, P, pd.cs);
  // per (ci, ry, rx): the class's non-zeros, their offsets and values
  const int64_t ss = s * s;
  std::vector<int32_t> ptr(ci * ss + 1, 0);
  std::vector<int64_t> off;
  std::vector<float> tval;
  off.reserve(bptr[ci * k * k]);
  tval.reserve(bptr[ci * k * k]);
  for (int64_t c = 0; c < ci; ++c)
    for (int64_t ry = 0; ry < s; ++ry)
      for (int64_t rx = 0; rx < s; ++rx) {
        for (int64_t u = 0; u < k; ++u) {
          if (!divides(ry + p - u, s)) continue;
          for (int64_t v = 0; v < k; ++v) {
            if (!divides(rx + p - v, s)) continue;
            const int64_t du = (ry + p - u) / s, dv = (rx + p - v) / s, bucket = (c * k + u) * k + v;
            for (int32_t j = bptr[bucket]; j < bptr[bucket + 1]; ++j) {
              off.push_back(chan[j] * pd.cs + (du * pd.wp + dv) * b);
              tval.push_back(val[j]);
            }
          }
        }
        ptr[(c * s + ry) * s + rx + 1] = int32_t(off.size());
      }
  const int64_t ncb = channel_blocks(hi, ci), cib = (ci + ncb - 1) / ncb;
  const float* pbase = padded.data();
  if constexpr (std::is_same<DT, float>::value)
    if (!copy) pbase = dout;
  at::parallel_for(0, hi * ncb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t Y = it / ncb, cb = it % ncb, ry = Y % s, i = Y / s;
      for (int64_t c = cb * cib; c < std::min(ci, (cb + 1) * cib); ++c) {
        for (int64_t rx = 0; rx < s && rx < wi; ++rx) {
          const int64_t n = (wi - rx + s - 1) / s;                  // class columns X = rx + s*jx
          const float* base = pbase + ((i + P) * pd.wp + P) * b;
          OT* o = din + ((c * hi + Y) * wi + rx) * b;
          const int32_t a = ptr[(c * s + ry) * s + rx], z = ptr[(c * s + ry) * s + rx + 1];
          run_lanes<OT>(0, b, base, o, off.data(), tval.data(), a, z, n, b, s * b);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// sddmm (weight gradient on the support) over a padded input:
//   dval[j] = sum_{y, x, b} dout[co][y][x][b] * in[chan[j]][y*s + u][x*s + v][b]
// Output positions go in cache blocks (rows x columns whose input window for all channels stays in L2). Inside a
// block, G non-zeros of one output channel share every dout load (one load feeds G FMAs; each non-zero reads its
// input at its own offset off[j]). Each non-zero keeps one partial-sum vector, added block after block in a fixed
// order; the final horizontal sum is in double (the same bits at any thread count).
template <int G, typename DT>
inline void sddmm_block(const DT* dout, const float* in, const int64_t* offj, V* part, double* tail, int64_t b,
                        int64_t l0, int64_t l1, int64_t ho, int64_t wo, int64_t wp, int64_t s, int64_t co, int32_t j0,
                        int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  constexpr int A = G >= 8 ? 1 : 8 / G;     // accumulators per non-zero: G * A >= 8 independent FMA chains
  const int64_t bv = l0 + vector_lanes(l1 - l0);
  V acc[G][A];
  for (int i = 0; i < G; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = simd::zero();
  const float* inp[G];
  for (int i = 0; i < G; ++i) inp[i] = in + offj[j0 + i];
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) {
      const DT* d = dout + ((co * ho + y) * wo + x) * b;
      const int64_t off = (y * s * wp + x * s) * b;
      int64_t l = l0;
      for (; l + A * simd::W <= bv; l += A * simd::W) {
        V dv[A];
        for (int a = 0; a < A; ++a) dv[a] = loadv(d + l + a * simd::W);
        for (int i = 0; i < G; ++i)
          for (int a = 0; a < A; ++a)
            acc[i][a] = simd::fma(dv[a], simd::load(inp[i] + off + l + a * simd::W), acc[i][a]);
      }
      for (; l < bv; l += simd::W) {
        const V dv = loadv(d + l);
        for (int i = 0; i < G; ++i) acc[i][0] = simd::fma(dv, simd::load(inp[i] + off + l), acc[i][0]);
      }
      for (l = bv; l < l1; ++l)
        for (int i = 0; i < G; ++i) tail[j0 + i] += double(to_f(d[l])) * double(inp[i][off + l]);
    }
  }
  for (int i = 0; i < G; ++i) {
    V sum = acc[i][0];
    for (int a = 1; a < A; ++a) sum = simd::add(sum, acc[i][a]);
    part[j0 + i] = simd::add(part[j0 + i], sum);
  }
}

template <typename DT>
void sddmm_conv(const DT* dout, const float* in, const Padded& pin, const int32_t* bptr, const int32_t* chan,
                float* dval, int64_t co, int64_t k, int64_t s) {
  const int64_t ho = (pin.hp - k) / s + 1, wo = (pin.wp - k) / s + 1;
  const int64_t kk = k * k, nnz = bptr[co * kk];
  const std::vector<int64_t> off = offsets(bptr, chan, co, k, pin);
  std::vector<V> part(nnz, simd::zero());
  std::vector<double> tail(nnz, 0.0);
  // a block: a slice of the batch (as the forward's) x by x bx output positions whose input window
  // ((by*s + k) x (bx*s + k) pixels x channels x lanes) is near 2 MiB, and at least 8 positions (the partial
  // sums cost a few adds per block)
  const int64_t lanes = batch_block(pin.c, k, std::min(pin.wp, 4 * s + k), pin.b);
  const int64_t window = std::max<int64_t>(1, (int64_t(2) << 20) / std::max<int64_t>(1, pin.c * lanes * 4));
  int64_t bx = wo, by = 1;
  while (bx > 1 && bx * by > 8 && (by * s + k) * (bx * s + k) > window) bx = (bx + 1) / 2;
  while (by * 2 <= ho && (by * 2 * s + k) * (bx * s + k) <= window) by *= 2;
  at::parallel_for(0, co, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l0 = 0; l0 < pin.b; l0 += lanes) {
      const int64_t l1 = std::min(pin.b, l0 + lanes);
      for (int64_t y0 = 0; y0 < ho; y0 += by) {
        for (int64_t x0 = 0; x0 < wo; x0 += bx) {
          const int64_t y1 = std::min(ho, y0 + by), x1 = std::min(wo, x0 + bx);
          for (int64_t c = begin; c < end; ++c) {
            int32_t j = bptr[c * kk];
            const int32_t j1 = bptr[(c + 1) * kk];
#define MLBREG_SD(G) sddmm_block<G, DT>(dout, in, off.data(), part.data(), tail.data(), pin.b, l0, l1, ho, wo, pin.wp, s, \
                                    c, j, y0, y1, x0, x1)
            for (; j + 8 <= j1; j += 8) MLBREG_SD(8);
            for (; j + 4 <= j1; j += 4) MLBREG_SD(4);
            for (; j + 2 <= j1; j += 2) MLBREG_SD(2);
            for (; j < j1; ++j) MLBREG_SD(1);
#undef MLBREG_SD
          }
        }
      }
    }
    for (int64_t c = begin; c < end; ++c)
      for (int32_t j = bptr[c * kk]; j < bptr[(c + 1) * kk]; ++j) dval[j] = float(tail[j] + simd::hsum_d(part[j]));
  });
}

// Outputs are allocated in torch's shape, batch first, with batch-innermost strides: (B, C, H, W) with strides
// (1, H*W*B, W*B, B). The memory is the same as a contiguous (C, H, W, B) tensor, and torch sees a plain tensor
// (not a view of one).
at::Tensor alloc_bfirst(int64_t c, int64_t h, int64_t w, int64_t b, const at::TensorOptions& opts) {
  return at::empty_strided({b, c, h, w}, {1, h * w * b, w * b, b}, opts);
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
// Python entry points. Activations (inputs, outputs, gradients) may be float32 or bfloat16; weights, their
// values and gradients and the padded planes are float32.
// pad_chwb: the padded fp32 planes of a CHWB tensor as a (C, cs) tensor (see Padded)
at::Tensor pad_chwb(at::Tensor x, int64_t p) {
  check_chwb(x, "input", true);
  TORCH_CHECK(p >= 0, "padding must be >= 0");
  const int64_t c = x.size(0), h = x.size(1), w = x.size(2), b = x.size(3);
  // no border to add (a 1x1 conv) and already fp32: the planes as they are
  if (p == 0 && x.dtype() == at::kFloat) return x.view({c, h * w * b});
  const int64_t cs = p ? channel_stride(h + 2 * p, w + 2 * p, b) : h * w * b;
  auto out = at::empty({c, cs}, x.options().dtype(at::kFloat));
  if (x.dtype() == at::kBFloat16)
    pad_planes(x.data_ptr<bf16>(), out.data_ptr<float>(), c, h, w, b, p, cs);
  else
    pad_planes(x.data_ptr<float>(), out.data_ptr<float>(), c, h, w, b, p, cs);
  return out;
}

Padded padded_geom(const at::Tensor& xp, int64_t hp, int64_t wp, int64_t b) {
  TORCH_CHECK(xp.dtype() == at::kFloat && xp.device().is_cpu() && xp.is_contiguous() && xp.dim() == 2,
              "padded input must be a contiguous float32 CPU (C, cs) tensor from pad_chwb");
  TORCH_CHECK(hp > 0 && wp > 0 && b > 0 && (xp.size(1) == channel_stride(hp, wp, b) || xp.size(1) == hp * wp * b),
              "padded input does not match the given height, width and batch");
  return Padded{xp.size(0), hp, wp, b, xp.size(1)};
}

// sparse conv of a padded input (hp, wp: padded size): output (B, co, ho, wo) with CHWB strides, bf16 if asked
at::Tensor conv_gather_padded(at::Tensor xp, int64_t hp, int64_t wp, int64_t b, at::Tensor bptr, at::Tensor chan,
                              at::Tensor val, int64_t co, int64_t k, int64_t s, bool out_bf16) {
  const Padded pin = padded_geom(xp, hp, wp, b);
  TORCH_CHECK(s >= 1 && k >= 1 && hp >= k && wp >= k, "need stride >= 1 and a kernel inside the padded input");
  check_struct(bptr, chan, val, co, k, pin.c);
  const int64_t ho = (hp - k) / s + 1, wo = (wp - k) / s + 1;
  auto out = alloc_bfirst(co, ho, wo, b, xp.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  if (out_bf16)
    gather_conv(xp.data_ptr<float>(), pin, out.data_ptr<bf16>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
                val.data_ptr<float>(), co, k, s);
  else
    gather_conv(xp.data_ptr<float>(), pin, out.data_ptr<float>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
                val.data_ptr<float>(), co, k, s);
  return out;
}

// the sparse conv of a CHWB input, output in the input's dtype
at::Tensor conv_gather(at::Tensor in, at::Tensor bptr, at::Tensor chan, at::Tensor val, int64_t co,
                       int64_t k, int64_t s, int64_t p) {
  check_chwb(in, "input", true);
  TORCH_CHECK(s >= 1 && p >= 0 && p < k, "need stride >= 1 and 0 <= padding < kernel");
  check_struct(bptr, chan, val, co, k, in.size(0));
  const int64_t hp = in.size(1) + 2 * p, wp = in.size(2) + 2 * p;
  TORCH_CHECK(hp >= k && wp >= k, "output would be empty");
  return conv_gather_padded(pad_chwb(in, p), hp, wp, in.size(3), bptr, chan, val, co, k, s,
                            in.dtype() == at::kBFloat16);
}

// input gradient of a strided conv, in the output gradient's dtype
at::Tensor conv_tgather(at::Tensor dout, at::Tensor bptr, at::Tensor chan, at::Tensor val, int64_t ci,
                        int64_t hi, int64_t wi, int64_t k, int64_t s, int64_t p) {
  check_chwb(dout, "output gradient", true);
  TORCH_CHECK(s >= 1 && p >= 0 && p < k, "need stride >= 1 and 0 <= padding < kernel");
  check_struct(bptr, chan, val, ci, k, dout.size(0));
  TORCH_CHECK(dout.size(1) == (hi + 2 * p - k) / s + 1 && dout.size(2) == (wi + 2 * p - k) / s + 1,
              "output gradient shape does not match the input size");
  auto din = alloc_bfirst(ci, hi, wi, dout.size(3), dout.options());
  if (dout.dtype() == at::kBFloat16)
    tgather_conv(dout.data_ptr<bf16>(), din.data_ptr<bf16>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
                 val.data_ptr<float>(), dout.size(0), dout.size(1), dout.size(2), ci, hi, wi, dout.size(3), k, s, p);
  else
    tgather_conv(dout.data_ptr<float>(), din.data_ptr<float>(), bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
                 val.data_ptr<float>(), dout.size(0), dout.size(1), dout.size(2), ci, hi, wi, dout.size(3), k, s, p);
  return din;
}

// weight gradient on the support from the padded input of the forward (dout float32 or bfloat16)
at::Tensor conv_sddmm_padded(at::Tensor dout, at::Tensor xp, int64_t hp, int64_t wp, at::Tensor bptr, at::Tensor chan,
                             int64_t k, int64_t s) {
  check_chwb(dout, "output gradient", true);
  const Padded pin = padded_geom(xp, hp, wp, dout.size(3));
  TORCH_CHECK(dout.size(1) == (hp - k) / s + 1 && dout.size(2) == (wp - k) / s + 1,
              "output gradient shape does not match the input");
  auto dval = at::empty({chan.numel()}, xp.options());
  check_struct(bptr, chan, dval, dout.size(0), k, pin.c);
  if (dout.dtype() == at::kBFloat16)
    sddmm_conv(dout.data_ptr<bf16>(), xp.data_ptr<float>(), pin, bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
               dval.data_ptr<float>(), dout.size(0), k, s);
  else
    sddmm_conv(dout.data_ptr<float>(), xp.data_ptr<float>(), pin, bptr.data_ptr<int32_t>(), chan.data_ptr<int32_t>(),
               dval.data_ptr<float>(), dout.size(0), k, s);
  return dval;
}

at::Tensor conv_sddmm(at::Tensor dout, at::Tensor in, at::Tensor bptr, at::Tensor chan, int64_t k,
                      int64_t s, int64_t p) {
  check_chwb(dout, "output gradient", true);
  check_chwb(in, "input", true);
  TORCH_CHECK(dout.size(3) == in.size(3), "batch sizes differ");
  return conv_sddmm_padded(dout, pad_chwb(in, p), in.size(1) + 2 * p, in.size(2) + 2 * p, bptr, chan, k, s);
}

// ---------------------------------------------------------------------------------------------------
// BatchNorm over CHWB: channel c is the contiguous block x[c]. y = act(gamma * (x - mean) * invstd + beta [+ res]).
// Sums are taken in float blocks of 1024 added in double (accurate like torch's cascade sums). The activations
// (x, res, y and the gradients) are float32 or bfloat16 (T); the arithmetic is fp32.
namespace {
template <typename T>
inline double block_sum(const T* x, int64_t n) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t i1 = std::min(n, i0 + 1024);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += to_f(x[i]);
    total += s;
  }
  return total;
}
template <typename T>
inline double block_sq_dev(const T* x, int64_t n, float mean) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t i1 = std::min(n, i0 + 1024);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) { const float d = to_f(x[i]) - mean; s += d * d; }
    total += s;
  }
  return total;
}

template <typename T>
void bn_forward_impl(const T* xp, const T* rp, T* yp, double* mp, double* vp, const float* gp, const float* bp,
                     int64_t c, int64_t n, bool training, double eps, bool relu) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const T* xc = xp + ch * n;
      if (training) {
        mp[ch] = block_sum(xc, n) / double(n);
        vp[ch] = block_sq_dev(xc, n, float(mp[ch])) / double(n);
      }
      const double invstd = 1.0 / std::sqrt(vp[ch] + eps);
      const float scale = float(gp[ch] * invstd), shift = float(bp[ch] - mp[ch] * gp[ch] * invstd);
      T* yc = yp + ch * n;
      const T* rc = rp ? rp + ch * n : nullptr;
      if (rc && relu) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = from_f<T>(std::max(0.f, std::fma(to_f(xc[i]), scale, shift) + to_f(rc[i])));
      } else if (rc) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = from_f<T>(std::fma(to_f(xc[i]), scale, shift) + to_f(rc[i]));
      } else if (relu) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = from_f<T>(std::max(0.f, std::fma(to_f(xc[i]), scale, shift)));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) yc[i] = from_f<T>(std::fma(to_f(xc[i]), scale, shift));
      }
    }
  });
}

template <typename T>
void bn_backward_impl(const T* dyp, const T* xp, const T* ypp, T* dxp, T* drp, float* dgp, float* dbp,
                      const float* gp, const double* mp, const double* vp, int64_t c, int64_t n, double eps,
                      bool relu, bool training) {
  at::parallel_for(0, c, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t ch = begin; ch < end; ++ch) {
      const T* dyc = dyp + ch * n;
      const T* xc = xp + ch * n;
      // the gradient reaching the normalization, in fp32 (dy itself when it is fp32 and there is no ReLU)
      const float* g_eff = nullptr;
      if (relu || !std::is_same<T, float>::value) {
        buf.resize(n);
        const T* yc = ypp + ch * n;
        if (relu) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) buf[i] = to_f(yc[i]) > 0.f ? to_f(dyc[i]) : 0.f;
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) buf[i] = to_f(dyc[i]);
        }
        if (drp) {
          T* dr = drp + ch * n;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) dr[i] = from_f<T>(buf[i]);
        }
        g_eff = buf.data();
      } else {
        g_eff = reinterpret_cast<const float*>(dyc);
      }
      const float mu = float(mp[ch]);
      const double invstd = 1.0 / std::sqrt(vp[ch] + eps);
      double sum_g = 0.0, sum_gx = 0.0;
      for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        const int64_t i1 = std::min(n, i0 + 1024);
        float s = 0.f, sx = 0.f;
#pragma omp simd reduction(+ : s, sx)
        for (int64_t i = i0; i < i1; ++i) { s += g_eff[i]; sx += g_eff[i] * (to_f(xc[i]) - mu); }
        sum_g += s;
        sum_gx += sx;
      }
      dbp[ch] = float(sum_g);
      dgp[ch] = float(sum_gx * invstd);
      T* dxc = dxp + ch * n;
      const float a = float(gp[ch] * invstd);
      if (training) {
        // dx = gamma * invstd * (g - mean(g) - xhat * mean(g * xhat))
        const float mg = float(sum_g / double(n));
        const float k = float(sum_gx * invstd * invstd / double(n));
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxc[i] = from_f<T>(a * (g_eff[i] - mg - (to_f(xc[i]) - mu) * k));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) dxc[i] = from_f<T>(a * g_eff[i]);
      }
    }
  });
}
}  // namespace

// x, res: physical (C, H, W, B), float32 or bfloat16 (res converted to x's dtype). Returns (y, mean, var), y in x's
// dtype, batch-first with CHWB strides, where mean/var are the batch statistics used (training) or the given ones
// (eval); var is the biased batch variance in training.
std::vector<at::Tensor> bn_forward(at::Tensor x, at::Tensor gamma, at::Tensor beta, c10::optional<at::Tensor> res,
                                   c10::optional<at::Tensor> mean_in, c10::optional<at::Tensor> var_in,
                                   double eps, bool relu) {
  check_chwb(x, "input", true);
  const int64_t c = x.size(0), n = x.numel() / std::max<int64_t>(c, 1);
  TORCH_CHECK(gamma.numel() == c && beta.numel() == c, "affine parameters must have one entry per channel");
  auto g = gamma.contiguous().to(at::kFloat), bt = beta.contiguous().to(at::kFloat);
  const bool training = !mean_in.has_value();
  at::Tensor mean = training ? at::empty({c}, x.options().dtype(at::kDouble))
                             : mean_in->to(at::kDouble).contiguous();
  at::Tensor var = training ? at::empty({c}, x.options().dtype(at::kDouble))
                            : var_in->to(at::kDouble).contiguous();
  at::Tensor r;
  if (res.has_value()) {
    check_chwb(*res, "residual", true);
    TORCH_CHECK(res->sizes() == x.sizes(), "residual shape differs from the input");
    r = res->to(x.dtype());
  }
  auto y = alloc_bfirst(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  if (x.dtype() == at::kBFloat16)
    bn_forward_impl(x.data_ptr<bf16>(), r.defined() ? r.data_ptr<bf16>() : nullptr, y.data_ptr<bf16>(),
                    mean.data_ptr<double>(), var.data_ptr<double>(), g.data_ptr<float>(), bt.data_ptr<float>(), c, n,
                    training, eps, relu);
  else
    bn_forward_impl(x.data_ptr<float>(), r.defined() ? r.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                    mean.data_ptr<double>(), var.data_ptr<double>(), g.data_ptr<float>(), bt.data_ptr<float>(), c, n,
                    training, eps, relu);
  return {y, mean, var};
}

// gradients of bn_forward: (dx, dgamma, dbeta, dres) with dres = the incoming gradient after the ReLU
// (undefined when there is no residual). `y` is the forward output (its sign gives the ReLU mask). dy, x, y in one
// dtype (float32 or bfloat16; dy converted to x's); dx and dres in it too, dgamma and dbeta float32.
std::vector<at::Tensor> bn_backward(at::Tensor dy, at::Tensor x, at::Tensor y, at::Tensor gamma,
                                    at::Tensor mean, at::Tensor var, double eps, bool relu, bool training,
                                    bool has_res) {
  check_chwb(dy, "output gradient", true);
  check_chwb(x, "input", true);
  check_chwb(y, "output", true);
  TORCH_CHECK(y.dtype() == x.dtype(), "output and input dtypes differ");
  if (dy.dtype() != x.dtype()) dy = dy.to(x.dtype());
  const int64_t c = x.size(0), n = x.numel() / std::max<int64_t>(c, 1);
  auto g = gamma.contiguous().to(at::kFloat);
  auto m = mean.to(at::kDouble).contiguous(), v = var.to(at::kDouble).contiguous();
  auto dx = alloc_bfirst(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  at::Tensor dres;
  if (has_res && relu) dres = alloc_bfirst(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  auto fopts = x.options().dtype(at::kFloat);
  auto dgamma = at::empty({c}, fopts), dbeta = at::empty({c}, fopts);
  if (x.dtype() == at::kBFloat16)
    bn_backward_impl(dy.data_ptr<bf16>(), x.data_ptr<bf16>(), y.data_ptr<bf16>(), dx.data_ptr<bf16>(),
                     dres.defined() ? dres.data_ptr<bf16>() : nullptr, dgamma.data_ptr<float>(), dbeta.data_ptr<float>(),
                     g.data_ptr<float>(), m.data_ptr<double>(), v.data_ptr<double>(), c, n, eps, relu, training);
  else
    bn_backward_impl(dy.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(),
                     dres.defined() ? dres.data_ptr<float>() : nullptr, dgamma.data_ptr<float>(), dbeta.data_ptr<float>(),
                     g.data_ptr<float>(), m.data_ptr<double>(), v.data_ptr<double>(), c, n, eps, relu, training);
  return {dx, dgamma, dbeta, dres};
}

std::string simd_path() { return MLBREG_PATH; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv_gather", &conv_gather, "sparse conv, gather form (forward; stride-1 input gradient)");
  m.def("conv_tgather", &conv_tgather, "sparse conv input gradient, gather over the transposed structure (any stride)");
  m.def("conv_sddmm", &conv_sddmm, "sparse conv weight gradient on the support");
  m.def("pad_chwb", &pad_chwb, "zero-padded planes of a CHWB tensor, channel stride an odd number of cache lines");
  m.def("conv_gather_padded", &conv_gather_padded, "sparse conv of a padded input (pad_chwb)");
  m.def("conv_sddmm_padded", &conv_sddmm_padded, "weight gradient on the support from a padded input");
  m.def("bn_forward", &bn_forward, "BatchNorm (+ residual) (+ ReLU) over CHWB");
  m.def("bn_backward", &bn_backward, "gradients of bn_forward");
  m.def("simd_path", &simd_path);
}
