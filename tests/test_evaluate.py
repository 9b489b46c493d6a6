"""python -m adamatch_uan.evaluate: on the run's own test sets it reproduces results.json exactly."""

import json

import numpy as np
import pytest

from adamatch_uan.cli_errors import UserError
from adamatch_uan.data import DomainError
from adamatch_uan.evaluate import main

from conftest import quick_fit

pytestmark = pytest.mark.xdist_group("evaluate_run")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("evaluate")
    results = quick_fit(folder / "run", f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", "mn", steps=4)
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
