// Fused CPU passes of the mixture normalizing transform (ALGORITHMS.md section 2).
//
// Layout: x is (N, C, P) contiguous, P = product of spatial sizes. Per channel c the
// responsibilities of sample n come from a 1-D Gaussian mixture whose log-prior table is
// chosen by the sample's context (group) g = ctx[n]:
//     logit_k(x) = lc[g,k,c] - h[k,c] * (x - mu[k,c])^2,   tau = softmax_k(logit)
// where h = 1 / (2 sigma^2) and lc = log lambda - 0.5 log(2 pi sigma^2).
// Each pass recomputes tau in registers instead of storing a (N, K, C, P) tensor, so the
// layer reads x once per pass, as BatchNorm does. Channels are independent and are split
// between OpenMP threads; built with -fopenmp, the kernel binds to the libgomp that torch
// has already loaded, so it shares torch's thread pool.
//
// Positions are processed in blocks of one vector register (L lanes) with per-lane
// accumulators kept across rows, so short rows (small P) pay no horizontal reduction per
// row; lanes are flushed into double totals every few rows and whenever the group changes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// gcc's inliner gives up on some K in these deep loops; a call in the SIMD loop makes it
// scalar (30x slower), so the per-element helpers are always inlined.
#define MIX_INLINE inline __attribute__((always_inline))
// Loops over components are unrolled so per-element arrays (t[K], ...) live in registers.
#define MIX_UNROLL _Pragma("GCC unroll 8")
// Each pass is compiled on its own: inlined into the dispatch switch, some K lose SIMD.
#define MIX_PASS __attribute__((noinline))

namespace {

struct MixArgs {
  const void* x;         // (N, C, P) input
  const int64_t* ctx;    // (N,) group ids, or null for group 0
  const void* grad;      // (N, C, P) upstream gradient (apply backward)
  int64_t N, C, P, K, G;
  const void* mu;        // (K, C)
  const void* h;         // (K, C)
  const void* lc;        // (G, K, C)
  const void* shift;     // (C,) shift of the sums (stats passes)
  const void* alpha;     // (K, C) component means used by the output map
  const void* A;         // (G, K, C) component scales used by the output map
  const void* beta;      // (C,)
  const void* dS;        // (3, K, C) gradient of the sums (stats backward)
  void* out;             // (N, C, P) output, or input gradient (stats backward adds to it)
  void* red;             // reductions, layout (R, G, K, C)
  int64_t need_param_grads;
};

template <typename T>
constexpr int kLanes = 64 / sizeof(T);
// Rows summed in lanes before a flush to double: bounds float accumulation error.
constexpr int kFlushRows = 8;

// exp for arguments <= 0 (logits minus their max). Cephes-style polynomial that gcc
// vectorizes; relative error ~1e-7, below float32 resolution of the softmax.
MIX_INLINE float vexp(float x) {
  x = x < -87.0f ? -87.0f : x;
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float z = r * r;
  float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
              4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}
MIX_INLINE double vexp(double x) { return std::exp(x); }

template <typename T, int K>
MIX_INLINE void responsibilities(T xv, const T* m, const T* hh, const T* l0, T* t) {
  T l[K];
  T mx = l0[0] - hh[0] * (xv - m[0]) * (xv - m[0]);
  l[0] = mx;
  MIX_UNROLL
  for (int k = 1; k < K; ++k) {
    T d = xv - m[k];
    l[k] = l0[k] - hh[k] * d * d;
    mx = l[k] > mx ? l[k] : mx;
  }
  T s = 0;
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    t[k] = vexp(l[k] - mx);
    s += t[k];
  }
  T inv = T(1) / s;
  MIX_UNROLL
  for (int k = 0; k < K; ++k) t[k] *= inv;
}

// Rows of one channel are C*P elements apart, so each short row starts on a cold page
// where the hardware prefetcher has not ramped up: fetch the start of the next row early.
template <typename T>
MIX_INLINE void prefetch_row(const T* row, int64_t P, bool write = false) {
  const int64_t n = P < 512 ? P : 512;
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) write ? __builtin_prefetch(row + i, 1) : __builtin_prefetch(row + i);
}

