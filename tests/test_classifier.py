"""A finished run as a classifier: the checkpoint's EMA weights, the run's preprocessing, classes and context."""

import numpy as np
import pytest
import torch

import adamatch_uan
from adamatch_uan.classifier import Predictions, find_checkpoint
from adamatch_uan.cli.errors import UserError

from conftest import quick_fit, write_images

pytestmark = pytest.mark.xdist_group("classifier_run")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("classifier")
    quick_fit(folder / "run", f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", "uan_ctx",
              "--model.init_args.target_context", "1")
    return folder / "run"


def test_load_gives_the_ema_weights_of_the_selected_checkpoint_in_eval_mode(run):
    classifier = adamatch_uan.load(run)
    module = classifier.module
    assert not module.training and classifier.image_size == 32 and classifier.class_names == [str(i) for i in range(10)]
    saved = torch.load(find_checkpoint(run), map_location="cpu", weights_only=False)["state_dict"]
    for name, value in module.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert module.evaluated_model is module.ema.module


def test_predict_preprocesses_as_the_run_did_and_uses_its_context(run):
    classifier = adamatch_uan.load(run)
    raw = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)  # MNIST-sized: padded to 32 as in training
    got = classifier.predict(raw)
    padded = torch.nn.functional.pad(raw, (2, 2, 2, 2)).unsqueeze(1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        ids = torch.full((6,), 1)  # target_context 1
        expected = classifier.module.evaluated_model(classifier.module.inputs(padded), ids).softmax(1)
        source_context = classifier.module.evaluated_model(classifier.module.inputs(padded), ids * 0).softmax(1)
    torch.testing.assert_close(got.probabilities, expected)
    assert not torch.allclose(expected, source_context)  # the context matters, so the test can fail
    assert got.names == [classifier.class_names[i] for i in expected.argmax(1).tolist()]
    with pytest.raises(ValueError, match=r"Expected images \(N, 3, 32, 32\).*adamatch_uan.load"):
        classifier.module(raw.unsqueeze(1).expand(-1, 3, -1, -1))  # raw 28×28 is refused, not silently wrong


def test_predict_reads_folders_globs_and_npz_files(run, tmp_path):
    write_images(tmp_path / "flat", 3, size=16)
    write_images(tmp_path / "flat" / "deeper", 2, size=40, seed=1)
    np.savez(tmp_path / "more.npz", x=np.zeros((4, 16, 16), np.uint8))
    classifier = adamatch_uan.load(run)
    images, ids, resized = classifier.read([str(tmp_path / "flat"), str(tmp_path / "more.npz")])
    assert images.shape == (9, 3, 32, 32) and len(ids) == 9 and resized == 9
    assert ids[-1] == "more.npz:x[3]" and ids[0].endswith("0.png")
    assert len(classifier.read(str(tmp_path / "flat" / "*.png"))[1]) == 3


def test_a_run_without_a_checkpoint_or_config_is_a_short_error(tmp_path, run):
    with pytest.raises(UserError, match="not a run directory"):
        adamatch_uan.load(tmp_path)
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(UserError, match="no best checkpoint.*checkpoints/: none"):
        adamatch_uan.load(tmp_path)


def test_predictions_csv_never_overwrites(tmp_path):
    predictions = Predictions(["a", "b"], torch.tensor([[0.9, 0.1], [0.2, 0.8]]), ["cat", "dog"])
    path = predictions.write_csv(tmp_path / "p.csv")
    assert path.read_text().splitlines() == ["image,class,confidence,p_cat,p_dog", "a,cat,0.900000,0.900000,0.100000",
                                             "b,dog,0.800000,0.200000,0.800000"]
    with pytest.raises(UserError, match="exists"):
        predictions.write_csv(path)
    predictions.write_csv(path, replace=True)  # a run rewriting its own file
