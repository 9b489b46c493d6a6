"""AdaMatch (docs/METHOD.md §5): the pure functions on known values, and the training step."""

import copy
import math

import pytest
import torch

from adamatch_uan.methods import AdaMatch
from adamatch_uan.methods.adamatch import (DistributionAlignment, align_distribution, interpolate_logits,
                                           kl_divergence, relative_threshold, warmup)

from conftest import quiet_trainer, stripes, toy_train_batches
from test_source_only import LossRecorder


def test_relative_threshold_and_mask_on_known_logits():
    source = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]).log()
    threshold = relative_threshold(source, 0.9)
    assert threshold.item() == pytest.approx(0.9 * (0.7 + 0.4) / 2)
    target = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.45, 0.45, 0.1]])
    mask = target.max(1).values >= threshold
    assert mask.tolist() == [True, True, False]


def test_alignment_moves_a_skewed_target_towards_the_source_distribution():
    target = torch.softmax(torch.randn(64, 4) + torch.tensor([3.0, 0, 0, 0]), 1)
    source_mean = torch.full((4,), 0.25)
    aligned = align_distribution(target, source_mean, target.mean(0))
    torch.testing.assert_close(aligned.sum(1), torch.ones(64))
    assert kl_divergence(source_mean, aligned.mean(0)) < 0.5 * kl_divergence(source_mean, target.mean(0))
    # hand computation for one row
    row, s, t = torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([1 / 3] * 3), torch.tensor([0.8, 0.1, 0.1])
    expected = torch.tensor([0.6 / 0.8, 0.3 / 0.1, 0.1 / 0.1])
    torch.testing.assert_close(align_distribution(row, s, t, eps=0), (expected / expected.sum()).unsqueeze(0))


def test_alignment_state_follows_the_official_estimates():
    state = DistributionAlignment(4, momentum=0.999, history=128)
    source = torch.tensor([[1.0, 0, 0, 0]])
    target = torch.tensor([[0, 1.0, 0, 0]])
    state.update(source, target)
    torch.testing.assert_close(state.source_mean, 0.999 * torch.full((4,), 0.25) + 0.001 * source[0])
    torch.testing.assert_close(state.target_mean, (127 * torch.full((4,), 0.25) + target[0]) / 128)
    for _ in range(200):
        state.update(source, target)
    torch.testing.assert_close(state.target_mean, target[0])


@pytest.mark.parametrize("fraction, expected", [(0, 0.0), (0.25, 0.5), (0.5, 1.0), (1.0, 1.0)])
def test_warmup_matches_the_formula(fraction, expected):
    assert warmup(int(400 * fraction), 400) == pytest.approx(expected)


def test_interpolation_lies_between_the_passes_and_varies_per_entry():
    a, b = torch.zeros(64, 10), torch.ones(64, 10)
    z = interpolate_logits(a, b)
    assert (z >= 0).all() and (z <= 1).all() and z.std() > 0.2


def method_inputs(method, source=4, target=4):
    s = method.views(stripes(torch.randint(0, 2, (source,))))
    t = method.views(stripes(torch.randint(0, 2, (target,))))
    return s, t


@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx"])
def test_source_only_pass_leaves_running_statistics_and_combined_pass_changes_them(norm):
    # Samples as large as the batch: every position, no random draw that the source-only pass would advance.
    options = {"max_samples": 10**6} if norm != "bn" else None
    method = AdaMatch(num_classes=2, norm=norm, norm_options=options)
    method.train()
    source, target = method_inputs(method)
    before = {k: v.clone() for k, v in method.model.named_buffers()}
    reference = copy.deepcopy(method.model)
    method.forward_passes(source, target)
    domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).long()
    reference(torch.cat([source, target]), domains)  # the combined pass alone
    for name, buf in method.model.named_buffers():
        assert torch.equal(buf, dict(reference.named_buffers())[name]), name
    running = [k for k in before if "running" in k]
    assert running and all(not torch.equal(before[k], dict(method.model.named_buffers())[k]) for k in running)


def test_domain_ids_reach_context_layers_in_both_passes(monkeypatch):
    method = AdaMatch(num_classes=2, norm="uan_ctx")
    contexts = []
    layer = method.model.norms[0].layer
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda x, context=None: contexts.append(context.clone()) or original(x, context))
    method.train()
    method.forward_passes(*method_inputs(method, 3, 5))
    assert [c.tolist() for c in contexts] == [[0] * 6, [0] * 6 + [1] * 10]


@pytest.mark.parametrize("backbone", ["shallow_cnn", "wide_resnet"])
@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx"])
def test_one_training_step_for_every_norm_and_backbone(backbone, norm):
    method = AdaMatch(num_classes=2, backbone=backbone, norm=norm)
    before = [p.clone() for p in method.model.parameters()]
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(method, toy_train_batches(1, source=2, target=2))
    metrics = trainer.callback_metrics
    for key in ("loss_source", "loss_target", "mask_rate", "threshold", "kl_source_target", "logit_gap", "lr", "warmup"):
        assert torch.isfinite(metrics[f"train/{key}"]), key
    assert any(not torch.equal(a, b) for a, b in zip(before, method.model.parameters()))


@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx"])
def test_loss_decreases_on_a_learnable_problem(norm):
    method = AdaMatch(num_classes=2, norm=norm)
    losses = []
    quiet_trainer(max_steps=40, callbacks=[LossRecorder(losses)]).fit(method, toy_train_batches(40))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("options, check", [
    ({"interpolate": False}, lambda m: m["train/logit_gap"] == 0),
    ({"relative_threshold": False, "tau": 0.77}, lambda m: m["train/threshold"] == pytest.approx(0.77)),
    ({"hard_labels": False, "align": False}, lambda m: torch.isfinite(m["train/loss_target"])),
])
def test_named_deviations_from_the_official_recipe(options, check):
    method = AdaMatch(num_classes=2, **options)
    trainer = quiet_trainer(max_steps=2)
    trainer.fit(method, toy_train_batches(2))
    assert check(trainer.callback_metrics)


def test_target_loss_weight_follows_the_warmup():
    method = AdaMatch(num_classes=2)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(method, toy_train_batches(4))
    assert trainer.callback_metrics["train/warmup"].item() == pytest.approx(warmup(3, 4))
    assert not math.isnan(trainer.callback_metrics["train/loss"].item())
