"""One switch for norm statistics over every process under DDP: BatchNorm, MN and UAN together.

A Lightning ``LayerSync`` plugin (kept with the callbacks, the Lightning add-ons that read
``norm``): ``Trainer(plugins=[MixtureSync()], strategy="ddp")``, or on the command line
``--trainer.sync_batchnorm true``, which ``fit`` turns into this plugin (torch's own
conversion would leave UAN and MN local and fail on CPU). Lightning applies it when fitting,
before the DDP wrap, and reverts it at teardown; it changes layers in place
(``norm.sync_norms``), so parameter order, state-dict keys and the EMA copy stay aligned.
"""

from __future__ import annotations

from lightning.pytorch.plugins import LayerSync
from torch import nn

from adamatch_uan.norm import sync_norms, unsync_norms


class MixtureSync(LayerSync):
    """Sync every norm layer's training statistics over ``process_group`` (None: all processes).

    In one process it changes nothing: the layers sync only with more than one process.
    """

    def __init__(self, process_group=None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        return sync_norms(model, self.process_group)

    def revert(self, model: nn.Module) -> nn.Module:
        return unsync_norms(model)
