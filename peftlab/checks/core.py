"""The checkers' shared core: a :class:`Report` that prints expected vs got, calls into student code, own-work checks.

The locked check cells of ``solutions/`` call these, one or two lines each (``checks.check_lora_init(LoRALinear)``);
the hidden tests call the same functions with edge cases (odd shapes, float64, r=1) and
:func:`assert_own_work`, which fails when the graded object was imported (from peftlab, HF peft, ...)
instead of written in the notebook. Expected values come from closed forms written here, from Hugging
Face's real module trees (meta device) or from peftlab's reference layers, never from the student's code.

References:
    - Hu et al., "LoRA", arXiv:2106.09685 (shapes, init and the alpha / r scaling).
    - Rajbhandari et al., "ZeRO", arXiv:1910.02054 (16 bytes per parameter for Adam training).
    - introPy (lukassnoek/introPy): notebooks that call ``tests`` helpers from a locked cell.
"""

from __future__ import annotations

import dis
import os
import types
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

# Names a graded object must not lean on: the references the course ships (peftlab) and HF peft.
FORBIDDEN = ("peftlab", "peft")


def grading() -> bool:
    """True while the autograder (or ``nbgrader validate``) runs a notebook: long experiments then shrink.

    >>> os.environ.pop("PEFTLAB_GRADING", None) and None
    >>> grading() == (os.environ.get("NBGRADER_EXECUTION") is not None)
    True
    """
    return os.environ.get("PEFTLAB_GRADING") == "1" or os.environ.get("NBGRADER_EXECUTION") is not None


def device() -> torch.device:
    """CUDA when present, else the CPU: every notebook runs on both."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Report:
    """Collects ``expect`` lines, prints them as they come, and fails at the end naming what differed.

    >>> with Report("demo") as r:
    ...     ok = r.expect("answer", 42, 42)
    demo
      ok    answer: expected 42, got 42
    """

    def __init__(self, title: str):
        self.title, self.failed = title, []

    def __enter__(self) -> Report:
        print(self.title)
        return self

    def expect(self, what: str, expected, got, ok: bool | None = None, note: str = "") -> bool:
        ok = (expected == got) if ok is None else bool(ok)
        print(f"  {'ok  ' if ok else 'FAIL'}  {what}: expected {fmt(expected)}, got {fmt(got)}{note}")
        if not ok:
            self.failed.append(what)
        return ok

    def close(self, what: str, expected: torch.Tensor, got, atol: float = 1e-5) -> bool:
        """Tensors equal within ``atol`` (shape first); prints the largest difference."""
        got_t = got if isinstance(got, torch.Tensor) else None
        if got_t is None or got_t.shape != expected.shape:
            shape = tuple(got_t.shape) if got_t is not None else type(got).__name__
            return self.expect(f"{what} shape", tuple(expected.shape), shape)
        err = (got_t.detach().double() - expected.detach().double()).abs().max().item()
        return self.expect(what, f"within {atol:g} of the reference", f"max |difference| {err:.3g}", err <= atol)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.failed:
            raise AssertionError(f"{len(self.failed)} check(s) failed: {', '.join(self.failed)}")


def fmt(x) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10_000:
        return f"{x:,}"
    return repr(x) if not isinstance(x, str) else x


def call(what: str, fn: Callable, *args, **kwargs):
    """Call student code; turn an exception into an AssertionError that says which call failed.

    Warnings are silenced to keep the report readable (library deprecations are not the student's fault).
    They could not cost points anyway: the grader scores a check cell by its verdict, not by its stderr
    (``autograde/preprocessors.py``).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except NotImplementedError:
        raise AssertionError(f"{what} is not implemented yet (it raised NotImplementedError)") from None
    except Exception as e:
        raise AssertionError(f"{what} raised {type(e).__name__}: {e}") from e


# --- "did the student write it?" --------------------------------------------------------------
def raised_by(fn: Callable, *args, **kwargs) -> str:
    """The name of the exception ``fn(*args, **kwargs)`` raises, or ``"nothing"``: what a check reports.

    >>> raised_by(int, "x"), raised_by(int, "1")
    ('ValueError', 'nothing')
    """
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - report what came
        return type(e).__name__
    return "nothing"


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions_of(obj) -> list[types.FunctionType]:
    if isinstance(obj, types.FunctionType):
        return [obj]
    if isinstance(obj, type):
        fns = []
        for cls in obj.__mro__:
            if cls in (object, nn.Module):
                continue
            fns += [v for v in vars(cls).values() if isinstance(v, types.FunctionType)]
        return fns
    return []


def _forbidden(value, forbidden: tuple[str, ...]) -> str | None:
    name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
    if isinstance(name, str) and name.split(".")[0] in forbidden:
        return name
    return None


def assert_own_work(*objs, forbidden: tuple[str, ...] = FORBIDDEN) -> None:
    """Fail unless each object was defined in the notebook and its code uses none of ``forbidden``.

    It checks where the class/function was defined (``__module__ == "__main__"`` in a notebook
    kernel), the base classes, and every global and import name its code refers to.
    """
    for obj in objs:
        label = getattr(obj, "__qualname__", repr(obj))
        module = getattr(obj, "__module__", None)
        if module != "__main__":
            raise AssertionError(f"{label} comes from module {module!r}: write it in this notebook")
        if isinstance(obj, type):
            for base in obj.__mro__[1:]:
                if base.__module__.split(".")[0] in forbidden:
                    raise AssertionError(f"{label} subclasses {base.__module__}.{base.__qualname__}: write your own")
        for fn in _functions_of(obj):
            if fn.__module__.split(".")[0] in forbidden:
                raise AssertionError(f"{label}.{fn.__name__} was defined in {fn.__module__}: write your own")
            for code in _code_objects(fn.__code__):
                names = set(code.co_names)
                names |= {i.argval for i in dis.get_instructions(code) if i.opname == "IMPORT_NAME"}
                for name in names:
                    if name.split(".")[0] in forbidden or name in ("import_module", "__import__"):
                        raise AssertionError(f"{label} uses {name!r}: the graded part must be your own code")
                    source = _forbidden(fn.__globals__.get(name), forbidden)
                    if source:
                        raise AssertionError(f"{label} calls {name!r} from {source}: the graded part must be "
                                             f"your own code")


# --- small models the checkers build (never the student's) ----------------------------------------
def bert_config(name: str = "minilm-l6", **overrides):
    """A ``BertConfig``: one of peftlab's real configs, with fields overridden (odd sizes for hidden tests)."""
    from ..models import arch_config

    config = arch_config(name)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def tiny_model(name: str = "tiny-bert"):
    """A small random classifier from a real architecture (same seed, same weights every call)."""
    from ..models import arch_config, build_from_config

    config = arch_config(name)
    config.pad_token_id = 0  # Llama has none; sequence classification needs one to find the last token
    return build_from_config(config, task="classification", num_labels=3, seed=0)
