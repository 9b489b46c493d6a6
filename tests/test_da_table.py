"""The DA sweep (benchmarks/da_table.py): aggregation, resumption, the command it runs."""

import json
from pathlib import Path
import statistics
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import da_table  # noqa: E402


def summary(row, seed, target, source=0.99, status="finished"):
    s = {"pair": "mnist_usps", "row": row, "seed": seed, "steps": 500, "status": status}
    if status == "finished":
        s["test"] = {"source": {"acc": source, "f1": source - 0.01}, "target": {"acc": target, "f1": target - 0.02}}
    return s


def test_aggregation_gives_mean_sample_std_and_every_seed_in_order():
    rows = [summary("uan", 2, 0.95), summary("bn", 1, 0.90), summary("bn", 0, 0.96), summary("bn", 2, 0.93),
            summary("uan", 0, 0.97), summary("uan", 1, 0.0, status="diverged")]
    table = da_table.aggregate(rows)
    assert list(table) == ["bn", "uan"]  # the order of ROWS
    bn = table["bn"]
    assert bn["seeds"] == [0, 1, 2] and bn["target/acc"]["values"] == [0.96, 0.90, 0.93]
    assert bn["target/acc"]["mean"] == pytest.approx(0.93)
    assert bn["target/acc"]["std"] == pytest.approx(statistics.stdev([0.96, 0.90, 0.93]))
    assert bn["target/f1"]["mean"] == pytest.approx(0.91) and bn["source/acc"]["std"] == pytest.approx(0.0)
    assert table["uan"]["seeds"] == [0, 2] and table["uan"]["diverged"] == [1]
    assert table["uan"]["target/acc"]["mean"] == pytest.approx(0.96)
    text = da_table.markdown(table, "t")
    assert "93.00 ± 3.00 (96.0, 90.0, 93.0)" in text and "| 1 |" in text
    one = da_table.aggregate([summary("mn", 0, 0.8)])["mn"]
    assert da_table.cell(one, "target/acc", seeds=True) == "80.00 (80.0)"  # one seed has no spread to show


def test_each_row_is_paired_with_bn_at_the_seeds_both_finished():
    rows = [summary("bn", 0, 0.96), summary("bn", 1, 0.90), summary("bn", 2, 0.93),
            summary("uan", 0, 0.97), summary("uan", 1, 0.0, status="diverged"), summary("uan", 2, 0.90),
            summary("mn", 3, 0.5)]
    table = da_table.aggregate(rows)
    da_table.paired_difference(table)
    uan = table["uan"]["target/acc − bn"]
    assert uan["seeds"] == [0, 2] and uan["values"] == pytest.approx([0.01, -0.03])
    assert uan["mean"] == pytest.approx(-0.01) and uan["std"] == pytest.approx(statistics.stdev([0.01, -0.03]))
    assert "target/acc − bn" not in table["bn"] and "target/acc − bn" not in table["mn"]  # no seed in common
    text = da_table.markdown(table, "t")
    assert "-1.00 ± 2.83 (+1.0, -3.0)" in text


def test_a_finished_cell_is_not_run_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bn-seed0.json").write_text(json.dumps(summary("bn", 0, 0.9)))
    monkeypatch.setattr(da_table.subprocess, "run", lambda *a, **k: pytest.fail("ran a finished cell"))
    assert da_table.run_one("mnist_usps", "bn", 0, 500, "data", tmp_path / "runs", out)["test"]["target"]["acc"] == 0.9


def test_the_command_is_the_real_cli_with_the_budget_and_the_seed(tmp_path):
    args = da_table.command("usps_mnist", "uan_input", 3, 500, "/data", tmp_path)
    text = " ".join(args)
    assert args[1:3] == ["-m", "adamatch_uan.fit"] and "configs/usps_mnist_uan_input.yaml" in text
    assert "--data.source npz:/data/USPS/usps_esl_16x16.npz --data.target mnist" in text
    assert "--seed_everything 3 --data.seed 3" in text and "--trainer.max_steps 500" in text
    for pair in da_table.PAIRS:
        for row in da_table.ROWS:
            if row not in da_table.RETESTS:  # retests train nothing
                assert (ROOT / "configs" / f"{pair}_{row}.yaml").exists(), (pair, row)


