"""The nbgrader pipeline of the course: build the student release, autograde submissions, validate and reset notebooks.

Layout (paths relative to the repository root)::

    solutions/<assignment>/<assignment>.ipynb   nbgrader source notebooks (solutions, hidden tests), committed executed
    notebooks/<assignment>/<assignment>.ipynb   the generated student release, committed, never hand-edited
    autograde/nbgrader_config.py                nbgrader settings, relative paths (copied into every course folder)
    autograde/cells.py                          the graded cells run in-process, as the autograder runs them (tests)
    autograde/examples/<student>/<assignment>/  sample submissions: solution, untouched, partial
    build/course/                               scratch course folder for the release (git-ignored); built once
                                                per change of its inputs (see :func:`generate`), then reused
    autograde/{source,release,submitted,autograded,feedback,gradebook.db}   the instructor's grading state (git-ignored)

Adding an exercise: put ``solutions/exN_name/exN_name.ipynb`` (nbgrader metadata on its cells), run
``python -m autograde release`` and commit ``notebooks/exN_name/``; optionally add partial-submission edits to
:data:`PARTIAL`. Everything else (grading, examples, tests) discovers assignments from ``solutions/``.

References:
    - nbgrader 0.9 (generate_assignment, autograde, generate_feedback, export); lukassnoek/introPy's course layout.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat

from autograde import class_report
from autograde.cells import student_source

CONFIG_NAME = "nbgrader_config.py"
BUILD = Path("build") / "course"  # the release's course folder, relative to the repository root
STAMP = ".built-from"  # in a course folder: the inputs of its release and the digests of what was built
GRADING_ENV = {"PEFTLAB_GRADING": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
EXAMPLE_STUDENTS = ("solution", "untouched", "partial")

# The partly wrong sample submission: the solution with these bugs (cell id -> (old, new) source edits), every other
# solution cell as the student would write it, one written answer filled in, ``make_hf_lora`` left undone.
PARTIAL: dict[str, dict] = {
    "ex1_motivation": {
        "edits": {"storage_bytes": [("(n_params + n_tasks * adapter_params) * bytes_per_param",
                                     "n_tasks * adapter_params * bytes_per_param  # forgot the base model")]},
        "undone": [],
        "answers": {"answer_1_2": "Freeze the big model and train only a few new parameters, e.g. LoRA matrices."},
        "failing": ["check_storage_bytes"],
    },
    "ex2_lora": {
        "edits": {"lora_layer": [("self.scaling = lora_alpha / r", "self.scaling = lora_alpha  # forgot / r")]},
        "undone": ["make_hf_lora"],
        "answers": {"answer_2_5": "Only A and B are saved; load the base model and put them back."},
        "failing": ["check_lora_init", "check_lora_forward", "check_merge", "check_hf_lora"],
    },
    "ex3_adapters": {
        "edits": {"switch": [("adapter.requires_grad_(key == name)",
                              "adapter.requires_grad_(True)  # forgot to freeze the other tasks")]},
        "undone": [],
        "answers": {"answer_3_1": "Small bottleneck layers go into every layer of a frozen model; only they train."},
        "failing": ["check_multitask_switch"],
    },
    "ex4_prefix_prompt": {
        "edits": {"extend_mask": [("return torch.cat([ones, attention_mask], dim=1)  # (B, P + T)",
                                   "return torch.cat([attention_mask, ones], dim=1)  # ones after the text")]},
        "undone": ["soft_prompt"],
        "answers": {"answer_4_1": "A few learned vectors are put in front of the input; the model stays frozen."},
        "failing": ["check_extend_mask", "check_prefix_forward", "check_soft_prompt_init", "check_soft_prompt_forward"],
    },
    "ex5_qlora": {
        "edits": {"constant_bits": [("(8 * blocks + 32 * blocks2 + 32)",
                                     "(8 * blocks)  # forgot the second-level scales")]},
        "undone": ["nf4_linear"],
        "answers": {"answer_5_1": "Fewer bits per weight: 4-bit is 8x smaller than fp32."},
        "failing": ["check_double_quant_bits", "check_linear4bit"],
    },
}


def repo_root() -> Path:
    """The repository root: the working directory when it holds ``solutions/``, else the checkout of this file."""
    cwd = Path.cwd()
    return cwd if (cwd / "solutions").is_dir() else Path(__file__).resolve().parents[1]


def assignments(root: Path) -> list[str]:
    """Assignment names: the folders of ``solutions/`` that hold a notebook of the same name."""
    return sorted(p.parent.name for p in (root / "solutions").glob("*/*.ipynb") if p.stem == p.parent.name)


def _run(cmd: list[str], cwd: Path, timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
    """Run a command in its own process group; on timeout kill the whole group (kernels included)."""
    # nbgrader runs the `alembic` script of its own environment: put the interpreter's bin/ first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {}), "PATH": path}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, (out or "") + f"\n[killed after {timeout:.0f} s]"


def _nbgrader(args: list[str], course: Path, timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
    return _run([sys.executable, "-m", "nbgrader", *args], course, timeout, env)


def prepare_course(root: Path, course: Path) -> None:
    """Make ``course`` an nbgrader course folder: our config, and ``source/`` = a fresh copy of ``solutions/``."""
    course.mkdir(parents=True, exist_ok=True)
    config = root / "autograde" / CONFIG_NAME
    if config.resolve() != (course / CONFIG_NAME).resolve():
        shutil.copy(config, course / CONFIG_NAME)
    source = course / "source"
    shutil.rmtree(source, ignore_errors=True)
    for name in assignments(root):
        shutil.copytree(root / "solutions" / name, source / name,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))


def release_inputs(root: Path) -> str:
    """A digest of what the release is built from: the assignments' folders in ``solutions/``, the nbgrader
    config, this file, and the versions of nbgrader, nbconvert and nbformat."""
    digest = hashlib.sha256()
    files = {CONFIG_NAME: root / "autograde" / CONFIG_NAME, "pipeline.py": Path(__file__)}
    for name in assignments(root):
        files |= {p.relative_to(root).as_posix(): p for p in sorted((root / "solutions" / name).rglob("*"))
                  if p.is_file() and not {".ipynb_checkpoints", "__pycache__"} & set(p.parts)}
    for label, path in files.items():
        data = path.read_bytes()
        digest.update(f"{label}\0{len(data)}\0".encode() + data)
    for dist in ("nbgrader", "nbconvert", "nbformat"):
        digest.update(f"{dist}=={importlib.metadata.version(dist)}\0".encode())
    return digest.hexdigest()


def _built_files(course: Path) -> list[str]:
    """What ``generate`` leaves in a course folder (besides the gradebook), as ``digest path`` lines."""
    paths = [course / CONFIG_NAME] + [p for d in ("source", "release") for p in sorted((course / d).rglob("*"))]
    return [f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.relative_to(course).as_posix()}"
            for p in paths if p.is_file()]


def is_built(root: Path, course: Path) -> bool:
    """True when ``course`` holds the release of the current inputs, untouched since ``generate`` built it."""
    stamp = course / STAMP
    if not stamp.exists() or not (course / "gradebook.db").exists():
        return False
    return stamp.read_text().splitlines() == [release_inputs(root), *_built_files(course)]


def generate(root: Path, course: Path, rebuild: bool = False) -> None:
    """``nbgrader generate_assignment`` for every assignment (writes ``course/release`` and the gradebook).

    A course folder that already holds the release of the same inputs (:func:`release_inputs`: solutions, config,
    nbgrader's version) is kept as it is, unless ``rebuild``: ``make test`` builds the release once, and the
    release check, the round trip and ``reset`` reuse it.
    """
    if not rebuild and is_built(root, course):
        print(f"{course}: the release is up to date with solutions/ (not rebuilt)")
        return
    (course / STAMP).unlink(missing_ok=True)
    prepare_course(root, course)
    code, log = _nbgrader(["generate_assignment", "*", "--force"], course)  # one process for all: startup is slow
    missing = [n for n in assignments(root) if not (course / "release" / n / f"{n}.ipynb").exists()]
    if code != 0 or missing:
        raise RuntimeError(f"nbgrader generate_assignment failed (missing {missing}):\n{log[-3000:]}")
    for nb_path in sorted((course / "release").glob("*/*.ipynb")):
        normalize(nb_path)
    (course / STAMP).write_text("\n".join([release_inputs(root), *_built_files(course)]) + "\n")


def normalize(path: Path) -> None:
    """Drop run-specific metadata (execution times) so the release is byte-for-byte reproducible."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


# --- the student release -----------------------------------------------------------------------
def _committed(root: Path, rel: str) -> bytes | None:
    """The file as committed at git HEAD, or None (not tracked, or not a git checkout)."""
    proc = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def example_notebooks(root: Path, release: Path) -> dict[str, bytes]:
    """The sample submissions, derived from the solutions and the release: ``relative path -> bytes``."""
    out = {}
    for name in assignments(root):
        solution = nbformat.read(root / "solutions" / name / f"{name}.ipynb", as_version=4)
        released = nbformat.read(release / name / f"{name}.ipynb", as_version=4)
        for cell in solution.cells:  # a submission carries no outputs
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        out[f"autograde/examples/solution/{name}/{name}.ipynb"] = nbformat.writes(solution).encode()
        out[f"autograde/examples/untouched/{name}/{name}.ipynb"] = nbformat.writes(released).encode()
        if name in PARTIAL:  # the partly wrong sample needs a spec of its bugs
            out[f"autograde/examples/partial/{name}/{name}.ipynb"] = nbformat.writes(
                partial_submission(solution, released, PARTIAL[name])).encode()
    return {k: v if v.endswith(b"\n") else v + b"\n" for k, v in out.items()}


def partial_submission(solution, released, spec: dict):
    """The release with the solution filled in, except ``spec``'s bugs and undone cells (see :data:`PARTIAL`)."""
    nb = nbformat.reads(nbformat.writes(released), as_version=4)
    by_id = {c.id: c for c in solution.cells}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.id in spec.get("answers", {}):
            cell.source = spec["answers"][cell.id]
        elif meta.get("solution") and cell.cell_type == "code" and cell.id not in spec.get("undone", []):
            source = student_source(by_id[cell.id].source)
            for old, new in spec.get("edits", {}).get(cell.id, []):
                if old not in source:
                    raise ValueError(f"partial submission: {old!r} not found in cell {cell.id}")
                source = source.replace(old, new)
            cell.source = source
    return nb


def release(root: Path | None = None, build: Path | None = None, check: bool = False, rebuild: bool = False) -> int:
    """Regenerate ``notebooks/`` and ``autograde/examples/``; write a release notebook only where it is unchanged.

    A committed release notebook that differs from git HEAD holds a student's edits: it is kept, and the new
    version is left in ``build/``. A release notebook that is not committed yet is (re)written.
    With ``check=True`` nothing is written: report drift and return 1. ``rebuild``: run nbgrader even when
    ``build`` holds the release of the same solutions (:func:`generate`).
    """
    root = root or repo_root()
    build = build or root / BUILD
    generate(root, build, rebuild)
    wanted: dict[str, bytes] = {}
    for name in assignments(root):
        for path in sorted((build / "release" / name).rglob("*")):
            if path.is_file():
                wanted[f"notebooks/{name}/{path.relative_to(build / 'release' / name)}"] = path.read_bytes()
    examples = example_notebooks(root, build / "release")
    drift = []
    for rel, data in {**wanted, **examples}.items():
        dest = root / rel
        current = dest.read_bytes() if dest.exists() else None
        if current == data:
            continue
        if check:
            drift.append(rel)
            continue
        committed = _committed(root, rel)
        student_file = rel.startswith("notebooks/")
        # Edited by a student = it exists, it is committed, and it differs from the commit. Not committed yet: ours.
        if current is not None and student_file and committed is not None and current != committed:
            print(f"kept {rel}: it differs from the committed release (your edits?); "
                  f"the new version is in {build / 'release' / rel.split('/', 1)[1]}")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        print(f"wrote {rel}")
    if check:
        for rel in drift:
            print(f"drift: {rel} differs from what the solutions generate")
        return 1 if drift else 0
    return 0


def reset(notebook: Path, root: Path | None = None) -> Path:
    """Replace a release notebook by a fresh copy; the student's version is kept beside it as ``.bak``."""
    root = root or repo_root()
    notebook = notebook.resolve()
    name = notebook.parent.name
    build = root / BUILD
    generate(root, build)
    fresh = build / "release" / name / notebook.name
    if not fresh.exists():
        raise ValueError(f"{notebook} is not a release notebook; choose one of {assignments(root)}")
    backup = notebook.with_suffix(f".{time.strftime('%Y%m%d-%H%M%S')}.bak.ipynb")
    if notebook.exists():
        shutil.copy(notebook, backup)
        print(f"your version is saved as {backup}")
    shutil.copy(fresh, notebook)
    print(f"reset {notebook}")
    return backup


def validate(notebook: Path, timeout: int = 300) -> int:
    """Run a notebook top to bottom and report which visible checks pass (nbgrader's Validator).

    The validator runs with :class:`autograde.preprocessors.StderrIsNotAVerdict`, as the autograder does:
    a warning a library prints does not fail a check here either.
    """
    if not notebook.exists():
        raise ValueError(f"{notebook} does not exist")
    code, log = _run([sys.executable, "-m", "autograde.pipeline", "_validate", str(notebook.resolve()), str(timeout)],
                     notebook.parent, env=GRADING_ENV)
    print(log)
    return code


def _validate_here(notebook: str, timeout: int) -> int:
    """nbgrader's ``validate``, in this process, with the grader's preprocessors (see :func:`validate`)."""
    from nbgrader.preprocessors import CheckCellMetadata, ClearOutput, Execute
    from nbgrader.validator import Validator
    from traitlets.config import Config

    from autograde.preprocessors import StderrIsNotAVerdict

    config = Config()
    config.Execute.timeout = timeout
    validator = Validator(config=config)
    validator.preprocessors = [CheckCellMetadata, ClearOutput, Execute, StderrIsNotAVerdict]
    validator.validate_and_print(notebook)
    return 0


# --- grading -------------------------------------------------------------------------------------
def restore_deleted_cells(path: Path, release: Path) -> list[str]:
    """Put back (as released) every nbgrader cell the student deleted, where it was; return their ids.

    nbgrader restores deleted *check* cells itself (``add_missing_cells``) but fails on a notebook that also lost
    a solution cell; with every cell back, a deleted solution simply scores zero.
    """
    nb, ref = nbformat.read(path, as_version=4), nbformat.read(release, as_version=4)
    grade_id = lambda c: c.metadata.get("nbgrader", {}).get("grade_id")  # noqa: E731
    have = {grade_id(c) for c in nb.cells if grade_id(c)}
    missing = [c for c in ref.cells if grade_id(c) and grade_id(c) not in have]
    if not missing:
        return []
    for cell in missing:
        before = [grade_id(c) for c in ref.cells[:ref.cells.index(cell)] if grade_id(c) in have]
        at = next((i + 1 for i, c in enumerate(nb.cells) if before and grade_id(c) == before[-1]), 0)
        nb.cells.insert(at, cell)
        have.add(grade_id(cell))
    nbformat.write(nb, path)
    return [grade_id(c) for c in missing]


def grading_salt(course: Path, new: bool = False) -> int:
    """The salt of this course folder's trusted re-runs: drawn once (``secrets``), kept in ``.grading/salt``, so a
    second run gives the same grades; ``new=True`` draws another (a fresh set of hidden inputs)."""
    path = course / ".grading" / "salt"
    if new or not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(secrets.randbits(62)))
        path.chmod(0o600)
    return int(path.read_text())


