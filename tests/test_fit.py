"""The command line end to end, in subprocesses, on generated data (and on ../shared/data when present)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.savez(folder / "s.npz", x=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), y=np.arange(200) % 10)
    np.savez(folder / "t.npz", x=rng.integers(0, 256, (200, 16, 16), dtype=np.uint8), y=np.arange(200) % 10)
    return folder


def fit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adamatch_uan.fit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def smoke_args(data: Path, run: Path, steps: int) -> list[str]:
    return ["--config", str(ROOT / "configs" / "smoke.yaml"), "--data.source", f"npz:{data / 's.npz'}",
            "--data.target", f"npz:{data / 't.npz'}", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false", "--run_dir", str(run)]


def test_smoke_run_writes_everything_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    done = fit(*smoke_args(data, run, 6), "--norm", "mn")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and set(results["test"]) == {"source", "target"}
    assert set(results["test"]["target"]) == {"acc", "precision", "recall", "f1"}
    assert (run / "checkpoints" / "last.ckpt").exists() and list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "metrics.csv").exists() and list(run.glob("events.out.tfevents.*"))
    assert "norm: mn" in (run / "config.yaml").read_text()  # the --norm shortcut reached the model
    assert "acc" in done.stdout and "target" in done.stdout  # the printed table

    resumed = fit(*smoke_args(data, run, 9), "--norm", "mn", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["steps"] == 9


def test_unknown_norm_lists_the_choices(data, tmp_path):
    done = fit(*smoke_args(data, tmp_path / "run", 2), "--norm", "layernorm")
    assert done.returncode != 0 and "bn, mn, none, uan, uan_ctx" in done.stderr


def test_missing_data_names_files_and_option_and_leaves_no_results(tmp_path):
    run = tmp_path / "run"
    done = fit("--data.source", "mnist", "--data.root", str(tmp_path / "empty"), "--data.download", "false",
               "--run_dir", str(run))
    assert done.returncode != 0
    assert "train-images-idx3-ubyte" in done.stderr and "--data.root" in done.stderr
    assert not (run / "results.json").exists()


def test_help_and_print_config():
    assert fit("--help").returncode == 0
    printed = fit("--print_config", "--norm", "uan")
    assert printed.returncode == 0 and "AdaMatch" in printed.stdout


@pytest.mark.skipif(not (SHARED / "MNIST").is_dir(), reason="../shared/data is not present")
def test_real_mnist_to_usps(tmp_path):
    run = tmp_path / "run"
    done = fit("--config", str(ROOT / "configs" / "smoke.yaml"), "--data.root", str(SHARED),
               "--data.target", f"npz:{SHARED / 'USPS' / 'usps_esl_16x16.npz'}", "--data.download", "false",
               "--trainer.max_steps", "200", "--trainer.val_check_interval", "100",
               "--trainer.enable_progress_bar", "false", "--norm", "bn", "--run_dir", str(run),
               # 0.999 keeps 82 % of the initial weights after 200 steps: the EMA needs a shorter memory here.
               "--model.init_args.ema_decay", "0.98")
    assert done.returncode == 0, done.stderr[-3000:]
    test = json.loads((run / "results.json").read_text())["test"]
    assert test["source"]["acc"] > 0.8 and test["target"]["acc"] > 0.3, test
