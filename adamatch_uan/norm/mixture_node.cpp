// The mixture transform as one autograd node written in C++ (torch's custom Function),
// so that a layer's forward and backward each cost one call from Python: the node
// allocates the output and the kernel's tables (one workspace), fills MixArgs, runs
// mix_forward / mix_backward (mixture_kernel.cpp) and hands the gradients to autograd.
// A Python node costs several times more per call than these two kernel calls take on
// a small input (kernel.py builds this file with torch's cpp_extension).
#include <torch/extension.h>

#include <algorithm>
#include <optional>

#include "mixture_kernel.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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
        stats(at::empty({2, in.mu.size(0), in.mu.size(1)}, in.x.options())) {
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
  TORCH_CHECK(in.x.scalar_type() == at::kFloat || in.x.scalar_type() == at::kDouble, "mixture node: x must be float32 or float64");
  TORCH_CHECK(in.mu.size(0) <= kMaxK, "mixture node: at most ", kMaxK, " components, got ", in.mu.size(0));
  for (const Tensor* t : {&in.weight_param, &in.mu, &in.var_param, &in.gamma, &in.beta, &in.alpha, &in.delta2,
                          &in.delta2_floor})
    TORCH_CHECK(!t->defined() || (t->scalar_type() == in.x.scalar_type() && t->is_contiguous()),
                "mixture node: every table must be contiguous in the dtype of x");
  TORCH_CHECK(!in.context.defined() || (in.context.scalar_type() == at::kLong && in.context.is_contiguous()),
              "mixture node: context ids must be a contiguous int64 tensor");
}

