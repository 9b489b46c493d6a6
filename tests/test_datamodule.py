import itertools

import numpy as np
import pytest
import torch

from adamatch_uan.data import DomainPairDataModule
from adamatch_uan.data.datamodule import PairedBatches, infinite_indices

from conftest import quiet_trainer


@pytest.fixture
def pair(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.random.randint(0, 256, (50, 28, 28), dtype=np.uint8), y=np.arange(50) % 10)
    np.savez(tmp_path / "t.npz", x_train=np.random.randint(0, 256, (7, 16, 16), dtype=np.uint8),
             y_train=np.full(7, 3), x_test=np.zeros((4, 16, 16), np.uint8), y_test=np.arange(4))
    return f"npz:{tmp_path / 's.npz'}", f"npz:{tmp_path / 't.npz'}"


def test_batches_have_the_documented_shape_and_no_target_labels(pair):
    dm = DomainPairDataModule(*pair, batch_size=4, uratio=3, val_fraction=0.2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"source", "target"}
    images, labels = batch["source"]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (4,)
    assert isinstance(batch["target"], torch.Tensor) and batch["target"].shape == (12, 3, 32, 32)
    assert not hasattr(dm, "target_labels") and len(dm.source_val) == 8


def test_samplers_are_infinite_and_never_truncate_a_domain(pair):
    dm = DomainPairDataModule(*pair, batch_size=4, uratio=3, max_source=10)
    dm.setup()
    batches = iter(dm.train_dataloader())
    targets = torch.cat([next(batches)["target"] for _ in range(10)])  # 120 draws from 7 images
    assert len(targets) == 120 and len(torch.unique(targets.flatten(1), dim=0)) == 7


def test_a_cut_short_epoch_continues_the_stream_instead_of_replaying_it(pair):
    dm = DomainPairDataModule(*pair, batch_size=4, uratio=1)
    dm.setup()
    loader = dm.train_dataloader()  # Lightning calls iter() once per epoch on the same loader
    first = [b["source"][1] for b in itertools.islice(loader, 3)]
    second = [b["source"][1] for b in itertools.islice(loader, 3)]
    fresh = DomainPairDataModule(*pair, batch_size=4, uratio=1)
    fresh.setup()
    continuous = [b["source"][1] for b in itertools.islice(fresh.train_dataloader(), 6)]
    assert all(torch.equal(a, b) for a, b in zip(first + second, continuous))


def test_infinite_indices_cover_each_epoch():
    it = infinite_indices(5, torch.Generator().manual_seed(0))
    epochs = [sorted(next(it) for _ in range(5)) for _ in range(3)]
    assert epochs == [list(range(5))] * 3


def test_evaluation_loaders_in_order(pair):
    dm = DomainPairDataModule(*pair, eval_batch_size=100, max_target=3)
    dm.setup()
    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert [len(l.dataset) for l in val] == [4] and [len(l.dataset) for l in test] == [10, 4]  # no target labels
    diagnostic = DomainPairDataModule(*pair, eval_batch_size=100, max_target=3, val_target=True)
    diagnostic.setup()
    assert [len(l.dataset) for l in diagnostic.val_dataloader()] == [4, 4]  # opt in: the target's test set
    assert len(dm.target_train) == 3
    assert next(iter(test[1]))[1].tolist() == [0, 1, 2, 3]


def test_target_training_labels_never_reach_training(tmp_path, pair):
    source, target = pair
    data = dict(np.load(target.split(":", 1)[1]))
    batches = []
    for labels in (data["y_train"], np.random.randint(0, 10, len(data["y_train"]))):
        np.savez(tmp_path / "t2.npz", **{**data, "y_train": labels})
        dm = DomainPairDataModule(source, f"npz:{tmp_path / 't2.npz'}", batch_size=4)
        dm.setup()
        it = iter(dm.train_dataloader())
        batches.append([next(it) for _ in range(3)])
    for a, b in zip(*batches):
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["source"][0], b["source"][0])


