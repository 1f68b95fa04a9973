"""Every syllabus item is covered by a graded cell, an experiment or a written answer, and every notebook follows the
course conventions (points stated and consistent, a spec above each solution, short locked checks, executed outputs)."""

import re
from pathlib import Path

import nbformat
import pytest

from autograde.pipeline import assignments

ROOT = Path(__file__).resolve().parents[2]
# The numbered items of the five exercises of the syllabus (seeds/004): 4 + 6 + 5 + 6 + 5.
SYLLABUS = [f"1.{i}" for i in range(1, 5)] + [f"2.{i}" for i in range(1, 7)] + [f"3.{i}" for i in range(1, 6)] + \
    [f"4.{i}" for i in range(1, 7)] + [f"5.{i}" for i in range(1, 6)]
ASSIGNMENTS = assignments(ROOT)


def coverage() -> list[dict]:
    rows = []
    for line in (ROOT / "solutions" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"\d\.\d", cells[0]):
            rows.append(dict(zip(["item", "point", "cell", "kind", "status"], cells, strict=True)))
    return rows


def notebook(item: str):
    name = next((n for n in ASSIGNMENTS if n.startswith(f"ex{item.split('.')[0]}_")), None)
    return name, (nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4) if name else None)


def kind_of(cell) -> str:
    meta = cell.metadata.get("nbgrader", {})
    if meta.get("grade") and meta.get("solution") and cell.cell_type == "markdown":
        return "written"
    if meta.get("grade") and cell.cell_type == "code" and not meta.get("solution"):
        return "autograded"
    if cell.cell_type == "code" and not meta:
        return "experiment"
    return "other"


def test_every_syllabus_item_has_a_row_and_written_assignments_are_done():
    rows = coverage()
    assert sorted({r["item"] for r in rows}) == sorted(SYLLABUS)
    for row in rows:
        assert row["kind"] in ("autograded", "experiment", "written"), row
        name, _ = notebook(row["item"])
        assert row["status"] == ("done" if name else "planned"), f"{row} (notebook {name})"


@pytest.mark.parametrize("row", [r for r in coverage() if r["status"] == "done"], ids=lambda r: r["cell"])
def test_covered_cell_exists_with_its_kind(row):
    _, nb = notebook(row["item"])
    cells = {c.id: c for c in nb.cells}
    assert row["cell"] in cells, f"cell id {row['cell']} not in the notebook of item {row['item']}"
    cell = cells[row["cell"]]
    assert kind_of(cell) == row["kind"]
    if row["kind"] == "experiment":  # executed: it produced output and no error
        assert cell.outputs and not [o for o in cell.outputs if o.output_type == "error"], row


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_every_graded_cell_is_in_the_coverage_table(name):
    nb = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    listed = {r["cell"] for r in coverage()}
    graded = {c.id for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")}
    assert graded <= listed, graded - listed


@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_notebook_conventions(name):
    nb = nbformat.read(ROOT / "solutions" / name / f"{name}.ipynb", as_version=4)
    grade = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert all(c.metadata["nbgrader"].get("points", 0) > 0 for c in grade)
    total = sum(c.metadata["nbgrader"]["points"] for c in grade)
    auto = sum(c.metadata["nbgrader"]["points"] for c in grade if c.cell_type == "code")
    header = nb.cells[0].source
    assert f"**Total: {total} points**" in header and f"{auto} autograded" in header, header[:300]
    ids = [c.id for c in nb.cells]
    assert len(ids) == len(set(ids))
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code":
            assert "execution" not in cell.metadata  # run-specific metadata would make the release drift
            assert not [o for o in cell.outputs if o.output_type == "error"], f"{cell.id} raised when executed"
            assert cell.execution_count is not None, f"{cell.id} was not executed (commit solutions executed)"
        if meta.get("solution") and cell.cell_type == "code":
            before = cell.source.split("### BEGIN SOLUTION")[0]
            assert '"""' in before, f"{cell.id}: no docstring spec above ### BEGIN SOLUTION"
            following = nb.cells[i + 1]
            assert following.metadata.get("nbgrader", {}).get("grade"), f"{cell.id} is not followed by its check"
            visible = following.source.split("### BEGIN HIDDEN TESTS")[0].strip().splitlines()
            assert 1 <= len(visible) <= 2, f"{following.id}: the visible check is {len(visible)} lines"
        if meta.get("grade") and cell.cell_type == "code":
            assert meta.get("locked"), cell.id
