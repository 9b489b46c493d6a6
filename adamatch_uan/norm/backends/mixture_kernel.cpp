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
// Every pass works on blocks of one vector register (gcc's vector types), each taken down
// a chunk of rows with its tables and reductions in registers: positions of a (sample,
// channel) row for spatial inputs (P > 1), channels of a sample for flat inputs (P == 1,
// x is (N, C)); the lanes are flushed into double totals after every chunk. Rows are
// visited group by group, and what is left of a row or channel range after the full
// vectors runs the same code on single elements.
//
// Two calls (mixture_kernel.h), each over channel ranges split between threads, each
// thread doing every step for its channels (no step needs another channel's results):
// mix_forward (UAN's parametrisation, the logit tables, the stats pass (shift and sums),
// alpha, delta^2 and A, running averages, the output pass) and mix_backward (the output
// pass's backward (input gradient and reductions), the gradient of the sums, the stats
// pass's backward (the rest of the input gradient), every parameter gradient, the chain
// through the parametrisation). The (K, C)-sized maths lives here too, so the autograd
// node (mixture_node.cpp) issues no small torch ops around the calls.
#include "mixture_kernel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

// gcc's inliner gives up on some K in these deep loops, and a call inside a block's row
// loop would spill its registers, so the per-element helpers are always inlined.
#define MIX_INLINE inline __attribute__((always_inline))
// Loops over components are unrolled (up to kMaxK of them) so per-element arrays (t[K], ...) live in registers.
#define MIX_PRAGMA(text) _Pragma(#text)
#define MIX_UNROLL_BY(n) MIX_PRAGMA(GCC unroll n)
#define MIX_UNROLL MIX_UNROLL_BY(MIX_MAX_K)
// Each pass is a function of its own, which keeps gcc's inlining decisions (and profiles) per pass.
#define MIX_PASS __attribute__((noinline))

