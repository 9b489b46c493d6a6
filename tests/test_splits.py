"""The toolkit's splits are stratified and seeded."""

import torch

from adamatch_uan.data.splits import stratified_split


def test_every_class_keeps_its_share_and_the_total_is_the_fraction():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 7 + [3] * 1)  # sorted by class
    kept, held = stratified_split(labels, len(labels), 0.2, seed=0)
    assert len(held) == round(0.2 * len(labels)) and len(kept) + len(held) == len(labels)
    counts = torch.bincount(labels[held], minlength=4).tolist()
    assert counts[:2] == [10, 6] and counts[2] in (1, 2) and counts[3] in (0, 1)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(len(labels)))


def test_the_split_is_a_function_of_the_seed():
    labels = torch.arange(100) % 5
    assert torch.equal(stratified_split(labels, 100, 0.3, 1)[1], stratified_split(labels, 100, 0.3, 1)[1])
    assert not torch.equal(stratified_split(labels, 100, 0.3, 1)[1], stratified_split(labels, 100, 0.3, 2)[1])


def test_without_labels_the_fraction_is_drawn_from_all():
    kept, held = stratified_split(None, 10, 0.3, 0)
    assert len(held) == 3 and sorted(torch.cat([kept, held]).tolist()) == list(range(10))
