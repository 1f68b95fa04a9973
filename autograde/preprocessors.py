"""nbgrader preprocessors of the course: a grade cell is scored by its verdict, never by a library's stderr.

nbgrader scores a grade cell 0 when any of its outputs is a stream on stderr (``nbgrader.utils.determine_grade``).
Libraries write there for reasons that are not the student's: bitsandbytes logs "Failed to load CPU
gemm_4bit_forward from kernels-community" at its first import when the optional ``kernels`` package is absent,
transformers emits FutureWarnings (``past_key_values`` -> ``cache``), ``PYTHONWARNINGS=always`` repeats every
warning. A checker's verdict is an exception: every check cell of the course either raises (an ``error`` output:
0 points) or returns (full points).

:class:`StderrIsNotAVerdict` runs right after nbgrader's ``Execute``, before the grades are saved: it turns
every stderr stream of a grade cell into a stdout stream whose lines start with ``[stderr]``. The text stays in
the feedback; only the verdict counts. Error outputs are untouched, so a failing check still scores 0.

The course config (``nbgrader_config.py``) puts it into ``Autograde.autograde_preprocessors``;
``python -m autograde validate`` runs nbgrader's Validator with it, so a student sees what the grader will see.
"""

from __future__ import annotations

from nbconvert.preprocessors import Preprocessor
from nbformat.v4 import new_output
from nbgrader.utils import is_grade
from traitlets import Bool

PREFIX = "[stderr] "


def relabel(text: str) -> str:
    """Every line of a stderr text, marked as such.

    >>> relabel("UserWarning: careful\\n  warnings.warn(\\n")
    '[stderr] UserWarning: careful\\n[stderr]   warnings.warn(\\n'
    """
    return "".join(PREFIX + line for line in text.splitlines(keepends=True))


class StderrIsNotAVerdict(Preprocessor):
    """Move the stderr streams of grade cells to stdout (prefixed ``[stderr]``); leave errors alone."""

    enabled = Bool(True, help="on by default (nbconvert's preprocessors are off unless enabled)").tag(config=True)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and is_grade(cell):
            outputs = []
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    out = new_output("stream", name="stdout", text=relabel(out.get("text", "")))
                outputs.append(out)
            cell.outputs = outputs
        return cell, resources
