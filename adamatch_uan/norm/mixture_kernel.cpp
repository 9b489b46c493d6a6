// Fused CPU passes of the mixture normalizing transform (ALGORITHMS.md section 2).
//
// Layout: x is (N, C, P) contiguous, P = product of spatial sizes. Per channel c the
// responsibilities of sample n come from a 1-D Gaussian mixture whose log-prior table is
// chosen by the sample's context (group) g = ctx[n]:
//     logit_k(x) = lc[g,k,c] - h[k,c] * (x - mu[k,c])^2,   tau = softmax_k(logit)
// where h = 1 / (2 sigma^2) and lc = log lambda - 0.5 log(2 pi sigma^2).
// Each pass recomputes tau in registers instead of storing a (N, K, C, P) tensor, so the
// layer reads x once per pass, as BatchNorm does. Channels are independent: the caller
// splits [0, C) between threads.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct MixArgs {
  const void* x;         // (N, C, P) input
  const int64_t* ctx;    // (N,) group ids, or null for group 0
  const void* grad;      // (N, C, P) upstream gradient (backward passes)
  int64_t N, C, P, K, G;
  const void* mu;        // (K, C)
  const void* h;         // (K, C)
  const void* lc;        // (G, K, C)
  const void* shift;     // (C,) shift of the sums (stats passes)
  const void* alpha;     // (K, C) component means used by the output map
  const void* A;         // (G, K, C) component scales used by the output map
  const void* beta;      // (C,)
  const void* dS;        // (3, K, C) gradient of the sums (stats backward)
  void* out;             // (N, C, P) output or input gradient
  void* red;             // reductions, layout (R, G, K, C)
  int64_t need_param_grads;
};

// exp for arguments <= 0 (logits minus their max). Cephes-style polynomial that gcc
// vectorizes; relative error ~1e-7, below float32 resolution of the softmax.
inline float vexp(float x) {
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
inline double vexp(double x) { return std::exp(x); }

template <typename T, int K>
inline void responsibilities(T xv, const T* m, const T* hh, const T* l0, T* t) {
  T l[K];
  T mx = l0[0] - hh[0] * (xv - m[0]) * (xv - m[0]);
  l[0] = mx;
  for (int k = 1; k < K; ++k) {
    T d = xv - m[k];
    l[k] = l0[k] - hh[k] * d * d;
    mx = l[k] > mx ? l[k] : mx;
  }
  T s = 0;
  for (int k = 0; k < K; ++k) {
    t[k] = vexp(l[k] - mx);
    s += t[k];
  }
  T inv = T(1) / s;
  for (int k = 0; k < K; ++k) t[k] *= inv;
}

// Per-channel constants gathered once so the inner loop touches only registers.
template <typename T, int K>
struct Channel {
  T m[K], hh[K];
  int64_t c, C, G;
  const MixArgs& a;
  Channel(const MixArgs& args, int64_t ch) : c(ch), C(args.C), G(args.G), a(args) {
    for (int k = 0; k < K; ++k) {
      m[k] = static_cast<const T*>(a.mu)[k * C + c];
      hh[k] = static_cast<const T*>(a.h)[k * C + c];
    }
  }
  int64_t group(int64_t n) const { return a.ctx ? a.ctx[n] : 0; }
  void group_table(const void* table, int64_t g, T* dst) const {
    for (int k = 0; k < K; ++k) dst[k] = static_cast<const T*>(table)[(g * K + k) * C + c];
  }
  void kc_table(const void* table, int64_t r, T* dst) const {
    for (int k = 0; k < K; ++k) dst[k] = static_cast<const T*>(table)[(r * K + k) * C + c];
  }
  void store(std::vector<double>& acc, int R) const {
    T* red = static_cast<T*>(a.red);
    for (int r = 0; r < R; ++r)
      for (int64_t g = 0; g < G; ++g)
        for (int k = 0; k < K; ++k)
          red[((r * G + g) * K + k) * C + c] = static_cast<T>(acc[(r * G + g) * K + k]);
  }
};

// S[0|1|2, k, c] = sum tau_k * {1, xt, xt^2}, xt = x - shift[c].
template <typename T, int K>
void stats(const MixArgs& a, int64_t c0, int64_t c1) {
  const T* x = static_cast<const T*>(a.x);
  std::vector<double> acc(3 * K);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    const T sh = static_cast<const T*>(a.shift)[c];
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t n = 0; n < a.N; ++n) {
      T l0[K], a0[K] = {}, a1[K] = {}, a2[K] = {};
      ch.group_table(a.lc, ch.group(n), l0);
      const T* xr = x + (n * a.C + c) * a.P;
      for (int64_t p = 0; p < a.P; ++p) {
        T t[K];
        responsibilities<T, K>(xr[p], ch.m, ch.hh, l0, t);
        T xt = xr[p] - sh;
        for (int k = 0; k < K; ++k) {
          a0[k] += t[k];
          a1[k] += t[k] * xt;
          a2[k] += t[k] * xt * xt;
        }
      }
      for (int k = 0; k < K; ++k) {
        acc[k] += a0[k];
        acc[K + k] += a1[k];
        acc[2 * K + k] += a2[k];
      }
    }
    T* S = static_cast<T*>(a.red);
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < K; ++k) S[(r * K + k) * a.C + c] = static_cast<T>(acc[r * K + k]);
  }
}

