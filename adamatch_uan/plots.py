"""Figures of a run directory: gradient variance, per-layer heatmaps, validation curves, activations.

The notebook ``notebooks/gradient_variance.ipynb`` calls these functions; the same figures
come from the command line without Jupyter::

    python -m adamatch_uan.plots RUN_DIR [RUN_DIR ...] [--out DIR] [--kind total]

A run directory is what ``python -m adamatch_uan.fit`` writes: ``config.yaml``,
``metrics.csv`` (CSVLogger), ``gradient_variance.csv`` (``GradientVariance``) and
``activations/*.png`` (``ActivationPlot``). Figures use matplotlib's object API (no pyplot
state), so they work headless.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from adamatch_uan.norm import SOURCE, UAN, DomainBatchNorm, MixtureNorm


# ---- mixtures of norm layers ----
def is_norm_layer(module: nn.Module) -> bool:
    """A layer with a model of its input's distribution: BatchNorm (per domain too), MN, UAN (GroupNorm has none)."""
    return isinstance(module, (_BatchNorm, DomainBatchNorm, MixtureNorm, UAN))


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Norm layers of ``model`` by module name, in forward order of definition."""
    return {name: m for name, m in model.named_modules() if is_norm_layer(m)}


@torch.no_grad()
def layer_mixture(layer: nn.Module, context: int = SOURCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Gaussian mixture a norm layer models its input with, as (λ, μ, σ²) arrays of shape (K, C).

    UAN: the learned λ (of ``context`` when the layer has contexts), μ, σ².
    MN: the latest EM estimates. BatchNorm: one component, the running mean and variance (per-domain
    BatchNorm: those of ``context``).
    """
    if isinstance(layer, UAN):
        weights, means, var = layer.weights[context if layer.num_contexts else 0], layer.mean, layer.var
    elif isinstance(layer, MixtureNorm):
        weights, means, var = layer.fit_weight, layer.fit_mean, layer.fit_var
    elif isinstance(layer, _BatchNorm) and layer.running_mean is not None:
        weights, means, var = torch.ones_like(layer.running_mean)[None], layer.running_mean[None], layer.running_var[None]
    elif isinstance(layer, DomainBatchNorm):
        means, var = layer.running_mean[context][None], layer.running_var[context][None]
        weights = torch.ones_like(means)
    else:
        raise TypeError(f"Expected a BatchNorm (with running stats), MixtureNorm or UAN layer, got {type(layer).__name__}")
    return tuple(t.detach().float().cpu().numpy() for t in (weights, means, var))


def component_densities(x: np.ndarray, weights: np.ndarray, means: np.ndarray, var: np.ndarray,
                        channel: int | None = None) -> np.ndarray:
    """λ_k N(x; μ_k, σ²_k) for each component k at points x, shape (K, len(x)), computed in log space.

    ``channel=None`` pools the channels: (1/C) Σ_c λ_kc N(x; μ_kc, σ²_kc).
    """
    if channel is not None:
        weights, means, var = weights[:, channel:channel + 1], means[:, channel:channel + 1], var[:, channel:channel + 1]
    x = x[None, None, :].astype(np.float64)
    mu, v = means[..., None].astype(np.float64), var[..., None].astype(np.float64)
    log_density = np.log(np.maximum(weights[..., None], 1e-300)) - 0.5 * (np.log(2 * np.pi * v) + (x - mu) ** 2 / v)
    return np.exp(log_density).mean(axis=1)


