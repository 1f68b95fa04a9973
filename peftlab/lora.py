"""LoRA: a frozen linear layer plus a trainable low-rank update, ``W x + (alpha / r) B A x``.

For ``W`` of shape (d x k) (out x in), LoRA trains ``A`` (r x k) and ``B`` (d x r): r (d + k)
numbers instead of d k. ``A`` starts Kaiming-uniform and ``B`` at zero, so the model is unchanged
at step 0. After training, ``B A`` can be added into ``W`` (merge) and inference costs nothing extra.

References:
    - Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    - Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA),
      arXiv:2312.03732.
    - HF peft ``tuners/lora`` (names, init and on-disk format followed here so files transfer).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .inject import Targets, freeze, get_parent, replace_modules

# Sensible defaults per architecture when target_modules is not given (HF peft's table, abridged).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """LoRA hyper-parameters, with HF peft's field names so configs and files transfer.

    >>> LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]).scaling
    2.0
    >>> LoraConfig(r=0)
    Traceback (most recent call last):
    ...
    ValueError: r must be a positive integer, got 0
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: Targets | None = None  # list of name suffixes, or one regex string
    bias: str = "none"  # which biases train: "none" | "all" | "lora_only"
    modules_to_save: list[str] | None = None  # e.g. ["classifier"]: trained in full and saved
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    fan_in_fan_out: bool = False  # True for GPT-2's Conv1D, whose weight is (in, out)
    init_lora_weights: bool = True  # False: B random too (tests use it to get a non-zero update)
    task_type: str | None = None  # kept for HF peft's adapter_config.json ("SEQ_CLS", "CAUSAL_LM")

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraAdapter(nn.Module):
    """One named low-rank update: ``A`` (r x in), ``B`` (out x r), a dropout and a scale."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig):
        super().__init__()
        self.r, self.scaling = config.r, config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)); B zero: the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not config.init_lora_weights:
            nn.init.normal_(self.lora_B, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., in) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus named LoRA adapters; one is usually active.

    >>> torch.manual_seed(0) and None
    >>> layer = LoraLinear(nn.Linear(16, 32), LoraConfig(r=4, lora_alpha=8))
    >>> tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)  # A is (r, in), B is (out, r)
    ((4, 16), (32, 4))
    >>> x = torch.randn(2, 16)
    >>> torch.equal(layer(x), layer.base(x))  # B = 0: identical to the base layer at step 0
    True
    """

    def __init__(self, base: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        if isinstance(base, LoraLinear):
            raise ValueError("this layer already has LoRA; use add_adapter() for a second adapter")
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores its weight as (in, out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:  # nn.Linear, or a quantized layer (peftlab.quant.Linear4bit) with the same attributes
            self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()  # the small container: name -> LoraAdapter
        self.active: list[str] = []
        self.merged: list[str] = []
        self.add_adapter(adapter_name, config)

    # --- the container --------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        # LoRA lives in the base's float dtype; over a 4-bit base it stays fp32 (QLoRA keeps it precise).
        ref = next(iter(self.base.parameters()), None)
        ref = ref if ref is not None else next(iter(self.base.buffers()))
        dtype = ref.dtype if ref.is_floating_point() and ref.dtype != torch.uint8 else torch.float32
        adapter = LoraAdapter(self.in_features, self.out_features, config)
        self.adapters[name] = adapter.to(device=ref.device, dtype=dtype)
        self.active = [name]

    @property
    def lora_A(self) -> nn.Parameter:
        return self.adapters[self.active[0]].lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.adapters[self.active[0]].lora_B

    # --- the math -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name in self.active:
            if name not in self.merged:  # a merged update is already inside base.weight
                lora = self.adapters[name]
                out = out + lora(x.to(lora.lora_A.dtype)).to(out.dtype)
        return out

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling * B @ A`` laid out like ``base.weight`` (transposed for Conv1D)."""
        dw = self.adapters[name or self.active[0]].delta_weight()
        return dw.T if self.fan_in_fan_out else dw

    def merge(self) -> None:
        """Add the active updates into the base weight (inference then costs nothing extra)."""
        with torch.no_grad():
            for name in self.active:
                if name not in self.merged:
                    self._add_to_base(self.delta_weight(name))
                    self.merged.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates again, restoring the base weight (up to float rounding)."""
        with torch.no_grad():
            while self.merged:
                self._add_to_base(-self.delta_weight(self.merged.pop()))

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if hasattr(self.base, "merge_delta"):  # a 4-bit base: dequantize, add, requantize (rounds)
            self.base.merge_delta(delta)
        else:
            self.base.weight += delta.to(self.base.weight.dtype)


class ModulesToSave(nn.Module):
    """A trainable copy of a module (e.g. the classifier head) per adapter; the original stays frozen."""

    def __init__(self, original: nn.Module, adapter_name: str = "default"):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.add_copy(adapter_name)

    def add_copy(self, name: str) -> None:
        import copy

        self.copies[name] = copy.deepcopy(self.original)
        for p in self.copies[name].parameters():
            p.requires_grad_(True)
        self.active = name

    def forward(self, *args, **kwargs):
        module = self.copies[self.active] if self.active in self.copies else self.original
        return module(*args, **kwargs)


# --- model-level functions -------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _wrappable_types() -> tuple[type, ...]:
    """Layers LoRA can wrap: linear layers, GPT-2's Conv1D, existing wrappers, and 4-bit layers (QLoRA)."""
    types: tuple[type, ...] = (nn.Linear, Conv1D, LoraLinear)
    try:
        from .quant import Linear4bit
    except ImportError:  # quant.py is optional for LoRA itself
        return types
    return (*types, Linear4bit)


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"target_modules is required for model_type {model_type!r} (defaults exist for {sorted(DEFAULT_TARGETS)})")
    return DEFAULT_TARGETS[model_type]


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and wrap each targeted linear layer in a :class:`LoraLinear` (in place).

    A second call with a new ``adapter_name`` adds another adapter to the same layers.

    >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> m = apply_lora(m, LoraConfig(r=2, target_modules=["0"]))
    >>> from peftlab.inject import count_parameters
    >>> count_parameters(m)[0]  # r * (in + out) = 2 * (8 + 8)
    32
    """
    targets = config.target_modules or _default_targets(model)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter {adapter_name!r} is already applied to this model; pick another name")
    if not lora_layers(model):
        freeze(model)

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, LoraLinear):  # a second named adapter on a layer that has LoRA
            module.add_adapter(adapter_name, config)
            return module
        return LoraLinear(module, config, adapter_name)

    # ".base" is excluded so a regex cannot reach the linear layer inside an existing wrapper.
    replace_modules(model, targets, wrap, types=_wrappable_types(), exclude=["base"],
                    what="layer (LoRA wraps nn.Linear and Conv1D)")
    for _, layer in lora_layers(model):
        layer.active = [adapter_name] if adapter_name in layer.adapters else []
    _set_bias_trainable(model, config.bias)
    for target in config.modules_to_save or []:
        _wrap_modules_to_save(model, target, adapter_name)
    if not hasattr(model, "peft_config"):
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    model.active_adapter = adapter_name
    return model


def _set_bias_trainable(model: nn.Module, bias: str) -> None:
    if bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base, "bias", None) is not None:
                layer.base.bias.requires_grad_(True)


def _wrap_modules_to_save(model: nn.Module, target: str, adapter_name: str) -> None:
    found = False
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave) and (name == target or name.endswith("." + target)):
            module.add_copy(adapter_name)
            found = True
        elif name and (name == target or name.endswith("." + target)) and not isinstance(module, ModulesToSave) \
                and ".copies." not in name and not name.endswith(".original"):
            parent, child = get_parent(model, name)
            setattr(parent, child, ModulesToSave(module, adapter_name))
            found = True
    if not found:
        tops = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_children()})
        raise ValueError(f"modules_to_save entry {target!r} matched no module. Top-level modules: {tops}")


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter of every LoRA layer and modules_to_save copy."""
    if name not in getattr(model, "peft_config", {}):
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(getattr(model, 'peft_config', {}))}")
    for _, m in model.named_modules():
        if isinstance(m, LoraLinear):
            if m.merged:
                raise ValueError("unmerge_lora(model) before switching adapters")
            m.active = [name] if name in m.adapters else []
        elif isinstance(m, ModulesToSave):
            m.active = name
    for n, p in model.named_parameters():  # only the active adapter trains
        if ".adapters." in n or ".copies." in n:
            p.requires_grad_(f".adapters.{name}." in n or f".copies.{name}." in n)
    model.active_adapter = name


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every active LoRA update into its base weight (in place); undo with :func:`unmerge_lora`."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract merged LoRA updates from the base weights, restoring them (up to rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every wrapper by its base module (merged first by default): a plain HF model again."""
    for name, layer in lora_layers(model):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent, child = get_parent(model, name)
        setattr(parent, child, layer.base)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        parent, child = get_parent(model, name)
        setattr(parent, child, m.copies[m.active] if merge and m.active in m.copies else m.original)
    model.__dict__.pop("peft_config", None)
    return model


