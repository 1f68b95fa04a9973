"""Issue #13, attacked as a hostile student would: every row of its table, built (tests/course/hostile.py) and graded.

One ``python -m autograde grade --jobs 2`` grades the whole hostile class (module fixture ``graded``); a second,
small class is graded, killed mid-batch and graded again (``rerun``). The course folders start from a copy of
build/course when it is built, as the round trip of test_course.py does. When an assertion here fails, the grader
is wrong: fix the grader, never the attack.
"""

import csv
import hashlib
import html
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autograde import pipeline, sandbox
from autograde.similarity import THRESHOLD

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: the attack builders beside this file
import hostile  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSIGNMENTS = pipeline.assignments(ROOT)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sandbox.available() is not None, reason=f"grading needs its sandbox: "
                                                                          f"{sandbox.available()}")]


def _course(tmp: Path) -> Path:
    course = tmp / "course"
    if pipeline.is_built(ROOT, ROOT / pipeline.BUILD):  # the release already built: no nbgrader generate here
        shutil.copytree(ROOT / pipeline.BUILD, course)
    return course


def _grade(subs: Path, course: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autograde", "grade", str(subs), "--course-dir", str(course),
                             "--jobs", "2", "--timeout", "60"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **popen)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _sandbox_processes(marker: str | None = None) -> list[tuple[int, int, str]]:
    """``(pid, uid, command line)`` of the live processes of the sandbox uids (61000 and up)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            uid = int(next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("Uid:")).split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, StopIteration, ValueError):
            continue
        if uid >= sandbox.UID_BASE and (marker is None or marker in cmd):
            found.append((int(proc.name), uid, cmd))
    return found


def _rows(course: Path) -> list[dict]:
    with open(course / "scores.csv") as f:
        return list(csv.DictReader(f))


def _text(path: Path) -> str:
    """A feedback HTML as the student reads it: tags (the syntax highlighting's spans) removed, entities decoded."""
    raw = path.read_text(errors="replace")
    return raw + "\n" + html.unescape(re.sub(r"<[^>]+>", "", raw))


class Graded:
    def __init__(self, tmp: Path):
        self.subs, self.tmp = tmp / "submissions", tmp
        self.expect = hostile.build_class(self.subs)
        self.all_names = hostile.everything_untouched(self.subs)  # student hx_all: every assignment, untouched
        self.course = _course(tmp)
        self.peftlab_before = _tree_digest(ROOT / "peftlab")
        start = time.time()
        proc = _grade(self.subs, self.course)
        self.log, _ = proc.communicate(timeout=1500)
        self.returncode, self.seconds = proc.returncode, time.time() - start
        self.survivors = _sandbox_processes(hostile.DAEMON_MARKER)
        for pid, _, _ in self.survivors:  # ours: the payload of hostile.DAEMON; the assertion below reports them
            os.kill(pid, signal.SIGKILL)
        self.peftlab_after = _tree_digest(ROOT / "peftlab")
        self.rows = _rows(self.course) if (self.course / "scores.csv").exists() else []
        self.by = {(r["student"], r["assignment"]): r for r in self.rows}

    def row(self, student: str) -> dict:
        return self.by[student, self.expect[student].assignment]

    def feedback(self, student: str, name: str | None = None) -> Path:
        name = name or self.expect[student].assignment
        return self.course / "feedback" / student / name / f"{name}.html"

    def autograded(self, student: str, name: str | None = None) -> Path:
        name = name or self.expect[student].assignment
        return self.course / "autograded" / student / name / f"{name}.ipynb"


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Graded:
    g = Graded(tmp_path_factory.mktemp("hostile"))
    assert g.returncode == 0, g.log[-6000:]
    print(f"graded the hostile class in {g.seconds:.0f} s")
    return g


# --- (1)-(3), (7), (10)-(13): the points of every attacker ------------------------------------------------------
def test_every_attacker_and_classmate_gets_exactly_the_expected_points(graded):
    """(1) no-op patches, (2) stolen solution, (3) closure / default argument / exec'd peftlab (that piece 0),
    (4) the vandal's classmates unchanged (the scores a run without the attacker gives: full marks for a solution),
    (10) os._exit last, (11) 6 GiB, (12) 50 MB, (13) a pasted check cell, (14) misnamed folders: points kept."""
    wrong = {}
    for student, exp in graded.expect.items():
        row = graded.by.get((student, exp.assignment))
        if row is None:
            wrong[student] = "missing from scores.csv"
            continue
        failed = set(row["failed_cells"].split())
        if exp.points is not None and float(row["autograded"] or 0) != exp.points:
            wrong[student] = f"{exp.attack}: {row['autograded']} points, expected {exp.points} ({row['status']})"
        elif not set(exp.failed) <= failed:
            wrong[student] = f"{exp.attack}: {sorted(set(exp.failed) - failed)} passed; failed: {sorted(failed)}"
        elif not row["status"].startswith("graded"):
            wrong[student] = f"{exp.attack}: status {row['status']!r}"
    assert not wrong, wrong


@pytest.mark.parametrize("student", ["hx_patcher", "hx_a_vandal"])
def test_stub_attackers_score_zero_on_every_cell(graded, student):
    row = graded.row(student)
    assert float(row["autograded"]) == 0, row
    assert sorted(row["failed_cells"].split()) == ["check_bert_param_count", "check_full_finetune_bytes",
                                                   "check_storage_bytes"], row


def test_the_attacks_really_ran_in_the_feedback_run(graded):
    """Else the zeros above prove nothing: the payloads' own prints are in their feedback."""
    vandal = _text(graded.feedback("hx_a_vandal"))
    assert "detached" in vandal and "stolen from" in vandal
    assert "could not patch" in vandal or "patched" in vandal
    assert "stolen from None" in vandal, "the student found a copy of the instructor's notebook"
    assert not re.search(r"^patched ", vandal, flags=re.M), "the student wrote into peftlab"


def test_reference_code_is_named_in_the_feedback(graded):
    """(3) own work: the feedback says why the piece scored 0."""
    for student in ("hx_closure", "hx_getsource"):
        text = _text(graded.feedback(student))
        assert "not your own work" in text or "own work" in text, student


# --- (4)-(6): classmates, survivors, peftlab ------------------------------------------------------------------
def test_the_vandal_did_not_touch_a_classmate(graded):
    """(4) gradebook rows of every other student as expected, their autograded notebooks and feedback there."""
    for student in graded.expect:
        if student == "hx_a_vandal":
            continue
        assert graded.autograded(student).exists(), student
        assert graded.feedback(student).exists(), student
    with sqlite3.connect(graded.course / "gradebook.db") as db:
        scores = dict(db.execute(
            "SELECT student.id, SUM(COALESCE(grade.auto_score, 0)) FROM grade "
            "JOIN submitted_notebook ON grade.notebook_id = submitted_notebook.id "
            "JOIN submitted_assignment ON submitted_notebook.assignment_id = submitted_assignment.id "
            "JOIN student ON submitted_assignment.student_id = student.id "
            "JOIN assignment ON submitted_assignment.assignment_id = assignment.id "
            "WHERE assignment.name = 'ex1_motivation' GROUP BY student.id").fetchall())
    for victim in ("hx_b_victim", "hx_sample", "hx_snoop", "hx_short", "hx_misnamed"):
        assert scores.get(victim) == hostile.EX1_MAX, (victim, scores.get(victim))


def test_no_process_of_the_sandbox_survives_the_grade_command(graded):
    """(5) the detached process (start_new_session, double fork) died with its sandbox."""
    assert graded.survivors == [], graded.survivors
    assert float(graded.row("hx_a_vandal")["autograded"]) == 0
    with open(graded.course / "grades.csv") as f:
        mine = [r for r in csv.DictReader(f) if r.get("student_id") == "hx_a_vandal"
                and r.get("assignment") == hostile.EX1]
    assert len(mine) == 1 and float(mine[0]["raw_score"] or 0) == 0, mine


def test_peftlab_is_unchanged_and_the_next_student_unaffected(graded):
    """(6) the installed package is read-only in the sandbox; the untouched student after the writer scores 0."""
    assert graded.peftlab_after == graded.peftlab_before
    assert float(graded.by["hx_all", hostile.EX1]["autograded"]) == 0


# --- (7): the sample solution, flagged --------------------------------------------------------------------------
def test_the_sample_solution_gets_full_marks_and_is_flagged(graded):
    row = graded.row("hx_sample")
    assert float(row["autograded"]) == hostile.EX1_MAX, row
    assert row["similarity"] and float(row["similarity"]) >= THRESHOLD, row
    assert "similarity" in row["review"], row


# --- (8), (9): nothing of the answers reaches a student -------------------------------------------------------
def test_no_feedback_holds_a_hidden_test_or_solution_code(graded):
    """(8) every assignment's feedback (the untouched student hx_all) and every attacker's: no hidden-test line;
    no line of the instructor's solution code in a feedback of a student who did not write it."""
    secrets = hostile.secret_lines()
    leaks = {}
    for name in graded.all_names:
        path = graded.feedback("hx_all", name)
        assert path.exists(), path
        text = _text(path)
        found = [ln for ln in secrets[name]["hidden"] | secrets[name]["solution"] if ln in text]
        if "Reference answer" in text:
            found.append("Reference answer")
        if found:
            leaks[name] = found[:5]
    for student, exp in graded.expect.items():
        path = graded.feedback(student)
        if path.exists():
            text = _text(path)
            found = [ln for ln in secrets[exp.assignment]["hidden"] if ln in text]
            if found:
                leaks[student] = found[:5]
    assert not leaks, leaks


def test_the_snooper_sees_no_classmate_answer_or_instructor_command(graded):
    """(9) os.walk of /, /proc/*/cmdline and environ, the environment, other folders: printed into the feedback."""
    text = _text(graded.feedback("hx_snoop"))
    assert "cmdline" in text and "environ" in text  # the payload ran
    others = sorted({s for s in graded.expect if s != "hx_snoop"} | {"hx_all"})
    assert [s for s in others if s in text] == []
    hidden = [ln for lines in hostile.secret_lines().values() for ln in lines["hidden"] if ln in text]
    assert hidden == []
    for secret in ("--course-dir", "autograde grade", str(graded.subs), "gradebook.db", "BEGIN HIDDEN TESTS"):
        assert secret not in text, secret


def test_the_snooper_sees_no_command_line_of_the_grader(graded):
    """(9) the sandbox's own command line (bubblewrap's, pid 1 of its namespace) must not name the grader's host
    folders (the course folder, the scratch path); what runs inside (setpriv, prlimit, the kernel) may show."""
    text = _text(graded.feedback("hx_snoop"))
    leaks = [s for s in (str(graded.course), "--ro-bind", "--bind ") if s in text]
    assert leaks == [], [text[max(text.index(s) - 100, 0):text.index(s) + 100] for s in leaks]


# --- (10)-(12): accidents, with a clear line ------------------------------------------------------------------
def test_memory_limit_is_reported(graded):
    assert "MemoryError" in _text(graded.feedback("hx_accidents"))


def test_a_huge_output_is_cut_and_said_so(graded):
    """(12) 50 MB printed: the autograded notebook and the feedback stay under 3 MB and say the output was cut."""
    for path in (graded.autograded("hx_bigprint"), graded.feedback("hx_bigprint")):
        assert path.stat().st_size < 3 * 2**20, (path, path.stat().st_size)
    assert "output cut" in _text(graded.feedback("hx_bigprint"))


# --- (13), (14): status lines, every student once --------------------------------------------------------------
def test_status_lines_name_what_was_odd(graded):
    for student, exp in graded.expect.items():
        for word in exp.status:
            assert word in graded.row(student)["status"], (student, graded.row(student)["status"])


def test_every_student_appears_once_per_assignment(graded):
    students = sorted(p.name for p in graded.subs.iterdir() if p.is_dir())
    counts = {}
    for r in graded.rows:
        counts[r["student"], r["assignment"]] = counts.get((r["student"], r["assignment"]), 0) + 1
    assert {k: v for k, v in counts.items() if v != 1} == {}
    assert sorted(counts) == sorted((s, a) for s in students for a in ASSIGNMENTS)


# --- (15): graded again, killed mid-batch, graded again ---------------------------------------------------------
@pytest.fixture(scope="module")
def rerun(graded, tmp_path_factory):
    """A small class: graded (1), graded again and killed after two of its three students (2), graded again (3).
    Grades (1) and (3) must be identical: a second run, and one after a killed run."""
    tmp = tmp_path_factory.mktemp("rerun")
    subs = tmp / "submissions"
    kinds = {"hx_r1_solution": "solution", "hx_r2_untouched": "untouched", "hx_r3_partial": "partial"}
    for student, kind in kinds.items():
        hostile._write(subs, student, hostile.EX1, hostile.example(kind))
    course = _course(tmp)
    (course / ".grading").mkdir(parents=True, exist_ok=True)
    for p in [graded.course / ".grading" / "salt", *(graded.course / ".grading").glob("reference-*.json")]:
        shutil.copy(p, course / ".grading" / p.name)  # the same salt: the solution's answers are not recomputed
    first = _grade(subs, course)
    log1, _ = first.communicate(timeout=900)
    assert first.returncode == 0, log1[-4000:]
    rows1 = _rows(course)
    killed = _grade(subs, course, start_new_session=True)
    results = course / ".grading" / "results"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if len(list(results.glob("*/*.json"))) >= 2:
            break
        time.sleep(0.5)
    stopped_early = killed.poll() is None
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    time.sleep(1)
    leftovers = [p for p in _sandbox_processes() if str(course) in p[2]]
    third = _grade(subs, course)
    log3, _ = third.communicate(timeout=900)
    assert third.returncode == 0, log3[-4000:]
    return dict(course=course, students=sorted(kinds), rows1=rows1, rows3=_rows(course), stopped_early=stopped_early,
                leftovers=leftovers)


def _scores(rows):
    return sorted((r["student"], r["assignment"], r["autograded"], r["failed_cells"], r["status"]) for r in rows)


def test_grading_again_gives_identical_scores(rerun):
    assert rerun["stopped_early"], "the grade command ended before it could be killed"
    assert _scores(rerun["rows1"]) == _scores(rerun["rows3"])


def test_a_killed_batch_graded_again_leaves_every_grade_once(rerun):
    from nbgrader.api import Gradebook

    assert rerun["leftovers"] == []
    keys = [(r["student"], r["assignment"]) for r in rerun["rows3"]]
    assert len(keys) == len(set(keys)) == len(rerun["students"]) * len(ASSIGNMENTS)
    with Gradebook(f"sqlite:///{rerun['course'] / 'gradebook.db'}") as gb:
        subs = [(s.student.id, s.assignment.name) for a in gb.assignments for s in gb.assignment_submissions(a.name)]
        assert sorted(subs) == sorted(set(subs))
        assert sorted(s for s, a in subs if a == hostile.EX1) == rerun["students"]
        for s in rerun["students"]:
            grades = gb.find_submission_notebook(hostile.EX1, hostile.EX1, s).grades
            assert sorted(g.name for g in grades) == sorted(set(g.name for g in grades))
    by = {r["student"]: float(r["autograded"]) for r in rerun["rows3"] if r["assignment"] == hostile.EX1}
    assert by["hx_r1_solution"] == hostile.EX1_MAX
    assert by["hx_r2_untouched"] == 0
    assert by["hx_r3_partial"] == hostile.EX1_MAX - 2  # autograde.pipeline.PARTIAL: check_storage_bytes fails