namespace {

template <typename T>
constexpr int kLanes = 64 / sizeof(T);
// Rows summed in lanes before a flush to double: bounds float accumulation error.
constexpr int kFlushRows = 8;
// How many rows ahead a flat block prefetches its lanes: its rows are C elements apart, a stride the
// hardware prefetcher follows late, and each element's long chain of maths leaves a load's miss exposed.
constexpr int64_t kFlatAhead = 16;

// ---- Value types. The per-element maths below runs on Vec<T>, gcc's explicit vector of
// one cache line (a block of lanes whose reductions stay in registers across rows, which
// gcc's auto-vectorized omp simd loops kept in memory), and on scalars T (what is left
// after the full vectors). Elem<V> is V's scalar type. ----

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename V>
struct ElemOf {
  using type = V;
};
template <>
struct ElemOf<Vec<float>> {
  using type = float;
};
template <>
struct ElemOf<Vec<double>> {
  using type = double;
};
template <typename V>
using Elem = typename ElemOf<V>::type;

template <typename V>
constexpr bool kIsVec = sizeof(V) == 64;

// static_cast for scalars; a vector static_cast would reinterpret the bits instead.
template <typename To, typename From>
MIX_INLINE To convert(From v) {
  if constexpr (kIsVec<From>) {
    return __builtin_convertvector(v, To);
  } else {
    return static_cast<To>(v);
  }
}

template <typename V>
MIX_INLINE V load(const Elem<V>* p) {
  if constexpr (!kIsVec<V>) {
    return *p;
  } else {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
}

template <typename V>
MIX_INLINE void store(Elem<V>* p, V v) {
  if constexpr (!kIsVec<V>) {
    *p = v;
  } else {
    std::memcpy(p, &v, sizeof(V));
  }
}

// bfloat16 storage: the upper half of a float32's bits. Inputs and outputs may be stored in it
// (BF16 below) while every computation runs in float32: loads widen, stores round to nearest even.
using BF16 = uint16_t;
typedef BF16 BF16Vec __attribute__((vector_size(32)));  // as many lanes as Vec<float>
typedef uint32_t U32Vec __attribute__((vector_size(64)));

// v loaded from storage of type IO (T itself, or BF16 for T = float).
template <typename V, typename IO>
MIX_INLINE V load_io(const IO* p) {
  if constexpr (std::is_same_v<IO, Elem<V>>) {
    return load<V>(p);
  } else if constexpr (kIsVec<V>) {
    BF16Vec h;
    std::memcpy(&h, p, sizeof(h));
    const U32Vec bits = __builtin_convertvector(h, U32Vec) << 16;
    V v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    const uint32_t bits = uint32_t(*p) << 16;
    V v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
}

// v stored to storage of type IO, rounded to nearest even for BF16.
template <typename V, typename IO>
MIX_INLINE void store_io(IO* p, V v) {
  if constexpr (std::is_same_v<IO, Elem<V>>) {
    store<V>(p, v);
  } else if constexpr (kIsVec<V>) {
    U32Vec bits;
    std::memcpy(&bits, &v, sizeof(v));
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const BF16Vec h = __builtin_convertvector(bits, BF16Vec);
    std::memcpy(p, &h, sizeof(h));
  } else {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(v));
    *p = BF16((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  }
}

// Lane j of v (v itself for a scalar).
template <typename V>
MIX_INLINE Elem<V> lane(V v, int j) {
  if constexpr (!kIsVec<V>) {
    return v;
  } else {
    return v[j];
  }
}

// f applied lane by lane (to v itself for a scalar). For floor and sqrt gcc turns the loop
// into one vector instruction; double vectors take libm's exp and logs lane by lane (they
// serve float64, the reference precision, not speed).
template <typename V, typename F>
MIX_INLINE V lanewise(V v, F&& f) {
  if constexpr (kIsVec<V>) {
    for (int j = 0; j < int(sizeof(V) / sizeof(Elem<V>)); ++j) v[j] = f(v[j]);
    return v;
  } else {
    return f(v);
  }
}

template <typename V>
MIX_INLINE V vfloor(V x) {
  return lanewise(x, [](Elem<V> e) { return std::floor(e); });
}

template <typename V>
MIX_INLINE V vsqrt(V x) {
  return lanewise(x, [](Elem<V> e) { return std::sqrt(e); });
}

// The int32 type of V's shape, for the bits of float values.
template <typename V>
using Bits = std::conditional_t<kIsVec<V>, Vec<int32_t>, int32_t>;

// 2^u for u <= 0 (base-2 logits minus their max): u = n + f with n = floor(u) and f in [0, 1),
// 2^f a degree-5 polynomial (minimax in relative error on [0, 1], 2^0 = 1 exactly; relative error
// below 2e-7 evaluated in float32), times 2^n. u is floored at -126, which keeps 2^n normal.
// Written once for float and Vec<float>.
template <typename V>
MIX_INLINE V exp2_nonpositive(V u) {
  using I = Bits<V>;
  const V lo = V{} - 126.0f;
  u = u < lo ? lo : u;
  const auto poly = [](V f) {
    return ((((1.86183513e-3f * f + 9.0304045e-3f) * f + 5.57884462e-2f) * f + 2.40168229e-1f) * f + 6.93150938e-1f) * f +
           1.0f;
  };
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  // f in one instruction (vreduceps: u - floor(u)) and the product in another (vscalefps: p * 2^floor(u)).
  if constexpr (kIsVec<V>) {
    const __m512 uv = reinterpret_cast<__m512>(u);
    const V f = reinterpret_cast<V>(_mm512_reduce_ps(uv, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    return reinterpret_cast<V>(_mm512_scalef_ps(reinterpret_cast<__m512>(poly(f)), uv));
  }
#endif
  const V n = vfloor(u);
  const I bits = (convert<I>(n) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  return poly(u - n) * scale;
}

template <typename V>
MIX_INLINE V vexp2(V u) {
  if constexpr (std::is_same_v<Elem<V>, float>) {
    return exp2_nonpositive(u);
  } else {
    return lanewise(u, [](double e) { return std::exp2(e); });
  }
}

// a * b + c rounded once, lane by lane.
template <typename V>
MIX_INLINE V vfma(V a, Elem<V> b, V c) {
  if constexpr (kIsVec<V>) {
    for (int j = 0; j < int(sizeof(V) / sizeof(Elem<V>)); ++j) a[j] = std::fma(a[j], b, c[j]);
    return a;
  } else {
    return std::fma(a, b, c);
  }
}

// exp(x) = 2^(x log2 e), for the tables' maths (x <= 0 up to rounding). In float the product is split
// into its rounded value t and its error e (by an FMA, plus x times the error of log2 e's float), and
// 2^e = 1 + e ln 2 to float precision, so a large |x| loses nothing to the product's rounding.
template <typename V>
MIX_INLINE V vexp(V x) {
  if constexpr (std::is_same_v<Elem<V>, float>) {
    constexpr float kLog2e = 1.44269504f, kLog2eError = 1.92596299e-8f;
    const V t = x * kLog2e;
    const V e = vfma(x, kLog2e, V{} - t) + x * kLog2eError;
    return exp2_nonpositive(t) * (e * float(M_LN2) + 1.0f);
  } else {
    return lanewise(x, [](double e) { return std::exp(e); });
  }
}

// log for positive normal x. Cephes logf: x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log x = e ln 2 + log m, log m a polynomial in m - 1; relative error ~1e-7.
template <typename V>
MIX_INLINE V log_positive(V x) {
  using I = Bits<V>;
  I bits;
  std::memcpy(&bits, &x, sizeof(V));
  const I mantissa = (bits & 0x007fffff) | 0x3f000000;  // m in [0.5, 1)
  V m, e = convert<V>(((bits >> 23) & 0xff) - 126);
  std::memcpy(&m, &mantissa, sizeof(V));
  const auto low = m < 0.70710678118654752f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const V z = m * m;
  V y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m - 1.2420140846e-1f) * m +
              1.4249322787e-1f) * m - 1.6668057665e-1f) * m + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m +
        3.3333331174e-1f) * m * z;
  y += -2.12194440e-4f * e - 0.5f * z;
  return m + y + 0.693359375f * e;
}

template <typename V>
MIX_INLINE V vlog(V x) {
  if constexpr (std::is_same_v<Elem<V>, float>) {
    return log_positive(x);
  } else {
    return lanewise(x, [](double e) { return std::log(e); });
  }
}

// log(1 + u) for u in [0, 1]. In float: the log of the rounded v = 1 + u, corrected by
// the rounding error u - (v - 1) (exact, as v is in [1, 2]); the barrier keeps
// -fassociative-math from folding v - 1 into u.
template <typename V>
MIX_INLINE V vlog1p(V u) {
  if constexpr (std::is_same_v<Elem<V>, double>) {
    return lanewise(u, [](double e) { return std::log1p(e); });
  } else {
    V v = u + 1.0f;
    __asm__("" : "+m"(v));
    return vlog(v) + (u - (v - 1.0f)) / v;
  }
}

// tau = softmax_k(logit) from the logit tables in base 2 (load_logit_tables): tau_k = 2^(l_k - max l) / sum_j 2^(l_j - max l).
template <typename V, int K, typename Tab>
MIX_INLINE void responsibilities(V xv, const Tab& m, const Tab& hh, const Tab& l0, V* t) {
  if constexpr (K == 2) {
    // The general code's exponential of the larger logit is 2^0 = 1, so two components need one
    // exponential: with e = 2^(-|l0 - l1|), the larger logit's tau is 1 / (1 + e), the smaller's e / (1 + e).
    const V d0 = xv - m[0], d1 = xv - m[1];
    const V diff = (l0[0] - hh[0] * d0 * d0) - (l0[1] - hh[1] * d1 * d1);
    const V e = vexp2(diff > 0 ? -diff : diff);
    const V big = Elem<V>(1) / (e + Elem<V>(1)), small = e * big;
    t[0] = diff >= 0 ? big : small;
    t[1] = diff >= 0 ? small : big;
    return;
  }
  V l[K];
  V mx = l0[0] - hh[0] * (xv - m[0]) * (xv - m[0]);
  l[0] = mx;
  MIX_UNROLL
  for (int k = 1; k < K; ++k) {
    V d = xv - m[k];
    l[k] = l0[k] - hh[k] * d * d;
    mx = l[k] > mx ? l[k] : mx;
  }
  V s{};
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    t[k] = vexp2(l[k] - mx);
    s += t[k];
  }
  V inv = Elem<V>(1) / s;
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
  template <typename V, typename Tab>
  MIX_INLINE void get(V xv, const Tab& m, const Tab& hh, const Tab& l0, int64_t i, V* t) const {
    if (Mode == kLoad) {
      MIX_UNROLL
      for (int k = 0; k < K; ++k) t[k] = load<V>(cache + k * stride + i);
      return;
    }
    responsibilities<V, K, Tab>(xv, m, hh, l0, t);
    if (Mode == kStore) {
      MIX_UNROLL
      for (int k = 0; k < K; ++k) store<V>(cache + k * stride + i, t[k]);
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

// ---- Per-element maths, shared by both layouts, on a value type V (one element, or one
// per lane); add(r, k, v) accumulates reduction r. ----

// Stats: tau_k * {1, xt, xt^2}, xt = x - shift.
template <typename V, int K, typename Tab, typename Tau, typename Add>
MIX_INLINE void stats_element(const Tau& tau, int64_t i, V xv, const Tab& m, const Tab& hh, const Tab& l0, V sh, Add&& add) {
  V t[K];
  tau.get(xv, m, hh, l0, i, t);
  const V xt = xv - sh;
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    add(0, k, t[k]);
    add(1, k, t[k] * xt);
    add(2, k, t[k] * xt * xt);
  }
}

// Output: y = beta + sum_k tau_k * A[g,k] * (x - alpha_k).
template <typename V, int K, typename Tab, typename Tau>
MIX_INLINE V apply_element(const Tau& tau, int64_t i, V xv, const Tab& m, const Tab& hh, const Tab& l0, const Tab& Ag, const Tab& al, V b) {
  V t[K];
  tau.get(xv, m, hh, l0, i, t);
  V s = b;
  MIX_UNROLL
  for (int k = 0; k < K; ++k) s += t[k] * Ag[k] * (xv - al[k]);
  return s;
}

// Backward of apply: returns d loss / dx and accumulates E0 = g tau, E1 = g tau (x - alpha)
// and, with Params, L0 = dl, R1 = dl (x - mu), R2 = dl (x - mu)^2, dl = d loss / d logit.
template <typename V, int K, bool Params, typename Tab, typename Tau, typename Add>
MIX_INLINE V apply_backward_element(const Tau& tau, int64_t i, V xv, V gv, const Tab& m, const Tab& hh, const Tab& l0, const Tab& Ag,
                                    const Tab& al, Add&& add) {
  V t[K], u[K];
  tau.get(xv, m, hh, l0, i, t);
  V yhat{}, direct{};
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    u[k] = Ag[k] * (xv - al[k]);
    yhat += t[k] * u[k];
    direct += t[k] * Ag[k];
  }
  V through_logits{};
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    const V gt = gv * t[k];
    const V dl = gt * (u[k] - yhat);
    const V d = xv - m[k];
    add(0, k, gt);
    add(1, k, gt * (xv - al[k]));
    if (Params) {
      add(2, k, dl);
      add(3, k, dl * d);
      add(4, k, dl * d * d);
    }
    through_logits += dl * hh[k] * d;
  }
  // d logit / dx = -2 h (x - mu), and the h here is in base 2 (load_logit_tables): hence 2 ln 2.
  return gv * direct - Elem<V>(2 * M_LN2) * through_logits;
}

// Backward of stats given dS: returns the part of d loss / dx and, with Params,
// accumulates L0, R1, R2 as above.
template <typename V, int K, bool Params, typename Tab, typename Tau, typename Add>
MIX_INLINE V stats_backward_element(const Tau& tau, int64_t i, V xv, const Tab& m, const Tab& hh, const Tab& l0, V sh, const Tab& d0,
                                    const Tab& d1, const Tab& d2, Add&& add) {
  V t[K], e[K];
  tau.get(xv, m, hh, l0, i, t);
  const V xt = xv - sh;
  V ebar{}, direct{};
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    e[k] = d0[k] + (d1[k] + d2[k] * xt) * xt;
    ebar += t[k] * e[k];
    direct += t[k] * (d1[k] + Elem<V>(2) * d2[k] * xt);
  }
  V through_logits{};
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    const V dl = t[k] * (e[k] - ebar);
    const V d = xv - m[k];
    if (Params) {
      add(0, k, dl);
      add(1, k, dl * d);
      add(2, k, dl * d * d);
    }
    through_logits += dl * hh[k] * d;
  }
  return direct - Elem<V>(2 * M_LN2) * through_logits;  // 2 ln 2: as in apply_backward_element
}

