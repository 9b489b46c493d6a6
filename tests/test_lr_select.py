"""Learning-rate selection (benchmarks/lr_select.py): chosen on source validation, never on the target."""

import json
from pathlib import Path
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import da_table  # noqa: E402
import lr_select  # noqa: E402

# Source validation prefers 0.01; the target's test labels would prefer 0.03.
SOURCE_VAL = {"0.03": 0.50, "0.01": 0.98, "0.003": 0.96}
TARGET_TEST = {"0.03": 0.99, "0.01": 0.80, "0.003": 0.70}


class FakeFit:
    def __init__(self):
        self.commands = []

    def __call__(self, args, **kwargs):
        self.commands.append(args)
        lr = args[args.index("--model.init_args.lr") + 1]
        run_dir = Path(args[args.index("--run_dir") + 1])
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({
            "steps": 500, "selected": {"step": 500, "monitor": "val/source/acc", "score": SOURCE_VAL[lr]},
            "test": {"source": {"acc": 0.9}, "target": {"acc": TARGET_TEST[lr]}}}))

        class Done:
            returncode, stdout, stderr = 0, "", ""
        return Done()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    fit = FakeFit()
    monkeypatch.setattr(da_table.subprocess, "run", fit)
    monkeypatch.setattr(da_table, "commit", lambda: "abc")
    monkeypatch.setattr(lr_select, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return fit


def test_the_learning_rate_is_chosen_on_source_validation_not_target_test(tmp_path, fake):
    argv = ["--pair", "mnist_usps", "--row", "gn", "--lrs", "0.03", "0.01", "0.003", "--seeds", "0",
            "--runs", str(tmp_path / "runs"), "--mode", "bf16-nhwc"]
    result = lr_select.main(argv)
    assert result["chosen_lr"] == 0.01
    assert result["lrs"]["0.03"]["source_val_acc"] == [0.50]
    # Each cell is the DA table's run of that row and mode with only the learning rate added.
    for cli, lr in zip(fake.commands, ("0.03", "0.01", "0.003")):
        assert cli[cli.index("--config") + 1] == "configs/mnist_usps_gn.yaml"
        assert cli[cli.index("--trainer.precision") + 1] == "bf16-mixed"
        assert cli[cli.index("--model.init_args.lr") + 1] == lr
    saved = json.loads((tmp_path / "results" / "lr_select_mnist_usps_gn.json").read_text())
    assert saved["chosen_lr"] == 0.01
    # A second call reads the summaries and runs nothing.
    fake.commands.clear()
    assert lr_select.main(argv)["chosen_lr"] == 0.01 and fake.commands == []


def test_the_confirmatory_seeds_choose_nothing(tmp_path, fake):
    with pytest.raises(SystemExit) as e:
        lr_select.main(["--pair", "mnist_usps", "--row", "gn", "--lrs", "0.01", "--seeds", "0", "3"])
    assert e.value.code == 2 and fake.commands == []


def test_every_committed_choice_is_what_its_config_pins():
    import yaml

    chosen = sorted((ROOT / "benchmarks" / "results").glob("lr_select_*.json"))
    for path in chosen:
        result = json.loads(path.read_text())
        config = yaml.safe_load((ROOT / "configs" / f"{result['pair']}_{result['row']}.yaml").read_text())
        assert config["model"]["init_args"]["lr"] == result["chosen_lr"], path.name
