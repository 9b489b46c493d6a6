"""Every committed result's recorded command still runs: it names configs that exist and parses with today's CLI."""

import json
import re
import shlex

import pytest

from conftest import ROOT

SUMMARIES = sorted((ROOT / "benchmarks" / "results").rglob("*.json"))


def recorded(fit: bool) -> dict[str, list[str]]:
    """Each distinct command (the seed and run directory aside) → the summaries that record it: the fit
    commands, or (``fit`` False) the benchmark scripts'."""
    commands: dict[str, list[str]] = {}
    for path in SUMMARIES:
        command = json.loads(path.read_text()).get("command")
        if isinstance(command, str) and ("adamatch_uan.fit" in command) == fit:
            key = re.sub(r"--(seed_everything|data\.seed|run_dir) \S+", "", command)
            commands.setdefault(key, []).append(str(path.relative_to(ROOT)))
    return commands


COMMANDS, SCRIPTS = recorded(fit=True), recorded(fit=False)


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_a_recorded_benchmark_command_names_a_script_that_exists(command):
    args = shlex.split(command)
    while args and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", args[0]):  # the environment it ran in (LD_PRELOAD=...)
        args = args[1:]
    assert args[0] == "python", (command, SCRIPTS[command][0])
    if args[1] == "-m":  # a retest by one of the package's commands (evaluate): its options still parse
        import importlib

        module = importlib.import_module(args[2])
        module.parser().parse_args(args[3:])
    else:
        assert (ROOT / args[1]).is_file(), (command, SCRIPTS[command][0])


def test_the_fit_summaries_record_their_commands():
    assert len(COMMANDS) >= 10 and sum(map(len, COMMANDS.values())) >= 60
    # Each names its precision, so that it reproduces its row whatever the default (bf16 on some CPUs).
    unnamed = [paths[0] for command, paths in COMMANDS.items() if "--trainer.precision" not in command]
    assert not unnamed, unnamed[:3]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_recorded_command_names_existing_configs_and_parses(command, capsys, monkeypatch):
    from adamatch_uan.fit import main

    monkeypatch.chdir(ROOT)  # the commands name configs relative to the repository's root
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "adamatch_uan.fit"], (args[:3], COMMANDS[command][0])
    for config in re.findall(r"--config (\S+)", command):
        assert (ROOT / config).is_file(), f"{COMMANDS[command][0]} names {config}, which does not exist"
    with pytest.raises(SystemExit) as exited:
        main([*args[3:], "--print_config"])
    assert exited.value.code == 0, COMMANDS[command][0]
    assert "class_path: adamatch_uan.methods" in capsys.readouterr().out
