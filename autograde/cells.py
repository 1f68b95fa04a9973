r"""The graded cells of a notebook, run outside Jupyter as nbgrader's autograder runs them: one verdict per check.

nbgrader grades a submission by running it top to bottom with every locked check cell put back as the
instructor wrote it (hidden tests included); a check cell that raises scores 0, one that returns scores its
points. The tests of the course do the same in-process, much faster and without a kernel:

- :func:`read_solution` reads ``solutions/<name>/<name>.ipynb``; :func:`solution_cells`, :func:`check_cells` and
  :func:`graded_cells` pick its cells by their nbgrader metadata;
- :func:`submission` is what the autograder runs for a student: the student's solution cells, the
  instructor's check cells; :func:`stub` is what nbgrader's release leaves of a solution cell, :func:`mutate` a
  plausible wrong answer;
- :func:`run_graded` executes the solution and check cells of one exercise in a fresh namespace named
  ``__main__`` (as a kernel's, so ``assert_own_work`` sees notebook-defined code) after :data:`PRELUDE`, and
  returns ``{check cell: passed}``; :func:`namespace` and :func:`run_check` are its two halves, for a test that
  wants the namespace or the exception itself.

Experiment cells are skipped (no graded cell depends on them), and so is the notebook's setup cell: it may load a
real model, which no check needs; :data:`PRELUDE` imports what the setup cells import.

>>> nb = read_solution("ex1_motivation")
>>> graded_cells(nb)
{'check_bert_param_count': 3, 'check_full_finetune_bytes': 2, 'check_storage_bytes': 2}
>>> print(stub("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"))
def double(x):
    # YOUR CODE HERE
    raise NotImplementedError()
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # nbgrader_config.py's ClearSolutions.code_stub
# What the setup cells of the notebooks import (they also load MiniLM, which no graded cell needs).
PRELUDE = """\
import math
import torch
from torch import nn
import torch.nn.functional as F
from transformers import DynamicCache
import peftlab
from peftlab import checks, quant
from peftlab.checks import ex3 as checks_ex3, ex4 as checks_ex4, ex5 as checks_ex5
from peftlab.models import build_from_config
"""


def read_solution(name: str, root: Path | None = None):
    """The solution notebook of an assignment: ``<root>/solutions/<name>/<name>.ipynb`` (root: this checkout)."""
    import nbformat  # here, not at the top: the GPU machine of tests/course/test_ex5_notebook.py lacks it

    root = root or Path(__file__).resolve().parents[1]
    path = root / "solutions" / name / f"{name}.ipynb"
    if not path.exists():
        found = sorted(p.parent.name for p in (root / "solutions").glob("*/*.ipynb") if p.stem == p.parent.name)
        raise ValueError(f"no solution notebook {path}; the assignments are {found}")
    return nbformat.read(path, as_version=4)


def nbgrader_meta(cell) -> dict:
    """A cell's nbgrader metadata (``{}`` for an ordinary cell)."""
    return cell.metadata.get("nbgrader", {})


_meta = nbgrader_meta


def cell_name(cell) -> str:
    """nbgrader's name of a cell: its ``grade_id`` (a notebook's cell id may differ), else the cell id."""
    return _meta(cell).get("grade_id", cell.id)


def solution_cells(nb) -> dict[str, str]:
    """``{cell id: source}`` of the code cells a student writes (nbgrader ``solution``)."""
    return {c.id: c.source for c in nb.cells if c.cell_type == "code" and _meta(c).get("solution")}


def check_cells(nb) -> dict[str, str]:
    """``{cell id: source}`` of the graded cells, hidden tests included (nbgrader ``grade``, markdown answers too)."""
    return {c.id: c.source for c in nb.cells if _meta(c).get("grade")}


def graded_cells(nb) -> dict[str, int]:
    """``{check cell: points}`` of the autograded (code) cells."""
    return {cell_name(c): _meta(c)["points"] for c in nb.cells if c.cell_type == "code" and _meta(c).get("grade")}


def student_source(source: str) -> str:
    """A solution cell as a student would write it: the solution code without nbgrader's marker lines."""
    return "\n".join(line for line in source.split("\n") if line.strip() not in SOLUTION_MARKERS)


def stub(source: str) -> str:
    """What nbgrader's release leaves of a solution cell: each solution block replaced by the stub, indented."""
    return re.sub(r"( *)### BEGIN SOLUTION\n.*?### END SOLUTION",
                  lambda m: "\n".join(m.group(1) + line for line in CODE_STUB.split("\n")), source, flags=re.S)


def mutate(source: str, old: str | None, new: str, cell_id: str) -> str:
    """A plausible wrong answer: ``old`` replaced by ``new`` in a solution cell's source (``old=None``: all of it)."""
    if old is None:
        return new
    if old not in source:
        raise ValueError(f"mutation target {old!r} not in cell {cell_id}")
    return source.replace(old, new)


def submission(solution, student) -> dict[str, str]:
    """What the autograder runs for ``student``: its solution cells, the check cells of ``solution`` (locked)."""
    return {**solution_cells(student), **check_cells(solution)}


def _cells(nb, replace: dict[str, str] | None, kinds: tuple[str, ...]):
    """``(name, source, is_check)`` of the code cells of ``kinds``, with sources from ``replace`` (by name or id)."""
    replace = replace or {}
    for cell in nb.cells:
        meta = _meta(cell)
        if cell.cell_type == "code" and any(meta.get(k) for k in kinds):
            name = cell_name(cell)
            yield name, replace.get(name, replace.get(cell.id, cell.source)), bool(meta.get("grade"))


def namespace(nb, replace: dict[str, str] | None = None, prelude: str = PRELUDE) -> dict:
    """A fresh ``__main__`` namespace with :data:`PRELUDE` and the solution cells run (errors propagate)."""
    ns = {"__name__": "__main__"}
    exec(prelude, ns)
    for name, source, _ in _cells(nb, replace, ("solution",)):
        exec(compile(source, name, "exec"), ns)
    return ns


def run_check(ns: dict, nb, name: str, source: str | None = None) -> None:
    """Run one check cell (hidden tests included) in ``ns``; its exception, if any, is the verdict."""
    cells = {n: s for n, s, check in _cells(nb, None, ("grade",)) if check}
    if name not in cells:
        raise ValueError(f"no check cell {name!r}; the notebook has {sorted(cells)}")
    exec(compile(cells[name] if source is None else source, name, "exec"), ns)


def run_graded(nb, replace: dict[str, str] | None = None, prelude: str = PRELUDE) -> dict[str, bool]:
    """Run the solution and check cells in notebook order, as the autograder does: ``{check cell: passed}``.

    ``replace`` maps a cell's name (or id) to the source to run instead: a student's answer, a stub, a mutant.
    A cell that raises is recorded and the run goes on, as nbgrader's does; what the cells print is swallowed.
    """
    ns = {"__name__": "__main__"}
    exec(prelude, ns)
    results = {}
    sink = io.StringIO()
    for name, source, is_check in _cells(nb, replace, ("solution", "grade")):
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                exec(compile(source, name, "exec"), ns)
            ok = True
        except Exception:  # noqa: BLE001 - a failing cell is the result we record
            ok = False
        if is_check:
            results[name] = ok
    return results


def points(nb, results: dict[str, bool]) -> tuple[int, int]:
    """``(points scored, points possible)`` of :func:`run_graded`'s verdicts."""
    table = graded_cells(nb)
    return sum(table[c] for c, ok in results.items() if ok), sum(table.values())
