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
from traitlets import Bool, Unicode

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


class ApplyRun(Preprocessor):
    """nbgrader's ``Execute``, replaced: put in the outputs of the sandboxed run and the trusted verdicts.

    :mod:`autograde.batch` has already run the notebook (in a sandbox) and decided every check cell
    (:mod:`autograde.verdicts`); its result file is ``<results_dir>/<student>/<assignment>.json``. Here, in the
    grader's own nbgrader process:

    - every locked cell gets its released source back, so the autograded notebook and the feedback never hold a
      hidden test (nbgrader's ``OverwriteCells`` has just put the gradebook's version, hidden tests included, there);
    - every code cell gets the run's outputs (text and images only; errors and stderr as text: they decide nothing);
    - every check cell gets one more output with the verdict: a passing note, or an ``error`` that nbgrader's
      ``SaveAutoGrades`` scores 0, with the reasons (which call failed, never the expected values).
    """

    enabled = Bool(True, help="on by default (nbconvert's preprocessors are off unless enabled)").tag(config=True)
    results_dir = Unicode(".grading/results", help="the result files of autograde.batch").tag(config=True)
    release_dir = Unicode("release", help="the released notebooks (locked cells as the students got them)").tag(
        config=True)

    def preprocess(self, nb, resources):
        import json
        from pathlib import Path

        import nbformat

        info = resources.get("nbgrader", {})
        student, assignment, notebook = info.get("student"), info.get("assignment"), info.get("notebook")
        path = Path(self.results_dir) / str(student) / f"{assignment}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        release_path = Path(self.release_dir) / str(assignment) / f"{notebook}.ipynb"
        released = {}
        if release_path.exists():
            for cell in nbformat.read(release_path, as_version=4).cells:
                gid = cell.metadata.get("nbgrader", {}).get("grade_id")
                if gid:
                    released[gid] = cell
        outputs = (result or {}).get("outputs", {})
        verdicts = (result or {}).get("verdicts", {})
        first_code = True
        for cell in nb.cells:
            meta = cell.metadata.get("nbgrader", {})
            gid = meta.get("grade_id")
            if meta.get("locked") and gid in released:
                cell.source = released[gid].source
            if cell.cell_type != "code":
                continue
            cell.outputs = [new_output(o["output_type"], **{k: v for k, v in o.items() if k != "output_type"})
                            for o in outputs.get(cell.get("id"), [])]
            if first_code and result is not None:
                cell.outputs += [new_output("stream", name="stdout", text=n + "\n") for n in result.get("notes", [])]
            first_code = False
            if is_grade(cell):
                verdict = verdicts.get(gid)
                if result is None or verdict is None:
                    cell.outputs.append(new_output("error", ename="NotGraded", evalue="this cell was not graded",
                                                   traceback=["[grader] this cell was not graded (no result)"]))
                elif verdict["passed"]:
                    text = "[grader] passed: the grader's re-run, hidden cases included\n"
                    cell.outputs.append(new_output("stream", name="stdout", text=text))
                else:
                    reasons = verdict["reasons"]
                    cell.outputs.append(new_output("error", ename="GradedCheckFailed", evalue="; ".join(reasons)[:2000],
                                                   traceback=["[grader] failed in the grader's re-run:"] +
                                                   [f"  - {r}" for r in reasons[:12]]))
        return nb, resources
