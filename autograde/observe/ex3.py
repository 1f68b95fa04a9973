"""Observers of exercise 3 (bottleneck adapters): what ``peftlab/checks/ex3.py`` asks, as plain data.

Every ``rep.expect`` / ``rep.close`` of a checker becomes a key of the observation. The random init of an adapter
is returned as invariants (shapes, ``up == 0``, ``max |W_down| > 0``); before a forward that should depend on
trained weights, every adapter tensor is set to values seeded by the salt, the site, the task and the tensor's
``state_dict`` key, so any correct implementation gives the same logits. The BERT models are
:func:`core.build_model`'s, with weights seeded by the salt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import core


def _fill(module: nn.Module, salt: int, *keys, std: float = 0.2) -> list[str]:
    """Set every floating tensor of ``module.state_dict()`` to N(0, std^2) values seeded by its key (a LayerNorm's
    weight around 1), as the checker's ``randomize``; return the sorted keys (the checker compares them)."""
    state = module.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            t = state[key]
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=core.generator(salt, *keys, key), dtype=torch.float64) * std
                t.copy_((noise + (1.0 if key.endswith("layer_norm.weight") else 0.0)).to(t.dtype))
    return sorted(state)


def _linear_shape(x):
    return tuple(x.weight.shape) if isinstance(x, nn.Linear) else type(x).__name__


