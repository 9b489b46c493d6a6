"""Building and loading the compiled mixture kernel (its numerics are tested in test_mixture.py, its operators in
test_cpu_kernel.py)."""

import os
import shutil
import subprocess
import sys

import pytest

from adamatch_uan.norm import backends
from adamatch_uan.norm.backends import build

from conftest import ROOT


@pytest.fixture
def broken_sources(tmp_path, monkeypatch):
    """A package whose kernel source does not compile, with its own build cache."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.cpp").write_text("this is not C++\n")
    (tmp_path / "src" / build.HEADER).write_text("\n")
    monkeypatch.setattr(build, "SOURCES", ("broken.cpp",))
    monkeypatch.setattr(build, "_source_dir", lambda: tmp_path / "src")
    monkeypatch.setenv("ADAMATCH_UAN_CACHE", str(tmp_path / "cache"))


def test_a_failed_build_warns_loudly_with_the_cause_and_the_fix_and_falls_back(broken_sources, monkeypatch):
    monkeypatch.delenv("ADAMATCH_UAN_KERNEL", raising=False)
    with pytest.warns(UserWarning, match=r"(?s)torch-ops backend.*Cause: Building the mixture kernel.*apt-get install g\+\+"):
        assert build.load() is None


def test_kernel_1_makes_a_failed_build_an_error(broken_sources, monkeypatch):
    monkeypatch.setenv("ADAMATCH_UAN_KERNEL", "1")
    with pytest.raises(build.KernelBuildError, match="Building the mixture kernel"):
        build.load()


def test_the_environment_can_turn_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ADAMATCH_UAN_KERNEL", "0")
    assert build.load() is None


def test_the_cache_key_follows_what_changes_the_binary_not_where_the_sources_are(tmp_path, monkeypatch):
    key = build.build_key()
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in (*build.SOURCES, build.HEADER):
        shutil.copy(build._source_dir() / name, copy / name)
    monkeypatch.setattr(build, "_source_dir", lambda: copy)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")  # another PATH
    assert build.build_key() == key
    (copy / build.HEADER).write_text((copy / build.HEADER).read_text() + "// changed\n")
    assert build.build_key() != key
    monkeypatch.setattr(build, "_source_dir", lambda: build.Path(build.__file__).parent)
    monkeypatch.setattr(build, "FLAGS", [*build.FLAGS, "-g"])
    assert build.build_key() != key


@pytest.mark.skipif(not backends.kernel_available(), reason="no C++ compiler: the compiled kernel is unavailable")
def test_a_copy_of_the_package_elsewhere_reuses_the_build(tmp_path, monkeypatch):
    folder = build.build_directory()
    library = next(folder.glob("*.so"))
    built = library.stat().st_mtime_ns
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in (*build.SOURCES, build.HEADER):
        shutil.copy(build._source_dir() / name, copy / name)
    monkeypatch.setattr(build, "_source_dir", lambda: copy)
    assert build.build() is not None
    assert library.stat().st_mtime_ns == built  # ninja found nothing to do
    assert str(folder / "src") in (folder / "build.ninja").read_text()


@pytest.mark.skipif(not backends.kernel_available(), reason="no C++ compiler: the compiled kernel is unavailable")
def test_the_build_command_reports_where_and_how_long():
    done = subprocess.run([sys.executable, "-m", "adamatch_uan.norm.backends.build"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "mixture kernel ready" in done.stdout and str(build.build_directory()) in done.stdout
