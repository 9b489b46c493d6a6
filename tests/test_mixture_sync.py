"""MixtureSync: Lightning's LayerSync slot, syncing every norm layer in place and undoing it."""

import lightning as L

from adamatch_uan.callbacks import MixtureSync
from adamatch_uan.models import make_backbone


def flags(model):
    return {type(m).__name__: m.sync_stats for m in model.modules() if hasattr(m, "sync_stats")}


def test_the_plugin_syncs_every_norm_in_place_and_reverts():
    model = make_backbone("shallow_cnn", 10, norm={"input": "uan", "norm1": "mn", "default": "bn"},
                          norm_at=["input", "norm1", "norm2"])
    plugin = MixtureSync()
    assert plugin.apply(model) is model
    assert flags(model) == {"UAN": True, "MixtureNorm": True, "SyncedBatchNorm": True}
    assert plugin.revert(model) is model
    assert flags(model) == {"UAN": False, "MixtureNorm": False}


def test_lightning_takes_it_as_the_layer_sync():
    trainer = L.Trainer(plugins=[MixtureSync()], accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(trainer._accelerator_connector._layer_sync, MixtureSync)
