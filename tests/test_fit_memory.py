"""benchmarks/fit_memory.py: each allocator reaches the fit through its environment; the tables read the runs."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import fit_memory  # noqa: E402


def test_each_allocator_sets_what_the_fit_reads(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/libother.so")
    release, keep = fit_memory.environment("release"), fit_memory.environment("keep")
    assert release["ADAMATCH_UAN_KEEP_FREED_MEMORY"] == "0" and keep["ADAMATCH_UAN_KEEP_FREED_MEMORY"] == "1"
    assert "LD_PRELOAD" not in release and "LD_PRELOAD" not in keep  # a preload the caller had would skew them


def test_tcmalloc_is_preloaded_or_its_absence_named(monkeypatch):
    monkeypatch.setattr(fit_memory, "tcmalloc_path", lambda: None)
    with pytest.raises(SystemExit, match="libtcmalloc-minimal4"):
        fit_memory.environment("tcmalloc")
    monkeypatch.setattr(fit_memory, "tcmalloc_path", lambda: "/lib/libtcmalloc_minimal.so.4")
    env = fit_memory.environment("tcmalloc")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4" and env["ADAMATCH_UAN_KEEP_FREED_MEMORY"] == "0"


def test_validated_reads_the_last_logged_validation(tmp_path):
    assert fit_memory.validated(tmp_path / "none") == 0
    (tmp_path / "metrics.csv").write_text("epoch,step,val/target/acc,time/elapsed_s\n0,99,0.5,10.0\n0,199,0.6,20.0\n")
    assert fit_memory.validated(tmp_path) == 200


def test_the_tables_have_a_row_per_run():
    runs = [{"row": "bn", "allocator": a, "s_per_step": 0.25, "peak_rss_mib": 1500.0, "peak_rss_first_half_mib": 1400.0,
             "peak_rss_second_half_mib": None, "wall_s": 300.0} for a in fit_memory.ALLOCATORS]
    lines = fit_memory.table(runs).splitlines()
    assert len(lines) == 2 + len(runs) and [line.split(" | ")[1] for line in lines[2:]] == list(fit_memory.ALLOCATORS)
    probes = [{"allocator": a, "points": [{"iteration": i, "rss_mib": 500.0 + i, "page_faults": 10 * i} for i in (0, 40)]}
              for a in ("release", "keep")]
    lines = fit_memory.probe_table(probes).splitlines()
    assert "iteration 40" in lines[0] and lines[3] == "| keep | 500, 0 | 540, 400 |"


def test_compact_puts_each_sample_on_one_line_and_keeps_the_data():
    import json

    data = {"runs": [{"rss_samples": [[0.0, 1.5, 0], [1.0, 2.5, 100]], "times": {"100": 3.0}}]}
    text = fit_memory.compact(json.dumps(data, indent=1))
    assert json.loads(text) == data and text.splitlines()[4].strip() == "[0.0, 1.5, 0],"
