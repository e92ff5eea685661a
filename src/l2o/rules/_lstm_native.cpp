// Compiled kernels of l2o's coordinatewise LSTM rule (l2o.rules.lstm.CoordinatewiseLSTM).
//
// Built at first use by l2o/rules/_lstm_native.py (g++ -O3 -march=native, no PyTorch
// headers) and called through ctypes.  l2o_lstm_step computes, for every coordinate, the
// math of l2o.rules._lstm_kernels.update_no_grad: the input preprocessing, every LSTM
// layer (gate order i, f, g, o) and the linear head, reading the state (h, c) of each
// layer and writing the new one (in place when the pointers are equal).
// l2o_lstm_layer_forward and l2o_lstm_layer_backward_dz serve meta-training's autograd
// Function (_lstm_kernels._LSTMLayer): one layer's forward, and the elementwise part of
// its backward.
//
// Why it is faster than the PyTorch kernel (benchmarks/optim_step.py): a coordinate's
// gates never leave registers (the PyTorch kernel writes [rows, 4H] gate blocks and
// reads them back several times); the gates of R coordinates are accumulated together,
// so one load of a weight vector serves R coordinates; sigmoid and tanh use a short
// polynomial for 2^x and a refined reciprocal estimate instead of library calls.
//
// Layout: 16-float vectors (GCC vector extensions: AVX-512 registers where the CPU has
// them, split into narrower ones elsewhere).  A layer's weights come repacked as
// W[k][NV*16] (row k = input k, then h_prev; columns = the 4H gates, zero-padded to NV
// whole vectors), scaled by -log2(e) (and the g columns by 2 more, for
// tanh(z) = 2 sigmoid(2z) - 1); its bias likewise as b[NV*16].  The state of a layer is
// row-major [n][H], as PyTorch stores it.

#include <stdint.h>
#include <string.h>

#include <thread>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64)));

// Coordinates whose gates are accumulated together: R x NV accumulators must fit in the
// registers (32 with AVX-512; measured 2..6 on the 2x20 LSTM, 4 was fastest).
#ifdef __AVX512F__
static const int R = 4;
#else
static const int R = 2;
#endif
static const int MAX_HIDDEN = 32;
static const int MAX_LAYERS = 4;

static inline v16 load(const float* p) { return *(const v16u*)p; }
static inline void store(float* p, v16 v) { *(v16u*)p = v; }
static inline v16 splat(float x) { return (v16){} + x; }

