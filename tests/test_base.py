"""Shared method machinery: weight-decay groups, lr schedule, EMA evaluation, metrics."""

import json
import math
import pickle
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adamatch_uan.methods import AdaMatch, SourceOnly
from adamatch_uan.methods.base import EMAUpdate, lr_factor, optimizer_groups
from adamatch_uan.models import make_backbone
from adamatch_uan.norm import sync_norms

from conftest import quiet_trainer, toy_eval_batches, toy_train_batches


@pytest.mark.parametrize("backbone", ["shallow_cnn", "wide_resnet"])
@pytest.mark.parametrize("norm", ["bn", "uan", "uan_ctx", "mn"])
def test_weight_decay_only_on_conv_and_linear_weights(backbone, norm):
    model = make_backbone(backbone, 10, norm=norm)
    groups = optimizer_groups(model, 1e-3, lr=0.03, mixture_lr_scale=10)
    decay, rest = groups[:2]
    assert decay["weight_decay"] == 1e-3 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {n for n, p in model.named_parameters() if n.endswith("weight") and ".layer." not in n}
    assert decayed == expected
    assert all(n.endswith("bias") or ".layer." in n for n in (names[id(p)] for p in rest["params"]))
    mixture = {names[id(p)] for g in groups[2:] for p in g["params"]}
    assert mixture == {n for n in names.values() if n.rsplit(".", 1)[-1] in ("mean", "raw_var", "prior_logits")}
    assert all(g["lr"] == pytest.approx(0.3) and g["weight_decay"] == 0.0 for g in groups[2:]) and len(groups) == (3 if mixture else 2)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_optimizer_groups_refuse_a_non_partition():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight  # the same tensor twice
    with pytest.raises(RuntimeError, match="partition"):
        optimizer_groups(model, 1e-3, lr=0.03)


def test_lr_schedule_matches_the_formula():
    T, theta = 400, math.acos(0.25)
    assert lr_factor(0, T, 0.25) == 1.0
    assert lr_factor(T // 4, T, 0.25) == pytest.approx(math.sqrt((1 + math.sqrt((1 + 0.25) / 2)) / 2))
    assert lr_factor(T // 2, T, 0.25) == pytest.approx(math.sqrt((1 + 0.25) / 2))  # cos(θ/2)
    assert lr_factor(T, T, 0.25) == pytest.approx(0.25)
    assert lr_factor(T // 2, T, 0.25) == pytest.approx(math.cos(theta / 2))


def test_trainer_applies_the_schedule_and_sgd_settings():
    method = SourceOnly(num_classes=2, lr=0.1)
    trainer = quiet_trainer(max_steps=8)
    trainer.fit(method, toy_train_batches(8))
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["momentum"] == 0.9 and not optimizer.defaults["nesterov"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(8, 8, 0.25))


def test_validation_evaluates_the_ema_model(monkeypatch):
    method = AdaMatch(num_classes=2)
    calls = {"ema": 0, "model": 0}
    for key, module in (("ema", method.ema.module), ("model", method.model)):
        original = module.forward
        monkeypatch.setattr(module, "forward", lambda *a, _k=key, _f=original, **k: calls.__setitem__(_k, calls[_k] + 1) or _f(*a, **k))
    quiet_trainer().validate(method, [toy_eval_batches(), toy_eval_batches()])
    assert calls == {"ema": 4, "model": 0}


def test_ema_averages_parameters_and_buffers():
    method = AdaMatch(num_classes=2, ema_decay=0.9)
    quiet_trainer(max_steps=3).fit(method, toy_train_batches(3))
    ema, model = dict(method.ema.module.named_buffers()), dict(method.model.named_buffers())
    name = next(n for n in ema if n.endswith("running_mean"))
    assert not torch.equal(ema[name], model[name])  # averaged, not copied
    assert all(not p.requires_grad for p in method.ema.parameters())


def test_metrics_and_confusion_matrix_per_evaluation_set(tmp_path):
    method = SourceOnly(num_classes=2, eval_names=["source", "target"], eval_contexts=[0, 1])
    trainer = quiet_trainer(default_root_dir=tmp_path)
    results = trainer.test(method, [toy_eval_batches(), toy_eval_batches()])
    for name in ("source", "target"):
        assert {f"test/{name}/{m}" for m in ("acc", "precision", "recall", "f1", "loss")} <= set(results[0]) | set(results[1])
    matrices = json.loads((tmp_path / "confusion_matrices.json").read_text())
    assert set(matrices) == {"source", "target"} and sum(map(sum, matrices["source"])) == 32


def test_eval_contexts_must_match_eval_sets():
    with pytest.raises(ValueError, match="eval context"):
        AdaMatch(eval_names=["source", "target"], eval_contexts=[0])


def test_a_model_with_an_ema_copy_pickles_as_ddp_spawn_needs():
    method = AdaMatch(num_classes=2, ema_decay=0.9)
    copy = pickle.loads(pickle.dumps(method))
    assert copy.ema.multi_avg_fn.decay == 0.9


def test_ema_update_is_torchs_ema():
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    ema, current = [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(3)]
    expected = [t.clone() for t in ema]
    get_ema_multi_avg_fn(0.9)(expected, current, torch.tensor(1))
    EMAUpdate(0.9)(ema, current, torch.tensor(1))
    for got, want in zip(ema, expected):
        torch.testing.assert_close(got, want)


def test_ddp_leaves_the_ema_copy_alone():
    method = AdaMatch(num_classes=2, ema_decay=0.9)
    ignored = set(method._ddp_params_and_buffers_to_ignore)
    names = {f"ema.{n}" for n, _ in [*method.ema.named_parameters(), *method.ema.named_buffers()]}
    assert ignored == names and not any(n.startswith("model.") for n in ignored)


def test_several_processes_refuse_unsynced_layers_that_write_parameters():
    method = AdaMatch(num_classes=2, norm="uan", norm_options={"mixture_fit": "momentum"})  # writes μ, σ², λ
    method._trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(ValueError, match="sync_batchnorm true"):
        method.on_fit_start()
    sync_norms(method.model)
    method.on_fit_start()  # synced: accepted
    plain = AdaMatch(num_classes=2, norm="uan")  # the default task-gradient fit writes no parameter
    plain._trainer = SimpleNamespace(world_size=2, global_rank=0)
    plain.on_fit_start()


def test_batch_statistics_are_means_over_processes():
    method = AdaMatch(num_classes=2)
    reduced = []
    method._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce=lambda t, reduce_op: reduced.append(reduce_op) or t * 0 + 7))
    assert method.mean_over_processes(torch.tensor(3.0)).item() == 7 and reduced == ["mean"]
    method._trainer = None
    assert method.mean_over_processes(torch.tensor(3.0)).item() == 3  # one process: the value itself