def test_a_stream_started_at_step_t_continues_the_uninterrupted_stream(pair):
    dm = DomainPairDataModule(*pair)
    dm.setup()
    source, target = (dm.source_train.images, dm.source_train.labels), dm.target_train.images
    whole = iter(PairedBatches(source, target, 4, 2, seed=3))
    batches = [next(whole) for _ in range(7)]
    resumed = iter(PairedBatches(source, target, 4, 2, seed=3, start=lambda: 5))
    for expected in batches[5:]:
        got = next(resumed)
        assert torch.equal(got["source"][0], expected["source"][0]) and torch.equal(got["target"], expected["target"])


def test_n_steps_then_resume_then_n_steps_gives_the_weights_of_2n_steps(data, tmp_path):
    """Bit-identical on the CPU: the same ops run in the same order on the same batches and random numbers
    (the stream replays its draws from the restored step; the global generator is restored at the
    first resumed batch)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from adamatch_uan.methods import AdaMatch

    class StopAfterValidation(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.global_step == 3:
                trainer.should_stop = True

    def train(stop: bool, ckpt: str | None = None):
        L.seed_everything(0)
        module = DomainPairDataModule(f"npz:{data / 's.npz'}", f"npz:{data / 't.npz'}", root=str(data), download=False,
                                      batch_size=4, uratio=2, eval_batch_size=16)
        method = AdaMatch(norm="uan", ema_decay=0.9)
        callbacks = [ModelCheckpoint(tmp_path, filename="last", enable_version_counter=False)]
        trainer = quiet_trainer(max_steps=6, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1,
                                enable_checkpointing=True, callbacks=callbacks + ([StopAfterValidation()] if stop else []))
        trainer.fit(method, datamodule=module, ckpt_path=ckpt)
        return trainer, method

    _, whole = train(stop=False)
    first, _ = train(stop=True)
    assert first.global_step == 3
    resumed_trainer, resumed = train(stop=False, ckpt=str(tmp_path / "last.ckpt"))
    assert resumed_trainer.global_step == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_each_process_draws_its_own_stream_and_rank_zero_the_one_process_stream(pair):
    dm = DomainPairDataModule(*pair)
    dm.setup()
    source, target = (dm.source_train.images, dm.source_train.labels), dm.target_train.images
    alone, first, second = (iter(PairedBatches(source, target, 4, 2, seed=3, rank=r)) for r in (0, 0, 1))
    for _ in range(3):
        a, b, c = next(alone), next(first), next(second)
        assert torch.equal(a["source"][0], b["source"][0])
        assert not torch.equal(b["source"][1], c["source"][1]) or not torch.equal(b["target"], c["target"])


def test_an_unlabelled_target_trains_and_only_the_source_is_evaluated(tmp_path, pair):
    np.savez(tmp_path / "u.npz", x=np.random.randint(0, 256, (9, 16, 16), dtype=np.uint8))
    dm = DomainPairDataModule(pair[0], f"npz:{tmp_path / 'u.npz'}", batch_size=4)
    assert dm.eval_names == ["source"] and dm.num_classes == 10 and dm.input_size == 32  # reads the data
    assert dm.target_test is None and len(dm.target_train) == 9 and dm.target_train.ids[0] == "u.npz:x[0]"
    assert len(dm.val_dataloader()) == 1 and len(dm.test_dataloader()) == 1
    assert next(iter(dm.train_dataloader()))["target"].shape == (12, 3, 32, 32)


def test_the_image_size_is_the_sources_own_from_32_up_or_the_one_given(tmp_path):
    from PIL import Image

    for domain in ("a", "b"):
        for label in ("x", "y"):
            for i in range(4):
                path = tmp_path / domain / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.random.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    spec_a, spec_b = f"folder:{tmp_path / 'a'}", f"folder:{tmp_path / 'b'}"
    for size, expected in ((None, 64), (64, 64), (48, 48)):
        dm = DomainPairDataModule(spec_a, spec_b, image_size=size, test_fraction=0.25, val_fraction=0.2)
        assert dm.input_size == expected and dm.hparams.image_size == expected
        assert dm.target_train.images.shape[-2:] == (expected, expected) == dm.source_test.images.shape[-2:]
        assert dm.classes == ["x", "y"] and dm.eval_names == ["source", "target"]