def activation_figure(samples: Mapping[str, np.ndarray], mixture: tuple[np.ndarray, np.ndarray, np.ndarray],
                      channel: int | None = None, title: str = "") -> Figure:
    """Histograms of a norm layer's input (one per domain, ``samples[name]`` of shape (N, C)) with
    the layer's mixture drawn over them: one curve per component (label ``component k``) and,
    for K > 1, their sum (label ``mixture``)."""
    values = {name: (s[:, channel] if channel is not None else s.ravel()) for name, s in samples.items()}
    # A diverging run must still get its picture (and never crash training): plot the finite
    # values and say how many were not.
    bad = sum(int((~np.isfinite(v)).sum()) for v in values.values())
    values = {name: v[np.isfinite(v)] for name, v in values.items()}
    everything = np.concatenate(list(values.values()))
    lo, hi = np.percentile(everything, [0.5, 99.5]) if everything.size else (-1.0, 1.0)
    lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-6 else (lo, hi)
    x = np.linspace(lo, hi, 400)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, v in values.items():
        if not ((v >= lo) & (v <= hi)).any():  # nothing in the drawn range: its density would be 0/0
            continue
        ax.hist(v, bins=80, range=(lo, hi), density=True, histtype="stepfilled", alpha=0.35, label=f"{name} activations")
    components = component_densities(x, *mixture, channel=channel)
    for k, density in enumerate(components):
        ax.plot(x, density, lw=1.5, label=f"component {k + 1}")
    if len(components) > 1:
        ax.plot(x, components.sum(0), "k--", lw=1, label="mixture")
    ax.set(xlabel="activation (norm layer input)", ylabel="density",
           title=title + (f", channel {channel}" if channel is not None else ", all channels"))
    if bad:
        ax.text(0.02, 0.95, f"{bad} non-finite values not shown", transform=ax.transAxes, color="red", va="top")
    ax.legend(fontsize=7)
    return fig


# ---- run directories ----
@dataclass
class Run:
    """What a run directory holds, read once."""
    path: Path
    label: str
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    gradient_variance: list[dict] = field(default_factory=list)
    activations: list[Path] = field(default_factory=list)


