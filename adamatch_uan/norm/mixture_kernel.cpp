// Fused CPU passes of the mixture normalizing transform (ALGORITHMS.md section 2).
//
// Layout: x is (N, C, P) contiguous, P = product of spatial sizes. Per channel c the
// responsibilities of sample n come from a 1-D Gaussian mixture whose log-prior table is
// chosen by the sample's context (group) g = ctx[n]:
//     logit_k(x) = lc[g,k,c] - h[k,c] * (x - mu[k,c])^2,   tau = softmax_k(logit)
// where h = 1 / (2 sigma^2) and lc = log lambda - 0.5 log(2 pi sigma^2).
// Each pass recomputes tau in registers instead of storing a (N, K, C, P) tensor, so the
// layer reads x once per pass, as BatchNorm does; for small inputs (MixArgs.tau set) the
// forward's stats pass stores tau and the three later passes read it instead of
// recomputing K exponentials per element. Channels are independent and are split
// between OpenMP threads; built with -fopenmp, the kernel binds to the libgomp that torch
// has already loaded, so it shares torch's thread pool.
//
// Spatial inputs (P > 1): positions are processed in blocks of one vector register (L lanes)
// with per-lane accumulators kept across rows, so short rows (small P) pay no horizontal
// reduction per row; lanes are flushed into double totals every few rows and whenever the
// group changes. Flat inputs (P == 1, x is (N, C)): the SIMD loop runs across the channels
// of a sample, each lane with its own channel's tables and accumulators.
//
// Two exported calls, each over channel ranges split between threads, each thread doing
// every step for its channels (no step needs another channel's results):
// mix_forward (UAN's parametrisation, the logit tables, the stats pass (shift and sums),
// alpha, delta^2 and A, running averages, the output pass) and mix_backward (the output
// pass's backward (input gradient and reductions), the gradient of the sums, the stats
// pass's backward (the rest of the input gradient), every parameter gradient, the chain
// through the parametrisation). The (K, C)-sized maths lives here too, so the Python side
// issues no small torch ops around the calls.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
  const void* x;             // (N, C, P) input
  const int64_t* ctx;        // (N,) group ids, or null for group 0
  const void* grad;          // (N, C, P) upstream gradient (backward)
  int64_t N, C, P, K, G;
  const void* mu;            // (K, C)
  const void* weight_param;  // (G, K, C) prior logits p (parametrised), else unused
  const void* var_param;     // (K, C) softplus pre-activation r (parametrised), else unused
  const void* gamma;         // (C,)
  const void* beta;          // (C,)
  double eps;
  int64_t parametrised;      // lambda = w + (1 - K w) softmax_k(p), sigma^2 = softplus(r) + min_var
  double min_weight, min_var;
  void* log_weight;          // (G, K, C) log lambda: written by mix_forward when parametrised, else given
  void* var;                 // (K, C) sigma^2: written by mix_forward when parametrised, else given
  void* h;                   // (K, C) 1 / (2 sigma^2): written by mix_forward
  void* lc;                  // (G, K, C) log lambda - 0.5 log(2 pi sigma^2): written by mix_forward
  void* shift;               // (C,) shift of the sums: written by mix_forward
  void* sums;                // (3, K, C) batch sums: written by mix_forward; null with given statistics
  void* alpha;               // (K, C) alpha_k: written from the sums, or given
  void* delta2;              // (K, C) delta_k^2: written from the sums, or given
  void* A;                   // (G, K, C) output scales: written by mix_forward
  void* running_mean;        // (K, C) running alpha, updated in place by mix_forward; or null
  void* running_var;         // (K, C) running delta^2 (corrected by S0 / (S0 - 1)); or null
  double momentum;
  void* out;                 // (N, C, P) output (forward) or input gradient (backward)
  void* tau;                 // responsibilities cached by mix_forward's stats pass for the other passes; or null
  // Gradients written by mix_backward: w.r.t. weight_param (or log lambda), mu, var_param
  // (or sigma^2), given alpha and delta^2, gamma, beta.
  void *g_weight, *g_mu, *g_var, *g_alpha, *g_delta2, *g_gamma, *g_beta;
  int64_t need_param_grads;
  // Scratch of mix_backward, set by the call itself.
  void* dS;                  // (3, K, C) gradient of the sums
  void* red;                 // (5, G, K, C) reductions of the output backward
  void* red2;                // (3, G, K, C) reductions of the stats backward
};

template <typename T>
constexpr int kLanes = 64 / sizeof(T);
// Rows summed in lanes before a flush to double: bounds float accumulation error.
constexpr int kFlushRows = 8;
// The largest K the calls serve (run_k's cases).
constexpr int kMaxK = 8;

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