// y = beta + sum_k tau_k * A[g,k] * (x - alpha_k)
template <typename T, int K>
void apply(const MixArgs& a, int64_t c0, int64_t c1) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.out);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    T al[K];
    ch.kc_table(a.alpha, 0, al);
    const T b = static_cast<const T*>(a.beta)[c];
    for (int64_t n = 0; n < a.N; ++n) {
      int64_t g = ch.group(n);
      T l0[K], Ag[K];
      ch.group_table(a.lc, g, l0);
      ch.group_table(a.A, g, Ag);
      const T* xr = x + (n * a.C + c) * a.P;
      T* yr = y + (n * a.C + c) * a.P;
      for (int64_t p = 0; p < a.P; ++p) {
        T t[K];
        T xv = xr[p];
        responsibilities<T, K>(xv, ch.m, ch.hh, l0, t);
        T s = b;
        for (int k = 0; k < K; ++k) s += t[k] * Ag[k] * (xv - al[k]);
        yr[p] = s;
      }
    }
  }
}

// Backward of apply. red (5, G, K, C): E0 = sum g tau, E1 = sum g tau (x - alpha),
// L0 = sum dl, R1 = sum dl (x - mu), R2 = sum dl (x - mu)^2 with dl = d loss / d logit.
template <typename T, int K>
void apply_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  const T* x = static_cast<const T*>(a.x);
  const T* gy = static_cast<const T*>(a.grad);
  T* dx = static_cast<T*>(a.out);
  const bool params = a.need_param_grads != 0;
  std::vector<double> acc(5 * a.G * K);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    T al[K];
    ch.kc_table(a.alpha, 0, al);
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t n = 0; n < a.N; ++n) {
      int64_t g = ch.group(n);
      T l0[K], Ag[K];
      ch.group_table(a.lc, g, l0);
      ch.group_table(a.A, g, Ag);
      const int64_t off = (n * a.C + c) * a.P;
      T e0[K] = {}, e1[K] = {}, q0[K] = {}, q1[K] = {}, q2[K] = {};
      for (int64_t p = 0; p < a.P; ++p) {
        T t[K], u[K];
        T xv = x[off + p], gv = gy[off + p];
        responsibilities<T, K>(xv, ch.m, ch.hh, l0, t);
        T yhat = 0, direct = 0;
        for (int k = 0; k < K; ++k) {
          u[k] = Ag[k] * (xv - al[k]);
          yhat += t[k] * u[k];
          direct += t[k] * Ag[k];
        }
        T through_logits = 0;
        for (int k = 0; k < K; ++k) {
          T gt = gv * t[k];
          T dl = gt * (u[k] - yhat);
          T d = xv - ch.m[k];
          e0[k] += gt;
          e1[k] += gt * (xv - al[k]);
          q0[k] += dl;
          q1[k] += dl * d;
          q2[k] += dl * d * d;
          through_logits += dl * ch.hh[k] * d;
        }
        dx[off + p] = gv * direct - T(2) * through_logits;
      }
      for (int k = 0; k < K; ++k) {
        acc[(0 * a.G + g) * K + k] += e0[k];
        acc[(1 * a.G + g) * K + k] += e1[k];
        if (params) {
          acc[(2 * a.G + g) * K + k] += q0[k];
          acc[(3 * a.G + g) * K + k] += q1[k];
          acc[(4 * a.G + g) * K + k] += q2[k];
        }
      }
    }
    ch.store(acc, 5);
  }
}

