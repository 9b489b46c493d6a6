"""notebooks/gradient_variance.ipynb executes headless against short generated-data runs and shows its figures."""

import nbformat
from conftest import ROOT, smoke_args
from nbclient import NotebookClient

NOTEBOOK = ROOT / "notebooks" / "gradient_variance.ipynb"


def test_notebook_runs_headless_and_produces_its_figures(data, tmp_path):
    from adamatch_uan.fit import main

    runs = []
    for norm in ("bn", "uan"):  # the runs it reads, trained in this process
        run = tmp_path / norm
        main([*smoke_args(data, run, 12), "--norm", norm])
        runs.append(str(run))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    [parameters] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = f"RUN_DIRS = {runs!r}\nKIND = 'total'"
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # gradient variance, a heatmap per run, validation, an activation gallery per run
    assert len(images) == 1 + 2 + 1 + 2
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "AdaMatch + bn" in printed and "AdaMatch + uan" in printed