// Calls f(p, j) for p in [0, P), j = p mod L: full blocks as one SIMD loop, then the tail.
template <int L, typename F>
MIX_INLINE void for_positions(int64_t P, F&& f) {
  int64_t p = 0;
  for (; p + L <= P; p += L) {
#pragma omp simd
    for (int j = 0; j < L; ++j) f(p + j, j);
  }
  for (int j = 0; p + j < P; ++j) f(p + j, j);
}

// Per-lane accumulators of R quantities per component, flushed into double totals
// laid out (R, G, K).
template <typename T, int R, int K>
struct Lanes {
  static constexpr int L = kLanes<T>;
  alignas(64) T v[R * K * L];
  std::vector<double> total;
  int64_t G, group = -1;
  int rows = 0;
  explicit Lanes(int64_t groups) : total(R * groups * K), G(groups) {}
  void reset() {
    std::fill(total.begin(), total.end(), 0.0);
    std::fill(v, v + R * K * L, T(0));
    group = -1;
    rows = 0;
  }
  void row(int64_t g) {
    if (g != group || rows == kFlushRows) flush();
    group = g;
    ++rows;
  }
  void flush() {
    if (group >= 0)
      for (int r = 0; r < R; ++r)
        MIX_UNROLL
        for (int k = 0; k < K; ++k) {
          double s = 0;
          for (int j = 0; j < L; ++j) s += v[(r * K + k) * L + j];
          total[(r * G + group) * K + k] += s;
        }
    std::fill(v, v + R * K * L, T(0));
    rows = 0;
  }
  T* at(int r, int k) { return v + (r * K + k) * L; }
  // Writes the totals of channel c into red laid out (R, G, K, C).
  void store(void* red, int64_t c, int64_t C) {
    flush();
    T* out = static_cast<T*>(red);
    for (int r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g)
        MIX_UNROLL
        for (int k = 0; k < K; ++k)
          out[((r * G + g) * K + k) * C + c] = static_cast<T>(total[(r * G + g) * K + k]);
  }
};

// Per-channel constants gathered once so the inner loop touches only registers.
template <typename T, int K>
struct Channel {
  T m[K], hh[K];
  const MixArgs& a;
  int64_t c;
  Channel(const MixArgs& args, int64_t ch) : a(args), c(ch) {
    MIX_UNROLL
    for (int k = 0; k < K; ++k) {
      m[k] = static_cast<const T*>(a.mu)[k * a.C + c];
      hh[k] = static_cast<const T*>(a.h)[k * a.C + c];
    }
  }
  int64_t group(int64_t n) const { return a.ctx ? a.ctx[n] : 0; }
  // table laid out (R, K, C): row r of channel c.
  void table(const void* t, int64_t r, T* dst) const {
    MIX_UNROLL
    for (int k = 0; k < K; ++k) dst[k] = static_cast<const T*>(t)[(r * K + k) * a.C + c];
  }
  const T* row(const void* base, int64_t n) const { return static_cast<const T*>(base) + (n * a.C + c) * a.P; }
  T* row(void* base, int64_t n) const { return static_cast<T*>(base) + (n * a.C + c) * a.P; }
};

// red (3, 1, K, C) = sums of tau_k * {1, xt, xt^2}, xt = x - shift[c].
template <typename T, int K>
MIX_PASS void stats(const MixArgs& a, int64_t c0, int64_t c1) {
  constexpr int L = kLanes<T>;
  Lanes<T, 3, K> acc(1);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    const T sh = static_cast<const T*>(a.shift)[c];
    acc.reset();
    for (int64_t n = 0; n < a.N; ++n) {
      T l0[K];
      ch.table(a.lc, ch.group(n), l0);
      acc.row(0);
      const T* __restrict__ xr = ch.row(a.x, n);
      if (n + 1 < a.N) prefetch_row(ch.row(a.x, n + 1), a.P);
      T* __restrict__ s0 = acc.at(0, 0);
      for_positions<L>(a.P, [=](int64_t p, int j) {
        T t[K];
        responsibilities<T, K>(xr[p], ch.m, ch.hh, l0, t);
        T xt = xr[p] - sh;
        MIX_UNROLL
        for (int k = 0; k < K; ++k) {
          s0[k * L + j] += t[k];
          s0[(K + k) * L + j] += t[k] * xt;
          s0[(2 * K + k) * L + j] += t[k] * xt * xt;
        }
      });
    }
    acc.store(a.red, c, a.C);
  }
}

