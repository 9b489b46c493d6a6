"""The splits the toolkit makes (test splits of files without their own, the source's validation set):
seeded and stratified, so every class keeps its share of each part whatever the file's order."""

from __future__ import annotations

import torch
from torch import Tensor


def stratified_split(labels: Tensor | None, count: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (kept, held out) of ``count`` samples, round(fraction · count) of them held out.

    Each class holds out its share fraction · n_class, rounded down, and the samples left to hold
    out go to the classes with the largest remainders (ties in a random order); within a class
    the samples are taken in a random order. Everything random is drawn from ``seed``. Without
    labels the samples are drawn from all alike. Both parts are sorted (the samples' order).
    """
    generator = torch.Generator().manual_seed(seed)
    total = int(round(count * fraction))
    if labels is None:
        order = torch.randperm(count, generator=generator)
        return order[total:].sort().values, order[:total].sort().values
    classes, sizes = labels.unique(return_counts=True)
    quota = sizes.double() * fraction
    held_per_class = quota.floor().long()
    remainder = quota - held_per_class
    order = torch.randperm(len(classes), generator=generator)  # random tie-breaking
    ranked = order[remainder[order].argsort(descending=True, stable=True)]
    held_per_class[ranked[: total - int(held_per_class.sum())]] += 1
    held, kept = [], []
    for label, take in zip(classes.tolist(), held_per_class.tolist()):
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        held.append(members[:take])
        kept.append(members[take:])
    empty = torch.zeros(0, dtype=torch.long)
    return torch.cat([empty, *kept]).sort().values, torch.cat([empty, *held]).sort().values