// 2^t = 2^n 2^f with n = round(t), |f| <= 1/2; 2^f by a degree-5 polynomial fitted for
// relative error on [-1/2, 1/2] (2.3e-7 measured in float32).
static inline v16 vexp2(v16 t) {
#ifdef __AVX512F__
  v16 n = (v16)_mm512_maskz_roundscale_ps(0xFFFF, (__m512)t,
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const v16 hi = splat(127.0f), lo = splat(-126.0f);
  t = t > hi ? hi : t;
  t = t < lo ? lo : t;
  // n = round(t) by the 1.5 * 2^23 trick (exact for |t| < 2^22)
  const v16 magic = splat(12582912.0f);
  v16 n = (t + magic) - magic;
#endif
  v16 f = t - n;
  v16 y = splat(1.3271720381453633e-3f);
  y = y * f + 9.67550091445446e-3f;
  y = y * f + 5.550727993249893e-2f;
  y = y * f + 2.4022120237350464e-1f;
  y = y * f + 6.931469440460205e-1f;
  y = y * f + 1.0000001192092896f;
#ifdef __AVX512F__
  // vscalefps: y 2^n with IEEE overflow to inf and underflow to 0, no clamping needed.
  return (v16)_mm512_maskz_scalef_ps(0xFFFF, (__m512)y, (__m512)n);
#else
  vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  return y * (v16)e;
#endif
}

// 1 / d for d >= 1 (finite).
static inline v16 vrecip(v16 d) {
#ifdef __AVX512F__
  // 14-bit estimate and one Newton step: ~float precision, cheaper than vdivps.
  v16 r = (v16)_mm512_maskz_rcp14_ps(0xFFFF, (__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// sigmoid(z) from t = -z log2(e): 1 / (1 + 2^t).  The gate weights arrive scaled by
// -log2(e), so the gates need no multiplication here.  t is capped at 126: beyond it
// 2^t would overflow to inf and the Newton step would turn 1 / inf into NaN (sigmoid is
// 1e-38 there anyway).  NaN propagates (the comparison is false for NaN).
static inline v16 vsigmoid_t(v16 t) {
  t = t > 126.0f ? splat(126.0f) : t;
  return vrecip(1.0f + vexp2(t));
}

// tanh(c) = 2 sigmoid(2c) - 1.
static inline v16 vtanh(v16 c) {
  return 2.0f * vsigmoid_t(c * (-2.0f * 1.44269504088896341f)) - 1.0f;
}

// Flushes denormals to zero while a kernel runs on this thread (saturated gates can
// produce them, and each one costs a microcode assist); restores the thread's MXCSR.
struct FlushDenormals {
#if defined(__SSE__)
  const unsigned int saved = __builtin_ia32_stmxcsr();
  FlushDenormals() { __builtin_ia32_ldmxcsr(saved | 0x8040); }
  ~FlushDenormals() { __builtin_ia32_ldmxcsr(saved); }
#endif
};

// The sum of the 16 lanes (a shuffle tree, not 16 scalar extractions).
static inline float hsum(v16 s) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps((__m512)s);
#else
  float t = 0.0f;
  for (int k = 0; k < 16; ++k) t += s[k];
  return t;
#endif
}

// Profiling builds only (benchmarks/lstm_native_parts.py; never defined otherwise):
// replace a part by a cheap stand-in (one multiply-add) to time the rest.
static inline v16 cheap(v16 t) { return t * 0.01f + 0.5f; }
#ifdef L2O_PROFILE_CHEAP_GATES
#define GATE_SIGMOID cheap
#else
#define GATE_SIGMOID vsigmoid_t
#endif
#ifdef L2O_PROFILE_CHEAP_TANH
static inline v16 cheap_tanh(v16 c) {
  return 2.0f * cheap(c * (-2.0f * 1.44269504088896341f)) - 1.0f;
}
#define CELL_TANH cheap_tanh
#else
#define CELL_TANH vtanh
#endif

// The state is stored as float or as bfloat16 (uint16_t: the high half of a float, as
// PyTorch's torch.bfloat16); all arithmetic is in float.
typedef uint16_t bf16;

// The first M values at p as floats (the other lanes zero): never reads past the row.
template <int M, typename S>
static inline v16 load_n(const S* p) {
  if constexpr (sizeof(S) == 4) {
    if constexpr (M >= 16) {
      return load((const float*)p);
    } else {
#ifdef __AVX512F__
      return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << M) - 1u), p);
#else
      v16 v = {};
      memcpy(&v, p, M * sizeof(float));
      return v;
#endif
    }
  } else {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    __m256i raw = M >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                          : _mm256_maskz_loadu_epi16((__mmask16)((1u << M) - 1u), p);
    return (v16)_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, raw), 16);
#else
    uint16_t raw[16] = {0};
    memcpy(raw, p, (M < 16 ? M : 16) * sizeof(uint16_t));
    vi16 bits;
    for (int q = 0; q < 16; ++q) bits[q] = (int32_t)((uint32_t)raw[q] << 16);
    return (v16)bits;
#endif
  }
}

