"""The trusted re-run's questions to a student's code, one observer per checker of ``peftlab.checks``.

See :mod:`autograde.observe.core` for the rules; ``ex1`` ... ``ex5`` hold the observers of each exercise.
:func:`load` imports them all (the worker and the grader call it before looking up :data:`OBSERVERS`).
"""

from __future__ import annotations

import importlib

from .core import OBSERVERS, TOLERANCES, compare, decode, encode, observes  # noqa: F401

MODULES = ("ex1", "ex2", "ex3", "ex4", "ex5")


def load() -> dict:
    """Import every exercise's observers; return :data:`OBSERVERS` (checker name -> observer)."""
    for name in MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    return OBSERVERS


def run_call(ns: dict, call, salt: int):
    """The observation of one :class:`autograde.plan.Call` on the objects of namespace ``ns``."""
    from autograde.plan import dtype

    load()
    if call.check not in OBSERVERS:
        raise KeyError(f"no observer for {call.check}: add one to autograde/observe/")
    missing = [name for name in call.objects if name not in ns]
    if missing:
        raise NameError(f"{', '.join(missing)} not defined (is the cell that defines it run?)")
    convert = lambda v: {k: convert(x) for k, x in v.items()} if isinstance(v, dict) else dtype(v)  # noqa: E731
    args = [convert(a) for a in call.args]
    kwargs = {k: convert(v) for k, v in call.kwargs.items()}
    return OBSERVERS[call.check](*(ns[n] for n in call.objects), *args, **kwargs, salt=salt)
