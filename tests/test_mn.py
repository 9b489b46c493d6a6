"""Mixture Normalization (docs/METHOD.md §3): EM recovery, schedule, evaluation."""

import pytest
import torch

from adamatch_uan.norm import MixtureNorm
from adamatch_uan.norm.mn import em_fit

from formulas import responsibilities, transform
from test_uan import TRUE_MEANS, TRUE_STDS, TRUE_WEIGHTS, mixture_samples


def sorted_fit(weight, mean, var):
    order = mean.argsort(0)
    return weight.gather(0, order), mean.gather(0, order), var.gather(0, order)


def test_em_recovers_a_well_separated_mixture():
    samples = mixture_samples(8192).T  # (C, M)
    start = (torch.full((3, 2), 1 / 3), torch.tensor([[-1.0], [0.0], [1.0]]).expand(3, 2), torch.ones(3, 2))
    weight, mean, var = sorted_fit(*em_fit(samples, *start, iters=50, min_var=1e-3))
    torch.testing.assert_close(mean, TRUE_MEANS[:, None].expand(3, 2), atol=0.05, rtol=0)
    torch.testing.assert_close(var.sqrt(), TRUE_STDS[:, None].expand(3, 2), atol=0.05, rtol=0)
    torch.testing.assert_close(weight, TRUE_WEIGHTS[:, None].expand(3, 2), atol=0.03, rtol=0)
    torch.testing.assert_close(weight.sum(0), torch.ones(2))


def test_layer_fits_the_mixture_and_normalizes_each_component():
    # The true components are narrower than the default floor (0.32 of the channel's std): a floor below them.
    layer = MixtureNorm(2, num_components=3, em_iters=3, max_samples=4096, affine=False, var_floor=0.01)
    for _ in range(40):
        layer(mixture_samples(1024))
    weight, mean, var = sorted_fit(layer.fit_weight, layer.fit_mean, layer.fit_var)
    torch.testing.assert_close(mean, TRUE_MEANS[:, None].expand(3, 2), atol=0.1, rtol=0)
    torch.testing.assert_close(var.sqrt(), TRUE_STDS[:, None].expand(3, 2), atol=0.05, rtol=0)
    torch.testing.assert_close(weight, TRUE_WEIGHTS[:, None].expand(3, 2), atol=0.05, rtol=0)
    running = sorted_fit(layer.running_weight, layer.running_mean, layer.running_var)
    torch.testing.assert_close(running[1], mean, atol=0.1, rtol=0)
    x = mixture_samples(4096)
    y = layer(x).detach()
    tau = responsibilities(x.unsqueeze(-1), *layer._mixture("fit"), None).squeeze(-1)
    for k in range(3):
        w, z = tau[:, k], y * layer.fit_weight[k].sqrt()
        mean_k = (w * z).sum(0) / w.sum(0)
        var_k = (w * (z - mean_k) ** 2).sum(0) / w.sum(0)
        torch.testing.assert_close(mean_k, torch.zeros(2), atol=0.02, rtol=0)
        torch.testing.assert_close(var_k, torch.ones(2), atol=0.02, rtol=0)


def test_em_runs_every_em_every_steps_on_at_most_max_samples(monkeypatch):
    import adamatch_uan.norm.mn as mn

    seen = []
    real = mn.em_fit
    monkeypatch.setattr(mn, "em_fit", lambda samples, *a, **k: seen.append(samples.shape) or real(samples, *a, **k))
    layer = MixtureNorm(4, em_every=3, max_samples=100)
    for _ in range(7):
        layer(torch.randn(16, 4, 5, 5))
    assert len(seen) == 3 and all(s == (4, 100) for s in seen)
    assert int(layer.num_fits) == 3 and int(layer.num_batches_tracked) == 7


@pytest.mark.parametrize("num_components", [2, 3])
def test_default_floor_keeps_every_component_at_least_a_tenth_of_the_channel_variance(num_components):
    layer = MixtureNorm(2, num_components=num_components)
    for _ in range(5):
        x = mixture_samples(1024)
        y = layer(x)
        floor = layer.var_floor * x.var(0, correction=0)
        assert torch.isfinite(y).all()
        assert (layer.fit_var >= 0.9 * floor).all() and (layer.running_var >= 0.9 * floor).all()