def test_classification_cells_share_the_runner_and_aggregate_on_the_labelled_domain(tmp_path, monkeypatch):
    import classify_table

    out = tmp_path / "out"
    out.mkdir()
    for seed, acc in ((0, 0.70), (1, 0.74)):
        s = summary("uan", seed, 0.0)
        s["test"] = {"source": {"acc": acc, "f1": acc - 0.01}}
        s["validation_error"] = [(0, 350, 0.5), (1, 700, 0.4 - seed / 10)]
        (out / f"uan-seed{seed}.json").write_text(json.dumps(s))
    monkeypatch.setattr(da_table.subprocess, "run", lambda *a, **k: pytest.fail("ran a finished cell"))
    assert classify_table.run_one("cifar10", "uan", 1, 5, None, "data", tmp_path / "runs", out)["test"]["source"]["acc"] == 0.74
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    text = classify_table.markdown(da_table.aggregate(summaries), summaries, "t")
    assert "72.00 ± 2.83 (70.0, 74.0)" in text and "50.0, 35.0" in text
    args = " ".join(classify_table.command("cifar10", "mn", 2, 5, "folder:/d", "/r", tmp_path))
    assert "configs/cifar10_mn.yaml" in args and "--data.domain folder:/d" in args and "--trainer.max_epochs 5" in args


def test_a_mode_adds_its_arguments_and_its_own_folder(tmp_path):
    text = " ".join(da_table.command("mnist_usps", "bn", 0, 500, "/data", tmp_path, "bf16-nhwc"))
    assert "--trainer.precision bf16-mixed --model.init_args.channels_last true" in text
    float32 = " ".join(da_table.command("mnist_usps", "bn", 0, 500, "/data", tmp_path, "fp32-nchw"))
    assert "--trainer.precision 32-true --model.init_args.channels_last false" in float32  # whatever the defaults
    assert da_table.table_tag("mnist_usps", 500, "bf16-nhwc") == "mnist_usps-500steps-bf16-nhwc"
    assert da_table.table_tag("mnist_usps", 500, None) == "mnist_usps-500steps"  # the legacy table
    # The confirmatory table's seeds never share a folder (and so an aggregate) with the exploratory ones.
    assert da_table.table_tag("mnist_usps", 500, "bf16-nhwc", True) == "mnist_usps-500steps-bf16-nhwc-confirmatory"


def test_the_guard_pairs_two_modes_by_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(da_table, "RESULTS", tmp_path)
    for mode, values in (("fp32-nchw", (0.90, 0.94)), ("bf16-nhwc", (0.91, 0.92))):
        folder = tmp_path / "da_table" / f"mnist_usps-500steps-{mode}"
        folder.mkdir(parents=True)
        for seed, value in enumerate(values):
            (folder / f"bn-seed{seed}.json").write_text(json.dumps(summary("bn", seed, value)))
    rows = da_table.guard("mnist_usps", 500, "fp32-nchw", "bf16-nhwc")
    assert rows["bn"]["difference"]["values"] == pytest.approx([0.01, -0.02])
    assert "-0.50 ± 2.12 (+1.0, -2.0)" in (tmp_path / "da_guard_mnist_usps-500steps.md").read_text()


