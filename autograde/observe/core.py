"""Observers: what the trusted re-run asks a student's code, and how two answers are compared.

The grader decides a check cell without trusting the student's kernel (``autograde/README.md``). For every call of a
check cell, e.g. ``checks.check_lora_forward(LoRALinear, d=5, k=7, r=1, alpha=3.0, lead=(3,))``, an *observer*
of the same name and signature (:func:`observes`) builds inputs from a grading-time ``salt``, calls the student's
objects and returns plain data: numbers, strings, tuples, tensors. It runs twice, on the same salt:

- in a sandboxed worker holding only the student's cells (no peftlab, no solutions, no grader state: it can
  compute the answers only by doing the work);
- on the instructor's solution cells.

The trusted grader compares the two answers (:func:`compare`); the student's answer decides nothing by itself.
Observers therefore follow three rules:

1. **Deterministic for every correct solution.** Inputs come from :func:`generator` (salt + the call's arguments);
   implementation-dependent values (a random init, the order of parameters) are not returned as they are: set
   parameters to seeded values before a forward, return invariants (shapes, ``max |A| <= bound``) for an init.
2. **Plain data out** (:data:`PLAIN`): the worker encodes it as JSON (:func:`encode`), never pickle.
3. **Only torch, transformers and the standard library**: the worker has no peftlab.

A call into student code that raises is the student's answer too: wrap it in :func:`attempt` to return the
exception's name, or let it propagate (the call then fails, with the exception's name in the feedback).

>>> @observes("check_double")
... def double(fn, cases=((1,), (2,)), *, salt: int):
...     return {"values": [fn(*c) for c in cases]}
>>> OBSERVERS["check_double"](lambda x: 2 * x, salt=0)
{'values': [2, 4]}
>>> compare({"values": [2, 4]}, {"values": [2, 5]})
['values[1]']
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable

import torch

OBSERVERS: dict[str, Callable] = {}
TOLERANCES: dict[str, dict[str, float]] = {}
PLAIN = (type(None), bool, int, float, str, tuple, list, dict, torch.Tensor, torch.dtype)
DEFAULT_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def observes(check: str, tolerance: dict[str, float] | None = None) -> Callable:
    """Register the decorated function as the observer of the checker ``check`` (its name in peftlab.checks).

    ``tolerance`` maps an observation key (a top-level key of the returned dict) to an absolute tolerance for its
    tensors and floats; without one, tensors use :data:`DEFAULT_ATOL` for their dtype and floats ``1e-9`` relative.
    """
    def register(fn: Callable) -> Callable:
        if check in OBSERVERS:
            raise ValueError(f"two observers for {check!r}")
        OBSERVERS[check] = fn
        TOLERANCES[check] = dict(tolerance or {})
        return fn
    return register


def generator(salt: int, *keys) -> torch.Generator:
    """A CPU generator seeded from the grading-time ``salt`` and ``keys`` (the call's arguments, a purpose).

    >>> a = torch.randn(3, generator=generator(7, "x", 2))
    >>> torch.equal(a, torch.randn(3, generator=generator(7, "x", 2)))
    True
    """
    digest = hashlib.sha256(repr((salt, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def seed(salt: int, *keys) -> int:
    """The integer seed of :func:`generator` (for ``build_model(..., seed=)`` and ``torch.manual_seed``)."""
    return int(generator(salt, *keys).initial_seed())


def seed_everything(salt: int, *keys) -> None:
    """Seed torch's global generator from ``salt`` and ``keys``: for code that draws from it (``nn.Linear(...)``)."""
    torch.manual_seed(seed(salt, *keys))


def attempt(fn: Callable, *args, **kwargs):
    """``("ok", result)`` or ``("raised", exception name)``: a call whose failure is an answer to compare.

    >>> attempt(int, "x"), attempt(int, "1")
    (('raised', 'ValueError'), ('ok', 1))
    """
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exception's name is the observation
        return "raised", type(e).__name__


# --- plain data on the wire (never pickle: the trusted grader reads what an untrusted process wrote) ----------
DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                              torch.int16, torch.int8, torch.uint8, torch.bool)}


