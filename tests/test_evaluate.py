"""python -m adamatch_uan.evaluate: on the run's own test sets it reproduces results.json exactly."""

import json

import numpy as np
import pytest

from adamatch_uan.cli.errors import UserError
from adamatch_uan.data import DomainError
from adamatch_uan.evaluate import main

from conftest import quick_fit

pytestmark = pytest.mark.xdist_group("evaluate_run")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("evaluate")
    results = quick_fit(folder / "run", f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", "mn",
                        "--trainer.precision", "32-true", steps=4)
    return folder / "run", results


def test_the_runs_own_test_sets_give_its_results_json(run, tmp_path):
    run_dir, results = run
    evaluated = main([str(run_dir), "--out", str(tmp_path / "e.json")])
    assert json.loads((run_dir / "results.json").read_text())["test"] == results["test"]
    for name in ("source", "target"):
        for metric in ("images", "acc", "precision", "recall", "f1"):
            assert evaluated["test"][name][metric] == results["test"][name][metric], (name, metric)
        matrix = np.array(evaluated["test"][name]["confusion_matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == results["test"][name]["images"]
        assert np.trace(matrix) / matrix.sum() == pytest.approx(results["test"][name]["acc"])
    assert json.loads((tmp_path / "e.json").read_text())["test"] == evaluated["test"]
    assert evaluated["precision"] == "32-true"


def test_a_bfloat16_run_is_evaluated_in_bfloat16(data, tmp_path):
    """Its own sets give its results.json, tested under the autocast it was tested under, not float32."""
    results = quick_fit(tmp_path / "run", f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", "uan",
                        "--trainer.precision", "bf16-mixed", "--model.init_args.channels_last", "true", steps=4)
    evaluated = main([str(tmp_path / "run"), "--out", str(tmp_path / "e.json")])
    assert evaluated["precision"] == "bf16-mixed"
    for name in ("source", "target"):
        for metric in ("images", "acc", "precision", "recall", "f1"):
            assert evaluated["test"][name][metric] == results["test"][name][metric], (name, metric)


def test_another_labelled_set_is_mapped_onto_the_runs_classes(run, tmp_path):
    run_dir, _ = run
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "other.npz", x_train=rng.integers(0, 256, (5, 16, 16), dtype=np.uint8), y_train=np.arange(5),
             x_test=rng.integers(0, 256, (6, 16, 16), dtype=np.uint8), y_test=np.array([3, 3, 4, 4, 5, 5]))
    evaluated = main([str(run_dir), "--data.target", f"npz:{tmp_path / 'other.npz'}", "--out", str(tmp_path / "o.json")])
    assert evaluated["test"]["target"]["images"] == 6
    assert np.array(evaluated["test"]["target"]["confusion_matrix"]).sum(1).tolist() == [0, 0, 0, 2, 2, 2, 0, 0, 0, 0]
    np.savez(tmp_path / "named.npz", x=np.zeros((10, 16, 16), np.uint8), y=np.arange(10) % 2,
             classes=np.array(["0", "eleven"]))
    with pytest.raises(DomainError, match="classes the source does not have: eleven"):
        main([str(run_dir), "--data.target", f"npz:{tmp_path / 'named.npz'}", "--out", str(tmp_path / "n.json")])
    np.savez(tmp_path / "unlabelled.npz", x=np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(UserError, match="Nothing to evaluate"):
        main([str(run_dir), "--data.source", f"npz:{tmp_path / 'unlabelled.npz'}", "--data.target",
              f"npz:{tmp_path / 'unlabelled.npz'}", "--out", str(tmp_path / "u.json")])
    with pytest.raises(UserError, match="exists"):
        main([str(run_dir), "--out", str(tmp_path / "o.json")])


def test_adabn_tests_the_target_with_statistics_of_its_training_images(run, tmp_path):
    import adamatch_uan
    from adamatch_uan.norm import recalibrated

    run_dir, results = run
    evaluated = main([str(run_dir), "--recalibrate", "target", "--out", str(tmp_path / "adabn.json")])
    assert evaluated["recalibrate"] == "target"
    assert evaluated["test"]["source"]["acc"] == results["test"]["source"]["acc"]  # the source keeps its statistics
    # the same copy by hand: the EMA model recalibrated on the target's training images, tested on its test set
    classifier = adamatch_uan.load(run_dir)
    module = classifier.module
    from adamatch_uan.data import load_domain

    target = json.loads((run_dir / "results.json").read_text())["data"]["target"]
    train = load_domain(target, "/", True, download=False, size=32)
    test = load_domain(target, "/", False, download=False, size=32)
    copy = recalibrated(module.evaluated_model, (module.inputs(b) for b in train.images.split(64)), 0)
    import torch

    with torch.no_grad():
        predicted = copy(module.inputs(test.images), torch.zeros(len(test), dtype=torch.long)).argmax(1)
    assert evaluated["test"]["target"]["acc"] == pytest.approx((predicted == test.labels).float().mean().item())
    with pytest.raises(UserError, match="--target_context 0"):
        main([str(run_dir), "--target_context", "7", "--out", str(tmp_path / "bad.json")])
