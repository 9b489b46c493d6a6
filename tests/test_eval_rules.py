"""Evaluation rules on the same weights (benchmarks/eval_rules.py): a real run retested, the paired aggregation."""

import json
import statistics
import sys

import pytest

from conftest import ROOT, smoke_args

sys.path.insert(0, str(ROOT / "benchmarks"))
import eval_rules  # noqa: E402


def test_a_run_retested_under_every_rule_reproduces_its_own_test_under_the_default(data, tmp_path):
    from adamatch_uan.fit import main

    run = tmp_path / "run"
    main([*smoke_args(data, run, 3), "--norm", "uan_ctx", "--trainer.callbacks", "[]"])
    summary = eval_rules.summarise(run, "toy", "uan_ctx", 0, 3)
    rules = summary["rules"]
    assert summary["default"] == "inference=running, target context=source" and len(rules) == 4  # uan_ctx's defaults
    own = json.loads((run / "results.json").read_text())["test"]
    for name in ("source", "target"):
        assert rules[summary["default"]]["test"][name]["acc"] == pytest.approx(own[name]["acc"])
    for inference in ("learned", "running"):  # the target's context never reaches the source set
        by_context = [rules[eval_rules.rule_name(inference, c)]["test"]["source"]["acc"] for c in (0, 1)]
        assert by_context[0] == by_context[1]


def summary(row, seed, accuracies):
    """A fabricated summary: rule -> target accuracy (source = target + 0.01)."""
    return {"row": row, "seed": seed, "default": "a", "rules": {
        rule: {"test": {"target": {"acc": acc}, "source": {"acc": acc + 0.01}}} for rule, acc in accuracies.items()}}


def test_aggregation_gives_each_rule_and_its_paired_difference_from_the_default():
    runs = [summary("uan", 2, {"a": 0.90, "b": 0.95}), summary("uan", 0, {"a": 0.80, "b": 0.81}),
            summary("uan", 1, {"a": 0.70, "b": 0.74})]
    table = eval_rules.aggregate(runs)
    entry = table["uan"]
    assert entry["seeds"] == [0, 1, 2]
    assert entry["rules"]["b"]["target"]["values"] == [0.81, 0.74, 0.95]
    assert entry["rules"]["b"]["minus_default"]["mean"] == pytest.approx(0.1 / 3)
    assert entry["rules"]["b"]["minus_default"]["std"] == pytest.approx(statistics.stdev([0.01, 0.04, 0.05]))
    assert entry["rules"]["a"]["minus_default"]["values"] == [0.0, 0.0, 0.0]
    text = eval_rules.markdown(table, "t")
    assert "| uan | 0, 1, 2 | **a** (default) | 80.00 ± 10.00 (80.0, 70.0, 90.0) |" in text
    assert "+3.33 ± 2.08 (+1.0, +4.0, +5.0)" in text
