"""One class index per run: the source domain defines the classes, every other domain is mapped onto them.

A domain's labels are either *named* (an image folder's sub-folders, CIFAR's class names, an npz
file's ``classes`` array), or *numbered*: the digit sets and npz files without names, whose
labels are the class indices themselves. The run's classes are the source's names, or
"0" … "K−1" for a numbered source (K = its largest label + 1). A named domain is mapped onto
them by name, a numbered one by index; a name the source does not have, or an index ≥ K, is
an error that lists them. A domain that lacks some classes is fine.
"""

from __future__ import annotations

import torch

from adamatch_uan.data.domains import Domain
from adamatch_uan.data.errors import DomainError


def run_classes(*source_splits: Domain) -> list[str]:
    """The class names a run has, from the splits of its (labelled) source."""
    first = source_splits[0]
    if first.labels is None:
        raise DomainError(f"The source domain {first.spec!r} has no labels: the source defines the classes, so it "
                          f"must be labelled (an image folder with a sub-folder per class, an npz with y, or a "
                          f"built-in set); use --data.source")
    if first.classes is not None:
        return list(first.classes)
    largest = max(int(split.labels.max()) for split in source_splits if split.labels is not None and len(split))
    return [str(i) for i in range(largest + 1)]


def onto(domain: Domain, classes: list[str]) -> Domain:
    """``domain`` with its labels in the run's class index (unlabelled domains are returned as they are).

    Raises:
        DomainError: names the source does not have, or indices beyond its classes.
    """
    if domain.labels is None:
        return domain
    if domain.classes is None:
        if len(domain) and (int(domain.labels.min()) < 0 or int(domain.labels.max()) >= len(classes)):
            raise DomainError(f"Expected the labels of {domain.spec} in [0, {len(classes)}) (the classes of the source), "
                              f"got [{int(domain.labels.min())}, {int(domain.labels.max())}]; the source defines "
                              f"the classes: check --data.source and the labels")
        return domain
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(domain.classes) - set(index))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        raise DomainError(f"{domain.spec} has classes the source does not have: {shown}; the source's classes are "
                          f"{', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}. Rename or remove those "
                          f"folders, or, if they are not classes, give the images unlabelled as images:PATH")
    mapping = torch.tensor([index[name] for name in domain.classes], dtype=torch.long)
    return domain.relabelled(mapping[domain.labels], list(classes))
