"""The trusted re-run's worker: runs a student's cells and answers the observers' questions, inside the sandbox.

Started by :mod:`autograde.verdicts` as ``python -I /grader/autograde/worker.py job.json results.jsonl`` in a
sandbox (:mod:`autograde.sandbox`) that holds the Python environment without peftlab, the observers
(``/grader/autograde/observe``) and this file. The job lists, per assignment, *units* in notebook order: a cell
to run (the student's solution cells and the cells they added) or a checker call to observe
(:func:`autograde.observe.run_call`). The worker writes one JSON line per unit to the results file: a
``start`` marker before it, then ``{"unit": i, "obs": ...}`` or ``{"unit": i, "error": "..."}``.

Nothing here is trusted by the grader: the student's code shares this process and may rewrite the results.
What it cannot do is compute the right answer without doing the work: the grader compares the observations with
those of the instructor's solution on a salt drawn at grading time, and the sandbox holds no solution, no
peftlab and no grader state. The ``start`` markers let the grader restart a worker that died or hung on one unit,
with that unit skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys


def _too_long(signum, frame):
    raise TimeoutError("it ran longer than the grader's time limit for one cell or call")


def main(job_path: str, results_path: str) -> int:
    # The grader's editable install maps "autograde" and "peftlab" to the repository, which is not in here.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path.insert(0, "/grader")
    with open(job_path) as f:
        job = json.load(f)
    from autograde.observe import core, load, run_call
    from autograde.plan import Call

    core.ARCH.update(job["arch"])
    load()
    out = open(results_path, "a", buffering=1)

    def emit(record: dict) -> None:
        out.write(json.dumps(record) + "\n")
        out.flush()

    sink = io.StringIO()
    signal.signal(signal.SIGALRM, _too_long)  # the student's code may undo this; the grader's wall clock remains
    for assignment in job["assignments"]:
        ns = {"__name__": "__main__"}
        exec(core.PRELUDE, ns)
        skip = set(assignment.get("skip", []))
        for unit in assignment["units"]:
            uid = unit["id"]
            if uid in skip:
                emit({"unit": uid, "error": "skipped: an earlier run of it died or hung"})
                continue
            emit({"start": uid})
            signal.alarm(int(job.get("unit_seconds", 60)))
            try:
                with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                    if unit["kind"] == "cell":
                        exec(compile(unit["source"], f"<cell {unit['name']}>", "exec"), ns)
                        record = {"unit": uid, "ok": True}
                    else:
                        call = Call(unit["check"], tuple(unit["objects"]), tuple(core.decode(unit["args"])),
                                    core.decode(unit["kwargs"]))
                        record = {"unit": uid, "obs": core.encode(run_call(ns, call, job["salt"]))}
            except BaseException as e:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are answers too
                record = {"unit": uid, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            signal.alarm(0)
            sink.seek(0)
            sink.truncate()
            emit(record)
    emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
