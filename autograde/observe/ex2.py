"""Observers of exercise 2 (LoRA): the student's layer, injection, counts, merge, HF peft model and LoRA files.

Each mirrors a checker of ``peftlab/checks/ex2.py`` with the same signature (plus ``salt``), and returns what that
checker looks at. What the student's code draws at random (``lora_A``'s init) is never returned: the init observer
returns invariants of it, the others copy salted values into ``lora_A`` and ``lora_B`` before anything is computed,
so every correct implementation answers the same tensors. The base layer, the tiny models' weights and the inputs
come from the salt too; names of wrapped modules are returned in ``named_modules()`` order, as the checkers want.
Tensors compared within a checker's tolerance carry it (:func:`observes`); the others use the dtype's default.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .core import arch_config, build_model, generator, observes, seed, seed_everything
from .ex1 import number

LORA = ("lora_A", "lora_B")


def _tiny(name: str, salt: int) -> nn.Module:
    """peftlab.checks.core.tiny_model: a random 3-label classifier of ``name``, its weights drawn from the salt."""
    config = arch_config(name)
    config.pad_token_id = 0  # Llama has none; sequence classification needs one to find the last token
    return build_model(config, "classification", num_labels=3, seed=seed(salt, "tiny", name))


def _ids(salt: int, *keys, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(5, 200, shape, generator=generator(salt, "ids", *keys))


def _set_lora(layers, salt: int, *keys) -> None:
    """Salted ``A ~ U(-1/sqrt(k), 1/sqrt(k))`` and ``B ~ 0.1 N(0, 1)`` in each LoRA layer, in order (a trained look).

    The values are drawn in storage order, whatever the tensors' shapes: a layer that stores A and B transposed holds
    the same sequence of values (it fails the checks of the layer, not those of saving and loading it)."""
    g = generator(salt, "lora", *keys)
    with torch.no_grad():
        for m in layers:
            a, b = m.lora_A, m.lora_B
            a.copy_((torch.rand(a.shape, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(m.base.in_features))
            b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.1)


def _tensor(x, dtype: torch.dtype):
    """A tensor answer, detached, in ``dtype`` (the checkers compare values, not dtypes); else its type's name."""
    return x.detach().to(dtype).clone() if isinstance(x, torch.Tensor) else ("not a tensor", type(x).__name__)


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        return "not a number", type(x).__name__


def _layer(cls: type, d: int, k: int, r: int, alpha: float, dtype, salt: int, *keys, **kwargs):
    seed_everything(salt, "layer", d, k, r, *keys)
    base = nn.Linear(k, d).to(dtype)
    return base, cls(base, r, alpha, **kwargs)


@observes("check_lora_init", tolerance={"output": 1e-6})
def lora_init(cls: type, d: int = 32, k: int = 16, r: int = 4, alpha: float = 8.0,
              dtype: torch.dtype = torch.float32, *, salt: int) -> dict:
    """``check_lora_init``: shapes, trainable A and B, frozen base, B = 0, A's Kaiming bound (over 8 salted inits),
    dtypes, scaling, trainable count and the output at init."""
    base, layer = _layer(cls, d, k, r, alpha, dtype, salt)
    a, b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
    obs = {"base_is_wrapped": getattr(layer, "base", None) is base,
           "A_shape": tuple(a.shape) if isinstance(a, torch.Tensor) else None,
           "B_shape": tuple(b.shape) if isinstance(b, torch.Tensor) else None}
    if obs["A_shape"] != (r, k) or obs["B_shape"] != (d, r):
        return obs
    spreads, pooled = [], []
    for i in range(8):  # A's spread over 8 inits: a few draws of r * k values decide nothing
        a_i = a if i == 0 else _layer(cls, d, k, r, alpha, dtype, salt, "spread", i)[1].lora_A
        spreads.append(a_i.detach().double().abs().max().item())
        pooled.append(a_i.detach().double().flatten())
    bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(k), 1/sqrt(k)), as nn.Linear
    x = torch.randn(3, k, generator=generator(salt, "x", d, k, r), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = layer(x)
    return {**obs,
            "A_B_trainable_parameters": isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter)
            and a.requires_grad and b.requires_grad,
            "base_frozen": [base.weight.requires_grad, base.bias.requires_grad],
            "B": b.detach().clone(),
            "A_nonzero": min(spreads) > 0,
            "A_within_bound": max(spreads) <= bound + 1e-6,
            "A_spread": torch.cat(pooled).std().item() > bound / 4,
            "dtypes": [a.dtype, b.dtype],
            "scaling": _float(getattr(layer, "scaling", None)),
            "trainable": sum(p.numel() for p in layer.parameters() if p.requires_grad),
            "output": _tensor(out, dtype)}


