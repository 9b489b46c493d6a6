// The compiled mixture kernel as torch operators (torch.library): adamatch_uan::mixture_forward,
// mixture_backward, mixture_sums and mixture_sums_backward, each a functional CPU op that
// allocates its outputs, fills MixArgs and runs mix_forward / mix_backward (mixture_kernel.cpp).
// Autograd, the fake (meta) implementations and the running averages are registered in
// Python (cpu_kernel.py), so that autograd, torch.compile, torch.export and tracing see
// the ops as ops, never as opaque calls. The forward returns its workspace (the kernel's
// tables and, for small inputs, the responsibilities) for the backward to read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "mixture_kernel.h"

namespace {

using at::Tensor;

// Below this many elements a call is cheaper on one thread than waking the others.
constexpr int64_t kParallelMinElements = 1 << 15;

// Offsets (in elements) of the kernel's tables in the forward's workspace; -1 for a table
// that is not there (given by the caller, or not needed).
struct Layout {
  int64_t log_weight = -1, var = -1, softmax = -1, slope = -1, h = -1, lc = -1, scale = -1, A = -1;
  int64_t shift = -1, sums = -1, alpha = -1, delta2 = -1, tau = -1, size = 0;
  Layout(int64_t N, int64_t C, int64_t P, int64_t K, int64_t G, bool parametrised, bool batch, bool cache) {
    const auto take = [this](int64_t n) {
      const int64_t at = size;
      size += n;
      return at;
    };
    if (parametrised) {
      log_weight = take(G * K * C);
      var = take(K * C);
      softmax = take(G * K * C);
      slope = take(K * C);
    }
    h = take(K * C);
    lc = take(G * K * C);
    scale = take(G * K * C);
    A = take(G * K * C);
    if (batch) {
      shift = take(C);
      sums = take(3 * K * C);
      alpha = take(K * C);
      delta2 = take(K * C);
    }
    if (cache) tau = take(N * K * C * P);
  }
};

// Element `offset` of t, or null for offset -1.
void* element(const Tensor& t, int64_t offset) {
  return offset < 0 ? nullptr : static_cast<char*>(t.data_ptr()) + offset * t.element_size();
}

// Data pointer of t, or null when t is undefined.
void* data(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct Inputs {
  // alpha, delta2: given, or undefined; delta2_floor (C,): or undefined
  Tensor x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2, delta2_floor;
};

// The kernel's arguments common to both calls: inputs, options and the workspace's tables.
MixArgs make_args(const Inputs& in, const Tensor& work, const Layout& l, double eps, bool parametrised,
                  double min_weight, double min_var) {
  MixArgs a{};
  a.x = in.x.data_ptr();
  a.ctx = in.context.defined() ? in.context.data_ptr<int64_t>() : nullptr;
  a.N = in.x.size(0);
  a.C = in.x.size(1);
  a.P = in.x.size(2);
  a.K = in.mu.size(0);
  a.G = in.weight_param.size(0);
  a.mu = in.mu.data_ptr();
  a.weight_param = in.weight_param.data_ptr();
  a.var_param = in.var_param.data_ptr();
  a.gamma = in.gamma.data_ptr();
  a.beta = in.beta.data_ptr();
  a.eps = eps;
  a.delta2_floor = in.delta2_floor.defined() ? in.delta2_floor.data_ptr() : nullptr;
  a.parametrised = parametrised;
  a.min_weight = min_weight;
  a.min_var = min_var;
  a.log_weight = parametrised ? element(work, l.log_weight) : in.weight_param.data_ptr();
  a.var = parametrised ? element(work, l.var) : in.var_param.data_ptr();
  a.softmax = element(work, l.softmax);
  a.slope = element(work, l.slope);
  a.h = element(work, l.h);
  a.lc = element(work, l.lc);
  a.scale = element(work, l.scale);
  a.A = element(work, l.A);
  a.shift = element(work, l.shift);
  a.sums = element(work, l.sums);
  a.alpha = in.alpha.defined() ? in.alpha.data_ptr() : element(work, l.alpha);
  a.delta2 = in.delta2.defined() ? in.delta2.data_ptr() : element(work, l.delta2);
  a.tau = element(work, l.tau);
  return a;
}

// What mix_backward writes: dx (the caller's buffer), the gradients of the mixture's
// parameters, of gamma and beta, and of given statistics (alpha, delta^2); the constructor
// points a's outputs at them.
struct Gradients {
  Tensor dx, weight, mu, var, gamma, beta, stats;
  Gradients(MixArgs& a, const Inputs& in, Tensor dx_buffer)
      : dx(std::move(dx_buffer)), weight(at::empty_like(in.weight_param)), mu(at::empty_like(in.mu)),
        var(at::empty_like(in.var_param)), gamma(at::empty_like(in.gamma)), beta(at::empty_like(in.beta)),
        stats(at::empty({2, in.mu.size(0), in.mu.size(1)}, in.mu.options())) {
    a.out = dx.data_ptr();
    a.g_weight = weight.data_ptr();
    a.g_mu = mu.data_ptr();
    a.g_var = var.data_ptr();
    a.g_gamma = gamma.data_ptr();
    a.g_beta = beta.data_ptr();
    a.g_alpha = stats[0].data_ptr();
    a.g_delta2 = stats[1].data_ptr();
  }
};

int threads_for(const Tensor& x) {
  return x.numel() >= kParallelMinElements ? static_cast<int>(std::min<int64_t>(at::get_num_threads(), x.size(1))) : 1;
}

void check_inputs(const Inputs& in) {
  TORCH_CHECK(in.x.dim() == 3 && in.x.is_contiguous() && in.x.device().is_cpu(), "mixture node: x must be a contiguous CPU (N, C, P) tensor");
  const auto table_type = in.mu.scalar_type();
  TORCH_CHECK(table_type == at::kFloat || table_type == at::kDouble, "mixture node: tables must be float32 or float64");
  TORCH_CHECK(in.x.scalar_type() == table_type || (in.x.scalar_type() == at::kBFloat16 && table_type == at::kFloat),
              "mixture node: x must be in the tables' dtype, or bfloat16 with float32 tables");
  TORCH_CHECK(in.mu.size(0) <= kMaxK, "mixture node: at most ", kMaxK, " components, got ", in.mu.size(0));
  for (const Tensor* t : {&in.weight_param, &in.mu, &in.var_param, &in.gamma, &in.beta, &in.alpha, &in.delta2,
                          &in.delta2_floor})
    TORCH_CHECK(!t->defined() || (t->scalar_type() == table_type && t->is_contiguous()),
                "mixture node: every table must be contiguous in one dtype (float32 or float64)");
  TORCH_CHECK(!in.context.defined() || (in.context.scalar_type() == at::kLong && in.context.is_contiguous()),
              "mixture node: context ids must be a contiguous int64 tensor");
}

// The kernel's data type of a call (mixture_kernel.h): x's, or bfloat16 storage over float32.
int dtype_of(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? kDouble : x.scalar_type() == at::kBFloat16 ? kBFloat16 : kFloat;
}

// Workspace tables of a forward call: the layout every op and the Python fake implementation
// (cpu_kernel.workspace_size) agree on.
Layout layout_for(const Inputs& in, bool parametrised, int64_t tau_cache_bytes) {
  const Tensor& x = in.x;
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2), K = in.mu.size(0), G = in.weight_param.size(0);
  const bool batch = !in.alpha.defined();
  const bool cache = batch && N * C * P * K * static_cast<int64_t>(in.mu.element_size()) <= tau_cache_bytes;
  return Layout(N, C, P, K, G, parametrised, batch, cache);
}

Tensor optional(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// y, the batch statistics (3, K, C) = (sum of tau, alpha, delta^2) or (0, K, C) with given
// statistics, and the workspace.
std::tuple<Tensor, Tensor, Tensor> mixture_forward(
    const Tensor& x, const std::optional<Tensor>& context, const Tensor& weight_param, const Tensor& mu,
    const Tensor& var_param, const Tensor& gamma, const Tensor& beta, const std::optional<Tensor>& alpha,
    const std::optional<Tensor>& delta2, const std::optional<Tensor>& delta2_floor, double eps, double min_weight,
    double min_var, bool parametrised, int64_t tau_cache_bytes) {
  const Inputs in{x, optional(context), weight_param, mu, var_param, gamma, beta,
                  optional(alpha), optional(delta2), optional(delta2_floor)};
  check_inputs(in);
  const int64_t K = mu.size(0), C = x.size(1);
  const Layout layout = layout_for(in, parametrised, tau_cache_bytes);
  Tensor work = at::empty({layout.size}, mu.options());
  Tensor y = at::empty_like(x);
  MixArgs a = make_args(in, work, layout, eps, parametrised, min_weight, min_var);
  a.out = y.data_ptr();
  TORCH_CHECK(mix_forward(dtype_of(x), &a, threads_for(x)) == 0, "mixture kernel forward failed");
  if (in.alpha.defined()) return {y, at::empty({0, K, C}, mu.options()), work};
  const auto table = [&](int64_t offset) { return work.narrow(0, offset, K * C).view({K, C}); };
  return {y, at::stack({table(layout.sums), table(layout.alpha), table(layout.delta2)}), work};
}

// dx and the gradients of weight_param, mu, var_param, gamma, beta and of given statistics
// (2, K, C) (undefined-free: zeros where nothing flows).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mixture_backward(
    const Tensor& grad, const Tensor& x, const std::optional<Tensor>& context, const Tensor& weight_param,
    const Tensor& mu, const Tensor& var_param, const Tensor& gamma, const Tensor& beta,
    const std::optional<Tensor>& alpha, const std::optional<Tensor>& delta2, const std::optional<Tensor>& delta2_floor,
    const Tensor& work, double eps, double min_weight, double min_var, bool parametrised, int64_t tau_cache_bytes,
    bool need_param_grads) {
  const Inputs in{x, optional(context), weight_param, mu, var_param, gamma, beta,
                  optional(alpha), optional(delta2), optional(delta2_floor)};
  check_inputs(in);
  const Layout layout = layout_for(in, parametrised, tau_cache_bytes);
  TORCH_CHECK(work.numel() == layout.size, "mixture_backward: the workspace is not this forward's");
  const Tensor gy = grad.contiguous().to(x.scalar_type());
  MixArgs a = make_args(in, work, layout, eps, parametrised, min_weight, min_var);
  const Gradients g(a, in, at::empty_like(x));
  a.grad = gy.data_ptr();
  a.need_param_grads = need_param_grads;
  TORCH_CHECK(mix_backward(dtype_of(x), &a, threads_for(x)) == 0, "mixture kernel backward failed");
  if (!need_param_grads) g.weight.zero_(), g.mu.zero_(), g.var.zero_();
  if (!in.alpha.defined()) g.stats.zero_();
  return {g.dx, g.weight, g.mu, g.var, g.gamma, g.beta, g.stats};
}

// The sums alone, S (3, K, C) over positions of tau_k * {1, x - s, (x - s)^2} about each
// channel's first value s (C,), for a distributed run that all-reduces them between this op
// and the transform with given statistics; and the workspace.
std::tuple<Tensor, Tensor, Tensor> mixture_sums(const Tensor& x, const std::optional<Tensor>& context,
                                                const Tensor& weight_param, const Tensor& mu, const Tensor& var_param,
                                                double min_weight, double min_var, bool parametrised) {
  const Tensor none;
  const Tensor ones = at::ones({x.size(1)}, mu.options()), zeros = at::zeros({x.size(1)}, mu.options());
  const Inputs in{x, optional(context), weight_param, mu, var_param, ones, zeros, none, none, none};
  check_inputs(in);
  const int64_t K = mu.size(0), C = x.size(1);
  const Layout layout = layout_for(in, parametrised, 0);
  // Zeros: the backward's parameter gradients read the output tables, which this op never fills.
  Tensor work = at::zeros({layout.size}, mu.options());
  MixArgs a = make_args(in, work, layout, 1.0, parametrised, min_weight, min_var);
  a.phase = 1;
  if (x.size(0) > 0) TORCH_CHECK(mix_forward(dtype_of(x), &a, threads_for(x)) == 0, "mixture kernel sums failed");
  return {work.narrow(0, layout.sums, 3 * K * C).view({3, K, C}).clone(), work.narrow(0, layout.shift, C).clone(), work};
}

// The stats pass's backward from dL/dS: dx and the mixture's parameter gradients through tau.
std::tuple<Tensor, Tensor, Tensor, Tensor> mixture_sums_backward(
    const Tensor& grad_sums, const Tensor& x, const std::optional<Tensor>& context, const Tensor& weight_param,
    const Tensor& mu, const Tensor& var_param, const Tensor& work, double min_weight, double min_var,
    bool parametrised) {
  const Tensor none;
  const Tensor ones = at::ones({x.size(1)}, mu.options()), zeros = at::zeros({x.size(1)}, mu.options());
  const Inputs in{x, optional(context), weight_param, mu, var_param, ones, zeros, none, none, none};
  check_inputs(in);
  const Layout layout = layout_for(in, parametrised, 0);
  TORCH_CHECK(work.numel() == layout.size, "mixture_sums_backward: the workspace is not this forward's");
  // dL/dS is a table: in the tables' dtype (float32 for a bfloat16 x), as the kernel reads it.
  const Tensor g_sums = grad_sums.contiguous().to(mu.scalar_type());
  MixArgs a = make_args(in, work, layout, 1.0, parametrised, min_weight, min_var);
  const Gradients g(a, in, at::zeros_like(x));
  a.phase = 1;
  a.dS = g_sums.data_ptr();
  a.grad = nullptr;
  a.need_param_grads = true;
  if (x.size(0) > 0) {
    TORCH_CHECK(mix_backward(dtype_of(x), &a, threads_for(x)) == 0, "mixture kernel sums backward failed");
  } else {
    g.weight.zero_(), g.mu.zero_(), g.var.zero_();
  }
  return {g.dx, g.weight, g.mu, g.var};
}

}  // namespace