@contextmanager
def disable_lora(model: nn.Module):
    """Run the base model alone inside a ``with`` block (merged updates are taken out first).

    >>> m = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> with disable_lora(m):
    ...     m[0].active
    []
    """
    saved = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            m.unmerge()
            saved[name] = m.active
            m.active = []
        elif isinstance(m, ModulesToSave):
            saved[name] = m.active
            m.active = None
    try:
        yield model
    finally:
        for name, m in model.named_modules():
            if name in saved:
                m.active = saved[name]


def add_weighted_adapter(model: nn.Module, names: list[str], weights: list[float], new_name: str,
                         combination_type: str = "cat") -> None:
    """Combine adapters into a new one.

    ``"cat"`` stacks the low-rank factors (rank = sum of ranks) so the new update is *exactly*
    ``sum_i w_i * scaling_i * B_i A_i``. ``"linear"`` (HF peft's) needs equal ranks and mixes the
    factors, ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``: cheaper, but it adds cross
    terms ``B_i A_j``, so it equals the weighted sum only when one adapter has weight.
    """
    if combination_type not in ("cat", "linear"):
        raise ValueError(f"combination_type must be 'cat' or 'linear', got {combination_type!r}")
    if len(names) != len(weights) or not names:
        raise ValueError("names and weights must be non-empty and of equal length")
    configs = [model.peft_config[n] for n in names]
    if combination_type == "linear" and len({c.r for c in configs}) != 1:
        raise ValueError(f"'linear' needs equal ranks, got {[c.r for c in configs]}; use 'cat'")
    r = sum(c.r for c in configs) if combination_type == "cat" else configs[0].r
    new_config = LoraConfig(r=r, lora_alpha=float(r), target_modules=configs[0].target_modules,
                            task_type=configs[0].task_type)  # alpha = r: scaling 1, weights carry the scale
    for _, layer in lora_layers(model):
        present = [(layer.adapters[n], w) for n, w in zip(names, weights, strict=True) if n in layer.adapters]
        if not present:
            continue
        layer.add_adapter(new_name, new_config)
        new = layer.adapters[new_name]
        with torch.no_grad():
            if combination_type == "cat":
                new.lora_A.copy_(torch.cat([a.lora_A for a, _ in present]))  # (sum r, in)
                new.lora_B.copy_(torch.cat([a.lora_B * (w * a.scaling) for a, w in present], dim=1))  # (out, sum r)
            else:
                new.lora_A.copy_(sum(a.lora_A * math.sqrt(w * a.scaling) for a, w in present))
                new.lora_B.copy_(sum(a.lora_B * math.sqrt(w * a.scaling) for a, w in present))
    model.peft_config[new_name] = new_config
    set_adapter(model, new_name)