// ---- The four passes. A block is one vector of elements (V = Vec<T>) or one element
// (V = T, for what is left over), taken down a chunk of rows with its tables and its
// reductions in registers:
// - flat inputs (P == 1, x is (N, C)): the lanes are channels [c, c + lanes) of each row,
//   whose tables are loaded as vectors; rows are chunked by kFlushRows * kLanes;
// - spatial inputs (P > 1): the lanes are positions [p, p + lanes) of the row of each
//   sample n and channel c, whose tables are channel c's, broadcast; rows are chunked by
//   kFlushRows, and the next row is prefetched (a channel's rows are C * P apart, so each
//   short row would start on a cold page where the hardware prefetcher has not ramped up).
// Rows are visited group by group, and after each chunk the float reductions are added
// into double totals per (group, component, channel). ----

// Scratch kept by each thread across calls, one buffer per use: a heap block freed at the
// end of every call can go back to the OS and cost page faults on the next call.
enum ScratchUse { kTotals, kRows, kBackwardTables };
template <typename E, int Use>
E* thread_scratch(size_t n) {
  thread_local std::vector<E> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Rows grouped by context: group g's rows are row(start[g]) .. row(start[g + 1] - 1), in
// order (without contexts every row is in group 0).
struct RowOrder {
  int64_t* rows = nullptr;  // null: row(i) = i
  int64_t* start;
  explicit RowOrder(const MixArgs& a) {
    const int64_t G = a.G;
    int64_t* buffer = thread_scratch<int64_t, kRows>((a.ctx ? a.N : 0) + 2 * G + 1);
    start = buffer;
    std::fill(start, start + G + 1, a.ctx ? 0 : a.N);
    start[0] = 0;
    if (!a.ctx) return;
    for (int64_t n = 0; n < a.N; ++n) ++start[a.ctx[n] + 1];
    for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
    int64_t* next = std::copy(start, start + G, buffer + G + 1) - G;
    rows = buffer + 2 * G + 1;
    for (int64_t n = 0; n < a.N; ++n) rows[next[a.ctx[n]]++] = n;
  }
  MIX_INLINE int64_t row(int64_t i) const { return rows ? rows[i] : i; }
};

// Double totals of R reductions per (group, component, channel of [c0, c1)).
template <int R, int K>
struct Totals {
  int64_t G, c0, width;
  double* v;
  Totals(int64_t groups, int64_t first, int64_t last) : G(groups), c0(first), width(last - first) {
    const size_t n = R * groups * K * width;
    v = thread_scratch<double, kTotals>(n);
    std::fill(v, v + n, 0.0);
  }
  // Adds acc[r * K + k] to group g's totals: lane j to channel c + j (flat), or every
  // lane to channel c (spatial).
  template <bool Spatial, typename V>
  MIX_INLINE void add(const std::array<V, R * K>& acc, int64_t g, int64_t c) {
    constexpr int kWidth = sizeof(V) / sizeof(Elem<V>);
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) {
        double* t = v + ((r * G + g) * K + k) * width + (c - c0);
        for (int j = 0; j < kWidth; ++j) t[Spatial ? 0 : j] += lane(acc[r * K + k], j);
      }
  }
  // Writes the totals into red laid out (R, G, K, C).
  template <typename T>
  void store(void* red, int64_t C) const {
    T* out = static_cast<T*>(red);
    for (int64_t rgk = 0; rgk < R * G * K; ++rgk)
      for (int64_t i = 0; i < width; ++i) out[rgk * C + c0 + i] = static_cast<T>(v[rgk * width + i]);
  }
};