def grade(submissions: Path, course: Path | None = None, root: Path | None = None, timeout: int = 120,
          notebook_timeout: int = 900, jobs: int | None = None, new_salt: bool = False,
          experiments: bool = False) -> list[dict]:
    """Autograde ``submissions/<student>/<assignment>/*.ipynb``: sandboxed runs, trusted verdicts, one writer.

    1. :func:`autograde.batch.stage`: every student folder, one status per assignment;
    2. :func:`autograde.batch.run_students`: ``jobs`` students at a time (default: every core), each in its own
       sandbox (:mod:`autograde.sandbox`): the feedback run and the trusted re-run (:mod:`autograde.verdicts`);
    3. one writer records the results with ``nbgrader autograde`` (:class:`autograde.preprocessors.ApplyRun`), in
       batches while the next students run (:class:`autograde.batch.GradebookWriter`), then ``generate_feedback``
       and ``export``; ``scores.csv`` and the summary add the statuses.
    """
    from autograde import batch, sandbox
    from autograde.verdicts import Verdicts

    root = root or repo_root()
    course = (course or root / "autograde").resolve()
    submissions = submissions.resolve()
    if not submissions.is_dir():
        raise ValueError(f"submissions folder {submissions} does not exist (expected <student>/<assignment>/*.ipynb)")
    if submissions == (course / "submitted").resolve():
        raise ValueError(f"{submissions} is the course's own submitted/ folder; hand in a copy (grading rewrites it)")
    why = sandbox.available()
    if why:
        raise RuntimeError(f"cannot grade safely here: {why}")
    start = time.perf_counter()
    generate(root, course)
    names = assignments(root)
    releases = {n: nbformat.read(course / "release" / n / f"{n}.ipynb", as_version=4) for n in names}
    status = batch.stage(submissions, course, releases)
    students: dict[str, dict[str, Path]] = {}
    for (student, name), notes in sorted(status.items()):
        path = course / "submitted" / student / name / f"{name}.ipynb"
        if name in releases and path.exists():
            students.setdefault(student, {})[name] = path
        for note in notes:
            print(f"{student}/{name}: {note}")
    verdicts = Verdicts(root, course, grading_salt(course, new_salt), unit_seconds=timeout)
    for name in names:  # the solution's answers first: a broken reference stops the batch before any student
        verdicts.reference(name)
    jobs = jobs or os.cpu_count() or 1
    from autograde import similarity

    def similar(student, name, path):
        from autograde.verdicts import student_code

        code = "\n\n".join(src for _, src in student_code(nbformat.read(path, as_version=4), releases[name]))
        return similarity.score(code, name, root)

    # nbgrader selects students by one id or by exclusion (a comma-separated list): plain ids can be recorded in
    # batches beside the runs; any other id makes the one writer wait and record everyone after the runs.
    staged = {p.name for p in (course / "submitted").iterdir()}  # every student folder stage() wrote
    plain = all(re.fullmatch(r"[A-Za-z0-9_.@+-]+", s) for s in staged)

    def record(batch_students: list[str]) -> None:
        others = ",".join(sorted(staged - set(batch_students)))
        _nbgrader(["autograde", "*", "--force", f"--CourseDirectory.student_id_exclude={others}"], course,
                  notebook_timeout * len(batch_students))

    t_runs = time.perf_counter()
    results = batch.run_students(course, root, verdicts, students, jobs, timeout, similarity=similar,
                                 experiments=experiments, record=record if plain else None)
    t_record = time.perf_counter()
    if not plain:
        _nbgrader(["autograde", "*", "--force"], course, notebook_timeout * max(len(students), 1))
    missing = [(s, n) for s, ns in students.items() for n in ns
               if not (course / "autograded" / s / n / f"{n}.ipynb").exists()]
    for student, name in missing:  # nbgrader failed on these: try each alone, say so
        code1, log1 = _nbgrader(["autograde", name, "--student", student, "--force"], course, notebook_timeout)
        if code1 != 0:
            status[(student, name)].append("not recorded: nbgrader failed on this notebook: " +
                                           " | ".join(line for line in log1.splitlines() if "ERROR" in line)[-300:])
    # generate_feedback only reads the gradebook: one process per assignment, jobs at a time
    t_feedback = time.perf_counter()
    names = sorted({n for ns in students.values() for n in ns})
    with ThreadPoolExecutor(max_workers=max(jobs or 1, 1)) as pool:
        logs = pool.map(lambda n: _nbgrader(["generate_feedback", n, "--force"], course), names)
        for name, (code, log) in zip(names, logs, strict=True):
            if code != 0:
                print(f"ERROR generate_feedback {name}:\n{log[-2000:]}")
    t_export = time.perf_counter()
    code, log = _nbgrader(["export", "--to", "grades.csv"], course)
    if code != 0:
        print(f"ERROR nbgrader export:\n{log[-2000:]}")
    # where the time went (benchmarks/grade_class.py reads it): the grader's own state, never a student's
    phases = {"prepare": t_runs - start, "sandboxed_runs": t_record - t_runs, "record": t_feedback - t_record,
              "feedback": t_export - t_feedback, "export": time.perf_counter() - t_export}
    (course / ".grading" / "timing.json").write_text(json.dumps(
        {"students": len(students), "notebooks": sum(len(ns) for ns in students.values()), "jobs": jobs,
         "seconds": {k: round(v, 1) for k, v in phases.items()}}, indent=1) + "\n")
    scores = autograded_scores(course)
    rows = []
    for (student, name), notes in sorted(status.items()):
        result = results.get((student, name), {})
        row = dict(student=student, assignment=name, seconds=result.get("seconds", 0.0))
        row.update(scores.get((student, name), {}))
        sim = result.get("similarity") or {}
        row["similarity"] = round(sim.get("max", 0.0), 2) if sim else ""
        flags = [r for v in result.get("verdicts", {}).values() for r in v["reasons"] if r.startswith(("not your own",
                                                                                                      "it changes"))]
        if sim and sim.get("max", 0.0) >= similarity.THRESHOLD:
            flags.append(f"review: similarity {sim['max']:.2f} to {sim.get('closest', 'the reference')}")
        row["review"] = " | ".join(dict.fromkeys(flags))
        graded = (student, name) in results and (course / "autograded" / student / name / f"{name}.ipynb").exists()
        if graded:
            row["status"] = "; ".join(["graded", *notes])
        else:
            row["status"] = "; ".join(notes) if any(n.startswith("not ") for n in notes) else \
                "; ".join(["not graded", *notes])
        rows.append(row)
    write_scores(rows, course / "scores.csv")
    report = class_report.write(rows, course, time.perf_counter() - start)
    print(f"\n{'student':>12} {'assignment':>18} {'autograded':>11} {'written':>8}  status")
    for r in rows:
        auto = f"{r.get('autograded', 0):>5g} / {r.get('autograded_max', 0):<3g}" if "autograded" in r else " " * 11
        print(f"{r['student']:>12} {r['assignment']:>18} {auto} {r.get('manual_max', 0):>6g}   {r['status']}")
    print(summary(rows, time.perf_counter() - start, t_record - start, jobs))
    print(f"gradebook {course / 'gradebook.db'}; scores {course / 'grades.csv'} (nbgrader export) and "
          f"{course / 'scores.csv'}; feedback in {course / 'feedback'}; the class on one page: {report}")
    return rows


