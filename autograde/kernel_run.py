"""Run a student's notebooks top to bottom in a Jupyter kernel, inside the grading sandbox: the feedback run.

Started by :mod:`autograde.feedback_run` as ``python -I /grader/autograde/kernel_run.py TIMEOUT IN OUT [IN OUT ...]``
in a sandbox (:mod:`autograde.sandbox`) that holds the environment, peftlab and the course's public data. Each
``IN`` is the student's notebook with the locked cells as released (the visible checks, no hidden tests). The
outputs are what the student sees in the feedback; they decide no points (:mod:`autograde.verdicts` does).

``OUT`` is written after every cell, so a kernel that dies (``os._exit``, the memory limit) or a sandbox stopped at
its time limit still leaves the outputs of the cells that ran; the cells after a kernel death get a note.
"""

from __future__ import annotations

import json
import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.v4 import new_output

CELL_BYTES = 256 * 1024  # what is written of one cell's outputs (the grader cuts again, to less, on its side)


def _cut(cell) -> None:
    """Keep the first :data:`CELL_BYTES` of a cell's outputs, and say how much was cut."""
    kept, dropped, outputs = 0, 0, []
    for out in cell.get("outputs", []):
        size = len(json.dumps(out))
        if kept + size <= CELL_BYTES:
            outputs.append(out)
            kept += size
        elif out.get("output_type") == "stream" and kept < CELL_BYTES:
            room = CELL_BYTES - kept
            text = "".join(out.get("text", ""))
            outputs.append(new_output("stream", name=out.get("name", "stdout"), text=text[:room]))
            dropped += size - room
            kept = CELL_BYTES
        else:
            dropped += size
    if dropped:
        cell.outputs = outputs
        _note(cell, f"output cut: {dropped:,} more bytes (the feedback keeps the first {CELL_BYTES:,})")


def _note(cell, text: str) -> None:
    cell.outputs = list(cell.get("outputs", [])) + [new_output("stream", name="stdout", text=f"[grader] {text}\n")]


def run_notebook(path_in: str, path_out: str, timeout: int) -> None:
    nb = nbformat.read(path_in, as_version=4)
    client = NotebookClient(nb, timeout=timeout, allow_errors=True, interrupt_on_timeout=True, kernel_name="python3",
                            resources={"metadata": {"path": str(__import__("pathlib").Path(path_in).parent)}})
    dead_at = None
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            if dead_at is not None:
                _note(cell, f"not run: the kernel died in an earlier cell ({dead_at})")
                continue
            try:
                client.execute_cell(cell, index)
            except CellTimeoutError:
                _note(cell, f"stopped after the time limit of {timeout} s per cell")
            except DeadKernelError:
                dead_at = cell.get("id", index)
                _note(cell, "the kernel died while running this cell (it exited, crashed or ran out of memory)")
            _cut(cell)
            nbformat.write(nb, path_out)
    nbformat.write(nb, path_out)


def main(argv: list[str]) -> int:
    timeout, pairs = int(argv[0]), argv[1:]
    for path_in, path_out in zip(pairs[::2], pairs[1::2], strict=True):
        try:
            run_notebook(path_in, path_out, timeout)
        except Exception as e:  # noqa: BLE001 - one notebook's failure must not stop the next
            print(f"kernel_run: {path_in}: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
