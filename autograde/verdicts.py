"""Verdicts no student kernel can change: the trusted re-run of every check cell, and the own-work check.

For one student and assignment the grader (this module, in its own process) decides each autograded cell:

1. **Own work** (:mod:`autograde.ownwork`, static, on the source): the graded objects of the cell, followed
   through the student's helpers, must not reach peftlab, HF peft, bitsandbytes (or what the cell's
   ``assert_own_work`` forbids) nor patch the environment; a finding fails the cell and says why.
2. **Re-run** (:mod:`autograde.worker` in :mod:`autograde.sandbox`): a fresh process that holds only the student's
   cells, no peftlab and no grader state answers every checker call of the cell (:mod:`autograde.plan`, hidden
   calls included) on inputs drawn from a salt chosen at grading time; the instructor's solution answers the same
   calls on the same salt (once per batch). Equal answers (:func:`autograde.observe.compare`) pass.

The in-kernel checks still run in the student's notebook (its outputs are the feedback), but they decide nothing.
A worker that dies or hangs on one unit (a cell or a call) is restarted with that unit skipped, so an
``os._exit`` in a late cell costs only what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from autograde import sandbox
from autograde.cells import nbgrader_meta as _meta
from autograde.cells import student_source
from autograde.observe import TOLERANCES, compare, decode, encode, load
from autograde.plan import Call, OwnWork, notebook_plan

GRADER_FILES = ("__init__.py", "worker.py", "plan.py", "observe")  # what of autograde/ the worker sees
UNIT_SECONDS = 60  # one cell or one checker call of the re-run (the worker's alarm; the wall clock below backs it)
RESTARTS = 3


@dataclass
class CellVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # for the feedback: what failed, never the expected values


def setup_source(release_nb) -> str:
    """The notebook's setup cell (its first code cell), as released: what binds ``peftlab``, ``checks``, ..."""
    return next((c.source for c in release_nb.cells if c.cell_type == "code"), "")


MAGIC = re.compile(r"^(\s*)(%|!).*$", re.M)


def without_magics(source: str) -> str:
    r"""IPython's ``%magic`` and ``!shell`` lines as ``pass``: the re-run and the own-work check read Python only.

    >>> [line.split("#")[0] for line in without_magics("%matplotlib inline\nx = 1\n  !ls").split("\n")]
    ['pass  ', 'x = 1', '  pass  ']
    """
    return MAGIC.sub(lambda m: m.group(1) + "pass  # (an IPython magic line, left out by the grader)", source)


def student_code(nb, release_nb) -> list[tuple[str, str]]:
    """``(name, source)`` of the cells the student wrote, in their notebook's order: the solution cells (by
    nbgrader id) and the code cells they added (ids the release does not have). Locked cells are not theirs."""
    released = {c.id: c for c in release_nb.cells}
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        meta = _meta(cell)
        if meta.get("solution") and not meta.get("grade"):
            out.append((meta.get("grade_id", cell.id), without_magics(cell.source)))
        elif cell.id not in released and not meta.get("locked") and not meta.get("grade"):
            out.append((f"added cell {cell.id}", without_magics(cell.source)))
    return out


def units(nb, plans: dict[str, tuple[list[Call], list[OwnWork]]], cells: list[tuple[str, str]]) -> list[dict]:
    """The worker's job for one notebook, in its order: the student's cells, and after each check cell its calls."""
    by_name = dict(cells)
    seen, out = set(), []

    def add_calls(grade_id):
        for i, call in enumerate(plans[grade_id][0]):
            out.append({"id": f"{grade_id}#{i}", "kind": "call", "check": call.check, "objects": list(call.objects),
                        "args": encode(tuple(call.args)), "kwargs": encode(dict(call.kwargs))})
        seen.add(grade_id)

    for cell in nb.cells:
        meta = _meta(cell)
        name = meta.get("grade_id", cell.id) if meta else f"added cell {cell.id}"
        if cell.cell_type == "code" and meta.get("grade") and name in plans and name not in seen:
            add_calls(name)
        elif name in by_name:
            out.append({"id": name, "kind": "cell", "name": name, "source": by_name.pop(name)})
    for grade_id in plans:  # a check cell the notebook lost: its calls still run, last
        if grade_id not in seen:
            add_calls(grade_id)
    return out


