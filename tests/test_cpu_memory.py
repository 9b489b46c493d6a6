"""cli.cpu_memory: with freed memory kept, a step's blocks are reused instead of faulted in again."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, smoke_args

# A 64 MiB tensor allocated, written and freed twice; the minor page faults of the second time.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    from adamatch_uan.cli.cpu_memory import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_step()
    print(kept, faults_of_one_step())
""")


def second_step_faults(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_where_released_memory_faults_again():
    kept, faults = second_step_faults("keep")
    _, released = second_step_faults("release")
    assert kept == "True"
    assert released > 10_000  # 64 MiB of fresh 4 KiB pages: glibc returned the block with munmap
    assert faults < 1_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_variable_leaves_malloc_as_it_is():
    kept, faults = second_step_faults("keep", ADAMATCH_UAN_KEEP_FREED_MEMORY="0")
    assert kept == "False" and faults > 10_000


def test_a_cpu_run_keeps_freed_memory(data, tmp_path, monkeypatch):
    from adamatch_uan import fit
    from adamatch_uan.cli import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "keep_freed_memory", lambda: calls.append(True) or True)
    fit.main([*smoke_args(data, tmp_path / "run", 2), "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"])
    assert calls == [True]
