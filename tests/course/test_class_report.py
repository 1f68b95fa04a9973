"""autograde.class_report: the one-page class summary, on rows whose counts are known by construction."""

import html.parser
from pathlib import Path

from autograde import class_report


def _row(student, assignment, score, top, failed="", status="graded", review=""):
    return dict(student=student, assignment=assignment, autograded=score, autograded_max=top, failed_cells=failed,
                status=status, review=review)


ROWS = [
    _row("ada", "ex1", 7, 7),
    _row("bob", "ex1", 3, 7, "check-a check-b"),
    _row("cy", "ex1", 5, 7, "check-b"),
    _row("ada", "ex2", 16, 16),
    _row("bob", "ex2", 0, 0, status="not graded: no readable notebook"),
    _row("cy", "ex2", 0, 0, status="not submitted"),
    _row("<script>alert(1)</script>", "ex1", 0, 7, "check-a check-b <img src=x>",
         status="graded; kernel died after cell 'x'", review="review: similarity 0.99 to ada"),
]


class _Parser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.links, self.images = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs["src"])


def test_failures_by_check_count_the_graded_notebooks_that_lost_each_cell():
    fails = {(a, c): (n, total) for a, c, n, total in class_report.failures_by_check(ROWS)}
    # ex1 has 4 graded notebooks; check-b lost by bob, cy and the hostile one, check-a by bob and the hostile one
    assert fails[("ex1", "check-b")] == (3, 4)
    assert fails[("ex1", "check-a")] == (2, 4)
    assert ("ex2", "check-a") not in fails  # the not-graded ex2 notebook counts nowhere
    assert list(fails)[0] == ("ex1", "check-b")  # worst first


def test_page_links_existing_feedback_escapes_student_text_and_embeds_the_plot(tmp_path: Path):
    for student, name in [("ada", "ex1"), ("ada", "ex2"), ("bob", "ex1")]:
        f = tmp_path / "feedback" / student / name / f"{name}.html"
        f.parent.mkdir(parents=True)
        f.write_text("feedback")
    page = class_report.write(ROWS, tmp_path, seconds=12.0).read_text()
    parser = _Parser()
    parser.feed(page)
    # only the three feedback files that exist are linked, by relative path, and each resolves
    assert sorted(parser.links) == ["feedback/ada/ex1/ex1.html", "feedback/ada/ex2/ex2.html",
                                    "feedback/bob/ex1/ex1.html"]
    assert all((tmp_path / href).is_file() for href in parser.links)
    # the hostile id and cell name are text, not markup: no script tag, one image (the histogram)
    assert "script" not in parser.tags and parser.images and len(parser.images) == 1
    assert parser.images[0].startswith("data:image/png;base64,")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "4 students, 5 of 7 notebooks graded in 12 s; 1 not submitted, 1 not graded; 1 flagged for review" in page
    assert "16 / 16" in page and "3 / 7" in page and "not graded" in page and "not submitted" in page
    assert "kernel died after cell …" in page  # the kinds table folds the quoted cell name


def test_an_empty_run_still_writes_a_page(tmp_path: Path):
    assert "No submissions were graded" in class_report.write([], tmp_path).read_text()
