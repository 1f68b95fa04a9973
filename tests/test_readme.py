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

    from peftlab.experiments.cli import build_parser

    commands = re.findall(r"`(peftlab [^`]+)`", README)
    assert commands
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv == ["--help"]:
            continue
        build_parser().parse_args(argv)  # SystemExit on an unknown sub-command or option


@pytest.mark.slow
def test_student_reset_keeps_a_backup_and_restores_the_release(tmp_path):
    """README, students 3: `python -m autograde reset <notebook>`."""
    import shutil
    import sys

    src = ROOT / "notebooks" / "ex1_motivation" / "ex1_motivation.ipynb"
    work = tmp_path / "ex1_motivation" / "ex1_motivation.ipynb"
    work.parent.mkdir()
    shutil.copy(src, work)
    work.write_text(work.read_text().replace("YOUR CODE HERE", "my own attempt", 1))
    proc = subprocess.run([sys.executable, "-m", "autograde", "reset", str(work)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backups = list(work.parent.glob("ex1_motivation.*.bak.ipynb"))
    assert len(backups) == 1 and "my own attempt" in backups[0].read_text()
    assert work.read_text() == src.read_text()


@pytest.mark.slow
def test_student_validate_reports_checks():
    """README, students 2: `python -m autograde validate <notebook>` on the solution passes, on the release not."""
    import sys

    def validate(path):
        return subprocess.run([sys.executable, "-m", "autograde", "validate", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)

    good = validate(ROOT / "solutions" / "ex1_motivation" / "ex1_motivation.ipynb")
    assert good.returncode == 0 and "Success" in good.stdout, good.stdout[-2000:] + good.stderr[-2000:]
    stub = validate(ROOT / "notebooks" / "ex1_motivation" / "ex1_motivation.ipynb")
    assert "NotImplementedError" in stub.stdout + stub.stderr
