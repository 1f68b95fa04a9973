"""The house imports downwards only: no library module (``peftlab`` outside experiments/ and checks/) imports the
studies or the checkers."""

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys

import peftlab

UPPER_ROOMS = ("peftlab.experiments", "peftlab.checks")


def library_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(peftlab.__path__, "peftlab.")]
    return ["peftlab"] + sorted(n for n in names if not n.startswith(UPPER_ROOMS) and not n.endswith(".conftest"))


def optional_modules() -> list[str]:
    """Library modules that need an optional dependency this machine lacks (the Triton kernels on CPU CI)."""
    return [] if importlib.util.find_spec("triton") else ["peftlab.kernels.nf4_triton"]


def imported_names(module: str) -> set[str]:
    """Every module an ``import`` statement in ``module``'s source names, relative imports resolved."""
    spec = importlib.util.find_spec(module)
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(spec.origin).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names.update([base] + [f"{base}.{a.name}" for a in node.names])
    return names


def test_library_modules_never_import_the_studies_or_the_checkers():
    # One fresh interpreter imports the modules one by one and reports which upper-room modules each import added:
    # a module imported earlier was already checked when it came in, so every culprit is named.
    code = f"""
import importlib, json, sys
rooms, found = {UPPER_ROOMS!r}, {{}}
for name in {[m for m in library_modules() if m not in optional_modules()]!r}:
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


def test_modules_that_cannot_be_imported_here_name_no_upper_room_either():
    # What the fresh interpreter cannot import on this machine (no triton) is checked from its source instead.
    for module in optional_modules():
        upper = sorted(n for n in imported_names(module) if n.startswith(UPPER_ROOMS))
        assert upper == [], f"{module} imports {upper}"
    assert imported_names("peftlab.quant") >= {"peftlab.nf4"}  # the source reader does see imports
