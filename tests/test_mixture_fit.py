"""How UAN's mixture is tied to its input (norm/mixture_fit.py): the NLL term, its injection, momentum writes."""

import math

import pytest
import torch
import torch.nn.functional as F

from adamatch_uan.models import make_backbone
from adamatch_uan.norm.mixture import sample_positions, spread_mixture
from adamatch_uan.norm.mixture_fit import add_to_objective, component_shares, mixture_nll, stepwise_update

MEANS, STDS, WEIGHTS = torch.tensor([-1.5, 1.0]), torch.tensor([0.3, 0.5]), torch.tensor([0.6, 0.4])  # overall


def test_nll_is_the_mixture_negative_log_likelihood_per_context():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    log_weight = torch.log_softmax(torch.randn(2, 2, 3, dtype=torch.float64), 1)
    mean, var = torch.randn(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64) + 0.2
    context = torch.tensor([0, 1, 1, 0])
    rows, values = sample_positions(x, 10_000)  # every position
    expected = 0.0
    for n in range(4):
        for c in range(3):
            for p in range(5):
                dens = sum(log_weight[context[n], k, c].exp() * torch.exp(-(x[n, c, p] - mean[k, c]) ** 2 / (2 * var[k, c]))
                           / torch.sqrt(2 * math.pi * var[k, c]) for k in range(2))
                expected -= torch.log(dens) / 60
    torch.testing.assert_close(mixture_nll(values, rows, log_weight, mean, var, context), expected)


