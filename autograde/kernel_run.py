"""Run a student's notebooks top to bottom inside the grading sandbox: the feedback run, warm-started.

Started by :func:`autograde.batch.feedback_run` as ``python -I /grader/autograde/kernel_run.py TIMEOUT IN OUT
[IN OUT ...]`` in a sandbox (:mod:`autograde.sandbox`) that holds the environment, peftlab and the course's public
data. Each ``IN`` is the student's notebook with the locked cells as released (the visible checks, no hidden
tests). The outputs are what the student sees in the feedback; they decide no points (:mod:`autograde.verdicts`
does).

A fresh Jupyter kernel per notebook spends 5-9 s importing torch, transformers, peftlab and matplotlib before the
first cell does any work. So this process imports the modules of the notebooks' (locked) setup cells once, then
forks one child per notebook: each child is a fresh interpreter that already has the modules loaded, runs the
cells in an IPython shell (magics, ``!`` commands and inline figures as in a kernel) and records the outputs as
nbformat outputs: streams (Python's and the file descriptors'), displays, results and errors.

``OUT`` is written after every cell, so a child that dies (``os._exit``, the memory limit) or a sandbox stopped at
its time limit still leaves the outputs of the cells that ran; the cell that was running gets a note, and so do
the cells after it. A cell over ``TIMEOUT`` is interrupted (``KeyboardInterrupt``, as a kernel's interrupt); one
that ignores the interrupt is killed 10 s later and the notebook ends there.
"""

from __future__ import annotations

import ast
import importlib
import io
import json
import os
import select
import signal
import sys
import time

import nbformat
from nbformat.v4 import new_output

CELL_BYTES = 256 * 1024  # what is kept of one cell's outputs (the grader cuts again, to less, on its side)
GRACE_SECONDS = 10  # how long a cell may ignore its interrupt before the child is killed
# Imported lazily by the visible checks and the HF-ecosystem exercises of four notebooks out of five: HF peft pulls in
# accelerate, bitsandbytes, sympy and networkx (3.8 s on this machine), which every child would otherwise pay again.
WARM_ALSO = ("peft", "scipy.stats")


# --- the warm start ------------------------------------------------------------------------------------------------
def setup_modules(nb) -> list[str]:
    """The modules the notebook's locked setup cell imports (the instructor's code, so safe to import early).

    >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
    ...     "import math\\nfrom torch import nn\\nimport peftlab.adapters as ref\\nfrom . import x",
    ...     metadata={"nbgrader": {"grade_id": "setup", "locked": True}})])
    >>> setup_modules(nb)
    ['math', 'torch', 'torch.nn', 'peftlab.adapters']
    """
    names: list[str] = []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if cell.cell_type != "code" or meta.get("grade_id") != "setup" or not meta.get("locked"):
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)  # and the names, which may be submodules (warm_up skips those that are not)
                names += [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    return list(dict.fromkeys(names))


def warm_up(modules: list[str]) -> None:
    """Import ``modules`` (and IPython, the inline backend, :data:`WARM_ALSO`) here, before any child is forked."""
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for name in ["IPython.core.interactiveshell", "matplotlib_inline.backend_inline", *modules, *WARM_ALSO]:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child's own import will show the error where the student sees it
            pass


# --- one notebook, in a forked child -------------------------------------------------------------------------------
class _Recorder:
    """The outputs of the running cell, capped at :data:`CELL_BYTES` (what is dropped is counted, not kept)."""

    def __init__(self):
        self.outputs: list = []
        self.kept = 0
        self.dropped = 0

    def add(self, out) -> None:
        size = len(json.dumps(out, default=str))
        if self.kept + size > CELL_BYTES:
            self.dropped += size
            return
        self.kept += size
        self.outputs.append(out)

    def stream(self, name: str, text: str) -> None:
        if not text:
            return
        room = CELL_BYTES - self.kept
        if len(text) > room:
            self.dropped += len(text) - max(room, 0)
            text = text[:max(room, 0)]
            if not text:
                return
        self.kept += len(text)
        last = self.outputs[-1] if self.outputs else None
        if last is not None and last.output_type == "stream" and last.name == name:
            last.text += text
        else:
            self.outputs.append(new_output("stream", name=name, text=text))

    def clear(self) -> None:
        self.outputs, self.kept = [], 0


class _Stream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of the child: text goes to the running cell's outputs."""

    def __init__(self, name: str, recorder: _Recorder):
        super().__init__()
        self.name, self.recorder = name, recorder

    def write(self, text) -> int:
        self.recorder.stream(self.name, str(text))
        return len(text)

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return "utf-8"


def _shell(recorder: _Recorder):
    """An IPython shell whose results, displays and tracebacks land in ``recorder`` as nbformat outputs."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type
    from traitlets.config import Config

    class Hook(DisplayHook):
        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            recorder.add(new_output("execute_result", data=format_dict, metadata=md_dict or {},
                                    execution_count=self.shell.execution_count))

        def finish_displayhook(self):
            pass

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, *args, **kwargs):
            recorder.add(new_output("display_data", data=data, metadata=metadata or {}))

        def clear_output(self, wait=False):
            recorder.clear()

    class Shell(InteractiveShell):
        displayhook_class = Type(Hook)
        display_pub_class = Type(Publisher)

        def _showtraceback(self, etype, evalue, stb):
            recorder.add(new_output("error", ename=getattr(etype, "__name__", str(etype)), evalue=str(evalue),
                                    traceback=list(stb)))

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    shell = Shell.instance(config=config)
    try:
        shell.enable_matplotlib("inline")
    except Exception:  # noqa: BLE001 - no matplotlib: the notebook's own import says so
        pass
    return shell


class _Interrupted(KeyboardInterrupt):
    pass


def _interrupt(signum, frame):
    raise _Interrupted("the cell ran past the grader's time limit")


def _drain(fd_file, recorder: _Recorder, name: str) -> None:
    """Move what C code and subprocesses wrote to file descriptor 1 or 2 into the cell's outputs."""
    fd_file.seek(0)
    data = fd_file.read()
    fd_file.seek(0)
    fd_file.truncate()
    if data:
        recorder.stream(name, data.decode(errors="replace"))


def run_child(nb, path_out: str, timeout: int, beat: int) -> None:
    """Run ``nb``'s code cells in this forked child, writing ``path_out`` after each; announce each on ``beat``."""
    import tempfile

    recorder = _Recorder()
    fd_files = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):  # output below Python's sys.stdout: C code, ! commands
        f = tempfile.TemporaryFile()
        os.dup2(f.fileno(), fd)
        fd_files[name] = f
    sys.stdin = open(os.devnull)
    sys.stdout, sys.stderr = _Stream("stdout", recorder), _Stream("stderr", recorder)
    shell = _shell(recorder)
    signal.signal(signal.SIGALRM, _interrupt)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        os.write(beat, f"{index}\n".encode())
        recorder.outputs, recorder.kept, recorder.dropped = [], 0, 0
        signal.alarm(timeout)
        try:
            result = shell.run_cell(cell.source, store_history=True)
        except BaseException as e:  # noqa: BLE001 - an interrupt between IPython's own handlers
            result = None
            recorder.add(new_output("error", ename=type(e).__name__, evalue=str(e), traceback=[]))
        finally:
            signal.alarm(0)
        for name, f in fd_files.items():
            _drain(f, recorder, name)
        cell.execution_count = shell.execution_count - 1 if result is not None else None
        cell.outputs = recorder.outputs
        error = result is not None and result.error_in_exec
        if isinstance(error, _Interrupted):
            _note(cell, f"stopped after the time limit of {timeout} s per cell")
        if recorder.dropped:
            _note(cell, f"output cut: {recorder.dropped:,} more bytes (the feedback keeps the first {CELL_BYTES:,})")
        _write(nb, path_out)
    os.write(beat, b"done\n")


def _write(nb, path: str) -> None:
    """Write atomically: a child killed while writing leaves the previous cell's version, never half a file."""
    nbformat.write(nb, path + ".part")
    os.replace(path + ".part", path)


def _note(cell, text: str) -> None:
    cell.outputs = list(cell.get("outputs", [])) + [new_output("stream", name="stdout", text=f"[grader] {text}\n")]


def run_notebook(nb, path_in: str, path_out: str, timeout: int) -> None:
    """Fork a child for ``nb`` (read from ``path_in``), watch its heartbeat, note a death or a hang in ``path_out``."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: a fresh interpreter with the setup modules loaded
        code = 0
        try:
            os.close(read_end)
            os.chdir(os.path.dirname(os.path.abspath(path_in)))
            run_child(nb, path_out, timeout, write_end)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    running, started, done, buffer = None, time.monotonic(), False, b""
    while True:
        ready, _, _ = select.select([read_end], [], [], 1.0)
        if ready:
            chunk = os.read(read_end, 4096)
            if not chunk:
                break  # the child exited (or closed its end)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line == b"done":
                    done = True
                else:
                    running, started = int(line), time.monotonic()
        elif running is not None and time.monotonic() - started > timeout + GRACE_SECONDS:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            os.close(read_end)
            _finish(nb, path_in, path_out, running, "it ignored the interrupt after the time limit of "
                    f"{timeout} s per cell and was stopped")
            return
    os.close(read_end)
    os.waitpid(pid, 0)
    if not done:
        _finish(nb, path_in, path_out, running, "the kernel died while running this cell (it exited, crashed or ran "
                "out of memory)")


def _finish(nb, path_in: str, path_out: str, running: int | None, why: str) -> None:
    """Add the notes of a child that ended early to what it wrote (or to the input, if it wrote nothing)."""
    try:
        written = nbformat.read(path_out, as_version=4)
        if len(written.cells) == len(nb.cells):
            nb = written
    except Exception:  # noqa: BLE001 - nothing (readable) was written
        pass
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or running is None or index < running:
            continue
        if index == running:
            _note(cell, why)
        else:
            cell.outputs = []
            _note(cell, f"not run: the kernel died in an earlier cell ({nb.cells[running].get('id', running)})")
    nbformat.write(nb, path_out)


def main(argv: list[str]) -> int:
    timeout, pairs = int(argv[0]), argv[1:]
    notebooks = list(zip(pairs[::2], pairs[1::2], strict=True))
    read = {}
    for path_in, _ in notebooks:
        try:
            read[path_in] = nbformat.read(path_in, as_version=4)
        except Exception as e:  # noqa: BLE001 - one unreadable notebook must not stop the others
            print(f"kernel_run: {path_in}: {type(e).__name__}: {e}", file=sys.stderr)
    warm_up(list(dict.fromkeys(m for nb in read.values() for m in setup_modules(nb))))
    for path_in, path_out in notebooks:
        try:
            if path_in in read:
                run_notebook(read[path_in], path_in, path_out, timeout)
        except Exception as e:  # noqa: BLE001 - one notebook's failure must not stop the next
            print(f"kernel_run: {path_in}: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
