"""Time the course notebooks: each solution notebook in full and in grading mode, and autograding one student.

Writes ``reports/course_timing.json``. Targets: ≤ 180 s per notebook in full, ≤ 120 s to autograde one student's
notebooks. Run from the repository root: ``python benchmarks/course_timing.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autograde.pipeline import assignments  # noqa: E402


def execute(path: Path, grading: bool) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PEFTLAB_GRADING": "1" if grading else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(path),
                        "--output-dir", tmp, "--ExecutePreprocessor.timeout=600"], check=True, env=env,
                       capture_output=True, cwd=path.parent)
        return round(time.perf_counter() - start, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "reports" / "course_timing.json"))
    parser.add_argument("--skip-full", action="store_true", help="only grading mode and autograding")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    result = {"cpu_count": os.cpu_count(), "load_average_at_start": round(load, 2), "notebooks": {}}
    for name in assignments(ROOT):
        nb = ROOT / "solutions" / name / f"{name}.ipynb"
        row = {"grading_mode_s": execute(nb, grading=True)}
        if not args.skip_full:
            row["full_s"] = execute(nb, grading=False)
        result["notebooks"][name] = row
        print(name, row, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        submitted = Path(tmp) / "submitted" / "solution"
        shutil.copytree(ROOT / "autograde" / "examples" / "solution", submitted)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "autograde", "grade", str(submitted.parent), "--course-dir",
                        str(Path(tmp) / "course")], check=True, cwd=ROOT, capture_output=True)
        total = time.perf_counter() - start
        scores = (Path(tmp) / "course" / "scores.csv").read_text()
    result["autograde_one_student_s"] = round(total, 1)
    result["autograde_scores_csv"] = scores
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
