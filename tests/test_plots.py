"""plots: mixture densities, the layer mixtures, the activation figure, run-directory figures and the CLI."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from adamatch_uan import plots
from adamatch_uan.norm import make_norm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_mixture(K=3, C=4, seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.ones(K), size=C).T
    return weights, rng.normal(size=(K, C)), rng.uniform(0.1, 2.0, size=(K, C))


@pytest.mark.parametrize("channel", [None, 2])
def test_component_densities_integrate_to_one(channel):
    x = np.linspace(-30, 30, 20001)
    densities = plots.component_densities(x, *random_mixture(), channel=channel)
    assert densities.shape == (3, len(x))
    assert np.trapezoid(densities.sum(0), x) == pytest.approx(1.0, abs=1e-6)


def test_one_component_is_the_gaussian_and_extremes_stay_finite():
    x = np.array([-1.0, 0.0, 2.5])
    one = plots.component_densities(x, np.ones((1, 1)), np.full((1, 1), 0.5), np.full((1, 1), 2.0))
    assert one[0] == pytest.approx(np.exp(-(x - 0.5) ** 2 / 4) / np.sqrt(4 * np.pi))
    far = plots.component_densities(np.array([0.0, 1e30, -1e30]), np.ones((1, 1)), np.zeros((1, 1)), np.full((1, 1), 1e-8))
    assert np.isfinite(far).all()


@pytest.mark.parametrize("norm, K", [("bn", 1), ("mn", 2), ("uan", 3), ("uan_ctx", 3)])
def test_layer_mixture_has_K_components_with_weights_summing_to_one(norm, K):
    layer = make_norm(norm, 5)
    weights, means, var = plots.layer_mixture(layer)
    assert weights.shape == means.shape == var.shape == (K, 5)
    assert np.allclose(weights.sum(0), 1.0) and (var > 0).all()


def test_layer_mixture_of_uan_with_contexts_picks_the_context_row():
    layer = make_norm("uan_ctx", 2)
    with torch.no_grad():
        layer.prior_logits[1, 0] = 5.0
    assert plots.layer_mixture(layer, context=1)[0][0, 0] > 0.9
    assert plots.layer_mixture(layer, context=0)[0][0, 0] == pytest.approx(1 / 3, abs=1e-5)


@pytest.mark.parametrize("K", [1, 3])
def test_activation_figure_draws_one_curve_per_component(K):
    mixture = random_mixture(K=K)
    samples = {"source": np.random.default_rng(0).normal(size=(100, 4)), "target": np.zeros((50, 4))}
    for channel in (None, 1):
        ax = plots.activation_figure(samples, mixture, channel=channel, title="t").axes[0]
        labels = [line.get_label() for line in ax.get_lines()]
        assert sum(label.startswith("component") for label in labels) == K
        assert ("mixture" in labels) == (K > 1)
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_activation_figure_survives_non_finite_activations():
    samples = {"source": np.array([[np.nan, 1.0], [np.inf, 2.0]]), "target": np.full((3, 2), np.nan)}
    ax = plots.activation_figure(samples, random_mixture(C=2)).axes[0]
    assert any("8 non-finite" in t.get_text() for t in ax.texts)
    nothing = plots.activation_figure({"source": np.full((2, 2), np.nan)}, random_mixture(C=2)).axes[0]
    assert nothing.get_xlim()[0] < nothing.get_xlim()[1]


def fake_run(folder, norm, steps=(0, 10, 20)):
    """A run directory as adamatch_uan.fit writes it, hand-made."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model:\n  class_path: adamatch_uan.methods.AdaMatch\n  init_args:\n    norm: {norm}\n")
    metrics = ["epoch,step,train/loss,val/source/acc,val/target/acc"]
    for i, s in enumerate(steps):
        metrics += [f"0,{s},{1.0 / (i + 1)},,", f"0,{s},,0.{5 + i},0.{4 + i}"]
    (folder / "metrics.csv").write_text("\n".join(metrics) + "\n")
    rows = ["step,epoch,layer,parameter,kind,variance"]
    for s in steps:
        for layer in ("convs.0", "head"):
            rows += [f"{s},0,{layer},weight,total,{1e-3 / (s + 1)}", f"{s},0,{layer},bias,total,{1e-5}"]
    (folder / "gradient_variance.csv").write_text("\n".join(rows) + "\n")
    plots.activation_figure({"source": np.zeros((4, 2))}, random_mixture(C=2)).savefig(folder / "act.png")
    (folder / "activations").mkdir()
    (folder / "act.png").rename(folder / "activations" / "norms.0.layer-step0000020.png")
    return folder


def test_load_run_reads_every_file(tmp_path):
    run = plots.load_run(fake_run(tmp_path / "a", "uan"))
    assert run.label == "AdaMatch + uan"
    assert run.metrics["val/target/acc"] == [(0, 0.4), (10, 0.5), (20, 0.6)]
    assert plots.variance_by_step(run, "total")[10] == pytest.approx([1e-3 / 11, 1e-5, 1e-3 / 11, 1e-5])
    assert len(run.activations) == 1
    with pytest.raises(FileNotFoundError, match="--run_dir"):
        plots.load_run(tmp_path / "missing")