def encode(value, depth: int = 0):
    """``value`` as JSON-able data; tensors become ``{"__tensor__": dtype, "shape": ..., "data": base64}``."""
    if depth > 20:
        raise ValueError("observation nested too deep")
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if str(t.dtype) not in DTYPES:
            raise ValueError(f"tensor dtype {t.dtype} cannot be sent; use one of {sorted(DTYPES)}")
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype), "shape": list(t.shape), "data": base64.b64encode(raw).decode()}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, bool | int | str | type(None)) or isinstance(value, float):
        return value
    if isinstance(value, tuple | list):
        return {"__tuple__": [encode(v, depth + 1) for v in value]} if isinstance(value, tuple) else \
            [encode(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    raise TypeError(f"cannot send a {type(value).__name__} as an observation (plain data only: {PLAIN})")


def decode(data, depth: int = 0):
    """The inverse of :func:`encode`, strict: anything else raises ``ValueError``."""
    if depth > 20:
        raise ValueError("observation nested too deep")
    if isinstance(data, bool | int | float | str | type(None)):
        return data
    if isinstance(data, list):
        return [decode(v, depth + 1) for v in data]
    if not isinstance(data, dict) or len(data) not in (1, 3):
        raise ValueError(f"not an observation: {type(data).__name__}")
    if "__tensor__" in data:
        dtype = DTYPES.get(data["__tensor__"])
        shape = data.get("shape")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError("bad tensor in observation")
        raw = base64.b64decode(data["data"], validate=True)
        n = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != n * itemsize:
            raise ValueError("tensor size does not match its shape")
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape).clone()
    if "__dtype__" in data:
        if data["__dtype__"] not in DTYPES:
            raise ValueError("bad dtype in observation")
        return DTYPES[data["__dtype__"]]
    if "__float__" in data:
        if data["__float__"] not in ("nan", "inf", "-inf"):
            raise ValueError("bad float in observation")
        return float(data["__float__"])
    if "__tuple__" in data:
        return tuple(decode(v, depth + 1) for v in data["__tuple__"])
    if "__dict__" in data:
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in data["__dict__"]}
    raise ValueError("not an observation")


# --- comparing the student's answer with the solution's --------------------------------------------------------
def compare(expected, got, tolerance: dict[str, float] | None = None, path: str = "") -> list[str]:
    """The paths where ``got`` differs from ``expected`` (empty: the same answer). Names only, never values:
    the feedback may show which observation differed, not what the hidden answer was."""
    tolerance = tolerance or {}
    top = path.split("[")[0].split(".")[0]
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
            return [path or "value"]
        if expected.dtype == torch.bool or not expected.is_floating_point():
            return [] if torch.equal(expected, got) else [path or "value"]
        atol = tolerance.get(top, DEFAULT_ATOL.get(expected.dtype, 1e-5))
        e, g = expected.double(), got.double()
        same_nan = torch.equal(e.isnan(), g.isnan())
        ok = same_nan and bool(((e - g).abs() <= atol).logical_or(e.isnan()).all())
        return [] if ok else [path or "value"]
    if isinstance(expected, float) and not isinstance(expected, bool):
        if not isinstance(got, int | float) or isinstance(got, bool):
            return [path or "value"]
        if math.isnan(expected):
            return [] if math.isnan(got) else [path or "value"]
        atol = tolerance.get(top, 0.0)
        return [] if math.isclose(expected, got, rel_tol=1e-9, abs_tol=atol) else [path or "value"]
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return [path or "value"]
        return [p for k in expected for p in compare(expected[k], got[k], tolerance, f"{path}.{k}" if path else str(k))]
    if isinstance(expected, tuple | list):
        if type(got) is not type(expected) or len(got) != len(expected):
            return [path or "value"]
        pairs = enumerate(zip(expected, got, strict=True))
        return [p for i, (e, g) in pairs for p in compare(e, g, tolerance, f"{path}[{i}]")]
    if type(got) is not type(expected) or got != expected:
        return [path or "value"]
    return []


# --- what the student's cells may assume, and the models the observers build --------------------------------
# The worker runs a student's cells after this, not after the notebook's setup cell: the setup cell imports
# peftlab, which the worker does not have. Every name a solution cell may use from the setup cell is here.
PRELUDE = """\
import copy
import math
import torch
from torch import nn
import torch.nn.functional as F
from transformers import DynamicCache
GRADING = True
DEVICE = torch.device("cpu")
"""
ARCH: dict[str, dict] = {}  # name -> raw transformers config: peftlab.models.ARCH_CONFIGS, sent by the grader


def arch_config(name: str, **overrides):
    """The transformers config of one of peftlab's architectures (``"tiny-bert"``), fields overridden."""
    from transformers import CONFIG_MAPPING

    if not ARCH:
        try:  # in the grader's own process (and tests): peftlab is there
            from peftlab.models import ARCH_CONFIGS
        except ImportError:
            raise RuntimeError("observe.core.ARCH is empty: the worker did not receive the model configs") from None
        ARCH.update(ARCH_CONFIGS)
    if name not in ARCH:
        raise ValueError(f"unknown model config {name!r}: choose one of {sorted(ARCH)}")
    raw = dict(ARCH[name])
    config = CONFIG_MAPPING[raw.pop("model_type")](**raw)
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def build_model(config, task: str = "causal_lm", dtype: torch.dtype = torch.float32, num_labels: int = 3,
                seed: int = 0, device: str = "cpu"):
    """A model with random weights from ``config`` (a name or a config), as ``peftlab.models.build_from_config``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = arch_config(config) if isinstance(config, str) else config
    if task == "causal_lm":
        auto = AutoModelForCausalLM
    elif task == "classification":
        auto, config.num_labels = AutoModelForSequenceClassification, num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
    else:
        raise ValueError(f"task must be 'causal_lm' or 'classification', got {task!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    return model.eval()