template <typename T, int K, typename Tab>
MIX_INLINE void responsibilities(T xv, const Tab& m, const Tab& hh, const Tab& l0, T* t) {
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

// Context (group) of sample n.
MIX_INLINE int64_t row_group(const MixArgs& a, int64_t n) { return a.ctx ? a.ctx[n] : 0; }

// Where a pass gets the responsibilities: recomputed in registers, also stored to, or
// loaded from a cache (MixArgs.tau) that holds one row's K components `stride` apart.
enum TauMode { kRecompute, kStore, kLoad };
template <typename T, int K, int Mode>
struct TauRow {
  T* cache;
  int64_t stride;
  template <typename Tab>
  MIX_INLINE void get(T xv, const Tab& m, const Tab& hh, const Tab& l0, int64_t i, T* t) const {
    if (Mode == kLoad) {
      MIX_UNROLL
      for (int k = 0; k < K; ++k) t[k] = cache[k * stride + i];
      return;
    }
    responsibilities<T, K, Tab>(xv, m, hh, l0, t);
    if (Mode == kStore) {
      MIX_UNROLL
      for (int k = 0; k < K; ++k) cache[k * stride + i] = t[k];
    }
  }
};

// The cache row of sample n (and channel c): laid out (N, K, C) for flat inputs, indexed
// by channel; (N, C, K, P) otherwise, indexed by position.
template <typename T, int K, int Mode>
MIX_INLINE TauRow<T, K, Mode> tau_row(const MixArgs& a, int64_t n, int64_t c) {
  if (Mode == kRecompute) return {nullptr, 0};
  T* base = static_cast<T*>(a.tau);
  if (a.P == 1) return {base + n * K * a.C, a.C};
  return {base + (n * a.C + c) * K * a.P, a.P};
}

// ---- Per-element maths, shared by both layouts; add(r, k, v) accumulates reduction r. ----

// Stats: tau_k * {1, xt, xt^2}, xt = x - shift.
template <typename T, int K, typename Tab, typename Tau, typename Add>
MIX_INLINE void stats_element(const Tau& tau, int64_t i, T xv, const Tab& m, const Tab& hh, const Tab& l0, T sh, Add&& add) {
  T t[K];
  tau.get(xv, m, hh, l0, i, t);
  const T xt = xv - sh;
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    add(0, k, t[k]);
    add(1, k, t[k] * xt);
    add(2, k, t[k] * xt * xt);
  }
}

// Output: y = beta + sum_k tau_k * A[g,k] * (x - alpha_k).
template <typename T, int K, typename Tab, typename Tau>
MIX_INLINE T apply_element(const Tau& tau, int64_t i, T xv, const Tab& m, const Tab& hh, const Tab& l0, const Tab& Ag, const Tab& al, T b) {
  T t[K];
  tau.get(xv, m, hh, l0, i, t);
  T s = b;
  MIX_UNROLL
  for (int k = 0; k < K; ++k) s += t[k] * Ag[k] * (xv - al[k]);
  return s;
}

// Backward of apply: returns d loss / dx and accumulates E0 = g tau, E1 = g tau (x - alpha)
// and, with Params, L0 = dl, R1 = dl (x - mu), R2 = dl (x - mu)^2, dl = d loss / d logit.
template <typename T, int K, bool Params, typename Tab, typename Tau, typename Add>
MIX_INLINE T apply_backward_element(const Tau& tau, int64_t i, T xv, T gv, const Tab& m, const Tab& hh, const Tab& l0, const Tab& Ag,
                                    const Tab& al, Add&& add) {
  T t[K], u[K];
  tau.get(xv, m, hh, l0, i, t);
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
    const T gt = gv * t[k];
    const T dl = gt * (u[k] - yhat);
    const T d = xv - m[k];
    add(0, k, gt);
    add(1, k, gt * (xv - al[k]));
    if (Params) {
      add(2, k, dl);
      add(3, k, dl * d);
      add(4, k, dl * d * d);
    }
    through_logits += dl * hh[k] * d;
  }
  return gv * direct - T(2) * through_logits;
}

