"""UAN (docs/METHOD.md §4): constraints, learning, evaluation modes, contexts."""

import math

import pytest
import torch
from torch.func import functional_call

from adamatch_uan.norm import UAN, frozen_stats
from adamatch_uan.norm.mixture import spread_mixture
from adamatch_uan.norm.uan import INFERENCES

from formulas import responsibilities, transform

TRUE_MEANS = torch.tensor([-4.0, 0.5, 5.0])
TRUE_STDS = torch.tensor([0.5, 0.4, 0.7])
TRUE_WEIGHTS = torch.tensor([0.3, 0.3, 0.4])


def mixture_samples(n, channels=2):
    """(n, channels) draws from a well-separated 1-D mixture, independently per channel."""
    k = torch.multinomial(TRUE_WEIGHTS, n * channels, replacement=True).view(n, channels)
    return TRUE_MEANS[k] + TRUE_STDS[k] * torch.randn(n, channels)


def negative_log_likelihood(layer, x):
    lw, mu, var = layer.mixture()
    log_p = lw[0] - 0.5 * torch.log(2 * math.pi * var) - (x.unsqueeze(1) - mu) ** 2 / (2 * var)
    return -torch.logsumexp(log_p, dim=1).mean()


def test_initial_components_spread_over_a_normalized_range():
    layer = UAN(4, num_components=3)
    torch.testing.assert_close(layer.mean[:, 0], spread_mixture(3)[0])
    assert layer.mean[0, 0] < -0.9 and layer.mean[2, 0] > 0.9
    torch.testing.assert_close(layer.weights, torch.full((1, 3, 4), 1 / 3))
    mixture_var = (layer.var + layer.mean**2).mean(0)  # uniform λ, mean 0
    torch.testing.assert_close(mixture_var, torch.ones(4))


def test_learns_a_well_separated_mixture_and_normalizes_each_component():
    layer = UAN(2, num_components=3, affine=False)
    opt = torch.optim.Adam([layer.prior_logits, layer.mean, layer.raw_var], lr=0.1)
    for _ in range(500):
        loss = negative_log_likelihood(layer, mixture_samples(512))
        opt.zero_grad()
        loss.backward()
        opt.step()
    order = layer.mean.detach().argsort(0)
    means = layer.mean.detach().gather(0, order)
    stds = layer.var.detach().gather(0, order).sqrt()
    weights = layer.weights.detach()[0].gather(0, order)
    torch.testing.assert_close(means, TRUE_MEANS[:, None].expand(3, 2), atol=0.15, rtol=0)
    torch.testing.assert_close(stds, TRUE_STDS[:, None].expand(3, 2), atol=0.1, rtol=0)
    torch.testing.assert_close(weights, TRUE_WEIGHTS[:, None].expand(3, 2), atol=0.05, rtol=0)

    x = mixture_samples(4096)
    y = layer(x).detach()
    tau = responsibilities(x.unsqueeze(-1), *layer.mixture(), None).squeeze(-1).detach()  # (N, K, C)
    lam = layer.weights.detach()[0]
    for k in range(3):
        w = tau[:, k]
        # §2 scales component k by 1/sqrt(λ_k): undo it to see the unit variance.
        z = y * lam[k].sqrt()
        mean = (w * y).sum(0) / w.sum(0)
        var = (w * (z - (w * z).sum(0) / w.sum(0)) ** 2).sum(0) / w.sum(0)
        torch.testing.assert_close(mean, torch.zeros(2), atol=0.02, rtol=0)
        torch.testing.assert_close(var, torch.ones(2), atol=0.02, rtol=0)


@pytest.mark.parametrize("num_contexts", [None, 2])
def test_constraints_hold_after_large_steps(num_contexts):
    layer = UAN(3, num_components=4, num_contexts=num_contexts)
    opt = torch.optim.SGD(layer.parameters(), lr=100.0)
    context = torch.randint(0, 2, (16,)) if num_contexts else None
    for _ in range(100):
        y = layer(torch.randn(16, 3, 4, 4) * 5, context)
        # Bounded in y, so only the raw parameters run wild, not the loss.
        loss = torch.sin(3 * y).mean() + y.tanh().max()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(layer.weights.sum(1), torch.ones(num_contexts or 1, 3))
    assert (layer.weights >= layer.min_weight).all() and (layer.var >= layer.min_var).all()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert layer.prior_logits.abs().max() > 10 or layer.raw_var.abs().max() > 10  # the steps were large