@observes("check_lora_forward")
def lora_forward(cls: type, d: int = 32, k: int = 16, r: int = 4, alpha: float = 8.0,
                 dtype: torch.dtype = torch.float32, lead: tuple[int, ...] = (2, 5), *, salt: int) -> dict:
    """``check_lora_forward``: with salted A and B, the output and its dtype, ``delta_weight()``, and which of A, B
    and the base weight get gradients."""
    base, layer = _layer(cls, d, k, r, alpha, dtype, salt)
    _set_lora([layer], salt, "forward", d, k, r)
    x = torch.randn(*lead, k, generator=generator(salt, "x", d, k, r, lead), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        out = layer(x)
        delta = layer.delta_weight()
    layer(x).sum().backward()
    return {"output": _tensor(out, dtype), "dtype": getattr(out, "dtype", None), "delta": _tensor(delta, dtype),
            "grads": [layer.lora_A.grad is not None, layer.lora_B.grad is not None, base.weight.grad is not None]}


@observes("check_lora_dropout", tolerance={"output": 1e-6})
def lora_dropout(cls: type, d: int = 8, k: int = 8, r: int = 2, *, salt: int) -> dict:
    """``check_lora_dropout``: the output in train mode with ``lora_dropout=0.5`` and B = 0 (dropout on the LoRA path
    only leaves base(x))."""
    _, layer = _layer(cls, d, k, r, 4.0, torch.float32, salt, "dropout", lora_dropout=0.5)
    layer.train()
    x = torch.randn(64, k, generator=generator(salt, "x", "dropout", d, k, r))
    with torch.no_grad():
        return {"output": _tensor(layer(x), torch.float32)}


@observes("check_add_lora", tolerance={"logits": 1e-5})
def add_lora(add_lora: Callable, cls: type, name: str = "tiny-bert", targets=("query", "value"), r: int = 4,
             alpha: float = 8.0, *, salt: int) -> dict:
    """``check_add_lora``: returned and wrapped names, trainable names other than A / B, the trainable count, and the
    logits right after injection."""
    model = _tiny(name, salt)
    got = add_lora(model, list(targets), r=r, lora_alpha=alpha)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        logits = model(input_ids=_ids(salt, "add_lora", name, shape=(2, 7))).logits
    return {"returned": [n if isinstance(n, str) else ("not a str", type(n).__name__) for n in got]
            if got is not None else None,
            "wrapped": [n for n, m in model.named_modules() if isinstance(m, cls)],
            "other_trainable": [n for n in trainable if not n.endswith(LORA)],
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "logits": logits.clone()}


def _raised(fn: Callable, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exception's name is the observation
        return type(e).__name__
    return "nothing"


@observes("check_add_lora_no_match")
def add_lora_no_match(add_lora: Callable, *, salt: int) -> dict:
    """``check_add_lora_no_match``: what ``add_lora(model, ["q_proj"])`` raises on a BERT model."""
    return {"raised": _raised(add_lora, _tiny("tiny-bert", salt), ["q_proj"], r=2, lora_alpha=4.0)}


@observes("check_merge", tolerance={"merge_adds": 1e-5, "merge_changes_logits": 1e-4, "merging_twice_adds": 1e-5,
                                    "unmerge_leaves": 1e-6, "unmerge_changes_logits": 1e-4})
def merge(add_lora: Callable, merge_lora: Callable, unmerge_lora: Callable, cls: type, name: str = "tiny-bert",
          targets=("query", "value"), r: int = 4, alpha: float = 16.0, *, salt: int) -> dict:
    """``check_merge``: with salted A and B, what merging once and twice adds to the first layer's base weight, what
    unmerging leaves in every base weight, and how much merging and unmerging change the logits. Changes, as the
    checker sees them: it compares the layer's weight with itself and the model's logits with themselves (a wrong
    forward or base is check_lora_forward's and check_lora_init's business)."""
    model = _tiny(name, salt)
    add_lora(model, list(targets), r=r, lora_alpha=alpha)
    layers = [m for m in model.modules() if isinstance(m, cls)]
    _set_lora(layers, salt, "merge", name)
    w0 = [m.base.weight.detach().clone() for m in layers]
    ids = _ids(salt, "merge", name, shape=(2, 9))
    obs = {}
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
        merge_lora(model)
        obs["merge_adds"] = layers[0].base.weight - w0[0]
        obs["merge_changes_logits"] = model(input_ids=ids).logits - before
        merge_lora(model)
        obs["merging_twice_adds"] = layers[0].base.weight - w0[0]
        unmerge_lora(model)
        obs["unmerge_leaves"] = [m.base.weight - w for m, w in zip(layers, w0, strict=True)]
        obs["unmerge_changes_logits"] = model(input_ids=ids).logits - before
    return obs


@observes("check_lora_counts")
def lora_counts(lora_param_count: Callable, count_lora_params: Callable, name: str = "tiny-bert",
                targets=("query", "value"), r: int = 4, shapes=((384, 384, 8), (1536, 384, 16)), *, salt: int) -> dict:
    """``check_lora_counts``: the closed form on the checker's shapes and a salted one; the model count at ``r`` and
    at a salted rank; LoRA parameters left in the model (none)."""
    g = generator(salt, "counts", name)
    d, k, rr, r2 = (int(v) for v in torch.randint(1, 2049, (4,), generator=g))
    model = _tiny(name, salt)
    return {"closed_form": [number(lora_param_count(d, k, rr)) for d, k, rr in shapes],
            "closed_form_salted": number(lora_param_count(d, k, rr % 64 + 1)),
            "count": number(count_lora_params(model, list(targets), r)),
            "count_salted": number(count_lora_params(model, list(targets), r2 % 64 + 1)),
            "lora_parameters_added": sum("lora" in n for n, _ in model.named_parameters())}


def _is_peft_model(obj) -> bool:
    """``isinstance(obj, peft.PeftModel)``, by name: observers do not import peft."""
    return any(c.__name__ == "PeftModel" and c.__module__.split(".")[0] == "peft" for c in type(obj).__mro__)


@observes("check_hf_lora")
def hf_lora(make_hf_lora: Callable, *, salt: int) -> dict:
    """``check_hf_lora``: a PeftModel?; its config's r, lora_alpha, target_modules and task_type; trainable count."""
    peft_model = make_hf_lora(_tiny("tiny-bert", salt))
    if not _is_peft_model(peft_model):
        return {"is_peft_model": False}
    cfg = peft_model.peft_config["default"]
    task = getattr(cfg.task_type, "value", cfg.task_type)
    return {"is_peft_model": True,
            "r_alpha": (number(cfg.r), number(cfg.lora_alpha)),
            "target_modules": sorted(str(t) for t in cfg.target_modules or []),
            "task_type": str(task),
            "trainable": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}


@observes("check_lora_state")
def lora_state(add_lora: Callable, lora_state_dict: Callable, load_lora_state_dict: Callable, cls: type,
               name: str = "tiny-bert", targets=("query", "value"), r: int = 2, *, salt: int) -> dict:
    """``check_lora_state``: how many tensors are saved and which are not A / B; the A and B of a fresh model after
    loading them (what its logits depend on), in storage order; what loading a key the model lacks raises."""
    model = _tiny(name, salt)
    add_lora(model, list(targets), r=r, lora_alpha=4.0)
    _set_lora([m for m in model.modules() if isinstance(m, cls)], salt, "state", name)
    state = lora_state_dict(model)
    keys = sorted(state) if isinstance(state, dict) else []
    fresh = _tiny(name, salt)  # same seed: same base weights, as a base model loaded from disk
    add_lora(fresh, list(targets), r=r, lora_alpha=4.0)
    load_lora_state_dict(fresh, state)
    loaded = {n: p.detach().flatten().clone() for n, p in fresh.named_parameters() if n.endswith(LORA)}  # as stored
    raised = _raised(load_lora_state_dict, fresh, {"not.a.layer.lora_A": torch.zeros(1)})
    return {"n_tensors": len(keys), "not_lora": [str(k) for k in keys if not str(k).endswith(LORA)],
            "loaded": loaded, "bad_key": "raised" if raised in ("KeyError", "ValueError", "RuntimeError") else raised}
