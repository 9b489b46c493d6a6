// The two calls of the compiled mixture kernel (mixture_kernel.cpp) and their arguments,
// shared with the autograd node that calls them (mixture_node.cpp).
#pragma once

#include <cstdint>

// The largest K the calls serve: the dispatcher's MAX_COMPONENTS (backends/__init__.py), which build.py
// hands to the compiler, so the limit is written once.
#ifndef MIX_MAX_K
#error "build with -DMIX_MAX_K=<MAX_COMPONENTS>, as adamatch_uan/norm/backends/build.py does"
#endif
constexpr int kMaxK = MIX_MAX_K;

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
  const void* delta2_floor;  // (C,) floor of delta^2 (max(delta_k^2, floor_c) replaces delta_k^2), or null
  int64_t parametrised;      // lambda = w + (1 - K w) softmax_k(p), sigma^2 = softplus(r) + min_var
  double min_weight, min_var;
  void* log_weight;          // (G, K, C) log lambda: written by mix_forward when parametrised, else given
  void* var;                 // (K, C) sigma^2: written by mix_forward when parametrised, else given
  void* softmax;             // (G, K, C) softmax_k(p): written by mix_forward when parametrised
  void* slope;               // (K, C) softplus'(r): written by mix_forward when parametrised
  void* h;                   // (K, C) 1 / (2 sigma^2): written by mix_forward
  void* lc;                  // (G, K, C) log lambda - 0.5 log(2 pi sigma^2): written by mix_forward
  void* shift;               // (C,) shift of the sums: written by mix_forward
  void* sums;                // (3, K, C) batch sums: written by mix_forward; null with given statistics
  void* alpha;               // (K, C) alpha_k: written from the sums, or given
  void* delta2;              // (K, C) delta_k^2: written from the sums, or given
  void* scale;               // (G, K, C) lambda^(-1/2) (max(delta^2, floor) + eps)^(-1/2): written by mix_forward
  void* A;                   // (G, K, C) output scales gamma * scale: written by mix_forward
  void* running_mean;        // (K, C) running alpha, updated in place by mix_forward; or null
  void* running_var;         // (K, C) running delta^2 (corrected by S0 / (S0 - 1)); or null
  double momentum;
  void* out;                 // (N, C, P) output (forward) or input gradient (backward)
  void* tau;                 // responsibilities cached by mix_forward's stats pass for the other passes; or null
  // Gradients written by mix_backward: w.r.t. weight_param (or log lambda), mu, var_param
  // (or sigma^2), given alpha and delta^2, gamma, beta.
  void *g_weight, *g_mu, *g_var, *g_alpha, *g_delta2, *g_gamma, *g_beta;
  int64_t need_param_grads;
  // 0: the whole transform. 1: the sums alone (for a distributed run, which all-reduces them
  // between calls): mix_forward stops after the stats pass; mix_backward takes dS as given and
  // runs the stats pass's backward only (out must be zeroed; A and scale are unused).
  int64_t phase;
  // Scratch of mix_backward, set by the call itself.
  void* dS;                  // (3, K, C) gradient of the sums (given with phase 1)
  void* red;                 // (5, G, K, C) reductions of the output backward
  void* red2;                // (3, G, K, C) reductions of the stats backward
};

// The data types a call runs in: float32 or float64 throughout, or x, the output and the
// gradients stored in bfloat16 with every computation and table in float32.
constexpr int kFloat = 0, kDouble = 1, kBFloat16 = 2;

// Forward and backward of the mixture transform on channels split between `threads`
// OpenMP threads, in `dtype` (kFloat, kDouble or kBFloat16). Return nonzero when K > kMaxK.
int mix_forward(int dtype, const MixArgs* a, int threads);
int mix_backward(int dtype, const MixArgs* a, int threads);