def test_a_vanishing_weight_keeps_the_output_finite():
    layer = UAN(3, num_components=3)
    with torch.no_grad():
        layer.prior_logits[0, 0] = -1e4
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("num_contexts", [None, 2])
def test_gradcheck_through_the_whole_layer(backend, num_contexts):
    layer = UAN(2, num_components=3, num_contexts=num_contexts, mixture_fit="gradient").double()  # a pure function
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    context = torch.tensor([0, 1, 1, 0]) if num_contexts else None

    def fn(x, *params):
        return functional_call(layer, dict(zip(names, params)), (x, context))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_learned_inference_uses_learned_mean_and_variance():
    layer = UAN(3, inference="learned")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(8, 3, 4, 4)
    train_out = layer(x)
    layer.eval()
    lw, mu, var = layer.mixture()
    expected = transform(x, lw, mu, var, layer.weight, layer.bias, layer.eps, stats=(mu, var))
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(layer(x), train_out, atol=1e-3)


def test_running_inference_uses_running_batch_statistics():
    layer = UAN(3, inference="running", momentum=0.5, mixture_fit="gradient", var_floor=0.0)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    layer(x)
    lw, mu, var = layer.mixture()
    tau = responsibilities(x.flatten(2), lw, mu, var, None).detach()
    mass = tau.sum((0, 3))
    alpha = (tau * x.flatten(2).unsqueeze(1)).sum((0, 3)) / mass
    delta2 = (tau * (x.flatten(2).unsqueeze(1) - alpha.unsqueeze(-1)) ** 2).sum((0, 3)) / mass
    torch.testing.assert_close(layer.running_mean, 0.5 * before_mean + 0.5 * alpha)
    torch.testing.assert_close(layer.running_var, 0.5 * before_var + 0.5 * delta2 * mass / (mass - 1))
    layer.eval()
    expected = transform(x, lw, mu, var, layer.weight, layer.bias, layer.eps,
                         stats=(layer.running_mean, layer.running_var))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("inference", INFERENCES)
def test_context_changes_the_output_only_through_its_weights(inference):
    # Evaluation first: training forwards update the running statistics, which differ by context.
    layer = UAN(3, num_contexts=2, mixture_fit="gradient", inference=inference)  # training leaves the mixture as it is
    x = torch.randn(8, 3, 4, 4)
    for training in (False, True):
        layer.train(training)
        torch.testing.assert_close(layer(x, torch.zeros(8, dtype=torch.long)), layer(x, torch.ones(8, dtype=torch.long)))
    with torch.no_grad():
        layer.prior_logits[1].add_(torch.randn(3, 3))
    plain = UAN(3, mixture_fit="gradient", inference=inference)
    plain.load_state_dict({k: v[1:] if k == "prior_logits" else v for k, v in layer.state_dict().items()})
    mixed = torch.tensor([0, 1] * 4)
    layer.eval(), plain.eval()
    torch.testing.assert_close(layer(x, mixed)[1::2], plain(x[1::2]))
    for training in (False, True):
        layer.train(training), plain.train(training)
        torch.testing.assert_close(layer(x, 1), plain(x))
        assert not torch.allclose(layer(x, 0), layer(x, 1))


def test_default_context_is_used_without_one():
    layer = UAN(3, num_contexts=2, default_context=1, mixture_fit="gradient")
    with torch.no_grad():
        layer.prior_logits[1].add_(torch.randn(3, 3))
    x = torch.randn(8, 3, 4, 4)
    for training in (True, False):
        layer.train(training)
        torch.testing.assert_close(layer(x), layer(x, 1))


def test_bad_configuration_and_context_are_clear_errors():
    with pytest.raises(ValueError, match="inference"):
        UAN(3, inference="batch")
    with pytest.raises(ValueError, match="default_context"):
        UAN(3, num_contexts=2, default_context=2)
    with pytest.raises(ValueError, match="num_contexts"):
        UAN(3)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"context ids in \[0, 2\)"):
        UAN(3, num_contexts=2)(torch.randn(4, 3), torch.full((4,), 2))