// Backward of stats given dS: returns the part of d loss / dx and, with Params,
// accumulates L0, R1, R2 as above.
template <typename T, int K, bool Params, typename Tab, typename Tau, typename Add>
MIX_INLINE T stats_backward_element(const Tau& tau, int64_t i, T xv, const Tab& m, const Tab& hh, const Tab& l0, T sh, const Tab& d0,
                                    const Tab& d1, const Tab& d2, Add&& add) {
  T t[K], e[K];
  tau.get(xv, m, hh, l0, i, t);
  const T xt = xv - sh;
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
    const T dl = t[k] * (e[k] - ebar);
    const T d = xv - m[k];
    if (Params) {
      add(0, k, dl);
      add(1, k, dl * d);
      add(2, k, dl * d * d);
    }
    through_logits += dl * hh[k] * d;
  }
  return direct - T(2) * through_logits;
}

// ---- Spatial layout (P > 1): SIMD along the positions of one (sample, channel) row. ----

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
  // add(r, k, v) for lane j.
  MIX_INLINE auto adder(int j) {
    T* s = v;
    return [s, j](int r, int k, T value) { s[(r * K + k) * L + j] += value; };
  }
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
  int64_t group(int64_t n) const { return row_group(a, n); }
  // table laid out (R, K, C): row r of channel c.
  void table(const void* t, int64_t r, T* dst) const {
    MIX_UNROLL
    for (int k = 0; k < K; ++k) dst[k] = static_cast<const T*>(t)[(r * K + k) * a.C + c];
  }
  const T* row(const void* base, int64_t n) const { return static_cast<const T*>(base) + (n * a.C + c) * a.P; }
  T* row(void* base, int64_t n) const { return static_cast<T*>(base) + (n * a.C + c) * a.P; }
};

// red (3, 1, K, C) = sums of tau_k * {1, xt, xt^2}, xt = x - shift[c].
template <typename T, int K, int Mode>
MIX_PASS void stats(const MixArgs& a, int64_t c0, int64_t c1) {
  constexpr int L = kLanes<T>;
  Lanes<T, 3, K> acc(1);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    const T sh = ch.row(a.x, 0)[0];
    static_cast<T*>(a.shift)[c] = sh;
    acc.reset();
    for (int64_t n = 0; n < a.N; ++n) {
      T l0[K];
      ch.table(a.lc, ch.group(n), l0);
      acc.row(0);
      const T* __restrict__ xr = ch.row(a.x, n);
      const auto tau = tau_row<T, K, Mode>(a, n, c);
      if (n + 1 < a.N) prefetch_row(ch.row(a.x, n + 1), a.P);
      for_positions<L>(a.P, [&](int64_t p, int j) {
        stats_element<T, K, const T*>(tau, p, xr[p], ch.m, ch.hh, l0, sh, acc.adder(j));
      });
    }
    acc.store(a.sums, c, a.C);
  }
}

// y = beta + sum_k tau_k * A[g,k] * (x - alpha_k)
template <typename T, int K, int Mode>
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
      const auto tau = tau_row<T, K, Mode>(a, n, c);
      T* __restrict__ yr = ch.row(a.out, n);
      if (n + 1 < a.N) {
        prefetch_row(ch.row(a.x, n + 1), a.P);
        prefetch_row(ch.row(a.out, n + 1), a.P, true);
      }
      for_positions<L>(a.P, [&](int64_t p, int) { yr[p] = apply_element<T, K, const T*>(tau, p, xr[p], ch.m, ch.hh, l0, Ag, al, b); });
    }
  }
}

// Backward of apply. red (5, G, K, C): E0, E1, L0, R1, R2 of apply_backward_element.
// Without need_param_grads only E0, E1 are reduced (the last three stay 0).
template <typename T, int K, bool Params, int Mode>
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
      const auto tau = tau_row<T, K, Mode>(a, n, c);
      const T* __restrict__ gr = ch.row(a.grad, n);
      T* __restrict__ dxr = ch.row(a.out, n);
      if (n + 1 < a.N) {
        prefetch_row(ch.row(a.x, n + 1), a.P);
        prefetch_row(ch.row(a.grad, n + 1), a.P);
        prefetch_row(ch.row(a.out, n + 1), a.P, true);
      }
      for_positions<L>(a.P, [&](int64_t p, int j) {
        dxr[p] = apply_backward_element<T, K, Params, const T*>(tau, p, xr[p], gr[p], ch.m, ch.hh, l0, Ag, al, acc.adder(j));
      });
    }
    acc.store(a.red, c, a.C);
  }
}

