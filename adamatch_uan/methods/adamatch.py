"""AdaMatch (Berthelot et al., ICLR 2022) as the official code does it (docs/METHOD.md §5).

``training_step`` reads like the algorithm; the maths lives in the small pure functions
below, and every deviation from the official recipe is a named argument of ``AdaMatch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamatch_uan.methods.base import SOURCE, TARGET, DomainAdaptationMethod
from adamatch_uan.norm import frozen_stats


def interpolate_logits(combined: Tensor, source_only: Tensor) -> Tensor:
    """z_S = λ z'_S + (1 − λ) z''_S with λ ~ U(0, 1) per sample and class (§5.3)."""
    lam = torch.rand_like(combined)
    return lam * combined + (1 - lam) * source_only


def relative_threshold(source_weak_logits: Tensor, tau: float, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """c_τ = τ · mean_i max_c softmax(z_S,weak)_i, without gradient (§5.4); ``reduce`` turns the
    local mean into the global batch's (the mean over processes under DDP)."""
    return tau * reduce(source_weak_logits.detach().softmax(1).amax(1).mean())


def align_distribution(target_probs: Tensor, source_mean: Tensor, target_mean: Tensor, eps: float = 1e-6) -> Tensor:
    """p̃_T = normalize_L1(p_T · (ε + p̄_S) / (ε + p̄_T)) (§5.5; ε as in the official code)."""
    aligned = target_probs * (eps + source_mean) / (eps + target_mean)
    return aligned / aligned.sum(1, keepdim=True)


def warmup(step: int, total: int) -> float:
    """μ(t) = ½ − ½ cos(min(π, 2π t/T)): 0 → 1 over the first half of training (§5.7)."""
    return 0.5 - 0.5 * math.cos(min(math.pi, 2 * math.pi * step / total))


def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p log(p/q) of two distributions over classes."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum()


class DistributionAlignment(nn.Module):
    """p̄_S: EMA of the batch-mean source weak prediction; p̄_T: mean of the last ``history``
    batch-means of p_T. Both start uniform (the history buffer is filled with uniform rows)."""

    def __init__(self, num_classes: int, momentum: float = 0.999, history: int = 128) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("source_mean", torch.full((num_classes,), 1 / num_classes))
        self.register_buffer("target_history", torch.full((history, num_classes), 1 / num_classes))
        self.register_buffer("cursor", torch.tensor(0, dtype=torch.long))

    @property
    def target_mean(self) -> Tensor:
        return self.target_history.mean(0)

    @torch.no_grad()
    def update(self, source_probs: Tensor, target_probs: Tensor,
               reduce: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        """Add a batch's means; ``reduce`` turns a local batch mean into the global batch's (DDP)."""
        self.source_mean.lerp_(reduce(source_probs.mean(0)).to(self.source_mean.dtype), 1 - self.momentum)
        self.target_history[self.cursor % len(self.target_history)] = reduce(target_probs.mean(0))
        self.cursor.add_(1)


class AdaMatch(DomainAdaptationMethod):
    """AdaMatch over any backbone and norm layer.

    Per step, with B source and U target images, each with a weak and a strong view:
    a source-only pass whose running-statistics updates are discarded (z''_S), a combined
    pass (z'_S, z_T), random logit interpolation, relative threshold, distribution
    alignment, hard pseudo-labels, and L = ½[CE(z_S,weak) + CE(z_S,strong)] +
    μ(t) · mean(mask · CE(z_T,strong, pseudo)). Domain ids (source 0, target 1) reach
    context-aware norm layers in both passes.

    Args:
        tau: confidence threshold τ.
        relative_threshold: scale τ by the mean source confidence (official); False: fixed τ.
        align: distribution alignment (official); False: raw target predictions.
        alignment_momentum: EMA momentum of p̄_S.
        alignment_history: batches averaged in p̄_T.
        interpolate: random logit interpolation with a source-only pass (official);
            False: z_S = z'_S and the source-only pass is skipped.
        hard_labels: argmax pseudo-labels (official); False: the aligned distribution as
            soft targets.
        target_weight: the target loss's weight at the end of the warm-up.
        **base: see ``DomainAdaptationMethod`` (backbone, norm, optimiser, EMA, views).
    """

    def __init__(self, tau: float = 0.9, relative_threshold: bool = True, align: bool = True,
                 alignment_momentum: float = 0.999, alignment_history: int = 128, interpolate: bool = True,
                 hard_labels: bool = True, target_weight: float = 1.0, **base) -> None:
        super().__init__(**base)
        self.save_hyperparameters()
        self.alignment = DistributionAlignment(self.hparams.num_classes, alignment_momentum, alignment_history)

    def forward_passes(self, source: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Source logits z_S (interpolated), target logits z_T, and the gap mean (z'_S − z''_S)²."""
        domains = torch.cat([torch.full((len(source),), SOURCE), torch.full((len(target),), TARGET)]).to(source.device)
        source_only = None
        if self.hparams.interpolate:
            with frozen_stats(self.model):
                source_only = self.model(source, domains[: len(source)])
        combined = self.model(torch.cat([source, target]), domains)
        source_combined, target_logits = combined[: len(source)], combined[len(source):]
        if source_only is None:
            return source_combined, target_logits, source_combined.new_zeros(())
        gap = (source_combined - source_only).detach().square().mean()
        return interpolate_logits(source_combined, source_only), target_logits, gap

    def training_step(self, batch, batch_idx):
        (source_images, labels), target_images = batch["source"], batch["target"]
        source, target = self.views(source_images), self.views(target_images)
        B, U = len(source_images), len(target_images)
        # Losses, thresholds and alignment in float32 whatever precision the passes ran in.
        source_logits, target_logits, gap = (t.float() for t in self.forward_passes(source, target))
        source_weak, source_strong = source_logits[:B], source_logits[B:]
        target_weak, target_strong = target_logits[:U], target_logits[U:]

        with torch.no_grad():
            hp = self.hparams
            # Batch statistics of the global batch: every process thresholds and aligns alike.
            global_mean = self.mean_over_processes
            threshold = (relative_threshold(source_weak, hp.tau, global_mean) if hp.relative_threshold
                         else source_weak.new_tensor(hp.tau))
            target_probs = target_weak.softmax(1)
            self.alignment.update(source_weak.softmax(1), target_probs, global_mean)
            if hp.align:
                target_probs = align_distribution(target_probs, self.alignment.source_mean, self.alignment.target_mean)
            confidence, pseudo = target_probs.max(1)
            mask = (confidence >= threshold).float()
            targets = pseudo if hp.hard_labels else target_probs

        loss_source = 0.5 * (F.cross_entropy(source_weak, labels) + F.cross_entropy(source_strong, labels))
        loss_target = (F.cross_entropy(target_strong, targets, reduction="none") * mask).mean()
        mu = hp.target_weight * warmup(self.global_step, self.total_steps)
        loss = loss_source + mu * loss_target
        self.loss_terms = {"source": loss_source, "target": mu * loss_target}  # read by GradientVariance(split=True)
        self.log_dict({
            "train/loss": loss, "train/loss_source": loss_source, "train/loss_target": loss_target,
            "train/mask_rate": mask.mean(), "train/threshold": threshold,
            "train/kl_source_target": kl_divergence(self.alignment.source_mean, self.alignment.target_mean),
            "train/logit_gap": gap, "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/warmup": mu,
        }, on_step=True, prog_bar=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss
