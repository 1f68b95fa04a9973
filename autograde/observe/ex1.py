"""Observers of exercise 1 (motivation): the student's closed forms, asked the checker's cases and one salted case.

Each mirrors a checker of ``peftlab/checks/ex1.py`` with the same signature (plus ``salt``). The checkers compare
integers with ``==``; :func:`number` turns an answer into what that comparison sees, so ``16``, ``16.0`` and
``torch.tensor(16)`` are one answer and ``16.5`` another. Besides the checker's fixed cases every observer asks one
case drawn from the salt (same kind of inputs, same meaning of the parameters): an answer written for the printed
cases only shows there.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from .core import arch_config, generator, observes

# The fields of BertModel's config that bert_param_count may read, and the salted ranges drawn for them.
BERT_FIELDS = {"vocab_size": (2, 500), "hidden_size": (1, 64), "num_hidden_layers": (1, 8),
               "intermediate_size": (1, 128), "max_position_embeddings": (1, 256), "type_vocab_size": (1, 4)}


def number(x):
    """What the checker's ``expected == got`` sees in an answer: an ``int`` when it is a whole number, else the float,
    else ``("not a number", type name)``.

    >>> number(16), number(16.0), number(torch.tensor(16)), number(16.5), number("16")
    (16, 16, 16, 16.5, ('not a number', 'str'))
    """
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_complex():
        x = x.item()
    if isinstance(x, numbers.Real):
        x = float(x) if not isinstance(x, numbers.Integral) else int(x)
        return int(x) if isinstance(x, int) or x.is_integer() else x
    return "not a number", type(x).__name__


def _draw(salt: int, *keys, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (), generator=generator(salt, *keys)))


@observes("check_param_count")
def param_count(fn: Callable, name: str = "minilm-l6", *, salt: int, **overrides) -> dict:
    """``check_param_count``: ``fn(config)`` on the checker's config, and on one with salted sizes."""
    salted = {k: _draw(salt, "param_count", name, k, low=lo, high=hi) for k, (lo, hi) in BERT_FIELDS.items()}
    return {"count": number(fn(arch_config(name, **overrides))),
            "salted": number(fn(arch_config(name, **{**overrides, **salted})))}


@observes("check_full_finetune_bytes")
def full_finetune_bytes(fn: Callable, cases: tuple = ((1_000_000, 4), (1_000_000, 2)), *, salt: int) -> dict:
    """``check_full_finetune_bytes``: ``fn(n, weight_bytes=b)`` for each case (b in 4 or 2, as the checker's)."""
    n = _draw(salt, "full_finetune_bytes", "n", low=1, high=10**12)
    b = (2, 4)[_draw(salt, "full_finetune_bytes", "b", low=0, high=1)]
    return {"bytes": [number(fn(n, weight_bytes=b)) for n, b in cases],
            "salted": number(fn(n, weight_bytes=b))}


def _pair(got):
    """The checker's ``tuple(got) if isinstance(got, (tuple, list)) else got``, each entry as :func:`number`."""
    if isinstance(got, tuple | list):
        return tuple(number(v) for v in got)
    return "not a tuple", type(got).__name__


@observes("check_storage_bytes")
def storage_bytes(fn: Callable, cases: tuple = ((1_000_000, 10, 1_000, 2),), *, salt: int) -> dict:
    """``check_storage_bytes``: ``fn(n, tasks, adapter, bytes_per_param=b)``, a pair ``(full, base + adapters)``."""
    n = _draw(salt, "storage_bytes", "n", low=1, high=10**11)
    tasks = _draw(salt, "storage_bytes", "tasks", low=1, high=1000)
    adapter = _draw(salt, "storage_bytes", "adapter", low=0, high=10**7)
    b = (1, 2, 4)[_draw(salt, "storage_bytes", "b", low=0, high=2)]
    return {"pairs": [_pair(fn(n, tasks, a, bytes_per_param=b)) for n, tasks, a, b in cases],
            "salted": _pair(fn(n, tasks, adapter, bytes_per_param=b))}