// Stores the first M lanes of v at p, as float or rounded to bfloat16 (to nearest even,
// NaN stays NaN, as PyTorch).  Plain stores of exactly M values, never a masked 64-byte
// store: a later load that overlaps the masked-off part of a pending masked store (the
// next coordinate's row starts right after this one) cannot be forwarded and stalls.
template <int M, typename S>
static inline void store_n(S* p, v16 v) {
  constexpr int K = M < 16 ? M : 16;
  if constexpr (sizeof(S) == 4) {
    if constexpr (M >= 16) {
      store((float*)p, v);
    } else {
      memcpy(p, &v, M * sizeof(float));
    }
  } else {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    __m256bh b = _mm512_cvtneps_pbh((__m512)v);
    memcpy(p, &b, K * sizeof(uint16_t));
#else
    typedef uint32_t vu16 __attribute__((vector_size(64)));
    vu16 x = (vu16)v;
    vu16 r = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
    r = v != v ? (vu16){} + 0x7FC0u : r;
    uint16_t out[16];
    for (int q = 0; q < K; ++q) out[q] = (uint16_t)r[q];
    memcpy(p, out, K * sizeof(uint16_t));
#endif
  }
}

// Columns [S, S + 16) of the activated gates a[0..NV) of one coordinate, from registers
// (a lane shuffle of two neighbouring vectors; no trip through memory, where a
// misaligned reload of just-stored gates would stall on store forwarding).
template <int S, int NV>
static inline v16 columns(const v16* a) {
  constexpr int V = S / 16, L = S % 16;
  if constexpr (L == 0) {
    return a[V];
  } else {
    constexpr int V2 = V + 1 < NV ? V + 1 : V;
#if defined(__clang__)
    return __builtin_shufflevector(a[V], a[V2], L + 0, L + 1, L + 2, L + 3, L + 4, L + 5,
                                   L + 6, L + 7, L + 8, L + 9, L + 10, L + 11, L + 12, L + 13,
                                   L + 14, L + 15);
#else
    return __builtin_shuffle(a[V], a[V2],
                             (vi16){L + 0, L + 1, L + 2, L + 3, L + 4, L + 5, L + 6, L + 7,
                                    L + 8, L + 9, L + 10, L + 11, L + 12, L + 13, L + 14,
                                    L + 15});
#endif
  }
}

// The cell for units [U, U + 16) of one coordinate: a holds its activated gates
// (i | f | sigmoid(2 z_g) | o, H columns each); ci is its c row, co and ho where the new
// c and h go, hl a local copy of the new h (whole vectors: the next layer reads it back
// at once, and a read of a masked store would stall).
template <int H, int NV, int U, typename S, bool WG = false>
static inline void cell(const v16* a, const S* ci, S* co, S* ho, float* hl, float* gr = nullptr,
                        int64_t plane = 0) {
  if constexpr (U < H) {
    constexpr int M = H - U < 16 ? H - U : 16;
    v16 i = columns<U, NV>(a), f = columns<H + U, NV>(a);
    v16 g = columns<2 * H + U, NV>(a), o = columns<3 * H + U, NV>(a);
    if constexpr (WG) {  // the activated gates i, f, tanh(z_g), o, gate-major (for backward)
      store_n<M>(gr + U, i);
      store_n<M>(gr + plane + U, f);
      store_n<M>(gr + 2 * plane + U, 2.0f * g - 1.0f);
      store_n<M>(gr + 3 * plane + U, o);
    }
    v16 c = f * load_n<M>(ci + U) + i * (2.0f * g - 1.0f);
    v16 h = o * CELL_TANH(c);
    store_n<M>(co + U, c);
    store_n<M>(ho + U, h);
    store(hl + U, h);
    cell<H, NV, U + 16, S, WG>(a, ci, co, ho, hl, gr, plane);
  }
}

// h_prev of RR rows as floats in hf[r * padded(H)] (bfloat16 state: converted once).
template <int H, int U, typename S>
static inline void widen(const S* hi, float* hf) {
  if constexpr (U < H) {
    store(hf + U, load_n<(H - U < 16 ? H - U : 16)>(hi + U));
    widen<H, U + 16, S>(hi, hf);
  }
}