// Backward of stats given dS (3, K, C); adds the input gradient to `out` (apply_backward's
// result), so the layer writes one input-gradient tensor. red (3, G, K, C): L0, R1, R2
// (0 without need_param_grads).
template <typename T, int K, bool Params, int Mode>
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
      const auto tau = tau_row<T, K, Mode>(a, n, c);
      T* __restrict__ dxr = ch.row(a.out, n);
      if (n + 1 < a.N) {
        prefetch_row(ch.row(a.x, n + 1), a.P);
        prefetch_row(ch.row(a.out, n + 1), a.P, true);
      }
      for_positions<L>(a.P, [&](int64_t p, int j) {
        dxr[p] += stats_backward_element<T, K, Params, const T*>(tau, p, xr[p], ch.m, ch.hh, l0, sh, d0, d1, d2, acc.adder(j));
      });
    }
    acc.store(a.red2, c, a.C);
  }
}

// ---- Flat layout (P == 1, x is (N, C)): SIMD along the channels of one sample. ----
// Each lane is its own channel, so the per-channel tables are loaded as vectors and the
// reductions are accumulated per channel directly; no transpose, and contexts are per row.

// Float accumulators per (R, G, K, channel of [c0, c1)), flushed into double totals.
template <typename T, int R, int K>
struct ChannelSums {
  int64_t G, width;
  std::vector<T> v;
  std::vector<double> total;
  int rows = 0;
  ChannelSums(int64_t groups, int64_t c0, int64_t c1)
      : G(groups), width(c1 - c0), v(R * groups * K * (c1 - c0)), total(v.size()) {}
  // Accumulator of (r, k, channel c) for group g is at(g)[r * rstride() + k * width + c]:
  // a plain local pointer hoisted out of the SIMD loop.
  T* at(int64_t g, int64_t c0) { return v.data() + g * K * width - c0; }
  int64_t rstride() const { return G * K * width; }
  void row() {
    if (++rows == kFlushRows * kLanes<T>) flush();
  }
  void flush() {
    for (size_t i = 0; i < v.size(); ++i) total[i] += v[i];
    std::fill(v.begin(), v.end(), T(0));
    rows = 0;
  }
  // Writes the totals into red laid out (R, G, K, C), channels [c0, c0 + width).
  void store(void* red, int64_t c0, int64_t C) {
    flush();
    T* out = static_cast<T*>(red);
    for (int64_t rgk = 0; rgk < R * G * K; ++rgk)
      for (int64_t i = 0; i < width; ++i) out[rgk * C + c0 + i] = static_cast<T>(total[rgk * width + i]);
  }
};

// Row r of a table laid out (R, K, C), as a typed pointer hoisted out of the SIMD loop
// (a load through MixArgs' void pointers inside it stops vectorization).
template <typename T>
MIX_INLINE const T* __restrict__ table_row(const void* t, int64_t r, int64_t K, int64_t C) {
  return static_cast<const T*>(t) + r * K * C;
}

// Entry [k] is t[k, c] of a (K, C) table row: read where used, so each lane loads its own
// channel's value as part of one vector load.
template <typename T>
struct Column {
  const T* __restrict__ t;
  int64_t C, c;
  MIX_INLINE T operator[](int k) const { return t[k * C + c]; }
};

template <typename T, int K, int Mode>
MIX_PASS void stats_flat(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t C = a.C;
  const T* __restrict__ mu = table_row<T>(a.mu, 0, K, C);
  const T* __restrict__ h = table_row<T>(a.h, 0, K, C);
  ChannelSums<T, 3, K> acc(1, c0, c1);
  T* sh = static_cast<T*>(a.shift);
  for (int64_t c = c0; c < c1; ++c) sh[c] = static_cast<const T*>(a.x)[c];
  for (int64_t n = 0; n < a.N; ++n) {
    const T* __restrict__ xr = static_cast<const T*>(a.x) + n * C;
    const auto tau = tau_row<T, K, Mode>(a, n, 0);
    const int64_t g = row_group(a, n);
    const T* __restrict__ lc_g = table_row<T>(a.lc, g, K, C);
    T* __restrict__ s = acc.at(0, c0);
    const int64_t w = acc.width, rs = acc.rstride();
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const Column<T> m{mu, C, c};
      const Column<T> hh{h, C, c};
      const Column<T> l0{lc_g, C, c};
      stats_element<T, K, Column<T>>(tau, c, xr[c], m, hh, l0, sh[c], [=](int r, int k, T value) { s[r * rs + k * w + c] += value; });
    }
    acc.row();
  }
  acc.store(a.sums, c0, a.C);
}

