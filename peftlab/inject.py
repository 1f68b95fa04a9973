"""Find modules by name and swap them for wrappers: the one injection helper every method uses.

LoRA, IA3, bottleneck adapters and 4-bit layers all do the same thing: walk
``model.named_modules()``, pick the modules whose names match a target list, and replace each
with a wrapper around it (``setattr`` on the parent). This file does that once, and holds what
the methods share around it: the default targets per model type (:func:`targets_for`), the
names of the task heads, and the one container of named adapters (:class:`NamedAdapters`) with
the walks that switch (:func:`set_adapter`) and bypass (:func:`disable_adapters`) them.

References:
    - minLoRA (cccntu/minLoRA), the ``add_lora`` walk over named modules.
    - HF peft ``check_target_module_exists``: a list entry matches a name equal to it or ending in
      ``"." + entry``; a string is a regex that must match the whole name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

Targets = str | Sequence[str]
T = TypeVar("T")

# The output layers of transformers' models: they are trained in full (modules_to_save) or kept in full precision.
CLASSIFIER_HEADS = ("classifier", "score")  # a sequence classifier's head (BERT, Llama)
LM_HEAD = "lm_head"  # a causal LM's output layer (often tied to the embeddings)
HEAD_NAMES = (*CLASSIFIER_HEADS, LM_HEAD)


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


def targets_for(model: nn.Module | str | None, table: Mapping[str, T], what: str = "default target_modules",
                hint: str = "pass target_modules=[...]") -> T:
    """The entry of ``table`` for a model's ``config.model_type`` (or for a model type given as a string).

    >>> targets_for("bert", {"bert": ["query", "value"]})
    ['query', 'value']
    >>> targets_for(nn.Linear(2, 2), {"bert": ["query", "value"]})
    Traceback (most recent call last):
    ...
    ValueError: no default target_modules known for model_type None (known: ['bert']); pass target_modules=[...]
    """
    model_type = model if isinstance(model, str) or model is None else \
        getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in table:
        raise ValueError(f"no {what} known for model_type {model_type!r} (known: {sorted(table)})"
                         + (f"; {hint}" if hint else ""))
    return table[model_type]


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


def present(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The entries of ``targets`` that name a module of ``model`` (HF peft's rule): what a file's
    ``modules_to_save`` keeps when it lists heads of several architectures (``classifier``, ``score``).

    >>> present(nn.Sequential(nn.Sequential(nn.Linear(2, 2))), ["0.0", "score"])
    ['0.0']
    """
    names = [n for n, _ in model.named_modules() if n]
    return [t for t in targets if any(matches(n, [t]) for n in names)]


def train_in_place(model: nn.Module, targets: Iterable[str]) -> None:
    """Let every module named by ``targets`` train in full, in place (IA3's and BitFit's ``modules_to_save``).

    >>> train_in_place(nn.Sequential(nn.Linear(2, 2)), ["classifier"])
    Traceback (most recent call last):
    ...
    ValueError: modules_to_save entry 'classifier' matched no module. Top-level modules: ['0']
    """
    for target in targets:
        found = [m for n, m in model.named_modules() if n and matches(n, [target])]
        if not found:
            tops = sorted(n for n, _ in model.named_children())
            raise ValueError(f"modules_to_save entry {target!r} matched no module. Top-level modules: {tops}")
        for module in found:
            module.requires_grad_(True)


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


