"""cli.cpu_memory: kept, a freed block stays with the process, where glibc's default returns it to the OS; a CPU
fit keeps it when asked to."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, smoke_args

# The resident memory (MiB) a freed 64 MiB tensor gives back to the OS.
PROBE = textwrap.dedent("""
    import os, sys, torch
    from adamatch_uan.cli import cpu_memory
    mode = sys.argv[1]
    kept = cpu_memory.keep_freed_memory() if mode == "keep" else mode == "environment" and cpu_memory.from_environment()
    def resident():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    x = torch.ones(16 << 20)
    before = resident()
    del x
    print(kept, before - resident())
""")

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")


def returned_mib(mode: str, **env: str) -> tuple[str, float]:
    environment = {key: value for key, value in os.environ.items() if key != "ADAMATCH_UAN_KEEP_FREED_MEMORY"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                          env={**environment, "OMP_NUM_THREADS": "1", **env}, check=True)
    kept, returned = done.stdout.split()
    return kept, float(returned)


@linux
def test_kept_memory_stays_with_the_process_where_glibc_returns_it():
    assert returned_mib("keep") == ("True", pytest.approx(0, abs=4))
    assert returned_mib("glibc") == ("False", pytest.approx(64, abs=4))  # munmap of the tensor's block


@linux
def test_the_variable_turns_it_on():
    assert returned_mib("environment", ADAMATCH_UAN_KEEP_FREED_MEMORY="1") == ("True", pytest.approx(0, abs=4))
    assert returned_mib("environment", ADAMATCH_UAN_KEEP_FREED_MEMORY="0") == ("False", pytest.approx(64, abs=4))
    assert returned_mib("environment") == ("False", pytest.approx(64, abs=4))


def test_a_cpu_run_asks_the_environment(data, tmp_path, monkeypatch):
    from adamatch_uan import fit
    from adamatch_uan.cli import cpu_memory

    calls = []
    monkeypatch.setattr(cpu_memory, "from_environment", lambda: calls.append(True) or False)
    fit.main([*smoke_args(data, tmp_path / "run", 2), "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu"])
    assert calls == [True]


def test_a_bad_value_stops_the_run_with_one_message_and_leaves_nothing(data, tmp_path, monkeypatch, capsys):
    from adamatch_uan import fit
    from adamatch_uan.cli import errors

    monkeypatch.setenv("ADAMATCH_UAN_KEEP_FREED_MEMORY", "yes")
    with pytest.raises(SystemExit) as stopped:
        errors.report(fit.main, [*smoke_args(data, tmp_path / "run", 2), "--trainer.accelerator", "cpu"])
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and "ADAMATCH_UAN_KEEP_FREED_MEMORY='yes'" in message and "MEMORY=1 to keep" in message
    assert not (tmp_path / "run").exists()