// y = beta + sum_k tau_k * A[g,k] * (x - alpha_k)
template <typename T, int K>
MIX_PASS void apply(const MixArgs& a, int64_t c0, int64_t c1) {
  constexpr int L = kLanes<T>;
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    T al[K];
    ch.table(a.alpha, 0, al);
    const T b = static_cast<const T*>(a.beta)[c];
    for (int64_t n = 0; n < a.N; ++n) {
      int64_t g = ch.group(n);
      T l0[K], Ag[K];
      ch.table(a.lc, g, l0);
      ch.table(a.A, g, Ag);
      const T* __restrict__ xr = ch.row(a.x, n);
      T* __restrict__ yr = ch.row(a.out, n);
      if (n + 1 < a.N) {
        prefetch_row(ch.row(a.x, n + 1), a.P);
        prefetch_row(ch.row(a.out, n + 1), a.P, true);
      }
      for_positions<L>(a.P, [=](int64_t p, int) {
        T t[K];
        T xv = xr[p];
        responsibilities<T, K>(xv, ch.m, ch.hh, l0, t);
        T s = b;
        MIX_UNROLL
        for (int k = 0; k < K; ++k) s += t[k] * Ag[k] * (xv - al[k]);
        yr[p] = s;
      });
    }
  }
}

// Backward of apply. red (5, G, K, C): E0 = sum g tau, E1 = sum g tau (x - alpha),
// L0 = sum dl, R1 = sum dl (x - mu), R2 = sum dl (x - mu)^2 with dl = d loss / d logit.
// Without need_param_grads only E0, E1 are reduced (the last three stay 0).
template <typename T, int K, bool Params>
MIX_PASS void apply_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  constexpr int L = kLanes<T>;
  Lanes<T, 5, K> acc(a.G);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    T al[K];
    ch.table(a.alpha, 0, al);
    acc.reset();
    for (int64_t n = 0; n < a.N; ++n) {
      int64_t g = ch.group(n);
      T l0[K], Ag[K];
      ch.table(a.lc, g, l0);
      ch.table(a.A, g, Ag);
      acc.row(g);
      const T* __restrict__ xr = ch.row(a.x, n);
      const T* __restrict__ gr = ch.row(a.grad, n);
      T* __restrict__ dxr = ch.row(a.out, n);
      if (n + 1 < a.N) {
        prefetch_row(ch.row(a.x, n + 1), a.P);
        prefetch_row(ch.row(a.grad, n + 1), a.P);
        prefetch_row(ch.row(a.out, n + 1), a.P, true);
      }
      T* __restrict__ s = acc.at(0, 0);
      for_positions<L>(a.P, [=](int64_t p, int j) {
        T t[K], u[K];
        T xv = xr[p], gv = gr[p];
        responsibilities<T, K>(xv, ch.m, ch.hh, l0, t);
        T yhat = 0, direct = 0;
        MIX_UNROLL
        for (int k = 0; k < K; ++k) {
          u[k] = Ag[k] * (xv - al[k]);
          yhat += t[k] * u[k];
          direct += t[k] * Ag[k];
        }
        T through_logits = 0;
        MIX_UNROLL
        for (int k = 0; k < K; ++k) {
          T gt = gv * t[k];
          T dl = gt * (u[k] - yhat);
          T d = xv - ch.m[k];
          s[k * L + j] += gt;
          s[(K + k) * L + j] += gt * (xv - al[k]);
          if (Params) {
            s[(2 * K + k) * L + j] += dl;
            s[(3 * K + k) * L + j] += dl * d;
            s[(4 * K + k) * L + j] += dl * d * d;
          }
          through_logits += dl * ch.hh[k] * d;
        }
        dxr[p] = gv * direct - T(2) * through_logits;
      });
    }
    acc.store(a.red, c, a.C);
  }
}

