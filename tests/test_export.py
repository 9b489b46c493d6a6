"""python -m adamatch_uan.export: a file torch alone loads, agreeing with the eager model."""

import json
import subprocess
import sys

import pytest
import torch

import adamatch_uan
from adamatch_uan.cli.errors import UserError
from adamatch_uan.export import main

from conftest import quick_fit

pytestmark = pytest.mark.xdist_group("export_runs")

# Loads an exported file with torch alone: importing adamatch_uan is made to fail.
LOADER = """
import sys, importlib.abc
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "adamatch_uan":
            raise ImportError("adamatch_uan must not be needed")
sys.meta_path.insert(0, Refuse())
import warnings
import torch
warnings.simplefilter("ignore")
path, fmt, images, out = sys.argv[1:]
model = torch.export.load(path).module() if fmt == "pt2" else torch.jit.load(path)
torch.save(model(torch.load(images)), out)
assert not any(name.startswith("adamatch_uan") for name in sys.modules)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("export")
    for norm in ("bn", "uan_ctx"):
        quick_fit(folder / norm, f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", norm,
                  *(["--model.init_args.target_context", "1"] if norm == "uan_ctx" else []))
    return folder


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
@pytest.mark.parametrize("norm", ["bn", "uan_ctx"])
def test_an_exported_model_loads_without_the_package_and_agrees_with_the_eager_one(runs, tmp_path, norm, fmt):
    out = main([str(runs / norm), "--format", fmt, "--out", str(tmp_path / f"model.{fmt}")])
    metadata = json.loads(out.with_name(out.name + ".json").read_text())
    assert metadata["classes"] == [str(i) for i in range(10)] and metadata["image_size"] == 32
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    torch.save(images, tmp_path / "images.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, str(out), fmt, str(tmp_path / "images.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    exported = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        eager = adamatch_uan.load(runs / norm).module(images)
    assert torch.equal(exported.argmax(1), eager.argmax(1))
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-4)


def test_export_never_overwrites(runs, tmp_path):
    (tmp_path / "taken.pt2").write_text("mine")
    with pytest.raises(UserError, match="exists"):
        main([str(runs / "bn"), "--out", str(tmp_path / "taken.pt2")])
    assert (tmp_path / "taken.pt2").read_text() == "mine"
    with pytest.raises(UserError, match="--format in"):
        main([str(runs / "bn"), "--format", "onnx2"])
