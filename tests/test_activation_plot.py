"""ActivationPlot: a valid PNG per plot, the layer's mixture drawn, TensorBoard, no side effects."""

import matplotlib.image
import pytest
import torch
from conftest import quiet_trainer, toy_train_batches
from lightning.pytorch.loggers import TensorBoardLogger

from adamatch_uan.callbacks import ActivationPlot
from adamatch_uan.methods import AdaMatch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("norm", ["bn", "mn", "uan", "uan_ctx"])
def test_plots_are_valid_pngs_and_reach_tensorboard(norm, tmp_path):
    callback = ActivationPlot(every_n_steps=1, every_n_epochs=1)
    trainer = quiet_trainer(max_steps=2, logger=TensorBoardLogger(tmp_path, name="", version=""),
                            callbacks=[callback])
    trainer.fit(AdaMatch(norm=norm), toy_train_batches(2))
    files = sorted((tmp_path / "activations").glob("*.png"))
    assert [f.name for f in files] == ["norms.0.layer-step0000001.png", "norms.0.layer-step0000002.png"]
    for f in files:
        assert f.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(f).ndim == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    assert "activations/norms.0.layer" in events.Tags()["images"]


def test_plotting_changes_neither_model_nor_rng(tmp_path):
    module = AdaMatch(norm="mn")
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, toy_train_batches(1))
    callback = ActivationPlot(layer="norms.1.layer")
    callback._batch = next(iter(toy_train_batches(1)))
    module.model.train()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    rng = torch.get_rng_state()
    path = callback.plot(trainer, module)
    assert path is not None and path.name.startswith("norms.1.layer-")
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())


def test_a_bad_layer_name_lists_the_norm_layers():
    module = AdaMatch(norm="uan")
    with pytest.raises(ValueError, match=r"norms\.0\.layer"):
        ActivationPlot(layer="conv9").resolve_layer(module.model)
    with pytest.raises(ValueError, match="no norm layer"):
        ActivationPlot().resolve_layer(AdaMatch(norm="none").model)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ActivationPlot(every_n_epochs=0)