struct MixtureNode : public torch::autograd::Function<MixtureNode> {
  // Outputs: y, and with batch statistics and want_stats also S0 (sum of tau), alpha and
  // delta^2, each (K, C) and not differentiable. With batch statistics the running
  // averages, when given, are updated in place: r <- r + momentum (batch - r), delta^2
  // corrected by S0 / max(S0 - 1, 1).
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& context,
                               const Tensor& weight_param, const Tensor& mu, const Tensor& var_param,
                               const Tensor& gamma, const Tensor& beta, const std::optional<Tensor>& alpha,
                               const std::optional<Tensor>& delta2, const std::optional<Tensor>& delta2_floor,
                               const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                               double eps, double min_weight, double min_var, double momentum, bool parametrised,
                               bool want_stats, int64_t tau_cache_bytes) {
    const Inputs in{x, context.value_or(Tensor()), weight_param, mu, var_param, gamma, beta,
                    alpha.value_or(Tensor()), delta2.value_or(Tensor()), delta2_floor.value_or(Tensor())};
    check_inputs(in);
    const int64_t N = x.size(0), C = x.size(1), P = x.size(2), K = mu.size(0), G = weight_param.size(0);
    const bool batch = !in.alpha.defined();
    const bool cache = batch && N * C * P * K * x.element_size() <= tau_cache_bytes;
    const Layout layout(N, C, P, K, G, parametrised, batch, cache);
    Tensor work = at::empty({layout.size}, x.options());
    Tensor y = at::empty_like(x);
    MixArgs a = make_args(in, work, layout, eps, parametrised, min_weight, min_var);
    a.out = y.data_ptr();
    const bool track = batch && running_mean.has_value() && running_mean->defined();
    const bool in_place = track && running_mean->scalar_type() == x.scalar_type() && running_mean->is_contiguous() &&
                          running_var->scalar_type() == x.scalar_type() && running_var->is_contiguous();
    if (in_place) {
      a.running_mean = running_mean->data_ptr();
      a.running_var = running_var->data_ptr();
      a.momentum = momentum;
    }
    TORCH_CHECK(mix_forward(x.scalar_type() == at::kDouble, &a, threads_for(x)) == 0, "mixture kernel forward failed");
    const auto table = [&](int64_t offset) { return work.narrow(0, offset, K * C).view({K, C}); };
    if (in_place) {
      // Written behind autograd's back: bump the versions so saved copies notice.
      torch::autograd::impl::bump_version(*running_mean);
      torch::autograd::impl::bump_version(*running_var);
    } else if (track) {
      const Tensor count = table(layout.sums);
      running_mean->lerp_(table(layout.alpha).to(running_mean->scalar_type()), momentum);
      running_var->lerp_((table(layout.delta2) * count / (count - 1).clamp_min(1)).to(running_var->scalar_type()),
                         momentum);
    }
    ctx->save_for_backward({x, in.context, weight_param, mu, var_param, gamma, beta, in.alpha, in.delta2, in.delta2_floor});
    ctx->saved_data["work"] = work;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["min_weight"] = min_weight;
    ctx->saved_data["min_var"] = min_var;
    ctx->saved_data["parametrised"] = parametrised;
    ctx->saved_data["cache"] = cache;
    ctx->saved_data["need_param_grads"] =
        weight_param.requires_grad() || mu.requires_grad() || var_param.requires_grad();
    if (!batch || !want_stats) return {y};
    // Copies: the workspace stays as backward needs it whatever the caller does with them.
    variable_list stats{table(layout.sums).clone(), table(layout.alpha).clone(), table(layout.delta2).clone()};
    ctx->mark_non_differentiable(stats);
    return {y, stats[0], stats[1], stats[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The gradients below carry no graph (as torch's once_differentiable says of Python nodes).
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the mixture transform cannot be differentiated twice (backward with create_graph=True)");
    const variable_list saved = ctx->get_saved_variables();
    const Inputs in{saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], saved[8], saved[9]};
    const Tensor work = ctx->saved_data["work"].toTensor();
    const bool parametrised = ctx->saved_data["parametrised"].toBool();
    const bool need_param_grads = ctx->saved_data["need_param_grads"].toBool();
    const Tensor& x = in.x;
    const int64_t N = x.size(0), C = x.size(1), P = x.size(2), K = in.mu.size(0), G = in.weight_param.size(0);
    const bool given = in.alpha.defined();
    const Layout layout(N, C, P, K, G, parametrised, !given, ctx->saved_data["cache"].toBool());
    const Tensor gy = grad_outputs[0].contiguous();
    MixArgs a = make_args(in, work, layout, ctx->saved_data["eps"].toDouble(), parametrised,
                          ctx->saved_data["min_weight"].toDouble(), ctx->saved_data["min_var"].toDouble());
    const Gradients g(a, in, at::empty_like(x));
    a.grad = gy.data_ptr();
    a.need_param_grads = need_param_grads;
    TORCH_CHECK(mix_backward(x.scalar_type() == at::kDouble, &a, threads_for(x)) == 0, "mixture kernel backward failed");
    const Tensor none;
    // One entry per forward argument: x, context, the tables, given alpha, delta^2, the
    // floor, the running averages and the seven options (the floor is a constant).
    return {g.dx,
            none,
            need_param_grads ? g.weight : none,
            need_param_grads ? g.mu : none,
            need_param_grads ? g.var : none,
            g.gamma,
            g.beta,
            given ? g.stats[0] : none,
            given ? g.stats[1] : none,
            none, none, none, none, none, none, none, none, none, none};
  }
};

// The sums alone, S (3, K, C) over positions of tau_k * {1, x - s, (x - s)^2} about each
// channel's first value s (C,), for a distributed run that all-reduces them between this
// node and the transform with given statistics; the backward takes dL/dS and runs the stats
// pass's backward (input gradient and the mixture's parameter gradients through tau).
struct SumsNode : public torch::autograd::Function<SumsNode> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& context,
                               const Tensor& weight_param, const Tensor& mu, const Tensor& var_param,
                               double min_weight, double min_var, bool parametrised) {
    const Tensor none;
    const Tensor ones = at::ones({x.size(1)}, x.options()), zeros = at::zeros({x.size(1)}, x.options());
    const Inputs in{x, context.value_or(Tensor()), weight_param, mu, var_param, ones, zeros, none, none, none};
    check_inputs(in);
    const int64_t N = x.size(0), C = x.size(1), P = x.size(2), K = mu.size(0), G = weight_param.size(0);
    const Layout layout(N, C, P, K, G, parametrised, true, false);
    // Zeros: the backward's parameter gradients read the output tables, which this node never fills.
    Tensor work = at::zeros({layout.size}, x.options());
    MixArgs a = make_args(in, work, layout, 1.0, parametrised, min_weight, min_var);
    a.phase = 1;
    if (N > 0) TORCH_CHECK(mix_forward(x.scalar_type() == at::kDouble, &a, threads_for(x)) == 0, "mixture kernel sums failed");
    ctx->save_for_backward({x, in.context, weight_param, mu, var_param});
    ctx->saved_data["work"] = work;
    ctx->saved_data["min_weight"] = min_weight;
    ctx->saved_data["min_var"] = min_var;
    ctx->saved_data["parametrised"] = parametrised;
    Tensor sums = work.narrow(0, layout.sums, 3 * K * C).view({3, K, C}).clone();
    Tensor shift = work.narrow(0, layout.shift, C).clone();
    ctx->mark_non_differentiable({shift});
    return {sums, shift};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the mixture transform cannot be differentiated twice (backward with create_graph=True)");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor none;
    const Tensor ones = at::ones({x.size(1)}, x.options()), zeros = at::zeros({x.size(1)}, x.options());
    const Inputs in{x, saved[1], saved[2], saved[3], saved[4], ones, zeros, none, none, none};
    const bool parametrised = ctx->saved_data["parametrised"].toBool();
    const int64_t N = x.size(0), C = x.size(1), P = x.size(2), K = in.mu.size(0), G = in.weight_param.size(0);
    const Layout layout(N, C, P, K, G, parametrised, true, false);
    const Tensor work = ctx->saved_data["work"].toTensor();
    const Tensor g_sums = grad_outputs[0].defined() ? grad_outputs[0].contiguous() : at::zeros({3, K, C}, x.options());
    MixArgs a = make_args(in, work, layout, 1.0, parametrised, ctx->saved_data["min_weight"].toDouble(),
                          ctx->saved_data["min_var"].toDouble());
    const Gradients g(a, in, at::zeros_like(x));
    a.phase = 1;
    a.dS = g_sums.data_ptr();
    a.grad = nullptr;
    a.need_param_grads = true;
    if (N > 0) {
      TORCH_CHECK(mix_backward(x.scalar_type() == at::kDouble, &a, threads_for(x)) == 0, "mixture kernel sums backward failed");
    } else {
      g.weight.zero_(), g.mu.zero_(), g.var.zero_();
    }
    return {g.dx, none, g.weight, g.mu, g.var, none, none, none};
  }
};