// One layer for RR coordinates (rows r): inputs x[r * rs + k * ks] (k < kx); state rows
// hi[r * H], ci[r * H] in, ho[r * H], co[r * H] out, element `row` onwards (out may equal
// in: each row is read before it is written); the new h also goes to hl[r * padded(H)].
template <int H, int RR, typename S, bool WG = false>
static void layer(const float* x, int rs, int ks, int kx, const void* hi_, const void* ci_,
                  void* ho_, void* co_, int64_t row, const float* W, const float* b,
                  float* hl, float* gates = nullptr, int64_t plane = 0) {
  constexpr int NV = (4 * H + 15) / 16;
  constexpr int HP = (H + 15) / 16 * 16;
  const S* hi = (const S*)hi_ + row;
  const S* ci = (const S*)ci_ + row;
  S* ho = (S*)ho_ + row;
  S* co = (S*)co_ + row;
  // h_prev as floats: the state itself, or a converted copy of the RR rows
  alignas(64) float hf[sizeof(S) == 4 ? 1 : RR * HP];
  const float* hp;
  int hs;
  if constexpr (sizeof(S) == 4) {
    hp = (const float*)hi;
    hs = H;
  } else {
    #pragma GCC unroll 32
    for (int r = 0; r < RR; ++r) widen<H, 0, S>(hi + r * H, hf + r * HP);
    hp = hf;
    hs = HP;
  }
  v16 acc[RR][NV];
  #pragma GCC unroll 32
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) acc[r][v] = load(b + 16 * v);
  for (int k = 0; k < kx; ++k) {  // the gates from the inputs ...
    const float* wk = W + (int64_t)k * NV * 16;
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      v16 w = load(wk + 16 * v);
      #pragma GCC unroll 32
      for (int r = 0; r < RR; ++r) acc[r][v] += w * x[r * rs + k * ks];
    }
  }
  for (int k = 0; k < H; ++k) {  // ... and from h_prev
    const float* wk = W + (int64_t)(kx + k) * NV * 16;
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      v16 w = load(wk + 16 * v);
      #pragma GCC unroll 32
      for (int r = 0; r < RR; ++r) acc[r][v] += w * hp[r * hs + k];
    }
  }
  #pragma GCC unroll 32
  for (int r = 0; r < RR; ++r)
    #pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) acc[r][v] = GATE_SIGMOID(acc[r][v]);
#ifdef L2O_PROFILE_NO_CELL
  for (int r = 0; r < RR; ++r) {  // keep the gates alive, skip the cell and the state
    v16 sum = acc[r][0];
    for (int v = 1; v < NV; ++v) sum += acc[r][v];
    for (int u = 0; u < HP; u += 16) store(hl + r * HP + u, sum);
  }
#else
  #pragma GCC unroll 32
  for (int r = 0; r < RR; ++r)
    cell<H, NV, 0, S, WG>(acc[r], ci + r * H, co + r * H, ho + r * H, hl + r * HP,
                          WG ? gates + row + r * H : nullptr, plane);
#endif
}

typedef void (*layer_fn)(const float*, int, int, int, const void*, const void*, void*, void*,
                         int64_t, const float*, const float*, float*, float*, int64_t);

// The layer code is specialised (fully unrolled) per hidden size; a build covers the
// sizes listed in L2O_HIDDEN_SIZES (the Python side builds one library per set of sizes,
// which keeps a build to a few seconds).
#ifndef L2O_HIDDEN_SIZES
#define L2O_HIDDEN_SIZES 20
#endif

template <int RR, typename S, bool WG, int... Hs>
static layer_fn pick_from(int hidden) {
  static_assert(((Hs >= 1 && Hs <= MAX_HIDDEN) && ...), "hidden sizes must be in 1..32");
  layer_fn f = 0;
  ((hidden == Hs ? (f = layer<Hs, RR, S, WG>, 0) : 0), ...);
  return f;
}