template <typename T, int K, int Mode>
MIX_PASS void apply_flat(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t C = a.C;
  const T* __restrict__ mu = table_row<T>(a.mu, 0, K, C);
  const T* __restrict__ h = table_row<T>(a.h, 0, K, C);
  const T* __restrict__ alpha = table_row<T>(a.alpha, 0, K, C);
  const T* beta = static_cast<const T*>(a.beta);
  for (int64_t n = 0; n < a.N; ++n) {
    const T* __restrict__ xr = static_cast<const T*>(a.x) + n * C;
    const auto tau = tau_row<T, K, Mode>(a, n, 0);
    T* __restrict__ yr = static_cast<T*>(a.out) + n * C;
    const int64_t g = row_group(a, n);
    const T* __restrict__ lc_g = table_row<T>(a.lc, g, K, C);
    const T* __restrict__ A_g = table_row<T>(a.A, g, K, C);
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const Column<T> m{mu, C, c};
      const Column<T> hh{h, C, c};
      const Column<T> l0{lc_g, C, c};
      const Column<T> Ag{A_g, C, c};
      const Column<T> al{alpha, C, c};
      yr[c] = apply_element<T, K, Column<T>>(tau, c, xr[c], m, hh, l0, Ag, al, beta[c]);
    }
  }
}

template <typename T, int K, bool Params, int Mode>
MIX_PASS void apply_backward_flat(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t C = a.C;
  const T* __restrict__ mu = table_row<T>(a.mu, 0, K, C);
  const T* __restrict__ h = table_row<T>(a.h, 0, K, C);
  const T* __restrict__ alpha = table_row<T>(a.alpha, 0, K, C);
  ChannelSums<T, 5, K> acc(a.G, c0, c1);
  for (int64_t n = 0; n < a.N; ++n) {
    const T* __restrict__ xr = static_cast<const T*>(a.x) + n * C;
    const auto tau = tau_row<T, K, Mode>(a, n, 0);
    const T* __restrict__ gr = static_cast<const T*>(a.grad) + n * C;
    T* __restrict__ dxr = static_cast<T*>(a.out) + n * C;
    const int64_t g = row_group(a, n);
    const T* __restrict__ lc_g = table_row<T>(a.lc, g, K, C);
    const T* __restrict__ A_g = table_row<T>(a.A, g, K, C);
    T* __restrict__ s = acc.at(g, c0);
    const int64_t w = acc.width, rs = acc.rstride();
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const Column<T> m{mu, C, c};
      const Column<T> hh{h, C, c};
      const Column<T> l0{lc_g, C, c};
      const Column<T> Ag{A_g, C, c};
      const Column<T> al{alpha, C, c};
      dxr[c] = apply_backward_element<T, K, Params, Column<T>>(tau, c, xr[c], gr[c], m, hh, l0, Ag, al, [=](int r, int k, T value) { s[r * rs + k * w + c] += value; });
    }
    acc.row();
  }
  acc.store(a.red, c0, a.C);
}

template <typename T, int K, bool Params, int Mode>
MIX_PASS void stats_backward_flat(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t C = a.C;
  const T* __restrict__ mu = table_row<T>(a.mu, 0, K, C);
  const T* __restrict__ h = table_row<T>(a.h, 0, K, C);
  const T* __restrict__ dS = table_row<T>(a.dS, 0, K, C);
  const T* __restrict__ dS_1 = table_row<T>(a.dS, 1, K, C);
  const T* __restrict__ dS_2 = table_row<T>(a.dS, 2, K, C);
  ChannelSums<T, 3, K> acc(a.G, c0, c1);
  const T* sh = static_cast<const T*>(a.shift);
  for (int64_t n = 0; n < a.N; ++n) {
    const T* __restrict__ xr = static_cast<const T*>(a.x) + n * C;
    const auto tau = tau_row<T, K, Mode>(a, n, 0);
    T* __restrict__ dxr = static_cast<T*>(a.out) + n * C;
    const int64_t g = row_group(a, n);
    const T* __restrict__ lc_g = table_row<T>(a.lc, g, K, C);
    T* __restrict__ s = acc.at(g, c0);
    const int64_t w = acc.width, rs = acc.rstride();
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const Column<T> m{mu, C, c};
      const Column<T> hh{h, C, c};
      const Column<T> l0{lc_g, C, c};
      const Column<T> d0{dS, C, c};
      const Column<T> d1{dS_1, C, c};
      const Column<T> d2{dS_2, C, c};
      dxr[c] += stats_backward_element<T, K, Params, Column<T>>(tau, c, xr[c], m, hh, l0, sh[c], d0, d1, d2, [=](int r, int k, T value) { s[r * rs + k * w + c] += value; });
    }
    acc.row();
  }
  acc.store(a.red2, c0, a.C);
}

// ---- The (K, C)-sized maths between the passes (ALGORITHMS.md section 2 and the backward
// derived in mixture.py), per channel, so a call needs no small torch ops around it. ----

