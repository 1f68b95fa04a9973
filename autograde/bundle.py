"""``python -m autograde student-bundle OUT``: what a graded class hands out, and nothing of the answers.

The repository is the self-study edition: solutions, sample submissions, hidden tests and the grader are all in
it, on purpose. A graded class must not hand that out. The bundle holds what the release notebooks need to run:

- ``notebooks/`` (the student release: stubs, visible checks only), ``peftlab/`` (the library the notebooks import,
  with the visible checkers), ``reports/`` and ``benchmarks/results/`` (the data the notebooks read);
- ``pyproject.toml``, ``requirements/course.lock`` and a ``README.md`` that says how to install and work.

It leaves out ``solutions/``, ``autograde/`` (the grader, its sample submissions), ``tests/`` (mutants and
attacks), ``build/`` and the git history. :func:`check_bundle` fails if a line of a hidden test is found in a
bundled file, or a line of a solution block (or of a reference answer) outside the library; ``student-bundle``
runs it before it reports success.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import nbformat

INCLUDE = ("notebooks", "peftlab", "reports", "benchmarks/results", "pyproject.toml", "requirements/course.lock",
           "LICENSE")
SKIP = ("__pycache__", ".ipynb_checkpoints", "*.pyc", "*.bak.ipynb")
README = """\
# peftlab: the exercises

Work in `notebooks/exN_*/exN_*.ipynb`: fill in the cells marked `# YOUR CODE HERE`; the check cell under each
one tells you what passes. Hand in the notebooks as your instructor says (one folder per exercise, the notebook
inside under the same name).

Set up once (Python 3.11):

    python3 -m venv .venv
    .venv/bin/pip install -r requirements/course.lock
    .venv/bin/pip install --no-deps -e .
    .venv/bin/jupyter lab notebooks/

The checks you see are the visible part of the grading. Your grade comes from a re-run of your code on
inputs you have not seen, in a sandbox, and from a check that the graded parts are your own code (not peftlab's,
HF peft's or bitsandbytes' version of them).
"""


def secret_lines(root: Path, hidden_only: bool = False) -> set[str]:
    """Distinctive lines of the answers: every line of a hidden-test (and, unless ``hidden_only``, solution) block
    of ``solutions/``, reference answers to the written questions included."""
    lines = set()
    for path in (root / "solutions").glob("*/*.ipynb"):
        for cell in nbformat.read(path, as_version=4).cells:
            inside = None
            for line in cell.source.split("\n"):
                mark = line.strip()
                if mark in ("### BEGIN SOLUTION", "### BEGIN HIDDEN TESTS"):
                    inside = mark
                elif mark in ("### END SOLUTION", "### END HIDDEN TESTS"):
                    inside = None
                elif inside and len(mark) >= 24 and not mark.startswith(("#", '"""', "return ", "raise ")) and \
                        not (hidden_only and inside == "### BEGIN SOLUTION"):
                    lines.add(mark)
    return lines


def check_bundle(bundle: Path, root: Path) -> list[str]:
    """``path: line`` for every answer line found in the bundle's text files (empty: clean).

    The library is the course's public reference (the notebooks import it; the own-work check and the similarity
    score keep it out of graded answers), so it is searched for hidden tests only; everything else for both."""
    found = []
    every, hidden = secret_lines(root), secret_lines(root, hidden_only=True)
    for path in sorted(bundle.rglob("*")):
        if not path.is_file() or path.suffix not in (".py", ".ipynb", ".md", ".txt", ".json", ".csv", ".toml"):
            continue
        text = path.read_text(errors="ignore")
        if path.suffix == ".ipynb":
            nb = nbformat.reads(text, as_version=4)
            text = "\n".join(c.source for c in nb.cells)
        present = {line.strip() for line in text.split("\n")}
        secrets = hidden if path.relative_to(bundle).parts[0] == "peftlab" else every
        found += [f"{path.relative_to(bundle)}: {s}" for s in sorted(secrets & present)]
    return found


def student_bundle(out: Path, root: Path, zip_it: bool = True) -> Path:
    """Write the bundle into ``out`` (a new folder) and ``out.zip``; refuse an existing folder."""
    if out.exists():
        raise ValueError(f"{out} exists; choose a new folder (nothing is overwritten)")
    for rel in INCLUDE:
        src = root / rel
        if src.is_dir():
            shutil.copytree(src, out / rel, ignore=shutil.ignore_patterns(*SKIP))
        elif src.is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, out / rel)
    (out / "README.md").write_text(README)
    leaks = check_bundle(out, root)
    if leaks:
        shutil.rmtree(out)
        raise RuntimeError("the bundle would hand out answers:\n  " + "\n  ".join(leaks[:20]))
    if zip_it:
        with zipfile.ZipFile(out.with_suffix(".zip"), "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(out.parent))
    return out