// The layer code for this hidden size (null: not built into this library); WG: it also
// writes the activated gates (the training forward).
template <int RR, typename S, bool WG = false>
static layer_fn pick(int hidden) {
  return pick_from<RR, S, WG, L2O_HIDDEN_SIZES>(hidden);
}

// log(a) for a >= FLT_MIN (and +inf, NaN): a = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) by Cephes' single-precision polynomial (relative error ~1e-7).
static inline v16 vlog(v16 a) {
#ifdef __AVX512F__
  v16 e = (v16)_mm512_maskz_getexp_ps(0xFFFF, (__m512)(a * 1.41421356237309505f));
  v16 x = (v16)_mm512_maskz_scalef_ps(0xFFFF, (__m512)a, (__m512)(-e)) - 1.0f;
  v16 z = x * x;
  v16 y = splat(7.0376836292e-2f);
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  v16 r = x + y + e * 0.693359375f;
  const v16 inf = splat(__builtin_inff());
  return a == inf ? inf : r;
#else
  v16 r;
  for (int q = 0; q < 16; ++q) r[q] = __builtin_logf(a[q]);
  return r;
#endif
}

enum { PRE_LOGSIGN = 0, PRE_NONE = 1, PRE_SCALE = 2 };

// The input features of 16 coordinates, feature-major into x[0..16) and x[16..32): the
// L2L preprocessing of l2o.preprocess (log part max(log(|g|) / p, -1), sign part
// clamp(g e^p, -1, 1)), or g itself, or g * input_scale.  NaN propagates as in PyTorch.
static inline int features(v16 g, int kind, float p, float exp_p, float input_scale,
                           float* x) {
  if (kind == PRE_LOGSIGN) {
    v16 a = g < 0.0f ? -g : g;
    const v16 tiny = splat(1.17549435e-38f);
    a = a < tiny ? tiny : a;  // NaN stays NaN (the comparison is false)
    v16 lg = vlog(a) / p;
    lg = lg < -1.0f ? splat(-1.0f) : lg;
    v16 sg = g * exp_p;
    sg = sg < -1.0f ? splat(-1.0f) : sg;
    sg = sg > 1.0f ? splat(1.0f) : sg;
    store(x, lg);
    store(x + 16, sg);
    return 2;
  }
  store(x, kind == PRE_SCALE ? g * input_scale : g);
  return 1;
}

// run(begin, end) over [0, n) split into up to `threads` ranges of whole 16-coordinate
// blocks, the first on the calling thread.  At least 131,072 coordinates per thread;
// fewer run on the calling thread alone: between calls PyTorch's OpenMP workers spin-wait
// on the other cores, and a second thread here competed with them (on 2 cores, calls of
// 65,536 coordinates ran slower on 2 threads than on 1, in a check not kept).  Each
// coordinate's arithmetic does not depend on the split: results are bit-identical for
// any number of threads.
template <typename Run>
static void parallel(int64_t n, int threads, const Run& run) {
  const int64_t per_thread = 131072;
  int64_t t = threads < 1 ? 1 : threads;
  if (t > n / per_thread) t = n / per_thread > 0 ? n / per_thread : 1;
  const int64_t blocks = (n + 15) / 16;
  auto bound = [=](int64_t k) { return k >= t ? n : blocks * k / t * 16; };
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < t; ++k) {
    pool.emplace_back([&run, bound, k] { run(bound(k), bound(k + 1)); });
  }
  run(0, bound(1));
  for (auto& th : pool) th.join();
}