// Moments of component entry i from the sums S (3, K, C): S0 floored at sqrt(tiny) (an
// empty component gets alpha = shift, delta^2 = 0), S1 / S0 and S2 / S0.
template <typename T>
struct Moments {
  T safe, m1, m2;
  Moments(const void* sums, int64_t i, int64_t KC) {
    const T* S = static_cast<const T*>(sums);
    safe = std::max(S[i], std::sqrt(std::numeric_limits<T>::min()));
    m1 = S[KC + i] / safe;
    m2 = S[2 * KC + i] / safe;
  }
};

// alpha, delta^2 from the sums (unless given), then A[g,k] = gamma lambda_gk^(-1/2) (delta_k^2 + eps)^(-1/2).
template <typename T>
void output_tables(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C, G = a.G;
  T* alpha = static_cast<T*>(a.alpha);
  T* delta2 = static_cast<T*>(a.delta2);
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k * C + c;
      if (a.sums) {
        const Moments<T> s(a.sums, i, K * C);
        alpha[i] = static_cast<const T*>(a.shift)[c] + s.m1;
        delta2[i] = std::max(s.m2 - s.m1 * s.m1, T(0));
      }
      const T rstd = T(1) / std::sqrt(delta2[i] + T(a.eps));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t gi = g * K * C + i;
        static_cast<T*>(a.A)[gi] = static_cast<const T*>(a.gamma)[c] *
                                   std::exp(T(-0.5) * static_cast<const T*>(a.log_weight)[gi]) * rstd;
      }
    }
}

// Typed views of the gradient outputs.
template <typename T>
struct Grads {
  T *log_weight, *mu, *var, *alpha, *delta2, *gamma, *beta;
  explicit Grads(const MixArgs& a)
      : log_weight(static_cast<T*>(a.g_weight)), mu(static_cast<T*>(a.g_mu)), var(static_cast<T*>(a.g_var)),
        alpha(static_cast<T*>(a.g_alpha)), delta2(static_cast<T*>(a.g_delta2)), gamma(static_cast<T*>(a.g_gamma)),
        beta(static_cast<T*>(a.g_beta)) {}
};

// From the output pass's reductions E0, E1: dL/dalpha, dL/ddelta^2 and, with batch
// statistics, dL/dS (through alpha = s + S1/S0 and delta^2 = max(S2/S0 - (S1/S0)^2, 0)).
template <typename T>
void sums_gradient(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C, G = a.G, KC = K * C, GKC = G * KC;
  const T* E0 = static_cast<const T*>(a.red);
  const T* E1 = E0 + GKC;
  const T* A = static_cast<const T*>(a.A);
  Grads<T> out(a);
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k * C + c;
      T g_alpha = 0, g_delta2 = 0;
      for (int64_t g = 0; g < G; ++g) {
        g_alpha -= A[g * KC + i] * E0[g * KC + i];
        g_delta2 -= T(0.5) * E1[g * KC + i] * A[g * KC + i];
      }
      g_delta2 /= static_cast<const T*>(a.delta2)[i] + T(a.eps);
      out.alpha[i] = g_alpha;
      out.delta2[i] = g_delta2;
      if (!a.sums) continue;
      const T count = static_cast<const T*>(a.sums)[i];
      const Moments<T> mom(a.sums, i, KC);
      const T safe = mom.safe, m1 = mom.m1, m2 = mom.m2;
      const T g_raw = m2 - m1 * m1 >= 0 ? g_delta2 : T(0);
      T* dS = static_cast<T*>(a.dS);
      dS[i] = count >= safe ? -(g_alpha * m1 + g_raw * (m2 - T(2) * m1 * m1)) / safe : T(0);
      dS[KC + i] = (g_alpha - T(2) * m1 * g_raw) / safe;
      dS[2 * KC + i] = g_raw / safe;
    }
}