def test_a_state_with_another_number_of_components_is_a_clear_error():
    earlier = MixtureNorm(4, num_components=3, var_floor=0.01)
    earlier(torch.randn(8, 4, 3, 3))
    with pytest.raises(ValueError, match=r"3 at .*num_components=3"):
        MixtureNorm(4).load_state_dict(earlier.state_dict())
    same = MixtureNorm(4, num_components=3, var_floor=0.01)
    same.load_state_dict(earlier.state_dict())
    torch.testing.assert_close(same.running_mean, earlier.running_mean)


def test_fits_are_warm_started_from_the_running_estimates(monkeypatch):
    import adamatch_uan.norm.mn as mn

    starts = []
    real = mn.em_fit
    monkeypatch.setattr(mn, "em_fit", lambda s, w, m, v, **k: starts.append(m.clone()) or real(s, w, m, v, **k))
    layer = MixtureNorm(4)
    layer(torch.randn(16, 4, 5, 5))
    running = layer.running_mean.clone()
    layer(torch.randn(16, 4, 5, 5))
    torch.testing.assert_close(starts[1], running)


def test_evaluation_uses_running_mixture_and_running_statistics():
    layer = MixtureNorm(3, momentum=0.5)
    for _ in range(3):
        layer(torch.randn(16, 3, 4, 4) * 2 + 1)
    layer.eval()
    x = torch.randn(8, 3, 4, 4)
    lw, mu, var = layer._mixture("running")
    expected = transform(x, lw, mu, var, layer.weight, layer.bias, layer.eps,
                         stats=(layer.running_alpha, layer.running_delta2))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("tau_from", ["fit", "running"])
def test_training_takes_tau_from_the_chosen_mixture_and_the_batch_statistics(tau_from):
    layer = MixtureNorm(3, momentum=0.3, tau_from=tau_from)
    for _ in range(3):
        layer(torch.randn(16, 3, 4, 4) * 2 + 1)
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    y = layer(x)  # the fit and the running mixture it joined are this batch's
    assert not torch.allclose(layer.fit_mean, layer.running_mean)
    for source in ("fit", "running"):
        lw, mu, var = layer._mixture(source)
        floor = layer.var_floor * layer.fit_channel_var
        expected = transform(x, lw, mu, var, layer.weight, layer.bias, layer.eps, delta2_floor=floor)
        assert torch.allclose(y, expected, atol=1e-5) == (source == tau_from), source


def test_gradients_flow_to_input_and_affine_not_into_em():
    layer = MixtureNorm(3)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and layer.weight.grad is not None
    assert not any(b.requires_grad for b in layer.buffers())


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="em_every"):
        MixtureNorm(3, em_every=0)
    with pytest.raises(ValueError, match=r"tau_from in \('fit', 'running'\), got 'batch'.*norm_options"):
        MixtureNorm(3, tau_from="batch")


def test_var_floor_keeps_em_variances_and_the_scale_relative_to_the_channel():
    x = torch.zeros(32, 2, 8, 8)  # zero-padded digits: one constant value over most positions
    x[:, :, 2:6, 2:6] = torch.randn(32, 2, 4, 4) * torch.tensor([1.0, 100.0]).view(1, 2, 1, 1)
    upstream = torch.randn(32, 2, 8, 8)
    channel_var = x.transpose(0, 1).reshape(2, -1).var(1, correction=0)
    largest = {}
    for floor in (0.0, 0.01):
        layer = MixtureNorm(2, var_floor=floor, min_var=1e-12)
        for _ in range(20):  # EM converges: a component on the spike (λ ≈ 3/4)
            layer(x)
        assert (layer.fit_weight.max(0).values > 0.7).all()
        if floor:
            assert (layer.fit_var >= 0.999 * floor * channel_var).all()
            torch.testing.assert_close(layer.fit_channel_var, channel_var)
        xg = x.clone().requires_grad_()
        (layer(xg) * upstream).sum().backward()
        largest[floor] = xg.grad.abs().amax((0, 2, 3)) * channel_var.sqrt()  # in units of the channel's scale
    assert (largest[0.0] > 10 * largest[0.01]).all(), largest  # ≈ (v/ε)^½ on the spike: how MN diverged
    assert (largest[0.01] < 1e2).all(), largest  # ≤ 1/sqrt(var_floor · λ) times BatchNorm's


def test_the_first_fit_starts_spread_even_when_most_values_are_equal():
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, :2] = torch.randn(16, 1, 2, 8)
    layer = MixtureNorm(1, num_components=3)
    layer(x)
    assert layer.fit_mean.unique().numel() == 3  # quantiles would have started two components at 0