def test_likelihood_fit_adds_the_weighted_nll_to_any_loss_backpropagated_through_the_layer():
    torch.manual_seed(1)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    upstream = torch.randn(8, 3, 4, 4)
    fitted = UAN(3, mixture_fit="likelihood", likelihood_weight=0.5, max_samples=10_000)
    plain = UAN(3, mixture_fit="gradient")
    plain.load_state_dict(fitted.state_dict())
    (fitted(x) * upstream).sum().backward()
    loss = (plain(x) * upstream).sum() + 0.5 * negative_log_likelihood(plain, x.transpose(0, 1).reshape(3, -1).T)
    loss.backward()
    # 128 positions < max_samples: the NLL is the exact mean over all of them.
    torch.testing.assert_close(fitted.last_nll, negative_log_likelihood(plain, x.transpose(0, 1).reshape(3, -1).T).detach())
    for a, b in zip(fitted.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_momentum_fit_moves_the_mixture_towards_the_batch_and_frozen_stats_discards_it():
    layer = UAN(3, mixture_fit="momentum", momentum=0.5, max_samples=10_000)
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    lw, mean, var = (t.detach().clone() for t in layer.mixture())
    with frozen_stats(layer):
        layer(x)
    for before, now in zip((lw, mean, var), layer.mixture()):
        torch.testing.assert_close(now.detach(), before)
    y = layer(x)
    tau = responsibilities(x.flatten(2), lw, mean, var, None)  # the mixture before the write computed τ
    mass = tau.sum((0, 3))
    alpha = (tau * x.flatten(2).unsqueeze(1)).sum((0, 3)) / mass
    delta2 = (tau * (x.flatten(2).unsqueeze(1) - alpha.unsqueeze(-1)) ** 2).sum((0, 3)) / mass
    share = mass / mass.sum(0)  # 128 positions < max_samples: every one is in the sample
    torch.testing.assert_close(layer.mean.detach(), 0.5 * mean + 0.5 * alpha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.var.detach(), 0.5 * var + 0.5 * delta2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weights.detach()[0], 0.5 * lw[0].exp() + 0.5 * share, rtol=1e-5, atol=1e-5)
    y.sum().backward()  # the writes left the graph valid
    assert layer.mean.grad is not None


@pytest.mark.parametrize("mixture_fit", ["gradient", "likelihood", "momentum"])
def test_var_floor_tames_a_component_on_a_spike(mixture_fit):
    x = torch.full((16, 2, 6, 6), 0.25)  # a constant value over two thirds of the positions (zero padding)
    x[:, :, :2] = torch.randn(16, 2, 2, 6)
    upstream = torch.randn(16, 2, 6, 6)
    largest = {}
    for floor in (0.0, 0.01):
        layer = UAN(2, mixture_fit=mixture_fit, var_floor=floor, eps=1e-8)
        with torch.no_grad():  # a narrow component on the spike, as a fitted mixture puts there: δ² ≈ 0
            layer.mean.copy_(torch.tensor([[-1.0, -1.0], [0.25, 0.25], [1.0, 1.0]]))
            layer.raw_var[1].fill_(-20.0)
        xg = x.clone().requires_grad_()
        (layer(xg) * upstream).sum().backward()
        largest[floor] = xg.grad.abs().max()
    assert largest[0.01] < largest[0.0] / 4, largest


def test_k1_with_the_defaults_is_batchnorm_in_training_and_evaluation():
    layer = UAN(5, num_components=1)  # the defaults: var_floor 0.01, the task-gradient fit, the running rule
    reference = torch.nn.BatchNorm2d(5)
    for step in range(4):  # the running statistics follow BatchNorm's, step by step
        x = torch.randn(8, 5, 6, 7) * (step + 1) + step
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    layer.eval(), reference.eval()
    x = torch.randn(3, 5, 6, 7) * 2
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-4)


def test_mixture_fit_options_are_validated():
    with pytest.raises(ValueError, match="mixture_fit"):
        UAN(3, mixture_fit="em")
    with pytest.raises(ValueError, match="var_floor"):
        UAN(3, var_floor=1.5)
