"""What every method shares: backbone, augmentations, EMA model, optimiser, evaluation metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
import torch.nn.functional as F
from torch import Tensor, nn
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from adamatch_uan.augment import Augment, to_model_input, to_unit
from adamatch_uan.models import make_backbone
from adamatch_uan.models.slots import NormAt, NormChoice
from adamatch_uan.norm import SOURCE, TARGET, mixture_parameters, recalibrated

_RANK_SEED_STRIDE = 1_000_003  # rank r > 0 draws from seed + r · stride: streams apart for any seed

_DECAYED = (nn.modules.conv._ConvNd, nn.Linear)


def optimizer_groups(model: nn.Module, weight_decay: float, lr: float, mixture_lr_scale: float = 1.0) -> list[dict]:
    """Optimiser groups by module type: conv/linear weights decay; norm parameters and biases
    don't; learned mixtures' parameters (``mixture_parameters``) don't and get ``lr · mixture_lr_scale``.

    (A ``p.dim() >= 2`` rule would decay UAN's (K, C) parameters.) Empty groups are left out.

    Raises:
        RuntimeError: if a trainable parameter is in no group or in two.
    """
    decay = [m.weight for m in model.modules() if isinstance(m, _DECAYED) and m.weight.requires_grad]
    mixture = [p for p in mixture_parameters(model) if p.requires_grad]
    taken = {id(p) for p in decay} | {id(p) for p in mixture}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if len(taken) != len(decay) + len(mixture) or taken | {id(p) for p in rest} != trainable:
        raise RuntimeError("optimiser groups do not partition the trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr}, {"params": rest, "weight_decay": 0.0, "lr": lr},
              {"params": mixture, "weight_decay": 0.0, "lr": lr * mixture_lr_scale}]
    return [g for g in groups if g["params"]]


class EMAUpdate:
    """e ← decay · e + (1 − decay) · p for every tensor pair, one foreach lerp per dtype (what
    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` does, as a module-level class so a model holding
    it pickles, as ``ddp_spawn`` needs)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, ema: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(ema, current, 1 - self.decay)
        else:  # integer buffers (BatchNorm's counters), as torch does
            for e, p in zip(ema, current):
                e.copy_(e * self.decay + p * (1 - self.decay))


LR_SCHEDULES = ("adamatch", "cosine", "step")


def lr_factor(step: int, total: int, decay: float, schedule: str = "adamatch") -> float:
    """lr(t)/lr₀ at step t of T.

    - "adamatch": cos(arccos(decay) · t/T), 1 at t = 0 and ``decay`` at t = T (docs/METHOD.md §5.8);
    - "cosine": ½ (1 + cos(π t/T)), 1 → 0;
    - "step": 1, then ×0.1 at t = T/2 and again at t = 3T/4.
    """
    t = min(step, total) / total
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.5) + (t >= 0.75))
    return math.cos(math.acos(decay) * t)


def evaluation_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy and macro precision, recall, F1 (the metrics of the UAN authors' tables)."""
    return MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }, prefix=prefix)


class DomainAdaptationMethod(L.LightningModule):
    """Base of the methods: a backbone with a pluggable norm, weak/strong views, an EMA copy.

    Training batches are ``{"source": (images, labels), "target": images}`` of uint8 images;
    evaluation batches are ``(images, labels)``, one dataloader per entry of ``eval_names``.
    The EMA model (parameters and buffers) is what validation and test evaluate.
    ``training_step`` also leaves ``self.loss_terms`` (name → term, the terms sum to the
    loss), which ``GradientVariance(split=True)`` differentiates one by one.

    Args:
        backbone: a name from ``adamatch_uan.models.BACKBONES``, or ``torchvision:NAME`` / ``timm:NAME``.
        backbone_options: more options for the backbone's constructor (e.g. ``{"weights": "DEFAULT"}``
            for a torchvision model).
        num_classes: classes (from the data on the command line).
        class_names: the name of each class (from the data on the command line; default "0" … "K−1").
        norm: anything ``make_norm`` accepts ("bn", "mn", "uan", "uan_ctx", ...), or a slot → norm
            mapping such as ``{"input": "uan_ctx", "default": "bn"}`` (``models.slots.NormChoice``).
        norm_at: where norm layers go: "all", "input", "none" or a list of slot names.
        norm_options: options for every norm layer (e.g. ``{"num_components": 3}``).
        lr: base learning rate of SGD.
        lr_decay: lr(T)/lr(0) of the "adamatch" schedule.
        lr_schedule: "adamatch" (the official cosine to ``lr_decay``), "cosine" (to 0) or "step" (``lr_factor``).
        momentum: SGD momentum (no Nesterov).
        mixture_lr_scale: learned mixtures' parameters (UAN's λ, μ, σ²) train at ``lr`` times this.
        weight_decay: on conv/linear weights only.
        ema_decay: decay of the evaluated EMA model; None evaluates the trained model itself.
        flip: random horizontal flips in the weak view (off for digits).
        strong_ops: ops per image in the strong view.
        cutout: cutout side in pixels in the strong view.
        image_size: side of the (square) input images (from the data on the command line).
        eval_names: a name per evaluation dataloader, in order (from the data on the command line).
        target_context: the context id target images get in evaluation and prediction: the source
            id (0, the authors' rule) or the target's (1). Only context-aware norms read it.
        recalibrate: "target": AdaBN (Li et al., 2016), the target is tested (and predicted) with a copy of
            the evaluated model whose running statistics are re-estimated on the target's training images
            (training-mode passes without gradients or labels; ``norm.recalibrated``); None: off.
        channels_last: keep the model and its inputs in ``torch.channels_last`` (NHWC): the layout
            the CPU's convolutions (and the mixture kernel) run fastest in; the results are the
            same up to floating-point summation order. None: the command line decides (channels-last
            exactly when the run trains in bf16 autocast on the CPU, ``cli.cpu_default``); NCHW here.
        eval_contexts: the context id given to each evaluation set (default: ``target_context``
            for the set named "target", the source id for the others).
    """

    def __init__(self, backbone: str = "shallow_cnn", num_classes: int = 10, norm: NormChoice = "bn",
                 norm_at: NormAt = "all", norm_options: dict | None = None, lr: float = 0.03,
                 lr_decay: float = 0.25, momentum: float = 0.9, mixture_lr_scale: float = 1.0, weight_decay: float = 1e-3,
                 ema_decay: float | None = 0.999, lr_schedule: str = "adamatch", flip: bool = False, strong_ops: int = 2, cutout: int = 16,
                 image_size: int = 32, eval_names: Sequence[str] = ("source", "target"),
                 eval_contexts: Sequence[int] | None = None, backbone_options: dict | None = None,
                 class_names: Sequence[str] | None = None, target_context: int = SOURCE,
                 recalibrate: str | None = None, channels_last: bool | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if eval_contexts is not None and len(eval_contexts) != len(eval_names):
            raise ValueError(f"Expected one eval context per eval set {list(eval_names)}, got {list(eval_contexts)}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"Expected {num_classes} class names, got {len(class_names)}: {list(class_names)[:10]}")
        if recalibrate not in (None, "target"):
            raise ValueError(f"Expected recalibrate None or 'target', got {recalibrate!r}; use "
                             f"--model.init_args.recalibrate target (AdaBN)")
        self.__dict__["recalibrated_model"] = None  # not a submodule: never in checkpoints, made at test time
        if target_context not in (SOURCE, TARGET):
            raise ValueError(f"Expected target_context {SOURCE} (source) or {TARGET} (target), got {target_context}; "
                             f"use --model.init_args.target_context")
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.model = make_backbone(backbone, num_classes, norm=norm, norm_at=norm_at, norm_options=norm_options,
                                   **(backbone_options or {}))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"Expected lr_schedule in {LR_SCHEDULES}, got {lr_schedule!r}; use --model.init_args.lr_schedule")
        self.ema = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.model, multi_avg_fn=EMAUpdate(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
            # DDP leaves the EMA copy alone (no broadcasts, no gradient buckets); it stays equal on
            # every process by construction (on_train_batch_end).
            self._ddp_params_and_buffers_to_ignore = [f"ema.{name}" for name, _ in
                                                      [*self.ema.named_parameters(), *self.ema.named_buffers()]]
        self.augment = Augment((image_size, image_size), flip=flip, num_ops=strong_ops, cutout=cutout)
        self.set_eval_sets(eval_names, eval_contexts)

    def set_eval_sets(self, names: Sequence[str], contexts: Sequence[int] | None = None) -> None:
        """Evaluate the sets ``names`` (one per dataloader, in order) with ``contexts`` (default: ``target_context``
        for "target", the source id for the others); their metrics start afresh."""
        num_classes = self.hparams.num_classes
        self.eval_names = list(names)
        self.eval_contexts = (list(contexts) if contexts is not None else
                              [self.hparams.target_context if name == "target" else SOURCE for name in self.eval_names])
        self.metrics = nn.ModuleDict({f"{stage}_{name}": evaluation_metrics(num_classes, f"{stage}/{name}/")
                                      for stage in ("val", "test") for name in self.eval_names})
        self.confusion = nn.ModuleDict({name: MulticlassConfusionMatrix(num_classes) for name in self.eval_names})
        self.confusion_matrices: dict[str, list[list[int]]] = {}

    # ---- training helpers ----
    # Inputs and views are made in float32 even under autocast (bf16-mixed): kornia's warps and colour
    # ops on bfloat16 would round the images; the model's layers then run in the autocast dtype. They
    # come in the model's memory format (channels-last when the model is), so no layer converts them.
    def _model_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def inputs(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] images → model input scale (no augmentation)."""
        with torch.autocast(images.device.type, enabled=False):
            return self._model_format(to_model_input(to_unit(images)))

    def weak_views(self, images: Tensor) -> Tensor:
        """uint8 images (N, ...) → weak views at model input scale (N, ...)."""
        with torch.autocast(images.device.type, enabled=False):
            return self._model_format(to_model_input(self.augment.weak(to_unit(images))))

    def views(self, images: Tensor) -> Tensor:
        """uint8 images (N, ...) → model inputs (2N, ...): the weak views, then the strong views."""
        with torch.autocast(images.device.type, enabled=False):
            unit = to_unit(images)
            return self._model_format(to_model_input(torch.cat([self.augment.weak(unit), self.augment.strong(unit)])))

    @property
    def total_steps(self) -> int:
        return max(int(self.trainer.estimated_stepping_batches), 1)

    def configure_optimizers(self):
        hp = self.hparams
        groups = optimizer_groups(self.model, hp.weight_decay, hp.lr, hp.mixture_lr_scale)
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=False)
        total, decay = self.total_steps, hp.lr_decay
        kind = hp.lr_schedule
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, decay, kind))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- several processes (DDP) ----
    @property
    def distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def mean_over_processes(self, value: Tensor) -> Tensor:
        """The mean over processes of a per-process batch mean (the global batch's mean, local
        batches being equal); ``value`` itself in one process."""
        return self.trainer.strategy.reduce(value.clone(), reduce_op="mean") if self.distributed else value

    def on_fit_start(self) -> None:
        if not self.distributed:
            return
        written = [name for name, m in self.model.named_modules() if getattr(m, "written_parameters", list)()
                   and not getattr(m, "sync_stats", False)]
        if written:
            raise ValueError(f"Layers {written[:3]}{' ...' if len(written) > 3 else ''} write parameters from batch "
                             f"statistics (UAN's mixture_fit='momentum'); under DDP each process would write its own "
                             f"and the copies would drift apart. Add --trainer.sync_batchnorm true "
                             f"(Trainer(plugins=[MixtureSync()])) to take the statistics over every process")
        # seed_everything seeds every process alike: each draws its own augmentations and λ.
        rank = self.global_rank
        if rank:
            torch.manual_seed((torch.initial_seed() + rank * _RANK_SEED_STRIDE) % 2**63)

    # ---- exact resume: the random stream of augmentations, interpolation and sampling ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}
        if self.distributed:  # every process saves (Lightning calls this hook on all), rank 0 writes
            states = [None] * self.trainer.world_size
            dist.all_gather_object(states, state)
            checkpoint["rng_states"] = {"per_process": states}
        else:
            checkpoint["rng_states"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Restored here, not when the checkpoint loads: what runs in between (the sanity check, new
        # loader iterators) draws from the global generator, which the uninterrupted run did not.
        states, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if not states:
            return
        if "per_process" in states:
            saved = states["per_process"]
            world = self.trainer.world_size if self._trainer is not None else 1
            if len(saved) != world:
                rank_zero_warn(f"The checkpoint was saved by {len(saved)} processes and resumes on {world}: "
                               "the random stream goes on, but not as the uninterrupted run's would")
            states = saved[self.global_rank % len(saved)]
        torch.set_rng_state(states["cpu"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is None:
            return
        self.ema.update_parameters(self.model)
        if self.distributed:
            # The parameters are equal on every process (DDP), the buffers only with synced norms:
            # the copy evaluated everywhere takes the first process's, as DDP's own buffers do.
            by_dtype: dict[torch.dtype, list[Tensor]] = {}
            for b in self.ema.module.buffers():
                by_dtype.setdefault(b.dtype, []).append(b)
            for buffers in by_dtype.values():  # one broadcast per dtype
                flat = torch._utils._flatten_dense_tensors(buffers)
                dist.broadcast(flat, src=0)
                for b, synced in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers)):
                    b.copy_(synced)

    # ---- evaluation and prediction ----
    @property
    def evaluated_model(self) -> nn.Module:
        """The EMA copy, or the trained model when there is none (``ema_decay=None``)."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def target_model(self) -> nn.Module:
        """What target images are tested and predicted with: the AdaBN copy when there is one, else
        ``evaluated_model``."""
        return self.recalibrated_model if self.recalibrated_model is not None else self.evaluated_model

    @torch.no_grad()
    def recalibrate_on(self, images: Tensor, batch_size: int = 256) -> None:
        """AdaBN: ``recalibrated_model`` becomes a copy of the evaluated model with its running statistics
        taken over ``images`` (uint8, the target's training images; no labels), in batches, with the
        context target images are evaluated with."""
        batches = (self.inputs(batch.to(self.device)) for batch in images.split(batch_size))
        self.__dict__["recalibrated_model"] = recalibrated(self.evaluated_model, batches, self.hparams.target_context)

    def on_test_start(self) -> None:
        if self.hparams.recalibrate != "target":
            return
        images = getattr(self.trainer.datamodule, "target_images", None)
        if images is None:
            raise ValueError("--model.init_args.recalibrate target needs the target's training images: a "
                             "domain-adaptation data module (DomainPairDataModule)")
        self.recalibrate_on(images(), self.trainer.datamodule.hparams.eval_batch_size)

    def forward(self, images: Tensor, context: int | None = None) -> Tensor:
        """Logits (N, K) of the evaluated model (``evaluated_model``) for images preprocessed as the run's
        were: uint8 (N, 3, S, S) at the run's ``image_size`` (``adamatch_uan.load(run).predict`` does that),
        with the context id ``context`` (default ``target_context``).

        Raises:
            ValueError: images of another shape.
        """
        size = self.hparams.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"Expected images (N, 3, {size}, {size}) preprocessed as the run's were, got "
                             f"{tuple(images.shape)}; adamatch_uan.load(RUN_DIR).predict(images) resizes them as the "
                             f"run did")
        ids = torch.full((len(images),), self.hparams.target_context if context is None else context,
                         device=images.device)
        return self.target_model(self.inputs(images), ids).float()

    def predict_step(self, batch, batch_idx: int = 0, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities (N, K) of a batch of images (or of (images, ...) tuples), as ``forward``."""
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).float().softmax(1)

    def _evaluate(self, batch, dataloader_idx: int, stage: str) -> None:
        if dataloader_idx >= len(self.eval_names):
            raise ValueError(f"Got evaluation dataloader {dataloader_idx}, but eval_names names only "
                             f"{self.eval_names}; set --model.eval_names")
        images, labels = batch
        name = self.eval_names[dataloader_idx]
        context = torch.full((len(images),), self.eval_contexts[dataloader_idx], device=images.device)
        model = self.target_model if stage == "test" and name == "target" else self.evaluated_model
        logits = model(self.inputs(images), context).float()  # metrics and loss in float32
        metrics = self.metrics[f"{stage}_{name}"]
        metrics.update(logits, labels)
        self.log(f"{stage}/{name}/loss", F.cross_entropy(logits, labels), add_dataloader_idx=False, sync_dist=True)
        # Only the source's validation is shown: the target's is a diagnostic, never watched to choose.
        self.log_dict(metrics, add_dataloader_idx=False, prog_bar=stage == "val" and name == "source")
        if stage == "test":
            self.confusion[name].update(logits, labels)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        for name, confusion in self.confusion.items():
            if confusion.update_count:
                self.confusion_matrices[name] = confusion.compute().tolist()
            confusion.reset()
        log_dir = self.trainer.log_dir  # a collective under DDP: every process asks
        if log_dir and self.trainer.is_global_zero and self.confusion_matrices:
            path = Path(log_dir) / "confusion_matrices.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.confusion_matrices))