// Every parameter gradient from the reductions (red: E0, E1, L0, R1, R2; red2: the stats
// pass's L0, R1, R2, or nothing with given statistics), through h = 1/(2 var) and
// lc = log lambda - 0.5 log(2 pi var).
template <typename T>
void parameter_grads(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C, G = a.G, KC = K * C, GKC = G * KC;
  const T* r = static_cast<const T*>(a.red);
  const T* r2 = static_cast<const T*>(a.red2);
  const T *E0 = r, *E1 = r + GKC, *L0 = r + 2 * GKC, *R1 = r + 3 * GKC, *R2 = r + 4 * GKC;
  const T* A = static_cast<const T*>(a.A);
  Grads<T> out(a);
  for (int64_t c = c0; c < c1; ++c) {
    T g_gamma = 0, g_beta = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k * C + c;
      const T var = static_cast<const T*>(a.var)[i], h = static_cast<const T*>(a.h)[i];
      const T rstd = T(1) / std::sqrt(static_cast<const T*>(a.delta2)[i] + T(a.eps));
      T g_h = 0, g_mu = 0, g_lc_sum = 0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t gi = g * KC + i;
        const T g_lc = L0[gi] + (r2 ? r2[gi] : T(0));
        g_h -= R2[gi] + (r2 ? r2[2 * GKC + gi] : T(0));
        g_mu += R1[gi] + (r2 ? r2[GKC + gi] : T(0));
        g_lc_sum += g_lc;
        out.log_weight[gi] = g_lc - T(0.5) * E1[gi] * A[gi];
        g_gamma += E1[gi] * std::exp(T(-0.5) * static_cast<const T*>(a.log_weight)[gi]) * rstd;
        g_beta += E0[gi];
      }
      out.mu[i] = T(2) * h * g_mu;
      out.var[i] = T(-0.5) * (g_h / var + g_lc_sum) / var;
    }
    out.gamma[c] = g_gamma;
    out.beta[c] = g_beta;
  }
}

// torch's softplus (linear above 20) and its derivative, the logistic function.
template <typename T>
MIX_INLINE T softplus(T r) { return r > T(20) ? r : std::log1p(std::exp(r)); }
template <typename T>
MIX_INLINE T softplus_slope(T r) { return r > T(20) ? T(1) : T(1) / (T(1) + std::exp(-r)); }

// softmax_k(p[g, :, c]) into s[K]; returns log sum_k exp(p_k).
template <typename T>
T prior_softmax(const MixArgs& a, int64_t g, int64_t c, T* s) {
  const T* p = static_cast<const T*>(a.weight_param);
  const int64_t K = a.K, C = a.C;
  T mx = p[g * K * C + c], total = 0;
  for (int64_t k = 1; k < K; ++k) mx = std::max(mx, p[(g * K + k) * C + c]);
  for (int64_t k = 0; k < K; ++k) total += s[k] = std::exp(p[(g * K + k) * C + c] - mx);
  for (int64_t k = 0; k < K; ++k) s[k] /= total;
  return mx + std::log(total);
}

// UAN's parametrisation: log lambda = log(w + (1 - K w) softmax_k(p)) (log_softmax when
// w = 0, so no weight underflows to log 0) and sigma^2 = softplus(r) + min_var.
template <typename T>
void parametrise(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  const T w = T(a.min_weight);
  T s[kMaxK];
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t g = 0; g < a.G; ++g) {
      const T log_total = prior_softmax<T>(a, g, c, s);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = (g * K + k) * C + c;
        static_cast<T*>(a.log_weight)[gi] = w == T(0) ? static_cast<const T*>(a.weight_param)[gi] - log_total
                                                       : std::log(w + (T(1) - T(K) * w) * s[k]);
      }
    }
    for (int64_t k = 0; k < K; ++k)
      static_cast<T*>(a.var)[k * C + c] = softplus(static_cast<const T*>(a.var_param)[k * C + c]) + T(a.min_var);
  }
}

// The chain rule through parametrise, in place on the gradients of log lambda and sigma^2:
// dL/dp_j = r_j dL/dlog lambda_j - s_j sum_k r_k dL/dlog lambda_k with r = (1 - K w) s / lambda
// (1 when w = 0), and dL/dr = dL/dsigma^2 softplus'(r).
template <typename T>
void parametrise_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  const T w = T(a.min_weight);
  T s[kMaxK], ratio[kMaxK];
  Grads<T> grad(a);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t g = 0; g < a.G; ++g) {
      prior_softmax<T>(a, g, c, s);
      T total = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = (g * K + k) * C + c;
        ratio[k] = w == T(0) ? T(1) : (T(1) - T(K) * w) * s[k] / std::exp(static_cast<const T*>(a.log_weight)[gi]);
        total += ratio[k] * grad.log_weight[gi];
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = (g * K + k) * C + c;
        grad.log_weight[gi] = ratio[k] * grad.log_weight[gi] - s[k] * total;
      }
    }
    for (int64_t k = 0; k < K; ++k)
      grad.var[k * C + c] *= softplus_slope(static_cast<const T*>(a.var_param)[k * C + c]);
  }
}

