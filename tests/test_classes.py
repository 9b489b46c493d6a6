"""One class index: the source defines the classes; other domains map onto them by name or index."""

import numpy as np
import pytest
import torch
from PIL import Image

from adamatch_uan.data import Domain, DomainError, load_domain, onto, run_classes


def domain(labels, classes=None):
    labels = torch.tensor(labels)
    return Domain("test", torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels, classes,
                  [str(i) for i in range(len(labels))])


def write_folder(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / name / f"{i}.png")


def test_a_labelled_folder_in_another_order_gets_the_sources_index(tmp_path):
    write_folder(tmp_path / "source", ["cat", "dog", "fox"])
    write_folder(tmp_path / "target", ["fox", "cat"])  # sorted: cat = 0, fox = 1 in the folder's own index
    source = load_domain(f"folder:{tmp_path / 'source'}", tmp_path, True, size=None, test_fraction=0.5)
    target = load_domain(f"folder:{tmp_path / 'target'}", tmp_path, True, size=None, test_fraction=0.5)
    classes = run_classes(source)
    assert classes == ["cat", "dog", "fox"]
    mapped = onto(target, classes)
    names = [classes[i] for i in mapped.labels.tolist()]
    assert names == [target.classes[i] for i in target.labels.tolist()]  # each image keeps its class name
    assert set(mapped.labels.tolist()) == {0, 2}  # fox is index 2 of the source, not the folder's 1


def test_a_class_the_source_does_not_have_is_refused_with_the_names(tmp_path):
    with pytest.raises(DomainError, match=r"classes the source does not have: owl, yak.*cat, dog"):
        onto(domain([0, 1, 2, 3], ["cat", "owl", "yak", "dog"]), ["cat", "dog"])


def test_a_numbered_domain_maps_by_index_and_is_checked_against_the_class_count():
    assert onto(domain([0, 2, 1]), ["a", "b", "c"]).labels.tolist() == [0, 2, 1]
    with pytest.raises(DomainError, match=r"labels of test in \[0, 3\).*got \[0, 5\]"):
        onto(domain([0, 5]), ["a", "b", "c"])


def test_a_numbered_source_has_classes_up_to_its_largest_label_over_its_splits():
    assert run_classes(domain([0, 3, 1]), domain([4])) == ["0", "1", "2", "3", "4"]
    assert run_classes(domain([1], ["x", "y"])) == ["x", "y"]


def test_an_unlabelled_source_cannot_define_classes():
    unlabelled = Domain("images:x", torch.zeros(2, 3, 4, 4, dtype=torch.uint8), None, None, ["a", "b"])
    with pytest.raises(DomainError, match="source defines the classes.*--data.source"):
        run_classes(unlabelled)
    assert onto(unlabelled, ["a"]) is unlabelled  # an unlabelled target is fine