// Backward of stats given dS (3, K, C); adds the input gradient to `out` (apply_backward's
// result), so the layer writes one input-gradient tensor. red (3, G, K, C): L0, R1, R2 as in
// apply_backward (0 without need_param_grads).
template <typename T, int K, bool Params>
MIX_PASS void stats_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  constexpr int L = kLanes<T>;
  Lanes<T, 3, K> acc(a.G);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    T d0[K], d1[K], d2[K];
    ch.table(a.dS, 0, d0);
    ch.table(a.dS, 1, d1);
    ch.table(a.dS, 2, d2);
    const T sh = static_cast<const T*>(a.shift)[c];
    acc.reset();
    for (int64_t n = 0; n < a.N; ++n) {
      int64_t g = ch.group(n);
      T l0[K];
      ch.table(a.lc, g, l0);
      acc.row(g);
      const T* __restrict__ xr = ch.row(a.x, n);
      T* __restrict__ dxr = ch.row(a.out, n);
      if (n + 1 < a.N) {
        prefetch_row(ch.row(a.x, n + 1), a.P);
        prefetch_row(ch.row(a.out, n + 1), a.P, true);
      }
      T* __restrict__ s = acc.at(0, 0);
      for_positions<L>(a.P, [=](int64_t p, int j) {
        T t[K], e[K];
        T xv = xr[p];
        responsibilities<T, K>(xv, ch.m, ch.hh, l0, t);
        T xt = xv - sh;
        T ebar = 0, direct = 0;
        MIX_UNROLL
        for (int k = 0; k < K; ++k) {
          e[k] = d0[k] + (d1[k] + d2[k] * xt) * xt;
          ebar += t[k] * e[k];
          direct += t[k] * (d1[k] + T(2) * d2[k] * xt);
        }
        T through_logits = 0;
        MIX_UNROLL
        for (int k = 0; k < K; ++k) {
          T dl = t[k] * (e[k] - ebar);
          T d = xv - ch.m[k];
          if (Params) {
            s[k * L + j] += dl;
            s[(K + k) * L + j] += dl * d;
            s[(2 * K + k) * L + j] += dl * d * d;
          }
          through_logits += dl * ch.hh[k] * d;
        }
        dxr[p] += direct - T(2) * through_logits;
      });
    }
    acc.store(a.red, c, a.C);
  }
}

template <typename T, int K>
struct StatsPass { static void run(const MixArgs& a, int64_t c0, int64_t c1) { stats<T, K>(a, c0, c1); } };
template <typename T, int K>
struct ApplyPass { static void run(const MixArgs& a, int64_t c0, int64_t c1) { apply<T, K>(a, c0, c1); } };
template <typename T, int K>
struct ApplyBackwardPass {
  static void run(const MixArgs& a, int64_t c0, int64_t c1) {
    a.need_param_grads ? apply_backward<T, K, true>(a, c0, c1) : apply_backward<T, K, false>(a, c0, c1);
  }
};
template <typename T, int K>
struct StatsBackwardPass {
  static void run(const MixArgs& a, int64_t c0, int64_t c1) {
    a.need_param_grads ? stats_backward<T, K, true>(a, c0, c1) : stats_backward<T, K, false>(a, c0, c1);
  }
};

template <typename T, template <typename, int> class Pass>
int run_k(const MixArgs& a, int64_t c0, int64_t c1) {
  switch (a.K) {
    case 1: Pass<T, 1>::run(a, c0, c1); return 0;
    case 2: Pass<T, 2>::run(a, c0, c1); return 0;
    case 3: Pass<T, 3>::run(a, c0, c1); return 0;
    case 4: Pass<T, 4>::run(a, c0, c1); return 0;
    case 5: Pass<T, 5>::run(a, c0, c1); return 0;
    case 6: Pass<T, 6>::run(a, c0, c1); return 0;
    case 7: Pass<T, 7>::run(a, c0, c1); return 0;
    case 8: Pass<T, 8>::run(a, c0, c1); return 0;
    default: return 1;
  }
}

template <template <typename, int> class Pass>
int run(int is_double, const MixArgs* a, int threads) {
  int failed = 0;
  const int64_t C = a->C;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
  for (int t = 0; t < threads; ++t) {
    const int64_t c0 = C * t / threads, c1 = C * (t + 1) / threads;
    failed |= is_double ? run_k<double, Pass>(*a, c0, c1) : run_k<float, Pass>(*a, c0, c1);
  }
  return failed;
}

}  // namespace

extern "C" {
int mix_stats(int is_double, const MixArgs* a, int threads) { return run<StatsPass>(is_double, a, threads); }
int mix_apply(int is_double, const MixArgs* a, int threads) { return run<ApplyPass>(is_double, a, threads); }
int mix_apply_backward(int is_double, const MixArgs* a, int threads) { return run<ApplyBackwardPass>(is_double, a, threads); }
int mix_stats_backward(int is_double, const MixArgs* a, int threads) { return run<StatsBackwardPass>(is_double, a, threads); }
}
