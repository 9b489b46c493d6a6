"""The torch-ops backend's hand-written (K, C) maths, which the Triton backend shares, against autograd."""

import torch

from adamatch_uan.norm.backends import torch_ops


def test_sum_grads_are_autograds_gradient_of_the_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64, generator=g) * 2 + 1
    tau = torch.softmax(torch.randn(50, 2, 3, dtype=torch.float64, generator=g), 1)
    shift = x[0]
    xt = (x - shift).unsqueeze(1)
    sums = torch.stack([tau.sum(0), (tau * xt).sum(0), (tau * xt * xt).sum(0)]).requires_grad_(True)
    g_alpha, g_delta2 = torch.randn(2, 2, 3, dtype=torch.float64, generator=g)
    alpha, delta2 = torch_ops.moments(sums, shift)
    (alpha * g_alpha + delta2 * g_delta2).sum().backward()
    torch.testing.assert_close(torch.stack(torch_ops.sum_grads(g_alpha, g_delta2, sums.detach())), sums.grad)


def test_mixture_grads_are_autograds_through_uans_parametrisation():
    g = torch.Generator().manual_seed(1)
    logits, mu, raw = (torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_(True)
                       for s in ((2, 3, 4), (3, 4), (3, 4)))
    t = torch_ops.Tables(None, mu, logits, raw, torch.ones(4), torch.zeros(4), 1e-3, (0.01, 0.05))
    log_weight, var, h, lc = torch_ops.tables(t)
    g_h, g_lc, g_lw = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64), \
        torch.randn(2, 3, 4, dtype=torch.float64)
    ((h * g_h).sum() + (lc * g_lc).sum() + (log_weight * g_lw).sum()).backward()
    got_w, _, got_v = torch_ops.mixture_grads(t, var.detach(), h.detach(), g_h, torch.zeros(3, 4), g_lc, g_lc + g_lw)
    torch.testing.assert_close(got_w, logits.grad)
    torch.testing.assert_close(got_v, raw.grad)
