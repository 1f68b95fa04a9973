"""The warm-started feedback run (autograde/kernel_run.py): outputs as a Jupyter kernel records them, deaths and hangs.

Run outside the sandbox here (the sandboxed path is covered by test_integrity and the course round trip): what is
tested is the recording, the forking and the notes, against what nbclient records for the same cells.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from autograde import kernel_run  # noqa: E402


def _run(tmp_path: Path, notebooks: list[list[str]], timeout: int = 30) -> list:
    argv = [sys.executable, "-I", str(ROOT / "autograde" / "kernel_run.py"), str(timeout)]
    for i, sources in enumerate(notebooks):
        cells = [new_code_cell("import math", metadata={"nbgrader": {"grade_id": "setup", "locked": True}})]
        nb = new_notebook(cells=cells + [new_code_cell(s) for s in sources])
        nbformat.write(nb, tmp_path / f"in{i}.ipynb")
        argv += [str(tmp_path / f"in{i}.ipynb"), str(tmp_path / f"out{i}.ipynb")]
    subprocess.run(argv, cwd=tmp_path, check=True, timeout=300, capture_output=True)
    return [nbformat.read(tmp_path / f"out{i}.ipynb", as_version=4) for i in range(len(notebooks))]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_outputs_are_recorded_as_a_kernel_records_them(tmp_path):
    nb, = _run(tmp_path, [[
        "print('hello'); import sys; print('oops', file=sys.stderr)",
        "1 + 1",
        "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))",
        "raise ValueError('bad input')",
        "import os\nos.system('echo from-a-subprocess')",
        "%time y = 2\ny",
        "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()",
        "input('name?')",
    ]])
    cells = nb.cells[1:]
    assert [(o.name, o.text) for o in cells[0].outputs] == [("stdout", "hello\n"), ("stderr", "oops\n")]
    assert cells[1].outputs[0].output_type == "execute_result" and cells[1].outputs[0].data["text/plain"] == "2"
    assert cells[1].execution_count == 3  # the setup cell is 1, then the first cell above
    assert cells[2].outputs[0].output_type == "display_data" and "text/html" in cells[2].outputs[0].data
    error = cells[3].outputs[0]
    assert (error.output_type, error.ename, error.evalue) == ("error", "ValueError", "bad input")
    assert any("ValueError" in line for line in error.traceback)
    assert "from-a-subprocess" in _text(cells[4])
    assert "Wall time" in _text(cells[5]) and cells[5].outputs[-1].data["text/plain"] == "2"
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in cells[6].outputs)
    assert cells[7].outputs[-1].output_type == "error"  # no stdin while grading


def test_each_notebook_gets_a_fresh_interpreter(tmp_path):
    first, second = _run(tmp_path, [["import math\nmath.pi = 3\nLEAK = 1"], ["print(math.pi, 'LEAK' in globals())"]])
    assert _text(second.cells[1]) == "3.141592653589793 False\n"


def test_a_death_is_noted_and_the_next_notebook_still_runs(tmp_path):
    dead, after = _run(tmp_path, [["print('before')", "import os; os._exit(3)", "print('never')"], ["print('ok')"]])
    assert _text(dead.cells[1]) == "before\n"
    assert "the kernel died while running this cell" in _text(dead.cells[2])
    assert "not run: the kernel died in an earlier cell" in _text(dead.cells[3])
    assert "never" not in _text(dead.cells[3])
    assert _text(after.cells[1]) == "ok\n"


def test_a_long_cell_is_interrupted_and_one_that_ignores_it_is_killed(tmp_path):
    slow, stubborn = _run(tmp_path, [
        ["import time; time.sleep(60)", "print('next cell runs')"],
        ["import time\nwhile True:\n    try:\n        time.sleep(60)\n    except BaseException:\n        pass",
         "print('never')"],
    ], timeout=2)
    assert slow.cells[1].outputs[0].ename == "_Interrupted"
    assert "stopped after the time limit of 2 s" in _text(slow.cells[1])
    assert _text(slow.cells[2]) == "next cell runs\n"
    assert "ignored the interrupt" in _text(stubborn.cells[1])
    assert "not run" in _text(stubborn.cells[2])


def test_a_flood_of_output_is_cut_with_a_note(tmp_path):
    nb, = _run(tmp_path, [["for _ in range(200_000): print('x' * 50)"]])
    size = len(_text(nb.cells[1]))
    assert size < kernel_run.CELL_BYTES + 1000
    assert "output cut:" in _text(nb.cells[1])


@pytest.mark.parametrize("source, expected", [
    ("import torch\nfrom peftlab import checks\nimport numpy as np, os.path",
     ["torch", "peftlab", "peftlab.checks", "numpy", "os.path"]),
    ("x = (", []),
])
def test_setup_modules_reads_only_the_locked_setup_cell(source, expected):
    locked = new_code_cell(source, metadata={"nbgrader": {"grade_id": "setup", "locked": True}})
    student = new_code_cell("import secrets_module")
    assert kernel_run.setup_modules(new_notebook(cells=[locked, student])) == expected
