"""Grading a class: staging every submission once, the sandboxed runs in parallel, the results nbgrader records.

:func:`stage` copies ``<submissions>/<student>/<assignment>/*.ipynb`` into the course's ``submitted/`` and says, per
student and assignment, what it found: a misnamed folder or notebook is matched to its assignment by the
nbgrader cells inside, an extra notebook is named in the status and left out, a duplicated nbgrader cell keeps its
id once, a corrupt file is "not readable". Every student folder gets one row per assignment.

:func:`run_students` then grades the students in parallel (``jobs`` at a time, one sandbox slot each). For one
student, in the trusted grader's process:

1. the feedback run: their notebooks, locked cells as released, in the sandbox (:mod:`autograde.kernel_run`);
2. the verdicts: own work and the trusted re-run (:mod:`autograde.verdicts`);
3. one result file per assignment in ``.grading/results/`` (outputs, verdicts, notes), written by this process.

The sandboxed code never writes the gradebook: one :class:`GradebookWriter` thread (a single writer) records finished
students with ``nbgrader autograde`` through :class:`autograde.preprocessors.ApplyRun` while the next students run;
afterwards ``generate_feedback`` renders them.
A tripwire checks, after every student, that no other student's submission changed; the writer checks, before
every write, that nothing but itself changed the gradebook.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import queue
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat

from autograde import sandbox
from autograde.cells import nbgrader_meta as _meta

KERNEL_LIMITS = sandbox.Limits(wall_seconds=900, file_bytes=64 * 2**20)  # an executed notebook is read up to this
CELL_TEXT_BYTES = 64 * 1024  # what the feedback keeps of one cell's text outputs
NOTEBOOK_OUTPUT_BYTES = 2 * 2**20  # and of a whole notebook's outputs (images included)
IMAGE_BYTES = 512 * 1024
PUBLIC_DATA = ("peftlab", "reports", "benchmarks")  # what of the repository the kernel sees (read-only)


def grade_ids(nb) -> set[str]:
    return {_meta(c)["grade_id"] for c in nb.cells if _meta(c).get("grade_id")}


# --- staging ---------------------------------------------------------------------------------------------------
def _read(path: Path):
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        return nb
    except Exception:  # noqa: BLE001 - any unreadable file is a status, never a crash
        return None


def match_assignment(folder: str, nbs: dict[str, object], releases: dict[str, object]) -> str | None:
    """The assignment a folder holds: its name (any case, or a prefix such as ``ex2``), else the nbgrader cells."""
    low = folder.lower()
    for name in releases:
        prefix = name.lower().split("_")[0]  # "ex2"
        if low == name.lower() or low == prefix or low.startswith(prefix + "_") or low.replace("-", "_") == name:
            return name
    for name, release in releases.items():
        ids = grade_ids(release)
        if any(nb is not None and len(grade_ids(nb) & ids) >= max(1, len(ids) // 2) for nb in nbs.values()):
            return name
    return None


def dedupe_cells(nb, release) -> list[str]:
    """Keep each nbgrader ``grade_id`` on one cell (the one with the release's cell id, else the first); the copies
    become ordinary cells. nbgrader refuses a notebook with a duplicated id. Returns the ids de-duplicated."""
    released_ids = {_meta(c).get("grade_id"): c.id for c in release.cells if _meta(c).get("grade_id")}
    by_id: dict[str, list] = {}
    for cell in nb.cells:
        if _meta(cell).get("grade_id"):
            by_id.setdefault(_meta(cell)["grade_id"], []).append(cell)
    fixed = []
    for gid, cells in by_id.items():
        if len(cells) < 2:
            continue
        keep = next((c for c in cells if c.id == released_ids.get(gid)), cells[0])
        for cell in cells:
            if cell is not keep:
                cell.metadata.pop("nbgrader", None)
        fixed.append(gid)
    return fixed


def stage(submissions: Path, course: Path, releases: dict[str, object]) -> dict[tuple[str, str], list[str]]:
    """Fill ``course/submitted`` from ``submissions``; ``{(student, assignment): notes}`` for every student folder
    and every assignment. A note starting with ``"not "`` means there is nothing to grade."""
    from autograde.pipeline import restore_deleted_cells

    target = course / "submitted"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    status: dict[tuple[str, str], list[str]] = {}
    for student_dir in sorted(p for p in submissions.iterdir() if p.is_dir() and not p.name.startswith(".")):
        student = student_dir.name
        found: dict[str, tuple[Path, object, list[str]]] = {}
        loose = [p for p in student_dir.glob("*.ipynb")]
        folders = sorted(p for p in student_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        for folder in folders + ([student_dir] if loose else []):
            paths = sorted(p for p in folder.glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
            nbs = {p.name: _read(p) for p in paths}
            name = match_assignment(folder.name, nbs, releases) if folder != student_dir else \
                match_assignment("", nbs, releases)
            if name is None:
                status.setdefault((student, "?"), []).append(
                    f"folder {folder.name!r} matches no assignment (expected one of {sorted(releases)}): not graded")
                continue
            notes = [] if folder.name == name else [f"folder {folder.name!r} graded as {name}"]
            want = f"{name}.ipynb"
            readable = {k: v for k, v in nbs.items() if v is not None}
            pick = want if want in readable else next(
                (k for k, v in readable.items() if grade_ids(v) & grade_ids(releases[name])), None)
            for k in nbs:
                if k != pick:
                    notes.append(f"{k}: {'not readable' if nbs[k] is None else 'also handed in, not graded'}")
            if pick is None:
                notes.append("not graded: no readable notebook of this assignment" if nbs else "not submitted")
            elif pick != want:
                notes.append(f"{pick} graded as {want}")
            if name in found:  # two folders for one assignment: the first (exact name sorts first) wins
                notes = [f"{folder.name}: a second folder for {name}, not graded"]
                status.setdefault((student, name), []).extend(notes)
                continue
            found[name] = (folder / pick if pick else None, readable.get(pick), notes)
        for name in releases:
            path, nb, notes = found.get(name, (None, None, ["not submitted"]))
            if nb is not None:
                dup = dedupe_cells(nb, releases[name])
                if dup:
                    notes.append(f"duplicated cells {dup}: the copies were graded as ordinary cells")
                dest = target / student / name / f"{name}.ipynb"
                dest.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, dest)
                restored = restore_deleted_cells(dest, course / "release" / name / f"{name}.ipynb")
                if restored:
                    notes.append(f"deleted cells {restored} were restored from the release")
            status[(student, name)] = notes
    return status


# --- the feedback run ------------------------------------------------------------------------------------------
SKIPPED = "# [grader] an experiment cell of the course: not run while grading (it decides no points)\n"


def public_notebook(nb, release, experiments: bool = False):
    """The student's notebook with every locked cell exactly as released: no hidden test is ever in it.

    Unless ``experiments``, the course's own experiment cells (code cells of the release without nbgrader
    metadata, left as released) are replaced by a one-line note: they decide no points, and they are most of a
    notebook's run time. The student's own cells (solutions, cells they added or changed) all run."""
    released = {_meta(c)["grade_id"]: c for c in release.cells if _meta(c).get("grade_id")}
    plain = {c.id: c.source for c in release.cells if c.cell_type == "code" and not _meta(c)}
    out = nbformat.reads(nbformat.writes(nb), as_version=4)
    for cell in out.cells:
        gid = _meta(cell).get("grade_id")
        ref = released.get(gid)
        if ref is not None and (_meta(ref).get("locked") or _meta(ref).get("grade") and not _meta(ref).get("solution")):
            cell.source, cell.metadata, cell.cell_type = ref.source, ref.metadata, ref.cell_type
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if not experiments and not _meta(cell) and plain.get(cell.id) == cell.source:
                cell.source = SKIPPED
    return out


def sanitize(outputs, budget: list[int]) -> list:
    """The outputs a feedback may show: text and PNG only, capped; errors and stderr as text (they decide nothing).

    ``budget`` is the notebook's remaining byte allowance (a one-element list, decremented)."""
    clean, text_bytes = [], 0
    for out in outputs if isinstance(outputs, list) else []:
        kind = out.get("output_type") if isinstance(out, dict) else None
        text = None
        if kind == "stream":
            raw = out.get("text", "")
            text = (raw if isinstance(raw, str) else "".join(map(str, raw)))
            text = text if out.get("name") == "stdout" else "".join("[stderr] " + line for line in
                                                                    text.splitlines(keepends=True))
        elif kind == "error":
            tb = out.get("traceback", [])
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", str(t)) for t in (tb if isinstance(tb, list) else [])][-20:]
            text = "\n".join(lines or [f"{out.get('ename')}: {out.get('evalue')}"]) + "\n"
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {}) if isinstance(out.get("data"), dict) else {}
            png = data.get("image/png")
            if isinstance(png, str) and len(png) <= IMAGE_BYTES and len(png) <= budget[0]:
                try:
                    base64.b64decode(png, validate=True)
                    clean.append(nbformat.v4.new_output("display_data", data={"image/png": png}))
                    budget[0] -= len(png)
                    continue
                except (binascii.Error, ValueError):
                    pass
            plain = data.get("text/plain")
            text = (plain if isinstance(plain, str) else "".join(map(str, plain or []))) + "\n" if plain else None
        if not text:
            continue
        room = min(CELL_TEXT_BYTES - text_bytes, budget[0])
        if len(text.encode()) > room:
            dropped = len(text.encode()) - max(room, 0)
            text = text.encode()[:max(room, 0)].decode(errors="ignore") + \
                f"\n[grader] output cut: {dropped:,} more bytes (the feedback keeps {CELL_TEXT_BYTES:,} per cell)\n"
        text_bytes += len(text.encode())
        budget[0] -= len(text.encode())
        clean.append(nbformat.v4.new_output("stream", name="stdout", text=text))
    return clean


