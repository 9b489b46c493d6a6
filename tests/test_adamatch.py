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


def test_target_loss_weight_follows_the_warmup():
    method = AdaMatch(num_classes=2)
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(method, toy_train_batches(4))
    assert trainer.callback_metrics["train/warmup"].item() == pytest.approx(warmup(3, 4))
    assert not math.isnan(trainer.callback_metrics["train/loss"].item())


# ---- training_step, piece by piece, against a stub backbone with known logits ----
B, U, K = 3, 4, 3  # source images, target images, classes
CODES = {"source": torch.arange(2 * B), "target": torch.arange(2 * B, 2 * B + 2 * U)}  # weak views, then strong
SHIFT = 0.7  # added to every logit of the combined pass: the two passes differ, as batch statistics make them
# The alignment's state before the step: skewed, so that aligning moves the target's predictions.
SOURCE_MEAN, TARGET_HISTORY = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.1, 0.3, 0.6])
TABLE_SEED = 4  # a draw where every piece moves the loss (test_each_wrong_reading_...)


class LogitTable(torch.nn.Module):
    """A backbone whose logits are a fixed table row per input image (its code, in pixel [0, 0, 0]), plus
    ``SHIFT`` when the batch holds target images; it records the context ids of each call."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.weight = torch.nn.Parameter(torch.ones(()))  # something for the optimiser
        self.calls = []

    def forward(self, x, context=None):
        self.calls.append(context.tolist())
        codes = x[:, 0, 0, 0].round().long()
        return self.weight * (self.table[codes] + SHIFT * bool((context == 1).any()))


def stub_method(step=2, total=8, **options):
    """AdaMatch over ``LogitTable`` at global step ``step`` of ``total``, its views and logging replaced
    by known codes and a dict."""
    from types import SimpleNamespace

    method = AdaMatch(num_classes=K, **options)
    generator = torch.Generator().manual_seed(TABLE_SEED)
    table = torch.randn(2 * B + 2 * U, K, generator=generator) * 2
    method.alignment.source_mean.copy_(SOURCE_MEAN)
    method.alignment.target_history.copy_(TARGET_HISTORY.expand_as(method.alignment.target_history))
    method.model = LogitTable(table)
    method.views = lambda images: CODES["source" if images.float().mean() < 0.5 else "target"].float().view(-1, 1, 1, 1)
    method.logged = {}
    method.log_dict = lambda values, **_: method.logged.update({k: float(v) for k, v in values.items()})
    method.log = lambda *_, **__: None
    method.trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=total, world_size=1,
                                     optimizers=[SimpleNamespace(param_groups=[{"lr": 0.03}])])
    return method, table


def stub_batch():
    labels = torch.tensor([2, 0, 1])
    return {"source": (torch.zeros(B, 3, 4, 4, dtype=torch.uint8), labels), "target": torch.ones(U, 3, 4, 4, dtype=torch.uint8)}


def by_hand(table, lam, labels, step, total, interpolate=True, relative_threshold=True, align=True, hard_labels=True,
            tau=0.9, target_weight=1.0):
    """docs/METHOD.md §5 written out with plain tensor operations, each piece by itself."""
    source_only = table[CODES["source"]]                    # z''_S: a pass without target images
    combined = table[CODES["source"]] + SHIFT               # z'_S
    target = table[CODES["target"]] + SHIFT                 # z_T
    z_source = lam * combined + (1 - lam) * source_only if interpolate else combined
    weak, strong = z_source[:B], z_source[B:]
    target_weak, target_strong = target[:U], target[U:]
    threshold = tau * weak.softmax(1).max(1).values.mean() if relative_threshold else torch.tensor(tau)
    p_target = target_weak.softmax(1)
    source_mean = 0.999 * SOURCE_MEAN + 0.001 * weak.softmax(1).mean(0)  # p̄_S after this batch
    target_mean = (127 * TARGET_HISTORY + p_target.mean(0)) / 128       # p̄_T after this batch
    if align:
        aligned = p_target * (1e-6 + source_mean) / (1e-6 + target_mean)
        p_target = aligned / aligned.sum(1, keepdim=True)
    mask = (p_target.max(1).values >= threshold).float()
    targets = p_target.argmax(1) if hard_labels else p_target
    ce = torch.nn.functional.cross_entropy
    source_term = 0.5 * (ce(weak, labels) + ce(strong, labels))
    mu = target_weight * (0.5 - 0.5 * math.cos(min(math.pi, 2 * math.pi * step / total)))
    target_term = mu * (ce(target_strong, targets, reduction="none") * mask).mean()
    return {"loss": source_term + target_term, "source": source_term, "target": target_term,
            "threshold": threshold, "mask": mask.mean()}


def run_stub(step=2, **options):
    method, table = stub_method(step=step, **options)
    torch.manual_seed(11)
    loss = method.training_step(stub_batch(), 0)
    torch.manual_seed(11)
    lam = torch.rand(2 * B, K)  # the interpolation's draw: the step's first random numbers
    return method, table, lam, loss


def test_training_step_equals_the_recipe_written_out_piece_by_piece():
    method, table, lam, loss = run_stub()
    expected = by_hand(table, lam, stub_batch()["source"][1], step=2, total=8)
    torch.testing.assert_close(loss, expected["loss"])
    torch.testing.assert_close(method.loss_terms["source"], expected["source"])
    torch.testing.assert_close(method.loss_terms["target"], expected["target"])
    assert method.logged["train/threshold"] == pytest.approx(float(expected["threshold"]))
    assert method.logged["train/mask_rate"] == pytest.approx(float(expected["mask"]))
    assert 0 < float(expected["mask"]) < 1 and float(expected["target"]) > 0  # the mask and μ(t) are at work
    # the source-only pass saw source images only, with the source's id; the combined pass both domains
    assert method.model.calls == [[0] * (2 * B), [0] * (2 * B) + [1] * (2 * U)]


def test_each_wrong_reading_of_the_recipe_gives_another_loss():
    """The written-out recipe is sensitive to each piece: a step that got one wrong would fail the test above."""
    method, table, lam, loss = run_stub()
    labels = stub_batch()["source"][1]
    right = by_hand(table, lam, labels, 2, 8)["loss"]
    swapped = table.clone()
    swapped[CODES["target"]] = table[CODES["target"].roll(U)]  # the target's weak and strong views swapped
    wrong = {"weak/strong swapped": by_hand(swapped, lam, labels, 2, 8)["loss"],
             "no interpolation": by_hand(table, lam, labels, 2, 8, interpolate=False)["loss"],
             "mask from unaligned probabilities": by_hand(table, lam, labels, 2, 8, align=False)["loss"],
             "no μ(t)": by_hand(table, lam, labels, 8, 8)["loss"],  # μ = 1 instead of μ(2/8) = ½
             "no ½ on the source terms": right + by_hand(table, lam, labels, 2, 8)["source"]}
    for name, value in wrong.items():
        assert not torch.allclose(value, right), name


@pytest.mark.parametrize("option, value", [("interpolate", False), ("relative_threshold", False), ("align", False),
                                           ("hard_labels", False)])
def test_each_named_deviation_changes_exactly_its_piece(option, value):
    method, table, lam, loss = run_stub(**{option: value})
    labels = stub_batch()["source"][1]
    expected = by_hand(table, lam, labels, 2, 8, **{option: value})
    official = by_hand(table, lam, labels, 2, 8)
    torch.testing.assert_close(loss, expected["loss"])
    torch.testing.assert_close(method.loss_terms["target"], expected["target"])
    assert not torch.allclose(expected["loss"], official["loss"])  # the option is not ignored
    if option == "interpolate":
        assert len(method.model.calls) == 1  # no source-only pass
    if option == "relative_threshold":
        assert method.logged["train/threshold"] == pytest.approx(0.9)


def test_the_target_term_is_off_at_step_0_and_fully_on_after_half_the_run():
    for step, mu in ((0, 0.0), (4, 1.0), (7, 1.0)):
        method, table, lam, loss = run_stub(step=step)
        expected = by_hand(table, lam, stub_batch()["source"][1], step, 8)
        torch.testing.assert_close(loss, expected["loss"])
        assert method.logged["train/warmup"] == pytest.approx(mu)


def test_a_confidence_equal_to_the_threshold_passes_the_mask():
    """mask = [max p̃_T ≥ c_τ] (§5.6): a target image exactly at the threshold is kept."""
    table = stub_method()[1]
    confidence = (table[CODES["target"][:U]] + SHIFT).softmax(1).max(1).values  # unaligned, as align=False sees it
    tau = float(confidence[0])
    method, table, lam, loss = run_stub(relative_threshold=False, align=False, tau=tau)
    assert method.logged["train/threshold"] == tau
    assert method.logged["train/mask_rate"] == pytest.approx(float((confidence >= confidence[0]).float().mean()))
    assert (confidence > confidence[0]).float().mean() < (confidence >= confidence[0]).float().mean()


@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx"])
def test_one_step_in_bfloat16_mixed_precision_channels_last_for_every_norm(norm):
    method = AdaMatch(num_classes=2, norm=norm, channels_last=True)
    before = [p.clone() for p in method.model.parameters()]
    trainer = quiet_trainer(max_steps=2, precision="bf16-mixed")
    trainer.fit(method, toy_train_batches(2, source=4, target=4))
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(metrics[f"train/{k}"]) for k in ("loss_source", "loss_target", "mask_rate"))
    assert all(p.dtype == torch.float32 for p in method.model.parameters())  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, method.model.parameters()))
    conv = method.model.convs[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