# --- 3.1 / 3.2: the adapter module ------------------------------------------------------------
@core.observes("check_adapter_layer")
def adapter_layer(cls: type, bottleneck_size: Callable, adapter_param_count: Callable, d: int = 32,
                  reduction_factor: int = 8, non_linearity: str = "relu", layer_norm: bool = False,
                  dtype: torch.dtype = torch.float32, *, salt: int) -> dict:
    """``check_adapter_layer``: m, the count, the module's shapes and init, the identity at init."""
    m = max(1, d // reduction_factor)  # the checker's input to the next calls, not an answer
    obs = {"bottleneck_size": bottleneck_size(d, reduction_factor),
           "param_count": adapter_param_count(d, m, layer_norm=layer_norm)}
    core.seed_everything(salt, "adapter_layer", d)
    adapter = cls(d, m, non_linearity, layer_norm=layer_norm).to(dtype)
    down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
    obs["shapes"] = [_linear_shape(down), _linear_shape(up)]
    if not (isinstance(down, nn.Linear) and isinstance(up, nn.Linear)):
        return obs
    obs["biases"] = [down.bias is not None, up.bias is not None]
    obs["up_zero"] = bool((up.weight == 0).all()) and (up.bias is None or bool((up.bias == 0).all()))
    obs["down_random"] = bool(down.weight.detach().abs().max() > 0)
    obs["layer_norms"] = [tuple(n.normalized_shape) for n in adapter.modules() if isinstance(n, nn.LayerNorm)]
    obs["n_params"] = sum(p.numel() for p in adapter.parameters())
    obs["n_trainable"] = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    h = torch.randn(2, 5, d, generator=core.generator(salt, "adapter_layer", "h", d), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = adapter(h)
    obs["identity_at_init"] = isinstance(out, torch.Tensor) and out.shape == h.shape and torch.equal(out, h)
    obs["output_at_init"] = out if isinstance(out, torch.Tensor) else type(out).__name__  # = h for every solution
    return obs


@core.observes("check_adapter_forward")
def adapter_forward(cls: type, d: int = 32, m: int = 4, non_linearity: str = "relu", layer_norm: bool = False,
                    dtype: torch.dtype = torch.float32, lead: tuple[int, ...] = (2, 5), *, salt: int) -> dict:
    """``check_adapter_forward``: the output with seeded weights, its dtype, the branch, gradients to down and up."""
    core.seed_everything(salt, "adapter_forward")
    mine = cls(d, m, non_linearity, layer_norm=layer_norm).to(dtype)
    obs = {"keys": _fill(mine, salt, "adapter_forward", d, m)}
    x = torch.randn(*lead, d, generator=core.generator(salt, "adapter_forward", "x", d), dtype=torch.float64)
    x = x.to(dtype)
    with torch.no_grad():
        got = mine(x)
    obs["output"], obs["dtype"] = got, getattr(got, "dtype", None)
    if layer_norm:  # without the residual the output is only the bottleneck's
        obs["branch"] = got - x
    mine(x).square().sum().backward()
    grads = [getattr(getattr(mine, n, None), "weight", None) for n in ("down", "up")]
    obs["grads"] = [w is not None and w.grad is not None and bool(w.grad.abs().sum() > 0) for w in grads]
    return obs


# --- 3.2: inserting adapters into BERT ---------------------------------------------------------
def _bert(name: str, dtype: torch.dtype, salt: int, **overrides) -> nn.Module:
    """The checker's ``bert_model``: a random BERT classifier (3 labels), weights seeded by the salt."""
    config = core.arch_config(name, **overrides)
    return core.build_model(config, "classification", dtype, num_labels=3, seed=core.seed(salt, "bert", name))


def _token_ids(model: nn.Module, salt: int, purpose: str) -> dict:
    """Random ids (batch 2, length 7) and a mask with one padded row, as the checker's ``token_ids``."""
    ids = torch.randint(5, model.config.vocab_size, (2, 7), generator=core.generator(salt, "ids", purpose))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row: the mask must still work through the wrapped layers
    return {"input_ids": ids, "attention_mask": mask}


def _names(got):
    """The returned site names, as plain data (a non-list answer by its type's name)."""
    if isinstance(got, list | tuple):
        return [n if isinstance(n, str) else type(n).__name__ for n in got]
    return got if isinstance(got, str | type(None)) else type(got).__name__


def _layers(model: nn.Module, layer_cls: type) -> list[tuple[str, nn.Module]]:
    return [(n, mod) for n, mod in model.named_modules() if isinstance(mod, layer_cls)]


def _adapters(layer: nn.Module) -> dict:
    adapters = getattr(layer, "adapters", None)
    return dict(adapters.items()) if isinstance(adapters, nn.ModuleDict | dict) else {}


def _trainable_tasks(model: nn.Module) -> list[str]:
    """The checker's "what trains": task names of trainable adapter tensors, other trainable names as they are."""
    return sorted({n.split(".adapters.")[1].split(".")[0] if ".adapters." in n else n
                   for n, p in model.named_parameters() if p.requires_grad})[:4]


@core.observes("check_add_adapters")
def add_adapters(add_adapters: Callable, adapter_cls: type, layer_cls: type, placement: str = "houlsby",
                 name: str = "tiny-bert", reduction_factor: int = 16, non_linearity: str | None = None,
                 layer_norm: bool = False, dtype: torch.dtype = torch.float32, *, salt: int, **overrides) -> dict:
    """``check_add_adapters``: sites, wrappers, adapters, frozen base, counts, logits at init and with seeded
    adapter weights."""
    model = _bert(name, dtype, salt, **overrides)
    originals = dict(model.named_modules())
    x = _token_ids(model, salt, "add_adapters")
    got = add_adapters(model, placement=placement, reduction_factor=reduction_factor, non_linearity=non_linearity,
                       layer_norm=layer_norm)
    layers = _layers(model, layer_cls)
    mine = {s: _adapters(layer).get("default") for s, layer in layers}
    obs = {"returned": _names(got), "wrapped": [s for s, _ in layers],
           "wraps_original": all(getattr(layer, "base", None) is originals.get(s) for s, layer in layers),
           "default_adapter": [isinstance(a, adapter_cls) for a in mine.values()],
           "n_adapters": sum(isinstance(mod, adapter_cls) for mod in model.modules())}
    with torch.no_grad():
        obs["logits_at_init"] = model(**x).logits
    obs["trainable_outside"] = sorted(n for n, p in model.named_parameters() if p.requires_grad
                                      and ".adapters." not in n)[:3]
    obs["n_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not all(isinstance(a, adapter_cls) for a in mine.values()):
        return obs
    obs["keys"] = [_fill(a, salt, "add_adapters", s, "default") for s, a in mine.items()]
    with torch.no_grad():
        obs["logits_trained"] = model(**x).logits
    return obs


# --- 3.3: several tasks, one frozen model ----------------------------------------------------------
@core.observes("check_set_adapter")
def set_adapter(add_adapters: Callable, set_adapter: Callable, adapter_cls: type, layer_cls: type,
                second: dict | None = None, name: str = "tiny-bert", dtype: torch.dtype = torch.float32, *,
                salt: int, **overrides) -> dict:
    """``check_set_adapter``: two tasks; for each switch the logits (seeded weights) and what trains; ``None``; an
    unknown name's exception."""
    second = second or dict(placement="houlsby", reduction_factor=8)
    first = dict(placement="houlsby", reduction_factor=16)
    model = _bert(name, dtype, salt, **overrides)
    x = _token_ids(model, salt, "set_adapter")
    add_adapters(model, adapter_name="sentiment", **first)
    add_adapters(model, adapter_name="topic", **second)
    layers = _layers(model, layer_cls)
    obs = {"wrapped": [s for s, _ in layers],
           "tasks": [sorted(k for k, a in _adapters(layer).items() if isinstance(a, adapter_cls))
                     for _, layer in layers]}
    obs["keys"] = [_fill(a, salt, "set_adapter", s, task) for s, layer in layers
                   for task, a in sorted(_adapters(layer).items())]
    for i, task in enumerate(("sentiment", "topic", "sentiment")):
        set_adapter(model, task)
        with torch.no_grad():
            obs[f"logits_{i}_{task}"] = model(**x).logits
        obs[f"trains_{i}_{task}"] = _trainable_tasks(model)
    set_adapter(model, None)
    with torch.no_grad():
        obs["logits_none"] = model(**x).logits
    obs["n_trainable_none"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    status, what = core.attempt(set_adapter, model, "news")
    obs["unknown_name"] = what if status == "raised" else "nothing"
    return obs