// Where a block's elements lie: the rows of chunk [i0, i1) of group g, at channel c and,
// for spatial inputs, positions [p0, p1).
struct Block {
  int64_t c, g, i0, i1, p0, p1;
};

// Calls f(at, i, tau) for the block's elements of each row: at is the element's offset in
// x, i its index in the row's responsibilities `tau`; spatial rows also prefetch the
// next row of each of `arrays`.
template <typename T, int K, int Mode, bool Spatial, typename V, typename F, typename... Arrays>
MIX_INLINE void for_block(const MixArgs& a, const RowOrder& o, const Block& b, F&& f, Arrays... arrays) {
  constexpr int64_t kWidth = sizeof(V) / sizeof(T);
  for (int64_t i = b.i0; i < b.i1; ++i) {
    const int64_t n = o.row(i);
    if constexpr (Spatial) {
      const int64_t base = (n * a.C + b.c) * a.P;
      if (kIsVec<V> && i + 1 < b.i1) {
        const int64_t next = (o.row(i + 1) * a.C + b.c) * a.P, length = a.P < 512 ? a.P : 512;
        for (int64_t p = 0; p < length; p += kLanes<T>) (__builtin_prefetch(arrays + next + p), ...);
      }
      const auto tau = tau_row<T, K, Mode>(a, n, b.c);
      for (int64_t p = b.p0; p < b.p1; p += kWidth) f(base + p, p, tau);
    } else {
      if (kIsVec<V> && i + kFlatAhead < b.i1) {
        const int64_t ahead = o.row(i + kFlatAhead) * a.C + b.c;
        (__builtin_prefetch(arrays + ahead), ...);
      }
      f(n * a.C + b.c, b.c, tau_row<T, K, Mode>(a, n, 0));
    }
  }
}