# --- files: HF peft's on-disk format ----------------------------------------------------------
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors one adapter owns, under HF peft's key names (A, B, trained biases, head copies)."""
    config = model.peft_config[adapter_name]
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.adapters:
            a = module.adapters[adapter_name]
            out[f"{_PREFIX}{name}.lora_A.weight"] = a.lora_A
            out[f"{_PREFIX}{name}.lora_B.weight"] = a.lora_B
            if config.bias != "none" and getattr(module.base, "bias", None) is not None:
                out[f"{_PREFIX}{name}.base_layer.bias"] = module.base.bias
        elif isinstance(module, ModulesToSave) and adapter_name in module.copies:
            for pname, p in module.copies[adapter_name].named_parameters():
                out[f"{_PREFIX}{name}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".base.bias" not in pname and ".copies." not in pname \
                    and ".original." not in pname:
                out[f"{_PREFIX}{pname}"] = p
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(model: nn.Module, path, adapter_name: str = "default") -> int:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as HF peft does; return bytes written.

    ``peft.PeftModel.from_pretrained(base, path)`` loads the result. Only the adapter is saved:
    the base weights are not touched.
    """
    import json
    import os

    from safetensors.torch import save_file

    if adapter_name not in getattr(model, "peft_config", {}):
        have = sorted(getattr(model, "peft_config", {}))
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {have}")
    os.makedirs(path, exist_ok=True)
    config = model.peft_config[adapter_name]
    as_json = {k: v for k, v in config.__dict__.items()}
    as_json.update(peft_type="LORA", inference_mode=True,
                   base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None))
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    save_file(lora_state_dict(model, adapter_name), weights, metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(as_json, f, indent=2, sort_keys=True)
    return os.path.getsize(weights) + os.path.getsize(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path) -> LoraConfig:
    """Read an ``adapter_config.json`` (ours or HF peft's) into a :class:`LoraConfig`."""
    import json
    import os

    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} does not exist: is {path!r} an adapter directory?")
    with open(file) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path} holds a {raw['peft_type']} adapter, not LoRA")
    for key in ("use_dora", "alpha_pattern", "rank_pattern", "layers_to_transform"):
        if raw.get(key):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported by peftlab's LoRA")
    fields = LoraConfig.__dataclass_fields__
    kwargs = {k: v for k, v in raw.items() if k in fields}
    if kwargs.get("modules_to_save"):  # HF peft lists the head twice for SEQ_CLS: de-duplicate
        kwargs["modules_to_save"] = list(dict.fromkeys(kwargs["modules_to_save"]))
    return LoraConfig(**kwargs)


