"""A person's mistakes end the CLI with one short message, status 2 and no traceback; bugs still raise."""

import subprocess
import sys

import pytest

from adamatch_uan.cli.errors import UserError, condense, report

from conftest import ROOT, smoke_args

CASES = {  # name -> (extra arguments given the data folder, what stderr must say)
    "unknown norm": (lambda d: ["--norm", "layernorm"], ["'layernorm'", "bn, bn_ctx, gn, mn, none, uan", "--norm"]),
    "unknown slot": (lambda d: ["--model.init_args.norm", '{"nowhere": "bn"}'], ["'nowhere'", "norm1", "--model.init_args.norm"]),
    "bad option value": (lambda d: ["--model.init_args.norm_options", '{"inference": "bad"}'], ["'bad'", "inference"]),
    "bad option type": (lambda d: ["--trainer.max_steps", "many"], ["trainer.max_steps", "many"]),
    "bad config key": (lambda d: ["--model.init_args.lrr", "3"], ["'lrr' is not accepted", "--help"]),
    "missing files": (lambda d: ["--data.source", "mnist", "--data.root", str(d / "empty"), "--data.download", "false"],
                      ["train-images-idx3-ubyte", "--data.root"]),
    "wrong checksum": (lambda d: ["--data.target", "svhn", "--data.root", str(d / "svhn"), "--data.download", "false"],
                       ["Wrong checksum", "32x32.mat", "replace it"]),
    "malformed npz": (lambda d: ["--data.target", f"npz:{d / 'junk.npz'}"], ["junk.npz", "npz"]),
    "malformed image folder": (lambda d: ["--data.target", f"folder:{d / 'folder'}"], ["Could not read image", "bad.png"]),
    "truncated npz": (lambda d: ["--data.target", f"npz:{d / 'cut.npz'}"], ["cut.npz", "truncated"]),
    "batch size 0": (lambda d: ["--data.batch_size", "0"], ["--data.batch_size", "got 0"]),
    "negative max_steps": (lambda d: ["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
    "a class count": (lambda d: ["--data.num_classes", "13"], ["'num_classes'", "comes from the data"]),
    "a model class count": (lambda d: ["--model.init_args.num_classes", "13"], ["num_classes comes from the data"]),
    "another norm than the checkpoint's": (lambda d: ["--norm", "bn", "--ckpt_path", str(d / "uan-run" / "checkpoints" / "last.ckpt")],
                                            ["norm 'uan'", "'bn'", "config.yaml"]),
    "an optimizer": (lambda d: ["--optimizer", "Adam"], ["--optimizer", "recipe", "--model.init_args.lr"]),
    "an lr scheduler": (lambda d: ["--lr_scheduler", "StepLR"], ["--lr_scheduler", "lr_schedule"]),
    "an abbreviation": (lambda d: ["--trainer.max_step", "3"], ["max_step", "did you mean --trainer.max_steps?"]),
    "a misspelt option": (lambda d: ["--data.batchsize", "3"], ["'batchsize'", "did you mean --data.batch_size?"]),
    "an unknown target class": (lambda d: ["--data.source", f"folder:{d / 'named'}", "--data.target",
                                           f"folder:{d / 'other'}"], ["classes the source does not have: owl"]),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, data):
    """Broken files of each format, folders of named classes, and a UAN run's checkpoint."""
    import numpy as np

    from conftest import quick_fit, write_images

    bad = tmp_path_factory.mktemp("bad")
    np.savez(bad / "full.npz", x=np.zeros((64, 16, 16), np.uint8), y=np.arange(64) % 10)
    (bad / "cut.npz").write_bytes((bad / "full.npz").read_bytes()[:500])
    write_images(bad / "named", 5, classes=("cat", "dog"))
    write_images(bad / "other", 5, classes=("cat", "owl"))
    quick_fit(bad / "uan-run", f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", "uan", steps=2)
    (bad / "svhn").mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (bad / "svhn" / name).write_bytes(b"not the file")
    (bad / "junk.npz").write_bytes(b"not an npz")
    (bad / "folder" / "cat").mkdir(parents=True)
    (bad / "folder" / "cat" / "bad.png").write_bytes(b"not a png")
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_error_is_one_short_message_with_the_value_and_the_fix(data, bad, tmp_path, monkeypatch, capfd, case):
    """In this process (``fit.run`` as ``python -m adamatch_uan.fit`` calls it, stderr read at the file
    descriptor); the last test checks the same contract on a real process."""
    from adamatch_uan import fit

    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["adamatch_uan.fit", *smoke_args(data, run, 2), *CASES[case][0](bad)])
    with pytest.raises(SystemExit) as exited:
        fit.run()
    stderr = capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert exited.value.code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and len(lines) <= 6, stderr[-3000:]
    for expected in CASES[case][1]:
        assert expected in stderr, (expected, stderr[-3000:])
    assert not run.exists()  # nothing written: no run directory, no checkpoint of an untrained model


def test_a_real_process_exits_2_with_the_message_and_debug_shows_the_traceback(data, tmp_path):
    command = [sys.executable, "-m", "adamatch_uan.fit", *smoke_args(data, tmp_path, 2), "--norm", "layernorm"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "'layernorm'" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    debug = subprocess.run([*command, "--debug"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_programming_errors_still_raise(capsys):
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        report(buggy, [])

    def user(argv):
        raise UserError("Expected X, got Y; use --flag Z")

    with pytest.raises(SystemExit) as exited:
        report(user, [])
    assert exited.value.code == 2 and "error: Expected X, got Y; use --flag Z" in capsys.readouterr().err


def test_condense_drops_the_union_boilerplate():
    message = ('Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A, B]\n'
               "  Errors:\n    - Problem with given class_path 'A':\n        Option 'lrr' is not accepted\n"
               "    - Expected a <class 'NoneType'>\n  Given value type: <class 'X'>\n  Given value: X(lrr=3)")
    assert condense(message).splitlines() == ['Parser key "model":', "    - Problem with given class_path 'A':",
                                              "        Option 'lrr' is not accepted"]
