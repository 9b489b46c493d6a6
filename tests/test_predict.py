"""python -m adamatch_uan.predict: one row per image, the classes the model gives in Python."""

import csv

import pytest

import adamatch_uan
from adamatch_uan.cli.errors import UserError
from adamatch_uan.data import DomainError
from adamatch_uan.predict import main

from conftest import quick_fit, write_images

pytestmark = pytest.mark.xdist_group("predict_run")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("predict")
    quick_fit(folder / "run", f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", "--norm", "uan")
    return folder / "run"


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_predict_on_a_folder_gives_one_row_per_image_and_the_classes_of_the_model_in_python(run, tmp_path):
    paths = write_images(tmp_path / "images", 5, size=16) + write_images(tmp_path / "images" / "sub", 2, size=28)
    out = main([str(run), str(tmp_path / "images"), "--out", str(tmp_path / "p.csv"), "--batch_size", "3"])
    got = rows(out)
    assert sorted(r["image"] for r in got) == sorted(map(str, paths))
    expected = adamatch_uan.load(run).predict(str(tmp_path / "images"))
    assert [r["class"] for r in got] == expected.names and [r["image"] for r in got] == expected.ids
    assert list(got[0]) == ["image", "class", "confidence", *(f"p_{i}" for i in range(10))]
    for row, confidence in zip(got, expected.confidence.tolist()):
        assert abs(float(row["confidence"]) - confidence) < 1e-5


def test_predict_never_overwrites_and_names_what_it_cannot_read(run, tmp_path):
    write_images(tmp_path / "images", 2)
    (tmp_path / "taken.csv").write_text("mine")
    with pytest.raises(UserError, match="taken.csv exists"):
        main([str(run), str(tmp_path / "images"), "--out", str(tmp_path / "taken.csv")])
    assert (tmp_path / "taken.csv").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files"):
        main([str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "e.csv")])
    (tmp_path / "images" / "broken.png").write_bytes(b"no image")
    with pytest.raises(DomainError, match="broken.png"):
        main([str(run), str(tmp_path / "images"), "--out", str(tmp_path / "b.csv")])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(UserError, match="no best checkpoint"):
        main([str(tmp_path / "unfinished"), str(tmp_path / "images")])
    assert not list((tmp_path / "unfinished").glob("*.csv"))
