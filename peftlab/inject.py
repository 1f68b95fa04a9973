"""Find modules by name and swap them for wrappers: the one injection helper every method uses.

LoRA, IA3, bottleneck adapters and 4-bit layers all do the same thing: walk
``model.named_modules()``, pick the modules whose names match a target list, and replace each
with a wrapper around it (``setattr`` on the parent). This file does that once.

References:
    - minLoRA (cccntu/minLoRA), the ``add_lora`` walk over named modules.
    - HF peft ``check_target_module_exists``: a list entry matches a name equal to it or ending in
      ``"." + entry``; a string is a regex that must match the whole name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import nn

Targets = str | Sequence[str]


def matches(name: str, targets: Targets) -> bool:
    """Whether a module's qualified name is selected by ``targets`` (HF peft's rule).

    >>> matches("bert.encoder.layer.0.attention.self.query", ["query", "value"])
    True
    >>> matches("bert.encoder.layer.0.attention.self.query", r".*\\.layer\\.1\\..*query")
    False
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Return ``(parent_module, attribute_name)`` for a dotted module name."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def leaf_names(model: nn.Module, types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Distinct last name parts of the modules of ``types``: the candidates an error should list."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, types) and n})


def replace_modules(
    model: nn.Module,
    targets: Targets,
    make: Callable[[str, nn.Module], nn.Module],
    types: tuple[type, ...] = (nn.Linear,),
    exclude: Iterable[str] = (),
    what: str = "module",
) -> list[str]:
    """Replace every module of ``types`` whose name matches ``targets`` by ``make(name, module)``.

    Returns the replaced names. Raises ``ValueError`` listing the candidate names when nothing
    matches, so a typo such as ``"q_proj"`` on a BERT model is caught at once.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> replace_modules(m, ["0"], lambda name, mod: nn.Identity())
    ['0']
    >>> replace_modules(m, ["query"], lambda name, mod: mod)
    Traceback (most recent call last):
    ...
    ValueError: target_modules ['query'] matched no Linear module. Candidates: none left
    """
    exclude = list(exclude)
    chosen = [
        n for n, m in model.named_modules()
        if n and isinstance(m, types) and matches(n, targets) and not any(matches(n, [e]) for e in exclude)
    ]
    if not chosen:
        kinds = "/".join(t.__name__ for t in types)
        cands = ", ".join(leaf_names(model, types)) or "none left"
        raise ValueError(f"target_modules {targets!r} matched no {kinds} {what}. Candidates: {cands}")
    for name in chosen:  # collected first: we must not mutate the tree while walking it
        parent, child = get_parent(model, name)
        setattr(parent, child, make(name, getattr(parent, child)))
    return chosen


def freeze(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter (the frozen base of every PEFT method)."""
    for p in model.parameters():
        p.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int, float]:
    """Return ``(trainable, total, percent)``: the numbers of HF peft's ``print_trainable_parameters``.

    Each distinct parameter tensor is counted once (shared/tied weights once), and every module
    in the model counts, including frozen originals kept beside a ``modules_to_save`` copy:
    this is what lives in memory, and it is HF peft's convention too.

    >>> count_parameters(nn.Linear(10, 5))
    (55, 55, 100.0)
    """
    trainable = total = 0
    for p in model.parameters():  # .parameters() already de-duplicates shared tensors
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total, 100.0 * trainable / max(total, 1)


def format_trainable(model: nn.Module) -> str:
    """The ``print_trainable_parameters`` line, e.g. ``trainable params: 55 || all params: 55 || ...``."""
    t, n, pct = count_parameters(model)
    return f"trainable params: {t:,} || all params: {n:,} || trainable%: {pct:.4f}"