variable_list sums(const Tensor& x, const std::optional<Tensor>& context, const Tensor& weight_param, const Tensor& mu,
                   const Tensor& var_param, double min_weight, double min_var, bool parametrised) {
  return SumsNode::apply(x, context, weight_param, mu, var_param, min_weight, min_var, parametrised);
}

variable_list transform(const Tensor& x, const std::optional<Tensor>& context, const Tensor& weight_param,
                        const Tensor& mu, const Tensor& var_param, const Tensor& gamma, const Tensor& beta,
                        const std::optional<Tensor>& alpha, const std::optional<Tensor>& delta2,
                        const std::optional<Tensor>& delta2_floor, const std::optional<Tensor>& running_mean,
                        const std::optional<Tensor>& running_var, double eps, double min_weight, double min_var,
                        double momentum, bool parametrised, bool want_stats, int64_t tau_cache_bytes) {
  return MixtureNode::apply(x, context, weight_param, mu, var_param, gamma, beta, alpha, delta2, delta2_floor,
                            running_mean, running_var, eps, min_weight, min_var, momentum, parametrised, want_stats,
                            tau_cache_bytes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("transform", &transform, "The mixture transform as one autograd node (see kernel.transform).");
  m.def("sums", &sums, "The transform's sums alone, as an autograd node (see kernel.sums).");
}