def run_label(path: Path) -> str:
    """'<method> + <norm>[, options][, seed S]' from the run's config.yaml (the directory name
    without one); the seed when the run fixed one, so that the seeds of a sweep tell apart."""
    config = path / "config.yaml"
    if not config.exists():
        return path.name
    settings = yaml.safe_load(config.read_text()) or {}
    model = settings.get("model", {})
    args = model.get("init_args", model)
    method = str(model.get("class_path", "")).rsplit(".", 1)[-1]
    norm = args.get("norm", "bn")
    options = args.get("norm_options") or {}
    extra = "".join(f", {k}={v}" for k, v in options.items())
    seed = settings.get("seed_everything")
    if isinstance(seed, int) and not isinstance(seed, bool):
        extra += f", seed {seed}"
    return f"{method} + {norm}{extra}" if method else f"{norm}{extra}"


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv (CSVLogger, one row per logging call) → {metric: [(step, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    file = path / "metrics.csv"
    if not file.exists():
        return {}
    with file.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series[key].append((step, float(value)))
    return dict(series)


def read_gradient_variance(path: Path) -> list[dict]:
    file = path / "gradient_variance.csv"
    if not file.exists():
        return []
    with file.open(newline="") as f:
        return [{**row, "step": int(row["step"]), "epoch": int(row["epoch"]), "variance": float(row["variance"])}
                for row in csv.DictReader(f)]


def load_run(path: str | Path) -> Run:
    """Read a run directory.

    Raises:
        FileNotFoundError: if ``path`` is not a directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No run directory at {path} (expected the --run_dir of adamatch_uan.fit)")
    return Run(path, run_label(path), read_metrics(path), read_gradient_variance(path),
               sorted((path / "activations").glob("*.png")))


# ---- figures of runs ----
def variance_by_step(run: Run, kind: str) -> dict[int, list[float]]:
    steps: dict[int, list[float]] = defaultdict(list)
    for row in run.gradient_variance:
        if row["kind"] == kind:
            steps[row["step"]].append(row["variance"])
    return dict(sorted(steps.items()))


def gradient_variance_figure(runs: Sequence[Run], kind: str = "total") -> Figure:
    """Max and mean over parameter tensors of the gradient variance, per measured step, one line per run."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for stat, ax in zip(("max", "mean"), axes):
        for run in runs:
            by_step = variance_by_step(run, kind)
            if by_step:
                reduce = max if stat == "max" else (lambda v: sum(v) / len(v))
                ax.plot(list(by_step), [reduce(v) for v in by_step.values()], marker=".", label=run.label)
        ax.set(yscale="log", xlabel="training step", ylabel="gradient variance",
               title=f"{stat} over layers of Var(∂L/∂W) ({kind})")
        ax.legend(fontsize=7)
    return fig


def layer_heatmap_figure(run: Run, kind: str = "total") -> Figure:
    """log10 gradient variance per parameter tensor (rows) and measured step (columns)."""
    names = list(dict.fromkeys(f"{r['layer']}.{r['parameter']}" for r in run.gradient_variance if r["kind"] == kind))
    steps = sorted({r["step"] for r in run.gradient_variance if r["kind"] == kind})
    grid = np.full((len(names), len(steps)), np.nan)
    row_of, col_of = {n: i for i, n in enumerate(names)}, {s: j for j, s in enumerate(steps)}
    for r in run.gradient_variance:
        if r["kind"] == kind:
            grid[row_of[f"{r['layer']}.{r['parameter']}"], col_of[r["step"]]] = math.log10(max(r["variance"], 1e-30))
    fig = Figure(figsize=(8, 0.25 * len(names) + 2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ticks = np.linspace(0, max(len(steps) - 1, 0), min(len(steps), 8)).astype(int)
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks] if steps else [])
    ax.set(xlabel="training step", ylabel="parameter tensor", title=f"{run.label}: log10 gradient variance ({kind})")
    fig.colorbar(image, ax=ax, label="log10 variance")
    return fig


def validation_figure(runs: Sequence[Run], sets: Sequence[str] | None = None) -> Figure:
    """Validation error (1 − accuracy) per step for each evaluation set, one line per run.

    ``sets`` None: those the runs validated on ("source" and "target" for domain adaptation,
    "source", the one labelled domain, for plain classification)."""
    if sets is None:
        sets = [name for name in ("source", "target") if any(f"val/{name}/acc" in run.metrics for run in runs)]
        sets = sets or ["source"]
    fig = Figure(figsize=(5 * len(sets), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(sets)))
    # The seeds of one configuration share a colour and differ in line style.
    bases = [run.label.split(", seed ")[0] for run in runs]
    colours = {base: f"C{i % 10}" for i, base in enumerate(dict.fromkeys(bases))}
    styles = [{"color": colours[base], "linestyle": ("-", "--", ":", "-.")[bases[:i].count(base) % 4]}
              for i, base in enumerate(bases)]
    one_domain = sets == ["source"] and not any("val/target/acc" in run.metrics for run in runs)
    for name, ax in zip(sets, axes):
        for run, style in zip(runs, styles):
            points = run.metrics.get(f"val/{name}/acc", [])
            if points:
                ax.plot([s for s, _ in points], [1 - a for _, a in points], marker=".", label=run.label, **style)
        title = "validation error" if one_domain else f"{name} validation error"
        ax.set(xlabel="training step", ylabel="validation error", title=title)
    # One legend below the axes: inside them, many runs' labels covered the curves' start, and beside them
    # long labels are wider than the figure.
    handles = {line.get_label(): line for ax in axes for line in ax.get_lines()}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", fontsize=7)
    return fig


def accuracy_curves_figure(runs: Sequence[Run], name: str = "target") -> Figure:
    """Validation accuracy of set ``name`` against the training step, one line per configuration (the runs
    whose labels differ only in the seed), the mean over its seeds with a band of ± one standard deviation
    (the seeds' spread); the number of seeds in the legend. The target's validation is an opt-in
    diagnostic (``--data.val_target``): a learning curve, never a choice."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.metrics.get(f"val/{name}/acc"):
            groups[run.label.split(", seed ")[0]].append(run)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, members) in enumerate(groups.items()):
        by_step: dict[int, list[float]] = defaultdict(list)
        for run in members:
            for step, acc in run.metrics[f"val/{name}/acc"]:
                by_step[step + 1].append(acc)  # a validation after N steps is logged at step N − 1
        steps = sorted(s for s, v in by_step.items() if len(v) == len(members))  # steps every seed reached
        means = np.array([np.mean(by_step[s]) for s in steps])
        spread = np.array([np.std(by_step[s], ddof=1) if len(members) > 1 else 0.0 for s in steps])
        ax.plot(steps, 100 * means, marker=".", color=f"C{i % 10}", label=f"{label} ({len(members)} seeds)")
        ax.fill_between(steps, 100 * (means - spread), 100 * (means + spread), color=f"C{i % 10}", alpha=0.2)
    ax.set(xlabel="training step", ylabel=f"{name} accuracy %", title=f"{name} accuracy of the evaluated model, "
           "mean ± std over seeds")
    ax.legend(fontsize=7)
    return fig


def activation_gallery_figure(run: Run, last: int = 3) -> Figure:
    """The run's latest activation plots (PNG files written by ``ActivationPlot``), side by side."""
    import matplotlib.image

    paths = run.activations[-last:]
    fig = Figure(figsize=(5 * max(len(paths), 1), 3.6), layout="constrained")
    fig.suptitle(f"{run.label}: activations of a norm layer with its mixture")
    for i, path in enumerate(paths):
        ax = fig.add_subplot(1, len(paths), i + 1)
        ax.imshow(matplotlib.image.imread(path))
        ax.set_title(path.stem, fontsize=8)
        ax.axis("off")
    return fig


MISSING = {
    "gradient variance": "gradient_variance.csv: add --trainer.callbacks+=adamatch_uan.callbacks.GradientVariance",
    "validation": "validation rows in metrics.csv (the run has not validated yet)",
    "activations": "activations/*.png: add --trainer.callbacks+=adamatch_uan.callbacks.ActivationPlot",
}


FIGURES = ("gradient_variance", "validation", "accuracy", "heatmap", "activations")


def write_figures(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                  kind: str = "total", which: Sequence[str] = FIGURES) -> tuple[list[Path], list[str]]:
    """Write the figures of ``which`` (``FIGURES``; "heatmap" and "activations" are one per run) that the runs
    have data for as PNG into ``out`` (default: the first run's ``figures/``).

    Returns:
        The files written, and a note per run and figure it has no data for (with the callback to enable).

    Raises:
        FileNotFoundError: a run directory that does not exist.
    """
    runs = [load_run(p) for p in run_dirs]
    out = Path(out) if out is not None else runs[0].path / "figures"
    has = {"gradient variance": [bool(variance_by_step(run, kind)) for run in runs],
           "validation": [any(k.startswith("val/") for k in run.metrics) for run in runs],
           "activations": [bool(run.activations) for run in runs]}
    needs = {"gradient variance": ("gradient_variance", "heatmap"), "validation": ("validation", "accuracy"),
             "activations": ("activations",)}
    notes = [f"{run.path} has no {MISSING[what]}" for what, flags in has.items() if set(needs[what]) & set(which)
             for run, flag in zip(runs, flags) if not flag]
    figures = {}
    if "gradient_variance" in which and any(has["gradient variance"]):
        figures["gradient_variance.png"] = gradient_variance_figure(runs, kind)
    if "validation" in which and any(has["validation"]):
        figures["validation.png"] = validation_figure(runs)
    if "accuracy" in which and any(run.metrics.get("val/target/acc") for run in runs):
        figures["accuracy.png"] = accuracy_curves_figure(runs)
    for i, run in enumerate(runs):
        tag = f"{i}-{run.path.name}"
        if "heatmap" in which and has["gradient variance"][i]:
            figures[f"heatmap-{tag}.png"] = layer_heatmap_figure(run, kind)
        if "activations" in which and has["activations"][i]:
            figures[f"activations-{tag}.png"] = activation_gallery_figure(run)
    written = []
    if figures:
        out.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=100)
        written.append(out / name)
    return written, notes


def main(args: Sequence[str] | None = None) -> list[Path]:
    """Write the figures and print their paths, and what each run lacks.

    Raises:
        UserError: a run directory that does not exist.
    """
    from jsonargparse import ArgumentParser

    from adamatch_uan.cli.errors import UserError

    parser = ArgumentParser(prog="python -m adamatch_uan.plots", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories written by adamatch_uan.fit")
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default RUN_DIR/figures)")
    parser.add_argument("--kind", type=str, default="total",
                        help="gradient kind: total, source, target, logits_source, logits_target")
    parser.add_argument("--figures", type=list[Literal[FIGURES]], default=list(FIGURES),
                        help="which figures (default all), e.g. --figures [accuracy] for a sweep's curves alone")
    config = parser.parse_args(args)
    try:
        written, notes = write_figures(config.run_dirs, config.out, config.kind, config.figures)
    except FileNotFoundError as error:
        raise UserError(str(error)) from error
    for path in written:
        print(path)
    for note in notes:
        print(f"note: {note}")
    return written


if __name__ == "__main__":
    from adamatch_uan.cli.errors import report

    report(main)
