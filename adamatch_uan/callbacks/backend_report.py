"""Say once, when fitting starts, which backend each mixture layer runs on."""

from __future__ import annotations

from collections import defaultdict

import lightning as L

from adamatch_uan.norm import UAN, MixtureNorm
from adamatch_uan.norm.backends import backend


def backend_lines(model, device) -> list[str]:
    """One line per backend: which mixture layers of ``model`` (by module name) run on it on ``device``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, (UAN, MixtureNorm)):
            groups[backend(device, module.num_components)].append(name)
    return [f"mixture layers on {where}: {', '.join(names)}" for where, names in groups.items()]


class BackendReport(L.Callback):
    """At the start of fitting, print which backend (the compiled CPU kernel or torch ops, and why)
    each MN and UAN layer of ``pl_module.model`` runs on, on the module's device (the first process)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            for line in backend_lines(getattr(pl_module, "model", pl_module), pl_module.device):
                print(line, flush=True)