// A table's entries for a block's lanes, from entry i: i, i + 1, ... (flat: one channel
// per lane) or entry i broadcast (spatial: every lane in channel i's row).
template <bool Spatial, typename V>
MIX_INLINE V lanes_at(const void* t, int64_t i) {
  const Elem<V>* p = static_cast<const Elem<V>*>(t) + i;
  if constexpr (Spatial) {
    return V{} + *p;
  } else {
    return load<V>(p);
  }
}

// Row r of a table laid out (R, K, C) for the lanes of a block at channel c.
template <bool Spatial, typename V, int K>
MIX_INLINE void load_table(const void* t, int64_t r, int64_t C, int64_t c, V* dst) {
  MIX_UNROLL
  for (int k = 0; k < K; ++k) dst[k] = lanes_at<Spatial, V>(t, (r * K + k) * C + c);
}

// A block's logit tables mu, h and lc, the last two in base 2 (times log2 e), the base the
// softmax exponentiates in (2^(l - max l)); the chain through the logits multiplies back by ln 2.
template <bool Spatial, typename V, int K>
MIX_INLINE void load_logit_tables(const MixArgs& a, const Block& b, V* m, V* hh, V* l0) {
  load_table<Spatial, V, K>(a.mu, 0, a.C, b.c, m);
  load_table<Spatial, V, K>(a.h, 0, a.C, b.c, hh);
  load_table<Spatial, V, K>(a.lc, b.g, a.C, b.c, l0);
  MIX_UNROLL
  for (int k = 0; k < K; ++k) {
    hh[k] *= Elem<V>(M_LOG2E);
    l0[k] *= Elem<V>(M_LOG2E);
  }
}

template <typename V, int K>
using Reductions = std::array<V, K>;

// Runs Pass::block<Spatial, V>(a, order, block) -> Reductions<V, R * K> over every block of
// the channels [c0, c1) and writes the totals into red laid out (R, G, K, C) (PerGroup)
// or (R, 1, K, C).
template <typename T, int R, int K, bool PerGroup, typename Pass>
MIX_INLINE void run_blocks(const MixArgs& a, int64_t c0, int64_t c1, void* red) {
  constexpr int W = kLanes<T>;
  const RowOrder order(a);
  Totals<R, K> totals(PerGroup ? a.G : 1, c0, c1);
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t slot = PerGroup ? g : 0, first = order.start[g], last = order.start[g + 1];
    if (a.P == 1) {
      for (int64_t i0 = first; i0 < last; i0 += kFlushRows * W) {
        const int64_t i1 = std::min(i0 + kFlushRows * W, last);
        int64_t c = c0;
        for (; c + W <= c1; c += W)
          totals.template add<false>(Pass::template block<false, Vec<T>>(a, order, {c, g, i0, i1, 0, 1}), slot, c);
        for (; c < c1; ++c)
          totals.template add<false>(Pass::template block<false, T>(a, order, {c, g, i0, i1, 0, 1}), slot, c);
      }
    } else {
      const int64_t vectors = a.P / W * W;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t i0 = first; i0 < last; i0 += kFlushRows) {
          const int64_t i1 = std::min(i0 + kFlushRows, last);
          if (vectors > 0)
            totals.template add<true>(Pass::template block<true, Vec<T>>(a, order, {c, g, i0, i1, 0, vectors}), slot, c);
          if (vectors < a.P)
            totals.template add<true>(Pass::template block<true, T>(a, order, {c, g, i0, i1, vectors, a.P}), slot, c);
        }
    }
  }
  if (R > 0) totals.template store<T>(red, a.C);
}

// red (3, 1, K, C) = sums of tau_k * {1, xt, xt^2} over all rows, xt = x - shift[c].
template <typename T, int K, int Mode, typename IO>
struct StatsPass {
  template <bool Spatial, typename V>
  static MIX_INLINE Reductions<V, 3 * K> block(const MixArgs& a, const RowOrder& o, const Block& b) {
    V m[K], hh[K], l0[K];
    load_logit_tables<Spatial, V, K>(a, b, m, hh, l0);
    const V sh = lanes_at<Spatial, V>(a.shift, b.c);
    Reductions<V, 3 * K> acc{};
    const IO* x = static_cast<const IO*>(a.x);
    for_block<T, K, Mode, Spatial, V>(a, o, b, [&](int64_t at, int64_t i, const auto& tau) {
      stats_element<V, K, const V*>(tau, i, load_io<V>(x + at), m, hh, l0, sh, [&](int r, int k, V v) { acc[r * K + k] += v; });
    }, x);
    return acc;
  }
};

template <typename T, int K, int Mode, typename IO>
struct ApplyPass {
  template <bool Spatial, typename V>
  static MIX_INLINE Reductions<V, 0> block(const MixArgs& a, const RowOrder& o, const Block& b) {
    V m[K], hh[K], l0[K], Ag[K], al[K];
    load_logit_tables<Spatial, V, K>(a, b, m, hh, l0);
    load_table<Spatial, V, K>(a.A, b.g, a.C, b.c, Ag);
    load_table<Spatial, V, K>(a.alpha, 0, a.C, b.c, al);
    const V beta = lanes_at<Spatial, V>(a.beta, b.c);
    const IO* x = static_cast<const IO*>(a.x);
    IO* y = static_cast<IO*>(a.out);
    for_block<T, K, Mode, Spatial, V>(a, o, b, [&](int64_t at, int64_t i, const auto& tau) {
      store_io<V>(y + at, apply_element<V, K, const V*>(tau, i, load_io<V>(x + at), m, hh, l0, Ag, al, beta));
    }, x, static_cast<const IO*>(y));
    return {};
  }
};