class Verdicts:
    """The trusted re-run of a course folder's assignments: one instance per grading batch (one salt)."""

    def __init__(self, root: Path, course: Path, salt: int, unit_seconds: int = UNIT_SECONDS):
        from peftlab.models import ARCH_CONFIGS

        self.root, self.course, self.salt, self.unit_seconds = root, course, salt, unit_seconds
        self.arch = ARCH_CONFIGS
        self.work = course / ".grading"
        self.plans, self.releases, self.references = {}, {}, {}
        for nb_path in sorted((course / "source").glob("*/*.ipynb")):
            name = nb_path.parent.name
            self.plans[name] = notebook_plan(nbformat.read(nb_path, as_version=4))
            self.releases[name] = nbformat.read(course / "release" / name / nb_path.name, as_version=4)
        load()

    # --- the worker ------------------------------------------------------------------------------------------
    def _binds(self) -> list[tuple[Path, str]]:
        here = Path(__file__).resolve().parent
        return [(here / f, f"/grader/autograde/{f}") for f in GRADER_FILES]

    def _hidden_packages(self) -> list[Path]:
        """peftlab's folder when it is installed into site-packages (an editable install is not mounted at all)."""
        import peftlab

        where = Path(peftlab.__file__).resolve().parent
        return [where] if str(where).startswith(sys.prefix) else []

    def observe(self, jobs: dict[str, list[dict]], scratch: Path, slot: int) -> dict[str, dict[str, dict]]:
        """Run ``{assignment: units}`` in sandboxed workers; ``{assignment: {unit id: record}}``.

        A worker that stops early is restarted without the unit it was on (at most :data:`RESTARTS` times)."""
        results: dict[str, dict[str, dict]] = {a: {} for a in jobs}
        skip: dict[str, set] = {a: set() for a in jobs}
        for _attempt in range(RESTARTS + 1):
            todo = [a for a in jobs if len(results[a]) < len(jobs[a])]
            if not todo:
                break
            sandbox.clean(scratch)
            scratch.mkdir(parents=True)
            job = {"salt": self.salt, "arch": self.arch, "unit_seconds": self.unit_seconds,
                   "assignments": [{"name": a, "units": jobs[a], "skip": sorted(skip[a])} for a in todo]}
            (scratch / "job.json").write_text(json.dumps(job))
            limits = _limits(sum(len(jobs[a]) for a in todo), self.unit_seconds)
            run = sandbox.run([sys.executable, "-I", "/grader/autograde/worker.py", f"{sandbox.HOME}/job.json",
                               f"{sandbox.HOME}/results.jsonl"], scratch, slot=slot, ro_binds=self._binds(),
                              hide=self._hidden_packages(), limits=limits)
            records = _read_records(scratch / "results.jsonl")
            owner = {u["id"]: a for a in todo for u in jobs[a]}
            started = None
            for rec in records:
                if "start" in rec and rec["start"] in owner:
                    started = rec["start"]
                elif "unit" in rec and rec["unit"] in owner:
                    results[owner[rec["unit"]]].setdefault(rec["unit"], rec)
                    started = None if rec["unit"] == started else started
            if started is not None:  # died or hung on this unit
                a = owner[started]
                skip[a].add(started)
                why = "; ".join(run.hit) or f"the process ended (exit code {run.returncode})"
                results[a].setdefault(started, {"unit": started, "error": f"the grader's re-run stopped here: {why}"})
            elif all(len(results[a]) >= len(jobs[a]) for a in todo):
                break
            elif run.returncode != 0 or run.hit:  # stopped before any unit (a broken environment): do not loop
                for a in todo:
                    for u in jobs[a]:
                        results[a].setdefault(u["id"], {"unit": u["id"], "error": "the re-run did not start: " +
                                                        (run.stderr.decode(errors="replace")[-300:] or "no output")})
        sandbox.clean(scratch)
        return results

    def reference(self, assignment: str) -> dict[str, object]:
        """The solution's observations on this batch's salt (computed once, kept in ``.grading/``)."""
        if assignment in self.references:
            return self.references[assignment]
        source = nbformat.read(self.course / "source" / assignment / f"{assignment}.ipynb", as_version=4)
        cells = [(_meta(c)["grade_id"], student_source(c.source)) for c in source.cells
                 if c.cell_type == "code" and _meta(c).get("solution") and not _meta(c).get("grade")]
        job = units(source, self.plans[assignment], cells)
        digest = hashlib.sha256(json.dumps([self.salt, job, _code_digest()], sort_keys=True).encode()).hexdigest()[:16]
        cache = self.work / f"reference-{assignment}-{digest}.json"
        if cache.exists():
            records = json.loads(cache.read_text())
        else:
            records = self.observe({assignment: job}, self.work / "reference-scratch", slot=99)[assignment]
            failed = {k: r["error"] for k, r in records.items() if "error" in r}
            if failed:
                raise RuntimeError(f"the reference solution of {assignment} fails in the grader's sandbox: {failed}")
            self.work.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(records))
        self.references[assignment] = {k: decode(r["obs"]) for k, r in records.items() if "obs" in r}
        return self.references[assignment]

    # --- deciding --------------------------------------------------------------------------------------------
    def decide(self, notebooks: dict[str, Path], scratch: Path, slot: int = 0) -> dict[str, dict[str, CellVerdict]]:
        """``{assignment: {check cell: verdict}}`` for one student's notebooks ``{assignment: path}``."""
        from autograde import ownwork

        jobs, findings, patches, nbs = {}, {}, {}, {}
        for a, path in notebooks.items():
            nb = nbs[a] = nbformat.read(path, as_version=4)
            cells = student_code(nb, self.releases[a])
            setup = setup_source(self.releases[a])
            declarations = [o for _, own in self.plans[a].values() for o in own]
            findings[a] = ownwork.check(setup, cells, declarations)
            patches[a] = ownwork.monkeypatches(setup, cells)
            jobs[a] = units(nb, self.plans[a], cells)
        records = self.observe(jobs, scratch, slot) if jobs else {}
        out = {}
        for a in notebooks:
            ref = self.reference(a)
            out[a] = {}
            for grade_id, (calls, own) in self.plans[a].items():
                reasons = [f"it changes the grading environment: {p}" for p in patches[a]]
                objects = {o for c in calls for o in c.objects} | {o for w in own for o in w.objects}
                reasons += [f"not your own work: {findings[a][o]}" for o in sorted(objects) if findings[a].get(o)]
                hidden = 0
                for i, call in enumerate(calls):
                    rec = records[a].get(f"{grade_id}#{i}", {"error": "not run"})
                    hidden += call.hidden
                    what = (f"hidden case {hidden}: {call.check}" if call.hidden else call.label())
                    if "error" in rec:
                        reasons.append(f"{what}: {rec['error'].split(':')[0]}" if call.hidden
                                       else f"{what}: {rec['error']}")
                        continue
                    try:
                        got = decode(rec["obs"])
                    except (ValueError, TypeError, KeyError) as e:
                        reasons.append(f"{what}: the answer could not be read ({type(e).__name__})")
                        continue
                    diff = compare(ref[f"{grade_id}#{i}"], got, TOLERANCES.get(call.check))
                    if diff:
                        reasons.append(f"{what}: differs from the reference in {', '.join(diff[:6])}")
                out[a][grade_id] = CellVerdict(not reasons, reasons)
        return out


def _code_digest() -> str:
    """What the solution's answers depend on besides the job: the observers, the worker, torch and transformers."""
    import importlib.metadata

    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([here / "worker.py", here / "plan.py", *(here / "observe").glob("*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    for dist in ("torch", "transformers"):
        digest.update(importlib.metadata.version(dist).encode())
    return digest.hexdigest()


def _limits(n_units: int, unit_seconds: int) -> sandbox.Limits:
    """The worker's limits: its wall clock grows with its units (a hung one costs at most this, once)."""
    return sandbox.Limits(wall_seconds=120 + 2 * unit_seconds * min(n_units, 10) + 5 * n_units, output_bytes=64 * 1024)


def _read_records(path: Path, limit: int = 64 * 2**20) -> list[dict]:
    """The JSON lines of a worker's results file (at most ``limit`` bytes; unreadable lines are skipped)."""
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for line in f.read(limit).splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records