def summary(rows: list[dict], seconds: float, run_seconds: float, jobs: int) -> str:
    """The end-of-batch summary: who was graded, what failed by kind, the distribution of scores."""
    import collections

    students = sorted({r["student"] for r in rows})
    graded = [r for r in rows if r["status"].startswith("graded")]
    kinds = collections.Counter()
    for r in rows:
        for part in r["status"].split("; ")[1:]:
            kinds[class_report.kind(part)] += 1
        if r.get("review"):
            kinds["flagged for review"] += 1
    bins = collections.Counter()
    for r in graded:
        if r.get("autograded_max"):
            bins[min(int(10 * r["autograded"] / r["autograded_max"]), 9)] += 1
    lines = [f"\n{len(students)} students, {len(graded)} of {len(rows)} notebooks graded in {seconds:.0f} s "
             f"({run_seconds / max(len(students), 1):.1f} s per student for the sandboxed runs, {jobs} at a time)"]
    lines += [f"  {n:>4} x {k}" for k, n in kinds.most_common()]
    lines.append("  scores (share of the autograded points): " +
                 "  ".join(f"{10 * b}-{10 * b + 10}%: {bins[b]}" for b in range(10) if bins[b]))
    return "\n".join(lines)


def autograded_scores(course: Path) -> dict[tuple[str, str], dict]:
    """Per (student, assignment): autograded points, their maximum, and the points of written answers."""
    from nbgrader.api import Gradebook, MissingEntry

    out = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for assignment in gb.assignments:
            for student in gb.students:
                try:
                    sub = gb.find_submission(assignment.name, student.id)
                except MissingEntry:
                    continue
                grades = [g for nb in sub.notebooks for g in nb.grades]
                auto = [g for g in grades if g.cell_type == "code"]
                manual = [g for g in grades if g.cell_type == "markdown"]
                out[(student.id, assignment.name)] = dict(
                    autograded=sum(g.auto_score or 0 for g in auto), autograded_max=sum(g.max_score for g in auto),
                    manual_max=sum(g.max_score for g in manual),
                    failed_cells=" ".join(sorted(g.name for g in auto if (g.auto_score or 0) < g.max_score)))
    return out


def write_scores(rows: list[dict], path: Path) -> None:
    fields = ["student", "assignment", "autograded", "autograded_max", "manual_max", "failed_cells", "status",
              "review", "similarity", "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_validate"]:  # the subprocess of validate()
        return _validate_here(argv[1], int(argv[2]))
    parser = argparse.ArgumentParser(prog="python -m autograde", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("release", help="regenerate notebooks/ (and the sample submissions) from solutions/")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if notebooks/ differs")
    p.add_argument("--rebuild", action="store_true", help="run nbgrader even if build/course is up to date")
    p = sub.add_parser("grade", help="autograde submitted/<student>/<assignment>/*.ipynb")
    p.add_argument("submissions", type=Path, help="folder of <student>/<assignment>/*.ipynb")
    p.add_argument("--course-dir", type=Path, default=None, help="nbgrader course folder (default: autograde/)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per cell (nbgrader's default is 30)")
    p.add_argument("--notebook-timeout", type=int, default=900, help="seconds per student and assignment")
    p.add_argument("--jobs", type=int, default=None, help="students graded at a time (default: one per core)")
    p.add_argument("--new-salt", action="store_true", help="draw new hidden inputs for the re-run (grades may move)")
    p.add_argument("--experiments", action="store_true",
                   help="run the course's experiment cells in the feedback run too (slower; they decide no points)")
    p = sub.add_parser("validate", help="run a notebook and its visible checks, as nbgrader validate")
    p.add_argument("notebook", type=Path)
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    p = sub.add_parser("student-bundle", help="what a graded class hands out: the release without any answer")
    p.add_argument("out", type=Path, help="a new folder (a .zip of it is written beside it)")
    p = sub.add_parser("reset", help="restore a fresh release notebook (your version is kept as .bak)")
    p.add_argument("notebook", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "release":
            return release(check=args.check, rebuild=args.rebuild)
        if args.command == "grade":
            grade(args.submissions, args.course_dir, timeout=args.timeout, notebook_timeout=args.notebook_timeout,
                  jobs=args.jobs, new_salt=args.new_salt, experiments=args.experiments)
            return 0
        if args.command == "validate":
            return validate(args.notebook, args.timeout)
        if args.command == "student-bundle":
            from autograde.bundle import student_bundle

            out = student_bundle(args.out.resolve(), repo_root())
            print(f"wrote {out} and {out.with_suffix('.zip')}: the release notebooks, peftlab, the data they read; "
                  f"no solutions, sample submissions, hidden tests or grader")
            return 0
        reset(args.notebook)
        return 0
    except (ValueError, RuntimeError) as e:
        print(f"python -m autograde {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
