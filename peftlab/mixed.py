"""Mixed-adapter batches: row ``i`` of a batch runs LoRA adapter ``adapter_names[i]``, so one base model serves many.

Every LoRA layer computes the base output ``W x`` for the whole batch once, then, for each adapter
name in the batch, picks that adapter's rows and adds their low-rank update, ``(alpha / r) B A x``.
The base weights are shared and never change, so requests for different fine-tunes share one forward
pass (HF peft's ``model(..., adapter_names=[...])``; the idea behind LoRA servers such as S-LoRA).
``"__base__"`` names a row that runs no adapter.

    >>> from peftlab.lora import LoraConfig, apply_lora
    >>> m = nn.Sequential(nn.Linear(4, 4))
    >>> m = apply_lora(m, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "a")
    >>> m = apply_lora(m, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "b").eval()
    >>> x = torch.randn(3, 4)
    >>> with mixed_batch(m, ["a", "__base__", "b"]):
    ...     y = m(x)
    >>> torch.allclose(y[1], m[0].base(x[1]))  # the "__base__" row ran the frozen layer alone
    True

References:
    - Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    - Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv:2311.03285.
    - HF peft ``LoraLayer._mixed_batch_forward`` and ``LoraModel._enable_peft_forward_hooks`` (behaviour
      and errors followed here: unknown names, merged layers, DoRA and training mode are refused).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .inject import ModulesToSave, NamedAdapters
from .lora import LoraLinear

BASE = "__base__"  # HF peft's name for "no adapter on this row"


def _row_groups(adapter_names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Each adapter name -> the indices of the rows that use it (in order of first appearance).

    >>> _row_groups(["a", "__base__", "a"], torch.device("cpu"))
    {'a': tensor([0, 2]), '__base__': tensor([1])}
    """
    names = list(dict.fromkeys(adapter_names))
    return {n: torch.tensor([i for i, a in enumerate(adapter_names) if a == n], device=device) for n in names}


def _check_rows(name: str, x: torch.Tensor, n_rows: int) -> None:
    if x.shape[0] != n_rows:
        raise ValueError(f"adapter_names has {n_rows} names but the batch reaching {name} has {x.shape[0]} rows: "
                         f"give one name per row (generate with num_beams=k: pass num_beams=k to mixed_batch)")


# --- the two forward hooks: they run after the module's own forward, which ran no adapter --------------------
def _add_lora_rows(layer: LoraLinear, args: tuple, out: torch.Tensor, *, name: str,
                   groups: dict[str, torch.Tensor], n_rows: int) -> torch.Tensor:
    """``out`` is the base output ``W x`` of the whole batch; add each adapter's update to its own rows."""
    x = args[0]  # (B, T, in) or (B, in)
    _check_rows(name, x, n_rows)
    for adapter, rows in groups.items():
        if adapter == BASE or adapter not in layer.adapters:  # a layer without this adapter runs its base alone
            continue
        lora = layer.adapters[adapter]
        rows = rows.to(x.device)
        delta = lora(x[rows].to(lora.lora_A.dtype))  # (b, T, out): this adapter's rows only
        out = out.index_add(0, rows, delta.to(out.dtype))  # out of place: autograd and the caller's tensor stay intact
    return out


def _swap_head_rows(wrapper: ModulesToSave, args: tuple, kwargs: dict, out: torch.Tensor, *, name: str,
                    groups: dict[str, torch.Tensor], n_rows: int) -> torch.Tensor:
    """``out`` came from the frozen original head; the rows of an adapter with its own head copy use that copy."""
    x = args[0]
    _check_rows(name, x, n_rows)
    out = out.clone()
    for adapter, rows in groups.items():
        if adapter != BASE and adapter in wrapper.copies:
            rows = rows.to(x.device)
            out[rows] = wrapper.copies[adapter](x[rows], *args[1:], **kwargs).to(out.dtype)
    return out


# --- the context manager ------------------------------------------------------------------------------------
def _lora_names(model: nn.Module) -> list[str]:
    return sorted({n for m in model.modules() if isinstance(m, LoraLinear) for n in m.adapters})


