"""The source-only baseline: the same backbone, optimiser and EMA, trained on source labels alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adamatch_uan.methods.base import SOURCE, DomainAdaptationMethod


class SourceOnly(DomainAdaptationMethod):
    """Cross-entropy on weak views of labelled source images; target images, if present in
    the batch, are ignored. Arguments are those of ``DomainAdaptationMethod``."""

    def training_step(self, batch, batch_idx):
        images, labels = batch["source"]
        context = torch.full((len(images),), SOURCE, device=images.device)
        loss = F.cross_entropy(self.model(self.weak_views(images), context).float(), labels)  # float32 loss
        self.loss_terms = {"source": loss}  # read by GradientVariance(split=True)
        self.log_dict({"train/loss": loss, "train/loss_source": loss,
                       "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"]}, on_step=True)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss
