"""The house imports downwards only: no library module (``peftlab`` outside experiments/ and checks/) imports the
studies or the checkers."""

import json
import pkgutil
import subprocess
import sys

import peftlab

UPPER_ROOMS = ("peftlab.experiments", "peftlab.checks")


def library_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(peftlab.__path__, "peftlab.")]
    return ["peftlab"] + sorted(n for n in names if not n.startswith(UPPER_ROOMS))


def test_library_modules_never_import_the_studies_or_the_checkers():
    # One fresh interpreter imports the modules one by one and reports which upper-room modules each import added:
    # a module imported earlier was already checked when it came in, so every culprit is named.
    code = f"""
import importlib, json, sys
rooms, found = {UPPER_ROOMS!r}, {{}}
for name in {library_modules()!r}:
    importlib.import_module(name)
    upper = sorted(m for m in sys.modules if m.startswith(rooms) and not any(m in v for v in found.values()))
    if upper:
        found[name] = upper
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == {}
    assert "peftlab.models" in library_modules() and "peftlab.train" in library_modules()
    assert not any(n.startswith(UPPER_ROOMS) for n in library_modules())
