"""MixtureTrace: what a learned mixture does during training, as CSV rows."""

import csv
import math

import torch

from adamatch_uan.callbacks import MixtureTrace
from adamatch_uan.callbacks.mixture_trace import trace_quantities
from adamatch_uan.methods import AdaMatch

from conftest import quiet_trainer, toy_train_batches


def state(mean, var, weight, alpha, delta2):
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in
            dict(mean=mean, var=var, weight=weight, alpha=alpha, delta2=delta2).items()}


def test_quantities_measure_distance_gap_and_scale():
    start = state([[0.0, 0.0]], [[1.0, 1.0]], [[[1.0, 1.0]]], [[0.0, 0.0]], [[1.0, 1.0]])
    now = state([[2.0, 2.0]], [[math.e, math.e]], [[[1.0, 1.0]]], [[1.0, 1.0]], [[4.0, 4.0]])
    q = trace_quantities(now, start)
    assert q["scale"] == 2.0  # K = 1: the channel's std is sqrt(δ̄²)
    assert q["moved/mean"] == 1.0 and q["moved/log_var"] == 1.0 and q["moved/weight"] == 0.0
    assert q["gap/mean"] == 0.5 and abs(q["gap/log_var"] - abs(1 - math.log(4))) < 1e-12  # (2 − 1) / 2


def test_trace_rows_for_every_mixture_layer(tmp_path):
    path = tmp_path / "trace.csv"
    trainer = quiet_trainer(max_steps=4, callbacks=[MixtureTrace(every_n_steps=2, path=str(path))])
    trainer.fit(AdaMatch(norm="uan", norm_options={"mixture_fit": "likelihood"}), train_dataloaders=toy_train_batches(4))
    rows = list(csv.DictReader(path.open()))
    assert {int(r["step"]) for r in rows} == {0, 2}
    layers = {r["layer"] for r in rows} - {"model"}
    assert layers == {f"norms.{i}.layer" for i in range(4)}
    per_layer = {r["quantity"] for r in rows if r["layer"] == "norms.0.layer"}
    assert {"grad_rms/mean", "grad_rms/raw_var", "grad_rms/prior_logits", "moved/mean", "gap/mean", "nll",
            "scale"} <= per_layer
    assert all(float(r["value"]) == 0.0 for r in rows if r["step"] == "0" and r["quantity"].startswith("moved/"))
    assert any(float(r["value"]) > 0 for r in rows if r["step"] == "2" and r["quantity"] == "moved/mean")