def test_sampled_positions_are_an_unbiased_sample():
    x = torch.arange(2 * 3 * 5000, dtype=torch.float32).view(2, 3, 5000)
    rows, values = sample_positions(x, 8000)
    assert values.shape == (8000, 3) and rows.shape == (8000,)
    torch.testing.assert_close(values[:, 1] - values[:, 0], torch.full((8000,), 5000.0))  # same position per channel
    torch.testing.assert_close(values.mean(0), x.transpose(0, 1).reshape(3, -1).mean(1), rtol=0.02, atol=0)
    torch.testing.assert_close(rows, (values[:, 0] // 15000).long())


def test_add_to_objective_is_the_identity_forward_and_adds_the_weighted_term_backward():
    x = torch.randn(5, requires_grad=True)
    theta = torch.tensor(2.0, requires_grad=True)
    y = add_to_objective(x * 3, theta**2, 0.25)
    torch.testing.assert_close(y, x.detach() * 3)
    (y * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(x.grad, 3 * torch.arange(5.0))
    torch.testing.assert_close(theta.grad, torch.tensor(0.25 * 2 * 2.0))


def test_stepwise_update_lerps_weights_mean_and_variance_through_the_parametrisation():
    logits, mean, raw_var = torch.randn(2, 3, 4), torch.zeros(3, 4), torch.full((3, 4), -2.0)
    shares = torch.softmax(torch.randn(2, 3, 4), 1)
    alpha, delta2 = torch.ones(3, 4), torch.full((3, 4), 4.0)
    weights = 1e-6 + (1 - 3e-6) * torch.softmax(logits, 1)
    var = F.softplus(raw_var) + 1e-3
    before = logits.clone()
    stepwise_update(logits, mean, raw_var, shares, torch.tensor([True, False]), alpha, delta2, 0.25, 1e-6, 1e-3)
    torch.testing.assert_close(1e-6 + (1 - 3e-6) * torch.softmax(logits[0], 0), 0.75 * weights[0] + 0.25 * shares[0])
    torch.testing.assert_close(logits[1], before[1])  # a context without values keeps its weights
    torch.testing.assert_close(mean, torch.full((3, 4), 0.25))
    torch.testing.assert_close(F.softplus(raw_var) + 1e-3, 0.75 * var + 0.25 * 4.0)


def test_component_shares_are_mean_responsibilities_per_context():
    values = torch.tensor([[-2.0], [-2.1], [2.0], [1.9]])
    rows = torch.tensor([0, 1, 1, 2])
    context = torch.tensor([0, 1, 1])  # sample 0 in context 0, samples 1-2 in context 1
    log_weight = torch.log(torch.full((3, 2, 1), 0.5))
    shares, present = component_shares(values, rows, log_weight, torch.tensor([[-2.0], [2.0]]),
                                       torch.full((2, 1), 0.1), context)
    torch.testing.assert_close(shares[0, :, 0], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(shares[1, :, 0], torch.tensor([1 / 3, 2 / 3]), atol=1e-6, rtol=0)
    assert present.tolist() == [True, True, False]


def mixture_images(n):
    """(n, 3, 32, 32) images whose pixels are draws from the 2-component mixture, and labels: the
    half (left 0, right 1) where the second component is three times as frequent as in the other."""
    labels = torch.randint(0, 2, (n,))
    share = torch.full((n, 1, 1, 32), 0.2)  # P(component 1) per column: 0.2 in one half, 0.6 in the other
    share[labels == 0, :, :, :16] = share[labels == 1, :, :, 16:] = 0.6
    k = (torch.rand(n, 3, 32, 32) < share).long()
    return MEANS[k] + STDS[k] * torch.randn(n, 3, 32, 32), labels


def train_input_mixture(mixture_fit, steps=120, task=True):
    """AdaMatch's optimiser on a ShallowCNN with UAN (K = 2) on the input image and BN elsewhere,
    on the task of ``mixture_images`` (or, ``task=False``, on random labels)."""
    torch.manual_seed(0)
    model = make_backbone("shallow_cnn", 2, norm={"input": {"norm": "uan", "num_components": 2,
                                                             "mixture_fit": mixture_fit}, "default": "bn"})
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    for _ in range(steps):
        x, labels = mixture_images(8)
        labels = labels if task else torch.randint(0, 2, (8,))
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = model.input.layer
    order = layer.mean.detach().argsort(0)
    return (layer.mean.detach().gather(0, order), layer.var.detach().sqrt().gather(0, order),
            layer.weights.detach()[0].gather(0, order))


@pytest.mark.parametrize("task", [False, True])
def test_the_momentum_fit_finds_the_activation_mixture_inside_a_backbone(task):
    means, stds, weights = train_input_mixture("momentum", task=task)
    torch.testing.assert_close(means, MEANS[:, None].expand(2, 3), atol=0.1, rtol=0)
    torch.testing.assert_close(stds, STDS[:, None].expand(2, 3), atol=0.05, rtol=0)
    if task:  # the task gradient pulls at λ too (the left/right shares are what it reads): moved towards 0.6
        assert (weights[0] > 0.55).all(), weights
    else:
        torch.testing.assert_close(weights, WEIGHTS[:, None].expand(2, 3), atol=0.05, rtol=0)


def test_the_likelihood_fit_moves_the_mixture_towards_the_activation_mixture():
    means, stds, _ = train_input_mixture("likelihood", steps=200)  # slower than the momentum fit
    torch.testing.assert_close(means, MEANS[:, None].expand(2, 3), atol=0.1, rtol=0)
    start = torch.full((2, 3), 0.546**0.5)  # UAN's initial σ for K = 2
    assert ((stds - STDS[:, None]).abs() < 0.6 * (start - STDS[:, None]).abs()).all()
    # (λ, which the task gradient also pulls at with the same weight, is not asserted.)


def test_the_task_gradient_alone_leaves_the_mixture_near_its_initialisation():
    means, stds, _ = train_input_mixture("gradient")
    assert (means - MEANS[:, None]).abs().max() > 0.3  # why the paper's inference rule fails (docs/RESULTS.md)
    start = spread_mixture(2)[0].sort().values[:, None].expand(2, 3)
    moved = (means - start).abs().max()
    assert 1e-4 < moved < 0.3, moved  # the gradient reaches μ and moves it, a little
