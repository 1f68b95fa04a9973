"""The class on one page: ``<course>/summary.html``, written by ``python -m autograde grade`` beside scores.csv.

An instructor opens it in a browser, offline (the plots are embedded PNGs, no script, no web font):

1. the numbers of the batch (students, notebooks graded, not graded, flagged for review);
2. the score distribution of every assignment (share of its autograded points; one histogram each);
3. the failures by check: for every graded cell, how many graded notebooks lost its points, worst first;
4. what went wrong, by kind (the statuses of scores.csv, with ids and numbers folded);
5. one row per student: score per assignment, linked to that student's feedback HTML, and any status or review flag.

Student ids, statuses and cell names come from submissions (folder and cell names a student chose): everything
is escaped, and links are relative paths inside the course folder, built only for feedback files that exist.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import re
import urllib.parse
from pathlib import Path


def kind(status_part: str) -> str:
    """A status folded into its kind: quoted names, bracketed lists and numbers become '…'."""
    return re.sub(r"[\"'].*?[\"']|\[.*?\]|\d+", "…", status_part)[:70]


def failures_by_check(rows: list[dict]) -> list[tuple[str, str, int, int]]:
    """(assignment, cell, notebooks that lost its points, graded notebooks of that assignment), worst first."""
    graded = [r for r in rows if r.get("status", "").startswith("graded") and r.get("autograded_max")]
    per_assignment = collections.Counter(r["assignment"] for r in graded)
    lost = collections.Counter((r["assignment"], c) for r in graded for c in str(r.get("failed_cells", "")).split())
    return sorted(((a, c, n, per_assignment[a]) for (a, c), n in lost.items()),
                  key=lambda t: (-t[2] / t[3], t[0], t[1]))


def _histograms(rows: list[dict], assignments: list[str]) -> str:
    """One histogram per assignment of the share of autograded points, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(assignments), figsize=(2.6 * len(assignments), 2.6), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], assignments, strict=True):
        shares = [100 * r["autograded"] / r["autograded_max"] for r in rows
                  if r["assignment"] == name and r.get("status", "").startswith("graded") and r.get("autograded_max")]
        ax.hist(shares, bins=[10 * i for i in range(11)], color="#4c72b0", edgecolor="white")
        ax.set_title(f"{name}\n{len(shares)} graded", fontsize=9)
        ax.set_xlabel("autograded points (%)", fontsize=8)
        ax.set_xlim(0, 100)
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("notebooks", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _number(x) -> str:
    return f"{float(x):g}"


def render(rows: list[dict], course: Path, seconds: float | None = None) -> str:
    """The page's HTML for the scores.csv rows of one grading run in ``course``."""
    esc = html.escape
    if not rows:
        return "<!doctype html><meta charset='utf-8'><title>Class summary</title><p>No submissions were graded.</p>"
    assignments = sorted({r["assignment"] for r in rows})
    students = sorted({r["student"] for r in rows})
    graded = [r for r in rows if r.get("status", "").startswith("graded")]
    flagged = [r for r in rows if r.get("review")]
    absent = [r for r in rows if r.get("status", "").startswith("not submitted")]
    kinds = collections.Counter(kind(p) for r in rows for p in r.get("status", "").split("; ")[1:])
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Class summary</title><style>",
           "body{font-family:sans-serif;margin:2em;max-width:80em} table{border-collapse:collapse;margin:1em 0}",
           "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em} th{background:#eee}",
           "td.num{text-align:right} .low{background:#fbe3e3} .absent{color:#888} .flag{color:#a33}",
           "img{max-width:100%}</style></head><body>",
           "<h1>Class summary</h1>",
           f"<p>{len(students)} students, {len(graded)} of {len(rows)} notebooks graded"
           + (f" in {seconds:.0f} s" if seconds is not None else "")
           + f"; {len(absent)} not submitted, {len(rows) - len(graded) - len(absent)} not graded; "
             f"{len(flagged)} flagged for review. "
             "Scores are the autograded points; written answers are graded by hand in nbgrader's formgrader.</p>",
           "<h2>Score distribution</h2>"]
    if graded:
        out.append(f"<img alt='histogram of autograded scores per assignment' "
                   f"src='data:image/png;base64,{_histograms(rows, assignments)}'>")
    out.append("<h2>Failures by check</h2>")
    fails = failures_by_check(rows)
    if fails:
        out.append("<table><tr><th>assignment</th><th>graded cell</th><th>notebooks that lost its points</th></tr>")
        out += [f"<tr><td>{esc(a)}</td><td>{esc(c)}</td><td class='num'>{n} of {total} ({100 * n / total:.0f}%)"
                f"</td></tr>" for a, c, n, total in fails]
        out.append("</table>")
    else:
        out.append("<p>No graded notebook lost points on any check.</p>")
    out.append("<h2>What went wrong, by kind</h2>")
    if kinds or flagged:
        out.append("<table><tr><th>kind</th><th>notebooks</th></tr>")
        out += [f"<tr><td>{esc(k)}</td><td class='num'>{n}</td></tr>" for k, n in kinds.most_common()]
        if flagged:
            out.append(f"<tr><td>flagged for review</td><td class='num'>{len(flagged)}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>Nothing: every notebook was graded without a note.</p>")
    out.append("<h2>Students</h2><table><tr><th>student</th>"
               + "".join(f"<th>{esc(a)}</th>" for a in assignments) + "<th>notes</th></tr>")
    by_key = {(r["student"], r["assignment"]): r for r in rows}
    for student in students:
        cells, notes = [], []
        for a in assignments:
            r = by_key.get((student, a))
            if r is None:
                cells.append("<td>—</td>")
                continue
            if r.get("status", "").startswith("graded") and r.get("autograded_max"):
                text = f"{_number(r['autograded'])} / {_number(r['autograded_max'])}"
                low = " class='num low'" if float(r["autograded"]) < 0.5 * float(r["autograded_max"]) else \
                    " class='num'"
            elif r.get("status", "").startswith("not submitted"):
                text, low = "not submitted", " class='absent'"
            else:
                text, low = "not graded", " class='low'"
            feedback = course / "feedback" / student / a / f"{a}.html"
            if feedback.is_file():
                href = urllib.parse.quote(feedback.relative_to(course).as_posix())
                text = f"<a href='{esc(href)}'>{esc(text)}</a>"
            else:
                text = esc(text)
            cells.append(f"<td{low}>{text}</td>")
            extra = "; ".join(r.get("status", "").split("; ")[1:])
            if not r.get("status", "").startswith(("graded", "not submitted")):
                extra = r.get("status", "")
            if extra:
                notes.append(f"{esc(a)}: {esc(extra)}")
            if r.get("review"):
                notes.append(f"<span class='flag'>{esc(a)}: {esc(r['review'])}</span>")
        out.append(f"<tr><td>{esc(student)}</td>{''.join(cells)}<td>{'<br>'.join(notes)}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out)


def write(rows: list[dict], course: Path, seconds: float | None = None) -> Path:
    """Write ``course/summary.html`` and return its path."""
    path = Path(course) / "summary.html"
    path.write_text(render(rows, Path(course), seconds), encoding="utf-8")
    return path
