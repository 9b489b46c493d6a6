"""Plain classification (the UAN paper's first experiment): the recipe, training, evaluation without EMA."""

import math

import torch
from torch.utils.data import DataLoader

from adamatch_uan.methods import Supervised
from adamatch_uan.methods.base import lr_factor

from conftest import quiet_trainer, stripes, toy_eval_batches


def labelled_batches(steps, size=16):
    batches = []
    for _ in range(steps):
        labels = torch.randint(0, 2, (size,))
        batches.append({"source": (stripes(labels), labels)})
    return DataLoader(batches, batch_size=None)


def test_defaults_are_the_classification_recipe():
    method = Supervised(num_classes=2, norm="uan")
    hp = method.hparams
    assert (hp.lr, hp.lr_schedule, hp.weight_decay, hp.flip, hp.ema_decay) == (0.05, "cosine", 5e-4, True, None)
    assert method.ema is None and method.evaluated_model is method.model
    assert list(method.eval_names) == ["source"]


def test_schedules():
    assert lr_factor(0, 100, 0.25, "cosine") == 1.0 and abs(lr_factor(100, 100, 0.25, "cosine")) < 1e-12
    assert math.isclose(lr_factor(50, 100, 0.25, "cosine"), 0.5)
    assert [lr_factor(t, 100, 0.25, "step") for t in (0, 49, 50, 74, 75, 100)] == [1, 1, 0.1, 0.1, 0.1**2, 0.1**2]


def test_learns_the_stripes_and_evaluates_the_trained_model(tmp_path):
    torch.manual_seed(0)
    method = Supervised(num_classes=2, norm="uan", lr=0.05)
    trainer = quiet_trainer(max_steps=30, limit_val_batches=2, default_root_dir=tmp_path)  # the test writes its matrices there
    trainer.fit(method, train_dataloaders=labelled_batches(30), val_dataloaders=toy_eval_batches())
    tested = trainer.test(method, dataloaders=toy_eval_batches(4), verbose=False)[0]
    assert tested["test/source/acc"] > 0.9
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 0.05 * 0.01  # the cosine schedule ends near 0