// h = 1 / (2 sigma^2), lc = log lambda - 0.5 log(2 pi sigma^2).
template <typename T>
void logit_terms(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t k = 0; k < K; ++k) {
      const T var = static_cast<const T*>(a.var)[k * C + c];
      static_cast<T*>(a.h)[k * C + c] = T(0.5) / var;
      const T log_norm = T(0.5) * std::log(T(2 * M_PI) * var);
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t gi = (g * K + k) * C + c;
        static_cast<T*>(a.lc)[gi] = static_cast<const T*>(a.log_weight)[gi] - log_norm;
      }
    }
}

// Running averages as BatchNorm keeps them: r <- r + momentum (batch - r), with delta^2
// corrected by S0 / max(S0 - 1, 1) (n / (n - 1) at K = 1).
template <typename T>
void track_running(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  const T m = T(a.momentum);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i = k * C + c;
      const T count = static_cast<const T*>(a.sums)[i];
      const T unbiased = static_cast<const T*>(a.delta2)[i] * count / std::max(count - T(1), T(1));
      T& mean = static_cast<T*>(a.running_mean)[i];
      T& var = static_cast<T*>(a.running_var)[i];
      mean += m * (static_cast<const T*>(a.alpha)[i] - mean);
      var += m * (unbiased - var);
    }
}

// The forward of one channel range: tables, sums (batch statistics only), alpha, delta^2
// and A, running averages, output. Channels are independent, so a thread needs no other's results.
template <typename T, int K>
struct ForwardPass {
  template <int Mode>
  static void stats_pass(const MixArgs& a, int64_t c0, int64_t c1) {
    a.P == 1 ? stats_flat<T, K, Mode>(a, c0, c1) : stats<T, K, Mode>(a, c0, c1);
  }
  template <int Mode>
  static void apply_pass(const MixArgs& a, int64_t c0, int64_t c1) {
    a.P == 1 ? apply_flat<T, K, Mode>(a, c0, c1) : apply<T, K, Mode>(a, c0, c1);
  }
  static void run(const MixArgs& a, int64_t c0, int64_t c1) {
    if (a.parametrised) parametrise<T>(a, c0, c1);
    logit_terms<T>(a, c0, c1);
    if (a.sums) a.tau ? stats_pass<kStore>(a, c0, c1) : stats_pass<kRecompute>(a, c0, c1);
    output_tables<T>(a, c0, c1);
    if (a.sums && a.running_mean) track_running<T>(a, c0, c1);
    a.tau ? apply_pass<kLoad>(a, c0, c1) : apply_pass<kRecompute>(a, c0, c1);
  }
};

// The backward of one channel range: the output pass (input gradient's direct part and
// reductions), the sums' gradient, the stats pass (batch statistics only), which adds its
// part of the input gradient, every parameter gradient, and the chain through parametrise.
template <typename T, int K>
struct BackwardPass {
  template <bool Params, int Mode>
  static void passes(const MixArgs& a, int64_t c0, int64_t c1) {
    a.P == 1 ? apply_backward_flat<T, K, Params, Mode>(a, c0, c1) : apply_backward<T, K, Params, Mode>(a, c0, c1);
    sums_gradient<T>(a, c0, c1);
    if (a.sums)
      a.P == 1 ? stats_backward_flat<T, K, Params, Mode>(a, c0, c1) : stats_backward<T, K, Params, Mode>(a, c0, c1);
  }
  template <bool Params>
  static void passes(const MixArgs& a, int64_t c0, int64_t c1) {
    a.tau ? passes<Params, kLoad>(a, c0, c1) : passes<Params, kRecompute>(a, c0, c1);
  }
  static void run(const MixArgs& a, int64_t c0, int64_t c1) {
    a.need_param_grads ? passes<true>(a, c0, c1) : passes<false>(a, c0, c1);
    parameter_grads<T>(a, c0, c1);
    if (a.parametrised) parametrise_backward<T>(a, c0, c1);
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
int mix_forward(int is_double, const MixArgs* a, int threads) { return run<ForwardPass>(is_double, a, threads); }
int mix_backward(int is_double, const MixArgs* a, int threads) {
  // Scratch for dS, red, red2, laid out as MixArgs describes.
  const int64_t KC = a->K * a->C, GKC = a->G * KC;
  std::vector<double> scratch(3 * KC + 8 * GKC);
  MixArgs b = *a;
  char* base = reinterpret_cast<char*>(scratch.data());
  const int64_t size = is_double ? sizeof(double) : sizeof(float);
  b.dS = base;
  b.red = base + 3 * KC * size;
  b.red2 = base + (3 * KC + 5 * GKC) * size;
  return run<BackwardPass>(is_double, &b, threads);
}
}