def test_an_interrupted_classification_cell_resumes_from_its_checkpoint(tmp_path, data):
    """A cell whose run stopped after a checkpoint goes on from it (its history kept), not from scratch."""
    import subprocess

    import classify_table

    run_dir, out = tmp_path / "runs" / "cell", tmp_path / "out"
    base = [sys.executable, "-m", "adamatch_uan.fit", "--config", str(ROOT / "configs" / "classify_smoke.yaml"),
            "--data.domain", f"npz:{data / 's.npz'}", "--data.batch_size", "16", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar", "false", "--run_dir", str(run_dir)]
    first = subprocess.run([*base, "--trainer.max_epochs", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "results.json").unlink()  # as if the run had been stopped after its checkpoint
    steps_per_epoch = 144 // 16
    summary_ = da_table.run_cell(out / "uan-seed0.json", run_dir, [*base, "--trainer.max_epochs", "2"],
                                 {"dataset": "npz", "row": "uan", "seed": 0, "epochs": 2},
                                 lambda run: {"validation_error": classify_table.validation_curve(run)})
    assert summary_["status"] == "finished" and summary_["trained_steps"] == 2 * steps_per_epoch
    assert [e for e, _, _ in summary_["validation_error"]] == [0, 1]  # epoch 0's validation kept, not rerun
    assert "--ckpt_path" in summary_["command_resumed"]


def test_time_to_accuracy_is_the_first_validation_at_each_threshold(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,time/elapsed_s,val/source/acc,val/target/acc\n"
                                          "0,99,,0.9,0.85\n0,99,60.0,,\n0,199,,0.95,0.93\n0,199,121.0,,\n"
                                          "0,299,,0.97,0.96\n0,299,180.5,,\n")
    assert da_table.target_curve(tmp_path) == [[100, 0.85, 60.0], [200, 0.93, 121.0], [300, 0.96, 180.5]]
    summaries = [{**summary("bn", 0, 0.96), "target_curve": [[100, 0.85, 60.0], [200, 0.93, 121.0], [300, 0.96, 180.5]]},
                 {**summary("bn", 1, 0.92), "target_curve": [[100, 0.91, 50.0], [200, 0.92, 100.0]]}]
    table = da_table.aggregate(summaries)
    da_table.time_to_accuracy(table, summaries)
    to90, to95 = table["bn"]["steps to 0.90"], table["bn"]["steps to 0.95"]
    assert to90["mean_steps"] == 150 and to90["reached"] == 2 and to90["mean_seconds"] == pytest.approx(85.5)
    assert to95["mean_steps"] == 300 and to95["reached"] == 1 and to95["per_seed"][1] is None
    text = da_table.markdown(table, "t")
    assert "| 150 (2/2) | 300 (1/2) |" in text
    # A cell that was paused while it ran keeps its steps; its seconds count the pause and are left out.
    summaries[1]["paused"] = "stopped for 7 minutes between steps 100 and 200"
    da_table.time_to_accuracy(table, summaries)
    to90 = table["bn"]["steps to 0.90"]
    assert to90["mean_steps"] == 150 and to90["mean_seconds"] == 121.0 and to90["timed_seeds"] == 1


def test_confirmatory_rows_retest_trained_checkpoints_with_the_evaluate_command(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    run_dir = runs / "mnist_usps-500steps-bf16-nhwc-confirmatory" / "bn-seed3"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")
    seen = {}
    real_run = da_table.subprocess.run

    def fake_run(args, **kwargs):
        if "adamatch_uan.evaluate" not in args:  # git, for the summary's commit
            return real_run(args, **kwargs)
        seen["args"] = args
        Path(args[args.index("--out") + 1]).write_text(json.dumps({"test": {"target": {"images": 2007, "acc": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.89, "confusion_matrix": []}}}))
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(da_table.subprocess, "run", fake_run)
    s = da_table.run_one("mnist_usps", "bn_adabn", 3, 500, "data", runs, out, "bf16-nhwc", confirmatory=True)
    assert seen["args"][1:4] == ["-m", "adamatch_uan.evaluate", str(run_dir)] and "--recalibrate" in seen["args"]
    assert s["retest_of"] == "bn" and s["test"]["target"] == {"images": 2007, "acc": 0.9, "precision": 0.9,
                                                             "recall": 0.9, "f1": 0.89}
    assert list(out.glob("*.json")) == [out / "bn_adabn-seed3.json"]
    for row in da_table.CONFIRMATORY_ROWS:
        for pair in da_table.PAIRS:
            assert (ROOT / "configs" / f"{pair}_{row}.yaml").exists(), (pair, row)


def test_confirmatory_rows_can_be_a_subset_in_table_order_and_nothing_else(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(da_table, "run_one", lambda pair, row, seed, *a, **k: ran.append((row, seed)))
    monkeypatch.setattr(da_table, "RESULTS", tmp_path)
    da_table.main(["--pair", "mnist_usps", "--confirmatory", "--rows", "uan_adabn", "uan", "--mode", "bf16-nhwc"])
    # The retest follows the row it retests, whatever order the user named them in; the seeds stay 3-5.
    assert ran == [(r, s) for s in da_table.CONFIRMATORY_SEEDS for r in ("uan", "uan_adabn")]
    ran.clear()
    da_table.main(["--pair", "mnist_usps", "--confirmatory", "--mode", "bf16-nhwc"])
    assert [r for r, s in ran if s == 3] == [*da_table.CONFIRMATORY_ROWS, *da_table.RETESTS]
    with pytest.raises(SystemExit) as e:
        da_table.main(["--pair", "mnist_usps", "--confirmatory", "--rows", "mn_k3"])
    assert e.value.code == 2


def test_the_confirmatory_table_pairs_uan_with_the_reviewers_baselines(tmp_path, monkeypatch):
    monkeypatch.setattr(da_table, "RESULTS", tmp_path)
    out = tmp_path / "da_table" / "mnist_usps-500steps-bf16-nhwc-confirmatory"
    out.mkdir(parents=True)
    for row, accs in (("bn", (0.960, 0.965)), ("uan", (0.970, 0.973)), ("bn_ctx", (0.972, 0.966))):
        for seed, acc in zip((3, 4), accs):
            (out / f"{row}-seed{seed}.json").write_text(json.dumps(summary(row, seed, acc)))
    table = da_table.main(["--pair", "mnist_usps", "--confirmatory", "--mode", "bf16-nhwc", "--aggregate-only"])
    assert table["uan"]["target/acc − bn_ctx"]["values"] == pytest.approx([-0.002, 0.007])
    text = (tmp_path / "da_table_mnist_usps-500steps-bf16-nhwc-confirmatory.md").read_text()
    assert "| uan | +0.25 ± 0.64 (-0.2, +0.7) |" in text