// Reductions E0, E1, L0, R1, R2 as apply_backward_element's, into red (5, G, K, C).
template <typename T, int K, bool Params, int Mode, typename IO>
struct ApplyBackwardPass {
  template <bool Spatial, typename V>
  static MIX_INLINE Reductions<V, 5 * K> block(const MixArgs& a, const RowOrder& o, const Block& b) {
    V m[K], hh[K], l0[K], Ag[K], al[K];
    load_logit_tables<Spatial, V, K>(a, b, m, hh, l0);
    load_table<Spatial, V, K>(a.A, b.g, a.C, b.c, Ag);
    load_table<Spatial, V, K>(a.alpha, 0, a.C, b.c, al);
    Reductions<V, 5 * K> acc{};
    const IO* x = static_cast<const IO*>(a.x);
    const IO* gy = static_cast<const IO*>(a.grad);
    IO* dx = static_cast<IO*>(a.out);
    for_block<T, K, Mode, Spatial, V>(a, o, b, [&](int64_t at, int64_t i, const auto& tau) {
      store_io<V>(dx + at, apply_backward_element<V, K, Params, const V*>(tau, i, load_io<V>(x + at), load_io<V>(gy + at), m,
                                                                         hh, l0, Ag, al, [&](int r, int k, V v) { acc[r * K + k] += v; }));
    }, x, gy, static_cast<const IO*>(dx));
    return acc;
  }
};

// Adds the stats pass's part of the input gradient to `out` (the output pass's), so the
// layer writes one input-gradient tensor; reductions L0, R1, R2 into red2 (3, G, K, C).
template <typename T, int K, bool Params, int Mode, typename IO>
struct StatsBackwardPass {
  template <bool Spatial, typename V>
  static MIX_INLINE Reductions<V, 3 * K> block(const MixArgs& a, const RowOrder& o, const Block& b) {
    V m[K], hh[K], l0[K], d0[K], d1[K], d2[K];
    load_logit_tables<Spatial, V, K>(a, b, m, hh, l0);
    load_table<Spatial, V, K>(a.dS, 0, a.C, b.c, d0);
    load_table<Spatial, V, K>(a.dS, 1, a.C, b.c, d1);
    load_table<Spatial, V, K>(a.dS, 2, a.C, b.c, d2);
    const V sh = lanes_at<Spatial, V>(a.shift, b.c);
    Reductions<V, 3 * K> acc{};
    const IO* x = static_cast<const IO*>(a.x);
    IO* dx = static_cast<IO*>(a.out);
    for_block<T, K, Mode, Spatial, V>(a, o, b, [&](int64_t at, int64_t i, const auto& tau) {
      store_io<V>(dx + at, load_io<V>(dx + at) + stats_backward_element<V, K, Params, const V*>(
                                                     tau, i, load_io<V>(x + at), m, hh, l0, sh, d0, d1, d2,
                                                     [&](int r, int k, V v) { acc[r * K + k] += v; }));
    }, x, static_cast<const IO*>(dx));
    return acc;
  }
};

// The stats pass: the shift (each channel's first value, x[0, c, 0]) and the sums.
template <typename T, int K, int Mode, typename IO>
MIX_PASS void stats(const MixArgs& a, int64_t c0, int64_t c1) {
  T* sh = static_cast<T*>(a.shift);
  for (int64_t c = c0; c < c1; ++c) sh[c] = load_io<T>(static_cast<const IO*>(a.x) + c * a.P);
  run_blocks<T, 3, K, false, StatsPass<T, K, Mode, IO>>(a, c0, c1, a.sums);
}

template <typename T, int K, int Mode, typename IO>
MIX_PASS void apply(const MixArgs& a, int64_t c0, int64_t c1) {
  run_blocks<T, 0, K, false, ApplyPass<T, K, Mode, IO>>(a, c0, c1, nullptr);
}

template <typename T, int K, bool Params, int Mode, typename IO>
MIX_PASS void apply_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  run_blocks<T, 5, K, true, ApplyBackwardPass<T, K, Params, Mode, IO>>(a, c0, c1, a.red);
}

template <typename T, int K, bool Params, int Mode, typename IO>
MIX_PASS void stats_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  run_blocks<T, 3, K, true, StatsBackwardPass<T, K, Params, Mode, IO>>(a, c0, c1, a.red2);
}

// ---- The (K, C)-sized maths between the passes (ALGORITHMS.md section 2 and the backward
// derived in mixture.py), per channel, so a call needs no small torch ops around it. ----

// Moments of the components at entry i of the sums S (3, K, C), for the channels of V:
// S0 floored at sqrt(tiny) (an empty component gets alpha = shift, delta^2 = 0), S1 / S0
// and S2 / S0.
template <typename V>
struct Moments {
  V safe, m1, m2;
  Moments(const void* sums, int64_t i, int64_t KC) {
    using T = Elem<V>;
    const T* S = static_cast<const T*>(sums) + i;
    const T tiny = std::sqrt(std::numeric_limits<T>::min());
    const V count = load<V>(S);
    safe = count > tiny ? count : V{} + tiny;
    m1 = load<V>(S + KC) / safe;
    m2 = load<V>(S + 2 * KC) / safe;
  }
};

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
      // Through max(delta^2, floor): no gradient where the floor holds.
      const T d2 = static_cast<const T*>(a.delta2)[i];
      const bool floored = a.delta2_floor && d2 < static_cast<const T*>(a.delta2_floor)[c];
      g_delta2 = floored ? T(0) : g_delta2 / (d2 + T(a.eps));
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
      T g_h = 0, g_mu = 0, g_lc_sum = 0;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t gi = g * KC + i;
        const T g_lc = L0[gi] + (r2 ? r2[gi] : T(0));
        g_h -= R2[gi] + (r2 ? r2[2 * GKC + gi] : T(0));
        g_mu += R1[gi] + (r2 ? r2[GKC + gi] : T(0));
        g_lc_sum += g_lc;
        out.log_weight[gi] = g_lc - T(0.5) * E1[gi] * A[gi];
        g_gamma += E1[gi] * static_cast<const T*>(a.scale)[gi];
        g_beta += E0[gi];
      }
      out.mu[i] = T(2) * h * g_mu;
      out.var[i] = T(-0.5) * (g_h / var + g_lc_sum) / var;
    }
    out.gamma[c] = g_gamma;
    out.beta[c] = g_beta;
  }
}