TORCH_LIBRARY(adamatch_uan, m) {
  m.def("mixture_forward(Tensor x, Tensor? context, Tensor weight_param, Tensor mu, Tensor var_param, Tensor gamma, "
        "Tensor beta, Tensor? alpha, Tensor? delta2, Tensor? delta2_floor, float eps, float min_weight, float min_var, "
        "bool parametrised, int tau_cache_bytes) -> (Tensor, Tensor, Tensor)");
  m.def("mixture_backward(Tensor grad, Tensor x, Tensor? context, Tensor weight_param, Tensor mu, Tensor var_param, "
        "Tensor gamma, Tensor beta, Tensor? alpha, Tensor? delta2, Tensor? delta2_floor, Tensor work, float eps, "
        "float min_weight, float min_var, bool parametrised, int tau_cache_bytes, bool need_param_grads) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("mixture_sums(Tensor x, Tensor? context, Tensor weight_param, Tensor mu, Tensor var_param, float min_weight, "
        "float min_var, bool parametrised) -> (Tensor, Tensor, Tensor)");
  m.def("mixture_sums_backward(Tensor grad_sums, Tensor x, Tensor? context, Tensor weight_param, Tensor mu, "
        "Tensor var_param, Tensor work, float min_weight, float min_var, bool parametrised) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adamatch_uan, CPU, m) {
  m.impl("mixture_forward", &mixture_forward);
  m.impl("mixture_backward", &mixture_backward);
  m.impl("mixture_sums", &mixture_sums);
  m.impl("mixture_sums_backward", &mixture_sums_backward);
}