def feedback_run(student: str, notebooks: dict[str, Path], releases: dict, root: Path, scratch: Path, slot: int,
                 cell_timeout: int, limits: sandbox.Limits = KERNEL_LIMITS,
                 experiments: bool = False) -> dict[str, dict]:
    """Run a student's notebooks in one sandbox; ``{assignment: {"outputs": {cell id: outputs}, "notes": [...]}}``."""
    sandbox.clean(scratch)
    scratch.mkdir(parents=True)
    argv = [sys.executable, "-I", "/grader/autograde/kernel_run.py", str(cell_timeout)]
    for a, path in notebooks.items():
        pub = public_notebook(nbformat.read(path, as_version=4), releases[a], experiments)
        (scratch / a).mkdir()
        nbformat.write(pub, scratch / a / f"{a}.ipynb")
        argv += [f"{sandbox.HOME}/{a}/{a}.ipynb", f"{sandbox.HOME}/{a}/executed.ipynb"]
    for p in scratch.rglob("*"):  # the sandbox's uid writes the executed notebooks beside the inputs
        shutil.chown(p, sandbox.UID_BASE + slot, sandbox.UID_BASE + slot)
    here = Path(__file__).resolve().parent
    binds = [(here / "kernel_run.py", "/grader/autograde/kernel_run.py")]
    binds += [(root / d, str(root / d)) for d in PUBLIC_DATA if (root / d).exists()]
    run = sandbox.run(argv, scratch, slot=slot, ro_binds=binds, limits=limits,
                      env={"PEFTLAB_GRADING": "1", "NBGRADER_EXECUTION": "autograde"})
    results = {}
    for a in notebooks:
        notes = [f"[grader] the notebook run was stopped: {h}" for h in run.hit]
        executed = scratch / a / "executed.ipynb"
        nb = None
        if executed.exists() and executed.stat().st_size <= limits.file_bytes:
            nb = _read(executed)
        if nb is None:
            notes.append("[grader] the notebook run left no readable outputs (the kernel did not start or "
                         "the run was stopped)")
        budget = [NOTEBOOK_OUTPUT_BYTES]
        outputs = {c.id: sanitize(c.get("outputs", []), budget) for c in (nb.cells if nb else [])
                   if c.cell_type == "code"}
        results[a] = {"outputs": {k: [dict(o) for o in v] for k, v in outputs.items()}, "notes": notes}
    sandbox.clean(scratch)
    return results