# --- named adapters: one container, one switch ----------------------------------------------------
class NamedAdapters(nn.ModuleDict):
    """The adapters of one wrapped module by name, and which of them runs: ``active`` (None: none).

    Every wrapper that holds several named adapters (LoRA layers, bottleneck sites, trainable head
    copies, task heads) keeps them in one of these; its forward reads ``active``. ``merged`` is True
    while the active adapter is folded into the wrapped weight (LoRA's merge): it cannot be switched
    then. :func:`set_adapter` and :func:`disable_adapters` walk the containers; nothing finds the
    active adapter by its parameter names.

    >>> c = NamedAdapters()
    >>> c.add("a", nn.Linear(2, 2)); c.add("b", nn.Linear(2, 2))
    >>> c.active, c["a"].weight.requires_grad, c["b"].weight.requires_grad  # the newest runs and trains
    ('b', False, True)
    """

    def __init__(self):
        super().__init__()
        self.active: str | None = None
        self.merged = False

    def add(self, name: str, module: nn.Module) -> None:
        """Add adapter ``name`` and make it the active one."""
        if name in self:
            raise ValueError(f"adapter {name!r} already exists on this layer (it has {list(self)})")
        if self.merged:
            raise ValueError(f"adapter {self.active!r} is merged into this layer's weight: unmerge it first")
        self[name] = module
        self.activate(name)

    def activate(self, name: str | None) -> None:
        """Run ``name`` (None: none); only the active adapter trains."""
        self.active = name
        for key, module in self.items():
            module.requires_grad_(key == name)


def adapter_containers(model: nn.Module) -> list[NamedAdapters]:
    """Every :class:`NamedAdapters` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, NamedAdapters)]


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on ``model`` (any method that keeps named adapters), sorted."""
    return sorted({name for c in adapter_containers(model) for name in c})


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter that runs (the first container with one active), or None."""
    return next((c.active for c in adapter_containers(model) if c.active is not None), None)


def pick_adapter(model: nn.Module, names: Iterable[str], adapter_name: str | None) -> str:
    """``adapter_name`` if ``model`` has it; None: the only adapter, else the active one.

    >>> m = nn.Sequential(ModulesToSave(nn.Linear(2, 2), "task"))
    >>> pick_adapter(m, ["task"], None)
    'task'
    >>> pick_adapter(m, ["task"], "default")
    Traceback (most recent call last):
    ...
    ValueError: no adapter named 'default'; this model has ['task']
    """
    names = sorted(names)
    if adapter_name is None:
        if len(names) == 1:
            return names[0]
        active = active_adapter(model)
        if active in names:
            return active
        raise ValueError(f"this model has several adapters and none runs: name one of {names}")
    if adapter_name not in names:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {names}")
    return adapter_name


@contextmanager
def unchanged_on_error(model: nn.Module) -> Iterator[nn.Module]:
    """If the block raises, put ``model`` back as it was: its modules, which parameters train, its adapters.

    What a failed load leaves behind otherwise: wrappers around layers, a frozen base, a half-added adapter.

    >>> m = nn.Sequential(nn.Linear(2, 2))
    >>> try:
    ...     with unchanged_on_error(m):
    ...         freeze(m); m[0] = nn.Identity(); raise ValueError("the file does not fit")
    ... except ValueError:
    ...     pass
    >>> type(m[0]).__name__, m[0].weight.requires_grad
    ('Linear', True)
    """
    modules = [(m, dict(m._modules)) for m in model.modules()]
    trains = [(p, p.requires_grad) for p in model.parameters()]
    active = [(c, c.active) for c in adapter_containers(model)]
    attributes = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(model).items() if not k.startswith("_")}
    try:
        yield model
    except BaseException:
        for m, children in modules:
            m._modules.clear()
            m._modules.update(children)
        for p, flag in trains:
            p.requires_grad_(flag)
        for c, name in active:
            c.active = name
        for k in [k for k in vars(model) if not k.startswith("_") and k not in attributes]:
            delattr(model, k)
        for k, v in attributes.items():
            setattr(model, k, v)
        raise


def _check_unmerged(containers: list[NamedAdapters]) -> None:
    if any(c.merged for c in containers):
        raise ValueError("an adapter is merged into the base weights: unmerge it first (unmerge_lora(model))")


def _sync_num_labels(model: nn.Module) -> None:
    """HF's classification loss reads ``model.num_labels``: keep it equal to the width of the head that runs
    (task heads that switch with the adapter, :class:`peftlab.adapters.TaskHeads`, say theirs)."""
    head = next((m for n, m in model.named_children() if n in CLASSIFIER_HEADS), None)
    num_labels = getattr(head, "num_labels", None)
    if isinstance(num_labels, int) and hasattr(model, "num_labels"):
        model.num_labels = model.config.num_labels = num_labels


def set_adapter(model: nn.Module, name: str) -> None:
    """Run (and train) adapter ``name`` everywhere it exists; modules without it run their base alone.

    The other adapters stay in memory, frozen. Serves LoRA and bottleneck adapters alike.

    >>> m = nn.Sequential(ModulesToSave(nn.Linear(4, 4), "a"))
    >>> m[0].add_copy("b")
    >>> set_adapter(m, "a"); m[0].copies.active, m[0].copies["b"].weight.requires_grad
    ('a', False)
    >>> set_adapter(m, "c")
    Traceback (most recent call last):
    ...
    ValueError: unknown adapter 'c'; this model has ['a', 'b']
    """
    containers = adapter_containers(model)
    names = sorted({n for c in containers for n in c})
    if not containers:
        raise ValueError(f"this {type(model).__name__} has no named adapters (LoRA, bottleneck adapters): IA3, "
                         f"prefix, prompt and BitFit hold one, with their own disable_* (e.g. disable_ia3)")
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}; this model has {names}")
    _check_unmerged(containers)
    for c in containers:
        c.activate(name if name in c else None)
    _sync_num_labels(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare frozen model inside a ``with`` block (original heads too); the adapters come back after.

    >>> m = nn.Sequential(ModulesToSave(nn.Linear(4, 4)))
    >>> with disable_adapters(m):
    ...     m[0].copies.active is None
    True
    >>> m[0].copies.active
    'default'
    """
    containers = adapter_containers(model)
    if not containers:
        raise ValueError(f"this {type(model).__name__} has no named adapters (LoRA, bottleneck adapters): IA3, "
                         f"prefix, prompt and BitFit have their own disable_* (disable_ia3, disable_prefix, ...)")
    _check_unmerged(containers)
    saved = [c.active for c in containers]
    for c in containers:
        c.active = None  # not activate(): which adapter trains does not change
    _sync_num_labels(model)
    try:
        yield model
    finally:
        for c, name in zip(containers, saved, strict=True):
            c.active = name
        _sync_num_labels(model)


