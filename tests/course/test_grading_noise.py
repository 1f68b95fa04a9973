"""No warning or log line changes a grade: autograde/preprocessors.py against nbgrader's own scoring rule."""

from pathlib import Path

from nbformat.v4 import new_code_cell, new_notebook, new_output
from nbgrader.utils import determine_grade
from traitlets.config import Config

from autograde.preprocessors import StderrIsNotAVerdict

ROOT = Path(__file__).resolve().parents[2]


def _grade_cell(outputs, grade_id="check"):
    cell = new_code_cell("checks.check_something(f)")
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "points": 3,
                                 "grade_id": grade_id, "schema_version": 3}
    cell.outputs = outputs
    return cell


def _stderr(text):
    return new_output("stream", name="stderr", text=text)


def _stdout(text):
    return new_output("stream", name="stdout", text=text)


def _error():
    return new_output("error", ename="AssertionError", evalue="1 check(s) failed: shape", traceback=[])


def test_nbgrader_alone_zeroes_a_cell_that_only_warned():
    """The problem, in nbgrader's own rule: a passing check with a warning on stderr scores 0."""
    cell = _grade_cell([_stdout("  ok    shape\n"), _stderr("FutureWarning: `past_key_values` is deprecated\n")])
    assert determine_grade(cell) == (0, 3)


def test_stderr_is_kept_as_text_but_never_scored():
    warned = _grade_cell([_stdout("  ok    shape\n"), _stderr("UserWarning: careful\nsecond line\n")], "warned")
    failed = _grade_cell([_stderr("Failed to load CPU gemm_4bit_forward from kernels-community\n"), _error()],
                         "failed")
    other = new_code_cell("import bitsandbytes")  # not a grade cell: left as it is
    other.outputs = [_stderr("a log line\n")]
    nb = new_notebook(cells=[warned, failed, other])
    nb, _ = StderrIsNotAVerdict().preprocess(nb, {})
    assert determine_grade(nb.cells[0]) == (3, 3)  # the verdict: it passed
    assert determine_grade(nb.cells[1]) == (0, 3)  # a failing check still scores 0
    assert [o.name for o in nb.cells[0].outputs] == ["stdout", "stdout"]
    assert nb.cells[0].outputs[1].text == "[stderr] UserWarning: careful\n[stderr] second line\n"
    assert nb.cells[1].outputs[0].text.startswith("[stderr] Failed to load") and nb.cells[1].outputs[1].output_type \
        == "error"
    assert nb.cells[2].outputs[0].name == "stderr"


def test_the_course_config_records_the_sandboxed_run_in_place_of_execute_and_both_are_enabled():
    """No student code runs in nbgrader's process: ApplyRun takes Execute's place (autograde/batch.py ran the
    notebook in a sandbox); nbconvert skips a preprocessor whose ``enabled`` is False, so both must be on."""
    config = Config()
    exec(compile((ROOT / "autograde" / "nbgrader_config.py").read_text(), "nbgrader_config.py", "exec"),
         {"get_config": lambda: config})
    pps = list(config.Autograde.autograde_preprocessors)
    assert pps[:2] == ["autograde.preprocessors.ApplyRun", "autograde.preprocessors.StderrIsNotAVerdict"]
    assert "nbgrader.preprocessors.Execute" not in pps
    assert "nbgrader.preprocessors.SaveAutoGrades" in pps[2:]
    from nbconvert.exporters import NotebookExporter

    exporter = NotebookExporter()
    for name in pps[:2]:
        exporter.register_preprocessor(name)
    assert [type(p).__name__ for p in exporter._preprocessors if p.enabled] == ["ApplyRun", "StderrIsNotAVerdict"]
    # nbgrader's defaults, in order, Execute replaced (a new nbgrader with other defaults shows up here)
    from nbgrader.converters import Autograde

    defaults = [c.__name__ for c in Autograde().autograde_preprocessors]
    assert ["Execute"] + [p.rsplit(".", 1)[1] for p in pps if not p.startswith("autograde.")] == defaults
