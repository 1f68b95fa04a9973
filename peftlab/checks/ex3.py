"""Checkers for exercise 3 (bottleneck adapters): the student's adapter, insertion and task switch against peftlab's.

Each checker runs the student's own objects on a fixed seed and prints expected vs got. Expected values come
from closed forms written here (``m = max(1, d // reduction_factor)``, ``2 d m + d + m (+ 2 d)`` parameters,
the identity at initialisation), from the site names of the paper's figure spelled out against the real BERT
module tree, or from peftlab's :mod:`peftlab.adapters` holding the same (copied) weights: never from the
student's code. Hidden tests repeat them with odd widths, ``m = 1``, float64, a LayerNorm, GELU, and a
second task on another placement, and call :func:`peftlab.checks.assert_own_work`.

References:
    - Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751 (Figure 2).
    - Pfeiffer et al., "AdapterFusion", arXiv:2005.00247 (one adapter per layer, after the feed-forward block).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .core import Report, bert_config, call, raised_by

DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}  # AdapterHub's defaults, as the notebook states


def expected_size(d: int, reduction_factor: int) -> int:
    """The bottleneck width: ``d // reduction_factor``, at least 1."""
    return max(1, d // reduction_factor)


def expected_count(d: int, m: int, layer_norm: bool = False) -> int:
    """``W_down`` (m x d) + ``b_down`` (m) + ``W_up`` (d x m) + ``b_up`` (d), + LayerNorm's weight and bias (2 d)."""
    return 2 * d * m + d + m + (2 * d if layer_norm else 0)


def randomize(module: nn.Module, seed: int, std: float = 0.2) -> None:
    """Trained-looking weights: every parameter drawn from N(0, std^2) (LayerNorm's weight around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std
            p.copy_(noise + (1.0 if name.endswith("layer_norm.weight") else 0.0))


def _reference_adapter(d: int, m: int, non_linearity: str, layer_norm: bool, dtype: torch.dtype):
    from ..adapters import BottleneckAdapter as Reference

    return Reference(d, m, non_linearity, layer_norm).to(dtype)


def _copy_into(what: str, mine: nn.Module, ref: nn.Module, rep: Report) -> bool:
    """Load the reference's tensors into the student's module; report when the names differ."""
    want, have = sorted(ref.state_dict()), sorted(mine.state_dict()) if isinstance(mine, nn.Module) else None
    if not rep.expect(f"{what}: state_dict keys (down, up, optional layer_norm)", want, have):
        return False
    with torch.no_grad():
        for key, value in ref.state_dict().items():
            mine.state_dict()[key].copy_(value)
    return True


# --- 3.1 / 3.2: the adapter module ------------------------------------------------------------
def check_adapter_layer(cls: type, bottleneck_size: Callable, adapter_param_count: Callable, d: int = 32,
                        reduction_factor: int = 8, non_linearity: str = "relu", layer_norm: bool = False,
                        dtype: torch.dtype = torch.float32) -> None:
    """Shapes, ``m`` from the reduction factor, zero ``up``, random ``down``, closed-form count, identity at init."""
    m = expected_size(d, reduction_factor)
    title = f"{cls.__name__}(d={d}, m={m}, {non_linearity!r}, layer_norm={layer_norm}), {dtype}, seed 0"
    with Report(title) as rep:
        rep.expect(f"bottleneck_size(d={d}, reduction_factor={reduction_factor}) = max(1, d // rf)", m,
                   call("bottleneck_size", bottleneck_size, d, reduction_factor))
        rep.expect(f"adapter_param_count(d={d}, m={m}, layer_norm={layer_norm}) = 2dm + d + m"
                   + (" + 2d" if layer_norm else ""), expected_count(d, m, layer_norm),
                   call("adapter_param_count", adapter_param_count, d, m, layer_norm=layer_norm))
        torch.manual_seed(0)
        adapter = call(f"{cls.__name__}({d}, {m}, {non_linearity!r}, layer_norm={layer_norm})", cls, d, m,
                        non_linearity, layer_norm=layer_norm)
        adapter = adapter.to(dtype)
        down, up = getattr(adapter, "down", None), getattr(adapter, "up", None)
        ok = rep.expect("adapter.down is nn.Linear(d, m), adapter.up is nn.Linear(m, d)", [(m, d), (d, m)],
                        [tuple(x.weight.shape) if isinstance(x, nn.Linear) else type(x).__name__ for x in (down, up)])
        if not ok:
            return
        rep.expect("down and up have biases", [True, True], [down.bias is not None, up.bias is not None])
        rep.expect("up starts at zero (weight and bias)", True,
                   bool((up.weight == 0).all()) and (up.bias is None or bool((up.bias == 0).all())))
        spread = down.weight.detach().abs().max().item()
        rep.expect("down starts random (nn.Linear's init), so the gradient reaches up at step 0", "max |W_down| > 0",
                   f"max |W_down| = {spread:.3g}", spread > 0)
        norms = [mod for mod in adapter.modules() if isinstance(mod, nn.LayerNorm)]
        rep.expect("LayerNorm(d) on the input" if layer_norm else "no LayerNorm", [(d,)] if layer_norm else [],
                   [tuple(n.normalized_shape) for n in norms])
        n_params = sum(p.numel() for p in adapter.parameters())
        rep.expect("parameters of the module = closed form", expected_count(d, m, layer_norm), n_params)
        rep.expect("all of them trainable", n_params, sum(p.numel() for p in adapter.parameters() if p.requires_grad))
        h = torch.randn(2, 5, d, dtype=dtype)
        with torch.no_grad():
            rep.close("output at init equals the input (up = 0, residual)", h, call("adapter(h)", adapter, h), 0.0)


def check_adapter_forward(cls: type, d: int = 32, m: int = 4, non_linearity: str = "relu", layer_norm: bool = False,
                          dtype: torch.dtype = torch.float32, lead: tuple[int, ...] = (2, 5)) -> None:
    """With trained-looking weights copied from ``peftlab.adapters.BottleneckAdapter``: same output, gradients flow."""
    ref = _reference_adapter(d, m, non_linearity, layer_norm, dtype)
    randomize(ref, seed=1)
    x = torch.randn(*lead, d, dtype=dtype)
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    title = f"{cls.__name__}(d={d}, m={m}, {non_linearity!r}, layer_norm={layer_norm}) forward, x {tuple(x.shape)}"
    with Report(f"{title} {dtype}, weights copied from peftlab's adapter") as rep:
        torch.manual_seed(0)
        mine = call(f"{cls.__name__}({d}, {m}, ...)", cls, d, m, non_linearity, layer_norm=layer_norm).to(dtype)
        if not _copy_into("adapter", mine, ref, rep):
            return
        with torch.no_grad():
            expected = ref(x)
            got = call("adapter(x)", mine, x)
            rep.close("h + up(f(down(LN(h)))) equals peftlab's", expected, got, atol)
            rep.expect("output dtype", dtype, getattr(got, "dtype", None))
            if layer_norm:  # without the residual the output is only the bottleneck's
                rep.close("output - input = the bottleneck branch", expected - x, got - x, atol)
        out = call("adapter(x)", mine, x)
        out.square().sum().backward()
        grads = [getattr(mine, n).weight.grad for n in ("down", "up")]
        rep.expect("gradients reach down and up", [True, True],
                   [g is not None and bool(g.abs().sum() > 0) for g in grads])


# --- 3.2: inserting adapters into BERT ---------------------------------------------------------
def bert_model(name: str = "tiny-bert", dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    """A small random BERT classifier (3 labels, seed 0, eval mode) of a real architecture, fields overridden."""
    from ..models import build_from_config

    return build_from_config(bert_config(name, **overrides), task="classification", num_labels=3, seed=0, dtype=dtype)


def paper_sites(model: nn.Module, placement: str) -> list[str]:
    """Houlsby's Figure 2: after the attention output projection and after the feed-forward output; Pfeiffer: the
    latter only. Spelled out for BERT's module tree (``BertSelfOutput.dense``, ``BertOutput.dense``)."""
    layers = range(model.config.num_hidden_layers)
    subs = ["attention.output.dense", "output.dense"] if placement == "houlsby" else ["output.dense"]
    names = [f"bert.encoder.layer.{i}.{s}" for i in layers for s in subs]
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    return names


def token_ids(model: nn.Module, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row: the mask must still work through the wrapped layers
    return {"input_ids": ids, "attention_mask": mask}


def _reference_model(model: nn.Module, adapters: list[tuple[str, dict]], dtype: torch.dtype, seed: int = 1):
    """A copy of the bare ``model`` with peftlab's adapters (name, AdapterConfig kwargs), each given random weights."""
    from ..adapters import AdapterConfig, adapter_layers, apply_adapters

    ref = copy.deepcopy(model)
    for i, (name, kwargs) in enumerate(adapters):
        apply_adapters(ref, AdapterConfig(**kwargs), adapter_name=name)
        ref.to(dtype)  # peftlab builds adapters in float32: follow the base model's dtype
        for _, layer in adapter_layers(ref):
            if name in layer.adapters:
                randomize(layer.adapters[name], seed=seed + 100 * i)
    return ref


def _students_adapter(model: nn.Module, site: str, name: str, layer_cls: type, adapter_cls: type):
    layer = model.get_submodule(site)
    adapters = getattr(layer, "adapters", {}) if isinstance(layer, layer_cls) else {}
    adapter = adapters[name] if name in adapters else None
    return adapter if isinstance(adapter, adapter_cls) else None


def check_add_adapters(add_adapters: Callable, adapter_cls: type, layer_cls: type, placement: str = "houlsby",
                       name: str = "tiny-bert", reduction_factor: int = 16, non_linearity: str | None = None,
                       layer_norm: bool = False, dtype: torch.dtype = torch.float32, **overrides) -> None:
    """``add_adapters`` wraps exactly the paper's sites, freezes the rest, starts as the identity, and (with
    weights copied from ``peftlab.adapters.apply_adapters``) gives the same logits."""
    model = bert_model(name, dtype, **overrides)
    bare = copy.deepcopy(model)
    d = model.config.hidden_size
    m = expected_size(d, reduction_factor)
    sites = paper_sites(model, placement)
    originals = {s: model.get_submodule(s) for s in sites}
    x = token_ids(model)
    with torch.no_grad():
        before = model(**x).logits
    act = non_linearity or DEFAULT_NON_LINEARITY[placement]
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    shape = f"d={d}, m={m}, {model.config.num_hidden_layers} layers, {act}, layer_norm={layer_norm}, {dtype}"
    with Report(f"add_adapters(placement={placement!r}) on {name} ({shape})") as rep:
        got = call(f"add_adapters(model, placement={placement!r})", add_adapters, model, placement=placement,
                    reduction_factor=reduction_factor, non_linearity=non_linearity, layer_norm=layer_norm)
        rep.expect("returned names: the paper's sites, in named_modules order", sites,
                   list(got) if isinstance(got, (list, tuple)) else got)
        wrapped = [n for n, mod in model.named_modules() if isinstance(mod, layer_cls)]
        rep.expect(f"modules that are now {layer_cls.__name__}", sites, wrapped)
        rep.expect("each wraps the original layer as .base", True,
                   all(getattr(model.get_submodule(s), "base", None) is originals[s] for s in wrapped))
        mine = {s: _students_adapter(model, s, "default", layer_cls, adapter_cls) for s in sites}
        rep.expect(f"an adapter named 'default' ({adapter_cls.__name__}) at every site", [], [s for s, a in mine.items()
                                                                                              if a is None])
        n_adapters = sum(isinstance(mod, adapter_cls) for mod in model.modules())
        rep.expect(f"{adapter_cls.__name__} modules in the model", len(sites), n_adapters)
        with torch.no_grad():
            rep.close("logits right after insertion equal the bare model's (up = 0)", before,
                      call("model(**x)", model, **x).logits, atol)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        rep.expect("trainable parameters outside the adapters (the base must be frozen)", [],
                   [n for n in trainable if ".adapters." not in n][:3])
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rep.expect(f"trainable = {len(sites)} sites x (2dm + d + m" + (" + 2d)" if layer_norm else ")"),
                   len(sites) * expected_count(d, m, layer_norm), n_train)
        if any(a is None for a in mine.values()):
            return
        ref = _reference_model(bare, [("default", dict(placement=placement, reduction_factor=reduction_factor,
                                                        non_linearity=non_linearity, layer_norm=layer_norm))], dtype)
        for s in sites:
            if not _copy_into(s, mine[s], ref.get_submodule(s).adapters["default"], rep):
                return
        with torch.no_grad():
            rep.close("trained-looking adapters: logits equal peftlab.adapters' with the same weights",
                      ref(**x).logits, model(**x).logits, atol)


# --- 3.3: several tasks, one frozen model ----------------------------------------------------------
def check_set_adapter(add_adapters: Callable, set_adapter: Callable, adapter_cls: type, layer_cls: type,
                      second: dict | None = None, name: str = "tiny-bert", dtype: torch.dtype = torch.float32,
                      **overrides) -> None:
    """Two named adapters on one model: switching reproduces each task's logits (peftlab's, same weights), only the
    active adapter trains, ``None`` runs the bare model, an unknown name raises ``ValueError``."""
    second = second or dict(placement="houlsby", reduction_factor=8)
    first = dict(placement="houlsby", reduction_factor=16)
    model = bert_model(name, dtype, **overrides)
    bare = copy.deepcopy(model)
    x = token_ids(model, seed=3)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    with torch.no_grad():
        base_logits = model(**x).logits
    with Report(f"two tasks on one {name}: 'sentiment' {first}, 'topic' {second}") as rep:
        sites = {p: paper_sites(model, p) for p in ("houlsby", "pfeiffer")}  # on the bare model
        call("add_adapters(model, adapter_name='sentiment', ...)", add_adapters, model, adapter_name="sentiment",
              **first)
        call("add_adapters(model, adapter_name='topic', ...)", add_adapters, model, adapter_name="topic", **second)
        wrapped = [n for n, mod in model.named_modules() if isinstance(mod, layer_cls)]
        rep.expect(f"one {layer_cls.__name__} per site (no wrapper inside a wrapper)", sites["houlsby"], wrapped)
        ref = _reference_model(bare, [("sentiment", first), ("topic", second)], dtype)
        from ..adapters import set_adapter as ref_set_adapter

        for task, kwargs in (("sentiment", first), ("topic", second)):
            for s in sites[kwargs["placement"]]:
                mine = _students_adapter(model, s, task, layer_cls, adapter_cls)
                if not rep.expect(f"{s} holds an adapter named {task!r}", True, mine is not None):
                    return
                if not _copy_into(f"{task} at {s}", mine, ref.get_submodule(s).adapters[task], rep):
                    return
        for task in ("sentiment", "topic", "sentiment"):
            call(f"set_adapter(model, {task!r})", set_adapter, model, task)
            ref_set_adapter(ref, task)
            with torch.no_grad():
                rep.close(f"set_adapter({task!r}): logits equal peftlab's for that task", ref(**x).logits,
                          model(**x).logits, atol)
            trainable = sorted({n.split(".adapters.")[1].split(".")[0] if ".adapters." in n else n
                                for n, p in model.named_parameters() if p.requires_grad})
            rep.expect(f"after set_adapter({task!r}), what trains", [task], trainable[:4])
        call("set_adapter(model, None)", set_adapter, model, None)
        with torch.no_grad():
            rep.close("set_adapter(None): the bare model's logits", base_logits, model(**x).logits, atol)
        rep.expect("set_adapter(None): nothing trains", 0,
                   sum(p.numel() for p in model.parameters() if p.requires_grad))
        rep.expect("set_adapter(model, 'news') (no such adapter)", "ValueError", raised_by(set_adapter, model, "news"))