class ModulesToSave(nn.Module):
    """A trainable copy of a module (e.g. the classifier head) per adapter; the original stays frozen."""

    def __init__(self, original: nn.Module, adapter_name: str = "default"):
        super().__init__()
        self.original = original
        self.copies = NamedAdapters()  # adapter name -> its trained copy of ``original``
        self.add_copy(adapter_name)

    def add_copy(self, name: str) -> None:
        self.copies.add(name, copy.deepcopy(self.original))

    def forward(self, *args, **kwargs):
        copies = self.copies
        return (self.original if copies.active is None else copies[copies.active])(*args, **kwargs)


def wrap_modules_to_save(model: nn.Module, target: str, adapter_name: str) -> None:
    """Give each module named ``target`` (HF peft's rule, as :func:`matches`) a trainable copy for ``adapter_name``.

    >>> wrap_modules_to_save(nn.Sequential(nn.Linear(2, 2)), "classifier", "default")
    Traceback (most recent call last):
    ...
    ValueError: modules_to_save entry 'classifier' matched no module. Top-level modules: ['0']
    """
    inside = {id(m) for w in model.modules() if isinstance(w, ModulesToSave) for m in w.modules() if m is not w}
    chosen = [n for n, m in model.named_modules() if n and matches(n, [target]) and id(m) not in inside]
    if not chosen:
        tops = sorted(n for n, _ in model.named_children())
        raise ValueError(f"modules_to_save entry {target!r} matched no module. Top-level modules: {tops}")
    for name in chosen:
        parent, child = get_parent(model, name)
        module = getattr(parent, child)
        if isinstance(module, ModulesToSave):  # a second adapter: one more copy
            module.add_copy(adapter_name)
        else:
            setattr(parent, child, ModulesToSave(module, adapter_name))