def load_adapter(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Load an adapter directory (written by :func:`save_adapter` or by HF peft) into ``model``.

    Raises ``ValueError`` when the file was made for another model: a tensor whose layer this
    model lacks, or whose shape differs.
    """
    from safetensors.torch import load_file

    config = read_adapter_config(path)
    if config.modules_to_save:  # HF peft adds "score" for SEQ_CLS: keep the heads this model has
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        config.modules_to_save = [m for m in config.modules_to_save if m in names]
    try:
        apply_lora(model, config, adapter_name)
    except ValueError as e:
        raise ValueError(f"adapter at {path} does not fit this model: {e}") from None
    mine = lora_state_dict(model, adapter_name)
    params = _param_lookup(model, adapter_name)
    tensors = load_file(f"{path}/{ADAPTER_WEIGHTS}")
    missing = sorted(set(mine) - set(tensors))
    unexpected = sorted(set(tensors) - set(mine))
    if unexpected or missing:
        raise ValueError(f"adapter at {path} was made for another model: "
                         f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), "
                         f"{len(missing)} missing (e.g. {missing[:2]})")
    with torch.no_grad():
        for key, value in tensors.items():
            if value.shape != mine[key].shape:
                raise ValueError(f"adapter at {path} was made for another model: {key} has shape "
                                 f"{tuple(value.shape)}, this model needs {tuple(mine[key].shape)}")
            params[key].copy_(value)
    return model


def _param_lookup(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Map HF peft key names back to this model's live parameters (inverse of lora_state_dict)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and adapter_name in module.adapters:
            a = module.adapters[adapter_name]
            out[f"{_PREFIX}{name}.lora_A.weight"], out[f"{_PREFIX}{name}.lora_B.weight"] = a.lora_A, a.lora_B
            if getattr(module.base, "bias", None) is not None:
                out[f"{_PREFIX}{name}.base_layer.bias"] = module.base.bias
        elif isinstance(module, ModulesToSave) and adapter_name in module.copies:
            for pname, p in module.copies[adapter_name].named_parameters():
                out[f"{_PREFIX}{name}.{pname}"] = p
    for pname, p in model.named_parameters():
        out.setdefault(f"{_PREFIX}{pname}", p)
    return out
