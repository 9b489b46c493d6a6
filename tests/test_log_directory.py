"""The callbacks' output folder is the trainer's log_dir, read without a collective."""

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from adamatch_uan.callbacks.log_directory import log_directory
from conftest import quiet_trainer


def test_log_directory_is_the_trainers_log_dir(tmp_path):
    trainer = quiet_trainer(logger=CSVLogger(tmp_path, name="", version=""), default_root_dir=tmp_path / "root")
    assert log_directory(trainer) == Path(trainer.log_dir)
    bare = quiet_trainer(default_root_dir=tmp_path / "root")
    assert log_directory(bare) == Path(bare.log_dir or bare.default_root_dir)