def test_a_fixed_seed_and_the_norm_options_join_the_label(tmp_path):
    folder = fake_run(tmp_path / "a", "mn")
    config = folder / "config.yaml"
    config.write_text(config.read_text() + "    norm_options:\n      var_floor: 0.01\nseed_everything: 3\n")
    assert plots.run_label(folder) == "AdaMatch + mn, var_floor=0.01, seed 3"
    config.write_text(config.read_text().replace("seed_everything: 3", "seed_everything: true"))
    assert plots.run_label(folder) == "AdaMatch + mn, var_floor=0.01"


def test_seeds_of_one_configuration_share_a_colour_and_differ_in_style(tmp_path):
    runs = []
    for norm, seed in (("bn", 0), ("uan", 0), ("bn", 1)):
        folder = fake_run(tmp_path / f"{norm}{seed}", norm)
        (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + f"seed_everything: {seed}\n")
        runs.append(plots.load_run(folder))
    bn0, uan0, bn1 = plots.validation_figure(runs).axes[0].get_lines()
    assert bn0.get_color() == bn1.get_color() != uan0.get_color()
    assert bn0.get_linestyle() != bn1.get_linestyle()


def test_the_validation_legend_covers_no_axis_and_names_each_run_once(tmp_path):
    runs = [plots.load_run(fake_run(tmp_path / f"{n}{i}", n)) for n in ("bn", "uan", "mn") for i in range(3)]
    figure = plots.validation_figure(runs)
    figure.draw_without_rendering()  # lays the figure out
    [legend] = figure.legends
    box = legend.get_window_extent()
    assert len(figure.axes) == 2 and not any(box.overlaps(ax.get_window_extent()) for ax in figure.axes)
    assert len(legend.get_texts()) == len({run.label for run in runs})


def test_plain_classification_runs_get_one_validation_axis(tmp_path):
    folder = tmp_path / "classify"
    folder.mkdir()
    (folder / "config.yaml").write_text("model:\n  class_path: adamatch_uan.methods.Supervised\n  init_args:\n    norm: uan\n")
    (folder / "metrics.csv").write_text("epoch,step,val/source/acc\n0,10,0.5\n1,20,0.75\n")
    [ax] = plots.validation_figure([plots.load_run(folder)]).axes
    assert ax.get_title() == "validation error" and list(ax.get_lines()[0].get_ydata()) == [0.5, 0.25]


def test_figures_name_each_run_in_their_legends(tmp_path):
    runs = [plots.load_run(fake_run(tmp_path / n, n)) for n in ("bn", "uan")]
    for figure in (plots.gradient_variance_figure(runs), plots.validation_figure(runs)):
        for ax in figure.axes:
            legend = ax.get_legend() or figure.legends[0]
            assert [t.get_text() for t in legend.get_texts()] == ["AdaMatch + bn", "AdaMatch + uan"]
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    heatmap = plots.layer_heatmap_figure(runs[0]).axes[0]
    assert heatmap.images[0].get_array().shape == (4, 3)


def test_the_cli_writes_pngs(tmp_path):
    runs = [fake_run(tmp_path / n, n) for n in ("bn", "mn")]
    out = tmp_path / "figures"
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.plots", *map(str, runs), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.glob("*.png")}
    assert {"gradient_variance.png", "validation.png", "heatmap-0-bn.png", "heatmap-1-mn.png",
            "activations-0-bn.png"} <= names
    assert all((out / n).read_bytes()[:8] == PNG_MAGIC for n in names)


def test_a_run_without_the_callbacks_gets_what_it_has_and_a_note_per_missing_callback(tmp_path):
    folder = fake_run(tmp_path / "bare", "bn")
    (folder / "gradient_variance.csv").unlink()
    shutil.rmtree(folder / "activations")
    out = tmp_path / "figures"
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.plots", str(folder), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr[-3000:]  # no matplotlib warnings
    assert {p.name for p in out.glob("*.png")} == {"validation.png", "accuracy.png"}
    assert "adamatch_uan.callbacks.GradientVariance" in done.stdout
    assert "adamatch_uan.callbacks.ActivationPlot" in done.stdout


def test_a_missing_run_directory_is_one_short_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.plots", str(tmp_path / "nowhere")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 6


def test_accuracy_curves_average_the_seeds_of_each_configuration(tmp_path):
    runs = []
    for norm, seed, values in (("bn", 0, (0.8, 0.9)), ("bn", 1, (0.6, 0.9)), ("uan", 0, (0.7, 0.95))):
        folder = fake_run(tmp_path / f"{norm}{seed}", norm, steps=(99, 199))
        (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + f"seed_everything: {seed}\n")
        (folder / "metrics.csv").write_text("epoch,step,val/target/acc\n" + "".join(
            f"0,{s},{v}\n" for s, v in zip((99, 199), values)))
        runs.append(plots.load_run(folder))
    ax = plots.accuracy_curves_figure(runs).axes[0]
    bn, uan = ax.get_lines()
    assert list(bn.get_xdata()) == [100, 200] and list(bn.get_ydata()) == pytest.approx([70.0, 90.0])
    assert "(2 seeds)" in bn.get_label() and "(1 seeds)" in uan.get_label()


def test_the_cli_writes_only_the_figures_asked_for(tmp_path):
    runs = [fake_run(tmp_path / n, n) for n in ("bn", "mn")]
    out = tmp_path / "figures"
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.plots", *map(str, runs), "--out", str(out),
                           "--figures", "[accuracy]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.glob("*.png")} == {"accuracy.png"}
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.plots", *map(str, runs), "--figures", "[acuracy]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "acuracy" in done.stderr and "Traceback" not in done.stderr