// Backward of stats given dS (3, K, C). red (3, G, K, C): L0, R1, R2 as in apply_backward.
template <typename T, int K>
void stats_backward(const MixArgs& a, int64_t c0, int64_t c1) {
  const T* x = static_cast<const T*>(a.x);
  T* dx = static_cast<T*>(a.out);
  const bool params = a.need_param_grads != 0;
  std::vector<double> acc(3 * a.G * K);
  for (int64_t c = c0; c < c1; ++c) {
    Channel<T, K> ch(a, c);
    T d0[K], d1[K], d2[K];
    ch.kc_table(a.dS, 0, d0);
    ch.kc_table(a.dS, 1, d1);
    ch.kc_table(a.dS, 2, d2);
    const T sh = static_cast<const T*>(a.shift)[c];
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t n = 0; n < a.N; ++n) {
      int64_t g = ch.group(n);
      T l0[K];
      ch.group_table(a.lc, g, l0);
      const int64_t off = (n * a.C + c) * a.P;
      T q0[K] = {}, q1[K] = {}, q2[K] = {};
      for (int64_t p = 0; p < a.P; ++p) {
        T t[K], e[K];
        T xv = x[off + p];
        responsibilities<T, K>(xv, ch.m, ch.hh, l0, t);
        T xt = xv - sh;
        T ebar = 0, direct = 0;
        for (int k = 0; k < K; ++k) {
          e[k] = d0[k] + (d1[k] + d2[k] * xt) * xt;
          ebar += t[k] * e[k];
          direct += t[k] * (d1[k] + T(2) * d2[k] * xt);
        }
        T through_logits = 0;
        for (int k = 0; k < K; ++k) {
          T dl = t[k] * (e[k] - ebar);
          T d = xv - ch.m[k];
          q0[k] += dl;
          q1[k] += dl * d;
          q2[k] += dl * d * d;
          through_logits += dl * ch.hh[k] * d;
        }
        dx[off + p] = direct - T(2) * through_logits;
      }
      if (params)
        for (int k = 0; k < K; ++k) {
          acc[(0 * a.G + g) * K + k] += q0[k];
          acc[(1 * a.G + g) * K + k] += q1[k];
          acc[(2 * a.G + g) * K + k] += q2[k];
        }
    }
    ch.store(acc, 3);
  }
}

template <typename T, int K>
struct StatsPass { static void run(const MixArgs& a, int64_t c0, int64_t c1) { stats<T, K>(a, c0, c1); } };
template <typename T, int K>
struct ApplyPass { static void run(const MixArgs& a, int64_t c0, int64_t c1) { apply<T, K>(a, c0, c1); } };
template <typename T, int K>
struct ApplyBackwardPass { static void run(const MixArgs& a, int64_t c0, int64_t c1) { apply_backward<T, K>(a, c0, c1); } };
template <typename T, int K>
struct StatsBackwardPass { static void run(const MixArgs& a, int64_t c0, int64_t c1) { stats_backward<T, K>(a, c0, c1); } };

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
int run(int is_double, const MixArgs* a, int64_t c0, int64_t c1) {
  return is_double ? run_k<double, Pass>(*a, c0, c1) : run_k<float, Pass>(*a, c0, c1);
}

}  // namespace

extern "C" {
int mix_max_components() { return 8; }
int mix_stats(int is_double, const MixArgs* a, int64_t c0, int64_t c1) { return run<StatsPass>(is_double, a, c0, c1); }
int mix_apply(int is_double, const MixArgs* a, int64_t c0, int64_t c1) { return run<ApplyPass>(is_double, a, c0, c1); }
int mix_apply_backward(int is_double, const MixArgs* a, int64_t c0, int64_t c1) { return run<ApplyBackwardPass>(is_double, a, c0, c1); }
int mix_stats_backward(int is_double, const MixArgs* a, int64_t c0, int64_t c1) { return run<StatsBackwardPass>(is_double, a, c0, c1); }
}