def _check(model: nn.Module, adapter_names: Sequence[str]) -> None:
    """HF peft's checks, made before anything changes: each names the problem."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names) or not adapter_names:
        raise ValueError(f"adapter_names must be a non-empty list of adapter names, one per row, got {adapter_names!r}")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    if not layers:
        raise ValueError(f"this {type(model).__name__} has no LoRA layers: mixed_batch serves LoRA adapters")
    others = sorted({type(m).__name__ for m in model.modules() if not isinstance(m, (LoraLinear, ModulesToSave))
                     and any(isinstance(c, NamedAdapters) for c in m.children())})
    if others:
        raise ValueError(f"mixed_batch serves LoRA adapters only; this model also has named adapters in {others}")
    if model.training:
        raise ValueError("mixed_batch is for inference: call model.eval() first (HF peft refuses adapter_names "
                         "in training mode too)")
    known = _lora_names(model)
    unknown = sorted(set(adapter_names) - set(known) - {BASE})
    if unknown:  # a typo would otherwise run the base model silently (HF peft PR #1558)
        raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; this model has {known} "
                         f"(use {BASE!r} for no adapter)")
    if any(m.adapters.merged for m in layers):
        raise ValueError("an adapter is merged into the base weights, so every row would carry it: "
                         "unmerge it first (peftlab.unmerge_lora(model))")
    configs = getattr(model, "peft_config", {})
    dora = sorted(n for n in set(adapter_names) if getattr(configs.get(n), "use_dora", False))
    if dora:  # DoRA rescales the whole weight per adapter: not an update that adds row by row
        raise ValueError(f"adapter(s) {dora} use DoRA, which mixed_batch does not support (HF peft refuses it too)")
    mixing = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)
              and any(getattr(h, "func", None) is _add_lora_rows for h in m._forward_hooks.values())]
    if mixing:  # nested blocks would add every update twice
        raise ValueError("mixed_batch is already active on this model: nested mixed_batch blocks are not allowed")


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], num_beams: int = 1) -> Iterator[nn.Module]:
    """Inside the block, row ``i`` of every batch runs LoRA adapter ``adapter_names[i]`` (``"__base__"``: none).

    Works for any batch-first input, ``(B, T, d)`` or ``(B, d)``, and through ``model.generate``: greedy
    decoding keeps one row per name; with ``num_beams=k`` (beam search expands each row k times, as HF peft
    does) each name is repeated k times. Head copies (``modules_to_save``) switch row by row too.
    After the block (also after an error) the model runs its active adapter again, as before; switching
    adapters inside the block (set_adapter) would add that adapter to every row on top.

    >>> from peftlab.lora import LoraConfig, apply_lora
    >>> m = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]), "a").eval()
    >>> with mixed_batch(m, ["a", "b"]):
    ...     pass
    Traceback (most recent call last):
    ...
    ValueError: unknown adapter(s) ['b'] in adapter_names; this model has ['a'] (use '__base__' for no adapter)
    """
    _check(model, adapter_names)
    adapter_names = [n for n in adapter_names for _ in range(num_beams)]  # beam search: row i -> rows i*k..i*k+k-1
    device = next(model.parameters()).device
    groups, n_rows = _row_groups(adapter_names, device), len(adapter_names)

    # Each wrapper's own forward runs no adapter (active = None), and a hook adds the right one per row.
    wrappers = [(n, m, m.adapters) for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    wrappers += [(n, m, m.copies) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    saved = [(container, container.active) for _, _, container in wrappers]
    handles = []
    try:
        for name, module, container in wrappers:
            container.active = None  # not activate(): which adapter trains does not change
            if isinstance(module, LoraLinear):
                hook = partial(_add_lora_rows, name=name, groups=groups, n_rows=n_rows)
                handles.append(module.register_forward_hook(hook))
            else:
                hook = partial(_swap_head_rows, name=name, groups=groups, n_rows=n_rows)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield model
    finally:  # normal behaviour again, whatever happened inside the block
        for handle in handles:
            handle.remove()
        for container, active in saved:
            container.active = active