# --- the class, in parallel --------------------------------------------------------------------------------------
def _signature(course: Path, skip: str | None = None) -> dict[str, tuple]:
    """A cheap fingerprint (size, mtime, inode) of every submission except ``skip``'s (the gradebook: the writer's)."""
    sig = {}
    for p in sorted((course / "submitted").rglob("*")):
        if p.is_file() and not (skip and p.is_relative_to(course / "submitted" / skip)):
            st = p.stat()
            sig[str(p)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return sig


def content_digest(course: Path) -> str:
    """The submissions' content (the gradebook has its own check: :class:`GradebookWriter`)."""
    digest = hashlib.sha256()
    for p in sorted((course / "submitted").rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(course).as_posix().encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


class IntegrityError(RuntimeError):
    pass


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


class GradebookWriter:
    """The one writer of ``gradebook.db``, beside the sandboxed runs: records finished students in batches.

    ``record(students)`` (one ``nbgrader autograde`` for those students, :func:`autograde.pipeline.grade`) runs in
    this thread, one call at a time, as soon as ``min_batch`` students are done (the rest at :meth:`close`): the
    gradebook's writing overlaps the next students' runs instead of waiting for the last one. Before each write
    and at :meth:`close` the database must hold exactly what the last write left (a digest of its bytes): a
    change by anyone else voids the batch. ``record=None`` writes nothing (the same check, with no writes).
    """

    def __init__(self, course: Path, record=None, min_batch: int = 8):
        self.path, self.record, self.min_batch = course / "gradebook.db", record, max(min_batch, 1)
        self.expected = _file_digest(self.path)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="gradebook-writer", daemon=True)
        self.thread.start()

    def _check(self) -> None:
        if _file_digest(self.path) != self.expected:
            raise IntegrityError(f"{self.path.name} changed outside the grader's writer: the batch is void")

    def add(self, student: str) -> None:
        self.queue.put(student)

    def _loop(self) -> None:
        pending: list[str] = []
        done = False
        while not done:
            item = self.queue.get()
            while True:  # everything finished meanwhile joins this batch
                if item is None:
                    done = True
                else:
                    pending.append(item)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            if pending and (done or len(pending) >= self.min_batch) and self.error is None:
                try:
                    self._check()
                    if self.record is not None:
                        self.record(sorted(pending))
                    self.expected = _file_digest(self.path)
                except BaseException as e:  # noqa: BLE001 - reported by close(), in the grader's thread
                    self.error = e
                pending = []

    def close(self) -> None:
        """Record what is left, wait for the writer, and check the gradebook once more; raise what went wrong."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self._check()


def run_students(course: Path, root: Path, verdicts, students: dict[str, dict[str, Path]], jobs: int,
                 cell_timeout: int, similarity=None, experiments: bool = False,
                 record=None) -> dict[tuple[str, str], dict]:
    """Grade ``{student: {assignment: submitted notebook}}``, ``jobs`` students at a time; write the result files.

    ``record(students)``, if given, is called by the one :class:`GradebookWriter` with the students whose result
    files are complete, while the others are still being run.
    """
    from tqdm.auto import tqdm

    out_dir = course / ".grading" / "results"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    slots: queue.Queue[int] = queue.Queue()
    for i in range(max(jobs, 1)):
        slots.put(i)
    lock = threading.Lock()
    before = content_digest(course)
    writer = GradebookWriter(course, record, min_batch=4 * max(jobs, 1))
    summary: dict[tuple[str, str], dict] = {}

    def one(student: str) -> None:
        slot = slots.get()
        try:
            others = _signature(course, skip=student)
            t0 = time.perf_counter()
            notebooks = students[student]
            scratch = course / ".grading" / "scratch" / f"slot{slot}"
            runs = feedback_run(student, notebooks, verdicts.releases, root, scratch, slot, cell_timeout,
                                experiments=experiments)
            t1 = time.perf_counter()
            decided = verdicts.decide(notebooks, scratch, slot)
            seconds = (time.perf_counter() - t0) / max(len(notebooks), 1)
            timing = {"feedback_run_s": round(t1 - t0, 1), "verdicts_s": round(time.perf_counter() - t1, 1)}
            for a in notebooks:
                record = {"outputs": runs[a]["outputs"], "notes": runs[a]["notes"], "seconds": round(seconds, 1),
                          "student_timing": timing,
                          "verdicts": {g: {"passed": v.passed, "reasons": v.reasons} for g, v in decided[a].items()}}
                if similarity is not None:
                    record["similarity"] = similarity(student, a, notebooks[a])
                path = out_dir / student / f"{a}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record))
                with lock:
                    summary[(student, a)] = record
            changed = sorted(k for k, v in _signature(course, skip=student).items() if others.get(k) != v)
            changed += sorted(set(others) - set(_signature(course, skip=student)))
            if changed:
                raise IntegrityError(f"while {student} was graded, other files changed: {changed[:5]}")
            writer.add(student)
        finally:
            slots.put(slot)

    try:
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            futures = {pool.submit(one, s): s for s in sorted(students)}
            for fut in tqdm(as_completed(futures), total=len(futures), desc="grading", unit="student"):
                fut.result()  # an IntegrityError (or a grader bug) stops the batch loudly
    finally:
        writer.close()  # the last batch is recorded (or, after an error, the writer stops and says why)
    if content_digest(course) != before:
        raise IntegrityError("the submissions changed during grading: the batch is void")
    return summary
