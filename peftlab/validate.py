"""Config validation shared by every method's ``@dataclass`` config: one message per kind of mistake.

Each check raises ``ValueError`` naming the field, the bad value and what is allowed, and
returns nothing, so a ``__post_init__`` reads as a list of checks.

References:
    - HF peft's config classes (``LoraConfig.__post_init__``...), whose field names the configs keep.
"""

from __future__ import annotations

from collections.abc import Iterable


def positive_int(name: str, value) -> None:
    """``value`` must be an int > 0 (not a bool).

    >>> positive_int("r", 8)
    >>> positive_int("r", 0)
    Traceback (most recent call last):
    ...
    ValueError: r must be a positive integer, got 0
    """
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def one_of(name: str, value, allowed: Iterable) -> None:
    """``value`` must be one of ``allowed`` (a tuple, a list, a dict's keys...); the message lists them.

    >>> one_of("task_type", "SEQ_CLS", ("SEQ_CLS", "CAUSAL_LM", None))
    >>> one_of("init", "GRU", ("MLP", "LSTM"))
    Traceback (most recent call last):
    ...
    ValueError: init must be one of ('MLP', 'LSTM'), got 'GRU'
    """
    shown = allowed if isinstance(allowed, (list, tuple)) else sorted(allowed, key=str)  # a dict's keys, a set
    if value not in shown:
        raise ValueError(f"{name} must be one of {shown}, got {value!r}")


def in_range(name: str, value, low: float, high: float) -> None:
    """``low <= value < high`` (a probability such as a dropout rate: ``in_range("p", p, 0, 1)``).

    >>> in_range("encoder_dropout", 1.0, 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: encoder_dropout must be in [0, 1), got 1.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value!r}")