extern "C" {

int l2o_lstm_abi_version(void) { return 7; }

// Returns 0 on success, a positive code when the configuration is not supported (the
// caller then uses the PyTorch kernel).
//   n: coordinates; grad: [n]; pre: PRE_*; p, input_scale: the preprocessing's
//   constants; L layers of hidden sizes H[l]; W[l], B[l]: repacked weights and bias (see
//   the top of the file); h_in[l], c_in[l]: [n][H[l]] the state, h_out[l], c_out[l] where
//   the new state goes (may be the same memory), float or, with state_bf16 = 1,
//   bfloat16; head_w: [H[L-1]], head_b, out_scale:
//   the head; out: [n] the update; threads: how many threads share the coordinates
//   (each coordinate's arithmetic is the same whatever the split: results are
//   bit-identical for any number of threads).
int l2o_lstm_step(int64_t n, const float* grad, int pre, float p, float input_scale, int L,
                  const int* H, const float* const* W, const float* const* B,
                  const void* const* h_in, const void* const* c_in, void* const* h_out,
                  void* const* c_out, int state_bf16, const float* head_w, float head_b,
                  float out_scale, float* out, int threads) {
  if (L < 1 || L > MAX_LAYERS) return 1;
  if (pre != PRE_LOGSIGN && pre != PRE_NONE && pre != PRE_SCALE) return 3;
  layer_fn many[MAX_LAYERS], one[MAX_LAYERS];
  for (int l = 0; l < L; ++l) {
    if (H[l] < 1 || H[l] > MAX_HIDDEN) return 2;
    many[l] = state_bf16 ? pick<R, bf16>(H[l]) : pick<R, float>(H[l]);
    one[l] = state_bf16 ? pick<1, bf16>(H[l]) : pick<1, float>(H[l]);
    if (!many[l] || !one[l]) return 4;  // not a size this library was built for
  }
  const float exp_p = __builtin_expf(p);
  const int HL = H[L - 1];
  const int HLP = (HL + 15) / 16 * 16;
  // The whole step for coordinates [begin, end) (begin a multiple of 16).
  auto run = [&](int64_t begin, int64_t end) {
    [[maybe_unused]] FlushDenormals ftz;
    alignas(64) float xf[32];                        // features of 16 coordinates
    alignas(64) float hl[2][R * (MAX_HIDDEN + 16)];  // the new h of a layer, padded rows
    alignas(64) float hw[MAX_HIDDEN + 16] = {0};     // the head's weights, zero-padded
    memcpy(hw, head_w, HL * sizeof(float));
    for (int64_t j0 = begin; j0 < end; j0 += 16) {
      const int m = end - j0 < 16 ? (int)(end - j0) : 16;
      v16 g = {};
      if (m == 16) {
        g = load(grad + j0);
      } else {
        for (int q = 0; q < m; ++q) g[q] = grad[j0 + q];
      }
      const int F = features(g, pre, p, exp_p, input_scale, xf);
      // R coordinates at a time, then the remaining (< R) one at a time.
      for (int q = 0; q < m;) {
        const int rr = m - q >= R ? R : 1;
        const int64_t j = j0 + q;
        const layer_fn* fns = rr == R ? many : one;
        const float* x = xf + q;
        int rs = 1, ks = 16, kx = F;
        for (int l = 0; l < L; ++l) {
          float* out_l = hl[l & 1];
          fns[l](x, rs, ks, kx, h_in[l], c_in[l], h_out[l], c_out[l], j * H[l], W[l], B[l],
                 out_l, nullptr, 0);
          x = out_l;
          rs = (H[l] + 15) / 16 * 16;
          ks = 1;
          kx = H[l];
        }
        for (int r = 0; r < rr; ++r) {
          v16 s = {};
          for (int u = 0; u < HLP; u += 16) s += load(x + r * HLP + u) * load(hw + u);
          out[j + r] = (head_b + hsum(s)) * out_scale;
        }
        q += rr;
      }
    }
  };
  parallel(n, threads, run);
  return 0;
}

// One layer's forward for the autograd Function of l2o.rules._lstm_kernels (training):
// inputs x [n][kx], state h_in, c_in [n][H] -> h_out, c_out [n][H] and the activated gates
// [4][n][H] (i, f, tanh(z_g), o) that its hand-written backward reads.  W, b as above.
int l2o_lstm_layer_forward(int64_t n, const float* x, int kx, int H, const float* W,
                           const float* B, const float* h_in, const float* c_in, float* h_out,
                           float* c_out, float* gates, int threads) {
  if (H < 1 || H > MAX_HIDDEN || kx < 1) return 2;
  layer_fn many = pick<R, float, true>(H), one = pick<1, float, true>(H);
  if (!many || !one) return 4;
  auto run = [&](int64_t begin, int64_t end) {
    [[maybe_unused]] FlushDenormals ftz;
    alignas(64) float hl[R * (MAX_HIDDEN + 16)];
    for (int64_t j = begin; j < end;) {
      const int rr = end - j >= R ? R : 1;
      (rr == R ? many : one)(x + j * kx, kx, 1, kx, h_in, c_in, h_out, c_out, j * H, W, B, hl,
                             gates, n * (int64_t)H);
      j += rr;
    }
  };
  parallel(n, threads, run);
  return 0;
}

// The elementwise part of one layer's backward (the autograd Function's backward; its
// matrix products stay in PyTorch), for n coordinates of H units:
//   t = tanh(c);  dz_o = dh t o (1 - o);  dct = dc + dh o (1 - t^2)
//   dz_i = dct g i (1 - i);  dz_f = dct c_prev f (1 - f);  dz_g = dct i (1 - g^2)
//   dc_prev = dct f
// dh, dc, c, c_prev: [n][H] (dh, dc may be null: zero); gates [4][n][H] (i, f,
// tanh(z_g), o); dz out [n][4H] (row j: dz_i, dz_f, dz_g, dz_o of coordinate j, the row
// order of the [4H, K] weights, so that dx = dz W is one GEMM); dc_prev [n][H] or null.
int l2o_lstm_layer_backward_dz(int64_t n, int H, const float* dh, const float* dc,
                               const float* gates, const float* c, const float* c_prev,
                               float* dz, float* dc_prev, int threads) {
  const int64_t m = n * H;
  parallel(n, threads, [=](int64_t begin, int64_t end) {
    [[maybe_unused]] FlushDenormals ftz;
    for (int64_t j = begin; j < end; ++j) {
      for (int u = 0; u < H; u += 16) {
        const int left = H - u < 16 ? H - u : 16;
        const int64_t e = j * H + u;
        const float* src[8] = {dh ? dh + e : nullptr, dc ? dc + e : nullptr,
                               gates + e, gates + m + e, gates + 2 * m + e,
                               gates + 3 * m + e, c + e, c_prev + e};
        v16 v[8];
        for (int q = 0; q < 8; ++q) {
          if (!src[q]) {
            v[q] = v16{};
          } else if (left == 16) {
            v[q] = load(src[q]);
          } else {  // a partial row: never a read past the arrays
#ifdef __AVX512F__
            v[q] = (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1u), src[q]);
#else
            alignas(64) float buf[16] = {};
            memcpy(buf, src[q], left * sizeof(float));
            v[q] = load(buf);
#endif
          }
        }
        const v16 vdh = v[0], vdc = v[1], i = v[2], f = v[3], g = v[4], o = v[5];
        const v16 t = vtanh(v[6]);
        const v16 dct = vdc + vdh * o * (1.0f - t * t);
        const v16 out[5] = {dct * g * i * (1.0f - i), dct * v[7] * f * (1.0f - f),
                            dct * i * (1.0f - g * g), vdh * t * o * (1.0f - o), dct * f};
        for (int q = 0; q < 5; ++q) {
          float* dst = q < 4 ? dz + j * 4 * H + q * H + u : (dc_prev ? dc_prev + e : nullptr);
          if (!dst) continue;
          if (left == 16) {
            store(dst, out[q]);
          } else {  // (nothing reads these back soon: a masked store cannot stall a load)
#ifdef __AVX512F__
            _mm512_mask_storeu_ps(dst, (__mmask16)((1u << left) - 1u), (__m512)out[q]);
#else
            memcpy(dst, &out[q], left * sizeof(float));
#endif
          }
        }
      }
    }
  });
  return 0;
}

}  // extern "C"
