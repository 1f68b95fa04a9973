"""Old module names of earlier releases, kept importable so a notebook begun on an earlier release still runs.

``import peftlab.checks_ex3`` gives the very module ``peftlab.checks.ex3`` (not a copy), loaded only when
asked for: the library itself never imports the checkers or the studies.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

RENAMED = {
    "peftlab.checks_ex3": "peftlab.checks.ex3",
    "peftlab.checks_ex4": "peftlab.checks.ex4",
    "peftlab.checks_ex5": "peftlab.checks.ex5",
    "peftlab.memory": "peftlab.experiments.memory",
    "peftlab.qlora": "peftlab.experiments.qlora",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in RENAMED else None

    def create_module(self, spec):
        return importlib.import_module(RENAMED[spec.name])  # the module itself, not a copy

    def exec_module(self, module):
        # The import system set __spec__ to the alias's: put back the module's own (found by its real name).
        module.__spec__ = importlib.util.spec_from_file_location(module.__name__, module.__file__)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
