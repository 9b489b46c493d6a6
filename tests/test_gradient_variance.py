"""GradientVariance: values against hand-computed gradients, the CSV, the logs, and no side effects."""

import csv

import lightning as L
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from adamatch_uan.callbacks import GradientVariance
from adamatch_uan.callbacks.gradient_variance import COLUMNS, gradient_variance


class TinyNet(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3) if norm else nn.Identity()

    def forward(self, x, context=None):
        return self.norm(self.linear(x))


class Tiny(L.LightningModule):
    """L = mean((f(x) − y)²) on source + ½‖W‖² as a second term; weak views add random noise."""

    def __init__(self, norm: bool = False, noise: float = 0.0) -> None:
        super().__init__()
        self.model = TinyNet(norm)
        self.noise = noise
        self.seen = []  # (W, b before the step, inputs, targets) per step

    def weak_views(self, x):
        return x + self.noise * torch.randn_like(x)

    def training_step(self, batch, batch_idx):
        (x, y), _ = batch["source"], batch["target"]
        x = self.weak_views(x)
        linear = self.model.linear
        self.seen.append((linear.weight.detach().clone(), linear.bias.detach().clone(), x.detach().clone(), y.clone()))
        fit = (self.model(x) - y).square().mean()
        decay = 0.5 * self.model.linear.weight.square().sum()
        self.loss_terms = {"source": fit, "target": decay}
        return fit + decay

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(steps: int, n: int = 6):
    torch.manual_seed(1)
    return DataLoader([{"source": (torch.randn(n, 4), torch.randn(n, 3)), "target": torch.randn(2 * n, 4)}
                       for _ in range(steps)], batch_size=None)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def value(table, step, layer, parameter, kind):
    [row] = [r for r in table if (int(r["step"]), r["layer"], r["parameter"], r["kind"]) == (step, layer, parameter, kind)]
    return float(row["variance"])


def test_gradient_variance_is_the_population_variance_of_the_elements():
    g = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert gradient_variance(g) == pytest.approx(np.var([1, 2, 3, 6]))


def test_loss_and_split_variances_equal_hand_computed_gradients(tmp_path):
    module = Tiny()
    path = tmp_path / "gv.csv"
    quiet_trainer(max_steps=3, callbacks=[GradientVariance(every_n_steps=1, split=True, path=str(path))]).fit(
        module, batches(3))
    table = rows(path)
    assert tuple(table[0]) == COLUMNS
    assert {int(r["step"]) for r in table} == {0, 1, 2}
    for step, (W, b, x, y) in enumerate(module.seen):
        residual = x @ W.T + b - y
        fit_grad = 2 * residual.T @ x / residual.numel()  # ∂ mean(r²)/∂W
        assert value(table, step, "linear", "weight", "source") == pytest.approx(np.var(fit_grad.numpy()), rel=1e-5)
        assert value(table, step, "linear", "weight", "target") == pytest.approx(np.var(W.numpy()), rel=1e-5)
        assert value(table, step, "linear", "weight", "total") == pytest.approx(np.var((fit_grad + W).numpy()), rel=1e-5)
        assert value(table, step, "linear", "bias", "target") == 0.0  # ½‖W‖² does not reach the bias


def test_logits_mode_equals_the_gradient_of_summed_logits(tmp_path):
    module = Tiny()
    path = tmp_path / "gv.csv"
    data = batches(1)
    batch = next(iter(data))
    quiet_trainer(max_steps=1, callbacks=[GradientVariance(every_n_steps=1, mode="logits", path=str(path))]).fit(
        module, data)
    table = rows(path)
    # ∂(Σ_i Σ_j (W x_i + b)_j)/∂W = 1 ⊗ Σ_i x_i: every row of the gradient is Σ_i x_i; ∂/∂b = N for each j.
    for kind, x in (("logits_source", batch["source"][0]), ("logits_target", batch["target"])):
        grad = np.tile(x.sum(0).numpy(), (3, 1))
        assert value(table, 0, "linear", "weight", kind) == pytest.approx(np.var(grad), rel=1e-5)
        assert value(table, 0, "linear", "bias", kind) == 0.0


def test_measuring_changes_nothing_not_even_the_rng_stream(tmp_path):
    def train(callbacks):
        torch.manual_seed(0)
        module = Tiny(norm=True, noise=0.1)
        quiet_trainer(max_steps=4, callbacks=callbacks).fit(module, batches(4))
        return module.state_dict()

    plain = train([])
    for callback in (GradientVariance(every_n_steps=1, mode="logits", path=str(tmp_path / "logits.csv")),
                     GradientVariance(every_n_steps=1, split=True, path=str(tmp_path / "split.csv"))):
        measured = train([callback])
        assert plain.keys() == measured.keys()
        for key in plain:
            assert torch.equal(plain[key], measured[key]), key


def test_a_logits_measurement_leaves_parameters_and_running_stats_bit_identical():
    module = Tiny(norm=True, noise=0.1)
    module.model.train()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    batch = next(iter(batches(1)))
    rng = torch.get_rng_state()
    rows_ = GradientVariance(mode="logits")._logit_variances(module, batch)
    assert rows_ and all(np.isfinite(v) for _, _, v in rows_)
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_scalars_reach_every_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    quiet_trainer(max_steps=3, logger=logger, log_every_n_steps=1,
                  callbacks=[GradientVariance(every_n_steps=2)]).fit(Tiny(), batches(3))
    logged = rows(tmp_path / "metrics.csv")
    steps = [int(r["step"]) for r in logged if r.get("grad_var/total/max")]
    assert steps == [0, 2]
    assert (tmp_path / "gradient_variance.csv").exists()  # default path: the trainer's log_dir


def test_bad_arguments_and_missing_loss_terms_are_explained(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        GradientVariance(mode="hessian")
    with pytest.raises(ValueError, match="every_n_steps"):
        GradientVariance(every_n_steps=0)
    with pytest.raises(ValueError, match="split"):
        GradientVariance(mode="logits", split=True)

    class NoTerms(Tiny):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            del self.loss_terms
            return loss

    with pytest.raises(RuntimeError, match="loss_terms"):
        quiet_trainer(max_steps=1, callbacks=[GradientVariance(split=True, path=str(tmp_path / "gv.csv"))]).fit(
            NoTerms(), batches(1))
