"""The README must be true: its Python runs, and each shell command it shows exists and is exercised."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.slow
def test_python_tour_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert blocks, "the README lost its API tour"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "(74883, 22789254, 0.328" in printed  # the numbers the README shows are the ones it prints


def test_make_targets_in_readme_exist():
    """Every `make X` the README shows is a real target (CI runs `make test`; `make -n` checks the rest)."""
    targets = set(re.findall(r"\bmake ([a-z][a-z-]*)", README))
    assert {"course", "test"} <= targets
    for target in targets:
        proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"`make {target}` from the README fails: {proc.stderr}"


def test_peftlab_commands_in_readme_parse():
    import shlex

    from peftlab.cli import build_parser

    commands = re.findall(r"`(peftlab [^`]+)`", README)
    assert commands
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv == ["--help"]:
            continue
        build_parser().parse_args(argv)  # SystemExit on an unknown sub-command or option