// Calls f(V{}, c) for the channels [c, c + lanes of V) of [c0, c1): blocks of Vec<T>,
// then single channels (V = T).
template <typename T, typename F>
MIX_INLINE void for_channel_blocks(int64_t c0, int64_t c1, F&& f) {
  int64_t c = c0;
  for (; c + kLanes<T> <= c1; c += kLanes<T>) f(Vec<T>{}, c);
  for (; c < c1; ++c) f(T{}, c);
}

// torch's softplus (linear above 20) as max(r, 0) + log1p(exp(-|r|)), and its derivative,
// the logistic function.
template <typename V>
MIX_INLINE void softplus(V r, V& value, V& slope) {
  using T = Elem<V>;
  const V u = vexp(r < T(0) ? r : -r);
  const V one = V{} + T(1);
  value = r > T(20) ? r : (r > T(0) ? r : V{}) + vlog1p(u);
  slope = r > T(20) ? one : (r >= T(0) ? one : u) / (T(1) + u);
}

// UAN's parametrisation: lambda = w + (1 - K w) softmax_k(p), log lambda (log_softmax when
// w = 0, so no weight underflows to log 0) and sigma^2 = softplus(r) + min_var; also the
// softmax and softplus'(r), which the backward reuses.
template <typename T>
void parametrise(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  const T w = T(a.min_weight), spread = T(1) - T(K) * w;
  for_channel_blocks<T>(c0, c1, [&](auto zero, int64_t c) {
    using V = decltype(zero);
    for (int64_t g = 0; g < a.G; ++g) {
      const T* p = static_cast<const T*>(a.weight_param) + g * K * C + c;
      V e[kMaxK], mx = load<V>(p);
      for (int64_t k = 1; k < K; ++k) {
        const V pk = load<V>(p + k * C);
        mx = pk > mx ? pk : mx;
      }
      V total{};
      for (int64_t k = 0; k < K; ++k) total += e[k] = vexp(load<V>(p + k * C) - mx);
      const V log_total = mx + vlog(total);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = (g * K + k) * C + c;
        const V s = e[k] / total;
        store<V>(static_cast<T*>(a.softmax) + gi, s);
        store<V>(static_cast<T*>(a.log_weight) + gi, w == T(0) ? load<V>(p + k * C) - log_total : vlog(w + spread * s));
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      V value, slope;
      softplus(load<V>(static_cast<const T*>(a.var_param) + k * C + c), value, slope);
      store<V>(static_cast<T*>(a.var) + k * C + c, value + T(a.min_var));
      store<V>(static_cast<T*>(a.slope) + k * C + c, slope);
    }
  });
}

// The chain rule through parametrise, in place on the gradients of log lambda and sigma^2:
// dL/dp_j = r_j dL/dlog lambda_j - s_j sum_k r_k dL/dlog lambda_k with s the softmax and
// r = (1 - K w) s / lambda (1 when w = 0), and dL/dr = dL/dsigma^2 softplus'(r).
template <typename T>
void parametrise_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  const T w = T(a.min_weight), spread = T(1) - T(K) * w;
  const T* s = static_cast<const T*>(a.softmax);
  Grads<T> grad(a);
  T ratio[kMaxK];
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t g = 0; g < a.G; ++g) {
      T total = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = (g * K + k) * C + c;
        ratio[k] = w == T(0) ? T(1) : spread * s[gi] / (w + spread * s[gi]);
        total += ratio[k] * grad.log_weight[gi];
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t gi = (g * K + k) * C + c;
        grad.log_weight[gi] = ratio[k] * grad.log_weight[gi] - s[gi] * total;
      }
    }
    for (int64_t k = 0; k < K; ++k) grad.var[k * C + c] *= static_cast<const T*>(a.slope)[k * C + c];
  }
}

// h = 1 / (2 sigma^2), lc = log lambda - 0.5 log(2 pi sigma^2).
template <typename T>
void logit_terms(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C;
  for_channel_blocks<T>(c0, c1, [&](auto zero, int64_t c) {
    using V = decltype(zero);
    for (int64_t k = 0; k < K; ++k) {
      const V var = load<V>(static_cast<const T*>(a.var) + k * C + c);
      store<V>(static_cast<T*>(a.h) + k * C + c, T(0.5) / var);
      const V log_norm = T(0.5) * vlog(T(2 * M_PI) * var);
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t gi = (g * K + k) * C + c;
        store<V>(static_cast<T*>(a.lc) + gi, load<V>(static_cast<const T*>(a.log_weight) + gi) - log_norm);
      }
    }
  });
}

