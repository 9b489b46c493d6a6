"""cli.cpu_default: a new run on a CPU with native bfloat16 trains in bf16-mixed, channels-last; what the user set,
a GPU, a resumed run and a CPU that would emulate bfloat16 keep float32 NCHW."""

from types import SimpleNamespace

import pytest
import torch

from adamatch_uan.cli import cpu_default


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(cpu_default, "native_bfloat16", lambda: True)


def resolve(precision=None, accelerator="cpu", channels_last=None, resumed=None):
    trainer = SimpleNamespace(precision=precision, accelerator=accelerator)
    model = SimpleNamespace(channels_last=channels_last)
    line = cpu_default.resolve(trainer, model, resumed)
    return trainer.precision, model.channels_last, line


def test_a_new_cpu_run_trains_in_bf16_channels_last(native):
    precision, nhwc, line = resolve()
    assert (precision, nhwc) == ("bf16-mixed", True)
    assert "channels-last" in line and "--trainer.precision 32-true" in line  # how to get float32 back


def test_what_the_user_set_is_kept(native):
    assert resolve("32-true")[:2] == ("32-true", False)
    assert resolve(channels_last=False)[:2] == ("bf16-mixed", False)
    assert "channels-last" not in resolve(channels_last=False)[2]
    assert resolve("32-true", channels_last=True)[:2] == ("32-true", True)
    assert resolve("bf16-mixed") == ("bf16-mixed", True, None)  # the layout follows an explicit bf16 on the CPU too


def test_a_gpu_and_an_emulating_cpu_keep_float32(native, monkeypatch):
    assert resolve(accelerator="gpu") == (None, False, None)
    assert resolve("bf16-mixed", accelerator="gpu") == ("bf16-mixed", False, None)
    monkeypatch.setattr(cpu_default, "native_bfloat16", lambda: False)
    assert resolve() == (None, False, None)


def test_a_resumed_run_continues_in_what_it_started_with(native, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "config.yaml").write_text("trainer:\n  precision: null\nmodel:\n  init_args:\n    channels_last: false\n")
    (new / "config.yaml").write_text("trainer:\n  precision: bf16-mixed\nmodel:\n  init_args:\n    channels_last: true\n")
    assert resolve(resumed=old) == (None, False, None)  # a run from before this default: float32
    assert resolve(resumed=new) == ("bf16-mixed", True, None)
    assert resolve(resumed=tmp_path) == (None, False, None)  # a checkpoint from elsewhere: no switch mid-run
    assert resolve("32-true", resumed=new)[:2] == ("32-true", True)  # what the user says still wins


def test_auto_means_the_cpu_when_there_is_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_default.runs_on_cpu("auto") and cpu_default.runs_on_cpu("cpu") and not cpu_default.runs_on_cpu("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not cpu_default.runs_on_cpu("auto")


def test_native_bfloat16_reads_the_cpus_instructions(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_default.native_bfloat16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_default.native_bfloat16()