// alpha = shift + S1/S0, delta^2 = max(S2/S0 - (S1/S0)^2, 0) from the sums (unless given);
// then scale[g,k] = lambda_gk^(-1/2) (max(delta_k^2, floor_c) + eps)^(-1/2) and A = gamma scale.
template <typename T>
void output_tables(const MixArgs& a, int64_t c0, int64_t c1) {
  const int64_t K = a.K, C = a.C, KC = K * C;
  T* alpha = static_cast<T*>(a.alpha);
  T* delta2 = static_cast<T*>(a.delta2);
  for_channel_blocks<T>(c0, c1, [&](auto zero, int64_t c) {
    using V = decltype(zero);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = k * C + c;
      if (a.sums) {
        const Moments<V> s(a.sums, i, KC);
        const V var = s.m2 - s.m1 * s.m1;
        store<V>(alpha + i, load<V>(static_cast<const T*>(a.shift) + c) + s.m1);
        store<V>(delta2 + i, var > T(0) ? var : V{});
      }
      V d2 = load<V>(delta2 + i);
      if (a.delta2_floor) {
        const V floor = load<V>(static_cast<const T*>(a.delta2_floor) + c);
        d2 = d2 < floor ? floor : d2;
      }
      const V rstd = T(1) / vsqrt(d2 + T(a.eps));
      for (int64_t g = 0; g < a.G; ++g) {
        const int64_t gi = g * KC + i;
        // lambda^(-1/2) = 1 / exp(log lambda / 2): log lambda <= 0 up to rounding.
        const V scale = rstd / vexp(T(0.5) * load<V>(static_cast<const T*>(a.log_weight) + gi));
        store<V>(static_cast<T*>(a.scale) + gi, scale);
        store<V>(static_cast<T*>(a.A) + gi, load<V>(static_cast<const T*>(a.gamma) + c) * scale);
      }
    }
  });
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
template <typename T, typename IO, int K>
struct ForwardPassOf {
  static void run(const MixArgs& a, int64_t c0, int64_t c1) {
    if (a.parametrised) parametrise<T>(a, c0, c1);
    logit_terms<T>(a, c0, c1);
    if (a.sums) a.tau ? stats<T, K, kStore, IO>(a, c0, c1) : stats<T, K, kRecompute, IO>(a, c0, c1);
    if (a.phase == 1) return;  // the sums alone
    output_tables<T>(a, c0, c1);
    if (a.sums && a.running_mean) track_running<T>(a, c0, c1);
    a.tau ? apply<T, K, kLoad, IO>(a, c0, c1) : apply<T, K, kRecompute, IO>(a, c0, c1);
  }
};
template <typename T, int K>
using ForwardPass = ForwardPassOf<T, T, K>;
template <typename T, int K>
using ForwardPassBF16 = ForwardPassOf<T, BF16, K>;

// The backward of one channel range: the output pass (input gradient's direct part and
// reductions), the sums' gradient, the stats pass (batch statistics only), which adds its
// part of the input gradient, every parameter gradient, and the chain through parametrise.
template <typename T, typename IO, int K>
struct BackwardPassOf {
  template <bool Params, int Mode>
  static void passes(const MixArgs& a, int64_t c0, int64_t c1) {
    if (a.phase == 1) {  // the sums alone: dS is given, the output pass's reductions are zero
      stats_backward<T, K, Params, Mode, IO>(a, c0, c1);
      return;
    }
    apply_backward<T, K, Params, Mode, IO>(a, c0, c1);
    sums_gradient<T>(a, c0, c1);
    if (a.sums) stats_backward<T, K, Params, Mode, IO>(a, c0, c1);
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
template <typename T, int K>
using BackwardPass = BackwardPassOf<T, T, K>;
template <typename T, int K>
using BackwardPassBF16 = BackwardPassOf<T, BF16, K>;

// Pass<T, a.K>::run for a.K in [K, kMaxK] (one instantiation per K); 1 when a.K is out of that range.
template <typename T, template <typename, int> class Pass, int K = 1>
int run_k(const MixArgs& a, int64_t c0, int64_t c1) {
  if constexpr (K > kMaxK) {
    return 1;
  } else {
    if (a.K != K) return run_k<T, Pass, K + 1>(a, c0, c1);
    Pass<T, K>::run(a, c0, c1);
    return 0;
  }
}

template <template <typename, int> class Pass, template <typename, int> class PassBF16>
int run(int dtype, const MixArgs* a, int threads) {
  int failed = 0;
  const int64_t C = a->C;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : failed)
  for (int t = 0; t < threads; ++t) {
    const int64_t c0 = C * t / threads, c1 = C * (t + 1) / threads;
    failed |= dtype == kDouble ? run_k<double, Pass>(*a, c0, c1)
              : dtype == kBFloat16 ? run_k<float, PassBF16>(*a, c0, c1) : run_k<float, Pass>(*a, c0, c1);
  }
  return failed;
}

}  // namespace

int mix_forward(int dtype, const MixArgs* a, int threads) { return run<ForwardPass, ForwardPassBF16>(dtype, a, threads); }
int mix_backward(int dtype, const MixArgs* a, int threads) {
  // Scratch for dS, red, red2, laid out as MixArgs describes; red2 stays null without
  // batch statistics (no stats pass to reduce).
  const int64_t KC = a->K * a->C, GKC = a->G * KC;
  MixArgs b = *a;
  char* base = reinterpret_cast<char*>(thread_scratch<double, kBackwardTables>(3 * KC + 8 * GKC));
  const int64_t size = dtype == kDouble ? sizeof(double) : sizeof(float);
  b.red = base + 3 * KC * size;
  b.red2 = a->sums ? base + (3 * KC + 5 * GKC) * size : nullptr;
  if (a->phase == 1) {
    std::memset(b.red, 0, 5 * GKC * size);  // no output pass: parameter_grads reads zeros
  } else {
    b.dS = base;
  }
  return run<BackwardPass, BackwardPassBF16>(dtype, &b, threads);
}
