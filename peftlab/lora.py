"""LoRA: a frozen linear layer plus a trainable low-rank update, ``W x + (alpha / r) B A x``.

For ``W`` of shape (d x k) (out x in), LoRA trains ``A`` (r x k) and ``B`` (d x r): r (d + k)
numbers instead of d k. ``A`` starts Kaiming-uniform and ``B`` at zero, so the model is unchanged
at step 0. After training, ``B A`` can be added into ``W`` (merge) and inference costs nothing extra.

References:
    - Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    - Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA),
      arXiv:2312.03732.
    - Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353 (``use_dora``; the maths
      lives in :mod:`peftlab.dora`).
    - HF peft ``tuners/lora`` (names, init and on-disk format followed here so files transfer).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import dora, files
from .inject import (
    ModulesToSave,
    NamedAdapters,
    Targets,
    disable_adapters,
    freeze,
    get_parent,
    pick_adapter,
    present,
    replace_modules,
    set_adapter,
    targets_for,
    unchanged_on_error,
    wrap_modules_to_save,
)
from .quant import Linear4bit
from .validate import in_range, one_of, positive_int

# Sensible defaults per architecture when target_modules is not given (HF peft's table, abridged).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
BIAS_MODES = ("none", "all", "lora_only")
PEFT_TYPE = "LORA"


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
    use_dora: bool = False  # DoRA (peftlab.dora): also train each output row's magnitude m

    def __post_init__(self):
        positive_int("r", self.r)
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        in_range("lora_dropout", self.lora_dropout, 0, 1)
        one_of("bias", self.bias, BIAS_MODES)
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
        self.magnitude: nn.Parameter | None = None  # DoRA's m (out,): set by LoraLinear, which knows W
        # A as nn.Linear's default init (Kaiming-uniform, a=sqrt(5)); B zero: the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not config.init_lora_weights:
            nn.init.normal_(self.lora_B, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling  # (..., in) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus named LoRA adapters, of which one runs.

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
        self.adapters = NamedAdapters()  # name -> LoraAdapter, and which one runs
        self.add_adapter(adapter_name, config)

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Add adapter ``name`` (it becomes the active one)."""
        # LoRA lives in the base's float dtype; over a 4-bit base it stays fp32 (QLoRA keeps it precise).
        ref = next(iter(self.base.parameters()), None)
        ref = ref if ref is not None else next(iter(self.base.buffers()))
        dtype = ref.dtype if ref.is_floating_point() and ref.dtype != torch.uint8 else torch.float32
        adapter = LoraAdapter(self.in_features, self.out_features, config).to(ref.device, dtype)
        if config.use_dora:  # m starts at ||W + s B A||_c, so the layer starts as W
            dora.init_magnitude(adapter, self.base_weight())
        self.adapters.add(name, adapter)

    def base_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor (a 4-bit base dequantized): what DoRA normalises."""
        w = self.base.dequantize() if isinstance(self.base, Linear4bit) else self.base.weight
        if not w.is_floating_point():
            raise ValueError(f"DoRA needs the dense base weight, but {type(self.base).__name__} stores it packed as "
                             f"{w.dtype}: use nn.Linear, Conv1D or peftlab.quant.Linear4bit")
        return w.T if self.fan_in_fan_out else w

    @property
    def lora_A(self) -> nn.Parameter:
        return self._running().lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self._running().lora_B

    def _running(self) -> LoraAdapter:
        if self.adapters.active is None:
            raise AttributeError(f"no adapter runs on this layer (it has {list(self.adapters)}; disabled, or "
                                 f"set_adapter chose one this layer lacks): use layer.adapters[name].lora_A")
        return self.adapters[self.adapters.active]

    # --- the math -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, name = self.base(x), self.adapters.active
        if name is None or self.adapters.merged:  # a merged update is already inside base.weight
            return out
        lora = self.adapters[name]
        if lora.magnitude is not None:  # DoRA (peftlab.dora): rescales W x too, in the adapter's dtype
            dt, bias = lora.lora_A.dtype, getattr(self.base, "bias", None)
            extra = dora.forward(lora, x.to(dt), out.to(dt), self.base_weight().to(dt),
                                 None if bias is None else bias.to(dt))
            return out + extra.to(out.dtype)
        return out + lora(x.to(lora.lora_A.dtype)).to(out.dtype)  # fp32 LoRA over a bf16 or 4-bit base

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``scaling * B @ A`` of adapter ``name`` (default: the active one), laid out like ``base.weight``."""
        dw = self.adapters[name or self.adapters.active].delta_weight()
        return dw.T if self.fan_in_fan_out else dw

    def merge(self) -> None:
        """Add the active update into the base weight (inference then costs nothing extra)."""
        if self.adapters.active is not None and not self.adapters.merged:
            lora = self._running()
            if lora.magnitude is None:
                self._add_to_base(self.delta_weight())
            else:  # DoRA: W' = (m / ||W + dW||_c) (W + dW), added as W' - W
                update = dora.merge_update(lora, self.base_weight())
                self._add_to_base(update.T if self.fan_in_fan_out else update)
            self.adapters.merged = True

    def unmerge(self) -> None:
        """Subtract a merged update again, restoring the base weight (up to float rounding)."""
        if self.adapters.merged:
            lora = self._running()
            if lora.magnitude is None:
                self._add_to_base(-self.delta_weight())
            else:  # DoRA: W = W' ||W + dW||_c / m - dW, with the norm kept at merge time
                update = dora.unmerge_update(lora, self.base_weight())
                self._add_to_base(update.T if self.fan_in_fan_out else update)
            self.adapters.merged = False

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor) -> None:
        if hasattr(self.base, "merge_delta"):  # a 4-bit base: dequantize, add, requantize (rounds)
            self.base.merge_delta(delta)
        else:
            self.base.weight += delta.to(self.base.weight.dtype)


# Layers LoRA can wrap: linear layers, GPT-2's Conv1D, 4-bit layers (QLoRA), and its own wrappers (a second adapter).
WRAPPABLE = (nn.Linear, Conv1D, Linear4bit, LoraLinear)


# --- model-level functions -------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` has LoRA layers."""
    return any(isinstance(m, LoraLinear) for m in model.modules())


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and wrap each targeted linear layer in a :class:`LoraLinear` (in place).

    A second call with a new ``adapter_name`` adds another adapter to the same layers; the newest
    runs and trains (:func:`peftlab.inject.set_adapter` switches).

    >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> m = apply_lora(m, LoraConfig(r=2, target_modules=["0"]))
    >>> from peftlab.inject import count_parameters
    >>> count_parameters(m)[0]  # r * (in + out) = 2 * (8 + 8)
    32
    """
    targets = config.target_modules or targets_for(model, DEFAULT_TARGETS)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"adapter {adapter_name!r} is already applied to this model; pick another name")
    if not is_lora_model(model):
        freeze(model)

    def wrap(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, LoraLinear):  # a second named adapter on a layer that has LoRA
            module.add_adapter(adapter_name, config)
            return module
        return LoraLinear(module, config, adapter_name)

    # ".base" is excluded so a regex cannot reach the linear layer inside an existing wrapper.
    replace_modules(model, targets, wrap, types=WRAPPABLE, exclude=["base"],
                    what="layer (LoRA wraps nn.Linear and Conv1D)")
    for target in config.modules_to_save or []:
        wrap_modules_to_save(model, target, adapter_name)
    _set_bias_trainable(model, config.bias)  # after: the frozen originals of modules_to_save stay frozen
    model.peft_config = {**getattr(model, "peft_config", {}), adapter_name: config}
    set_adapter(model, adapter_name)  # layers without this adapter run their base alone
    return model


def _set_bias_trainable(model: nn.Module, bias: str) -> None:
    if bias == "all":
        # not the frozen originals that modules_to_save keeps beside their trained copies (HF peft leaves them frozen)
        originals = {id(q) for m in model.modules() if isinstance(m, ModulesToSave) for q in m.original.parameters()}
        for n, p in model.named_parameters():
            if n.endswith("bias") and id(p) not in originals:
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base, "bias", None) is not None:
                layer.base.bias.requires_grad_(True)


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
        layer.merge() if merge else layer.unmerge()
        parent, child = get_parent(model, name)
        setattr(parent, child, layer.base)
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]:
        parent, child = get_parent(model, name)
        active = m.copies.active
        setattr(parent, child, m.copies[active] if merge and active is not None else m.original)
    model.__dict__.pop("peft_config", None)
    return model


@contextmanager
def disable_lora(model: nn.Module):
    """Run the base model alone inside a ``with`` block (merged updates are taken out first).

    >>> m = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> with disable_lora(m):
    ...     m[0].adapters.active is None
    True
    """
    merged = [layer for _, layer in lora_layers(model) if layer.adapters.merged]
    unmerge_lora(model)
    try:
        with disable_adapters(model):
            yield model
    finally:
        for layer in merged:  # merged again after the block, as it was before
            layer.merge()


def add_weighted_adapter(model: nn.Module, names: list[str], weights: list[float], new_name: str,
                         combination_type: str = "cat") -> None:
    """Combine adapters into a new one.

    ``"cat"`` stacks the low-rank factors (rank = sum of ranks) so the new update is *exactly*
    ``sum_i w_i * scaling_i * B_i A_i``. ``"linear"`` (HF peft's) needs equal ranks and mixes the
    factors, ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``: cheaper, but it adds cross
    terms ``B_i A_j``, so it equals the weighted sum only when one adapter has weight.
    """
    one_of("combination_type", combination_type, ("cat", "linear"))
    if len(names) != len(weights) or not names:
        raise ValueError("names and weights must be non-empty and of equal length")
    configs = [model.peft_config[n] for n in names]
    if any(c.use_dora for c in configs):  # each DoRA adapter rescales W by its own m: no sum of updates
        raise ValueError(f"add_weighted_adapter combines LoRA updates; DoRA adapters "
                         f"{[n for n, c in zip(names, configs, strict=True) if c.use_dora]} cannot be combined")
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


# --- files: HF peft's key names (peftlab.files writes and reads the directory) ----------------------
def lora_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """HF peft's file key -> this model's live tensor, for one adapter: A, B, trained biases, head copies."""
    config = model.peft_config[adapter_name]
    out = {}
    for name, module in model.named_modules():
        key = files.PREFIX + name
        if isinstance(module, LoraLinear) and adapter_name in module.adapters:
            a = module.adapters[adapter_name]
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a.lora_A, a.lora_B
            if a.magnitude is not None:  # DoRA's m, under HF peft's key (no ".weight")
                out[f"{key}.{dora.MAGNITUDE_KEY}"] = a.magnitude
            if config.bias != "none" and getattr(module.base, "bias", None) is not None:
                out[f"{key}.base_layer.bias"] = module.base.bias  # HF peft calls the wrapped layer base_layer
        elif isinstance(module, ModulesToSave) and adapter_name in module.copies:
            out.update({f"{key}.{n}": p for n, p in module.copies[adapter_name].named_parameters()})
    if config.bias == "all":  # the other biases, under the model's own names
        wrapped = {id(p) for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave)) for p in m.parameters()}
        out.update({files.PREFIX + n: p for n, p in model.named_parameters()
                    if n.endswith("bias") and id(p) not in wrapped})
    return out


def save_lora(model: nn.Module, path, adapter_name: str | None = None) -> int:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as HF peft does; return bytes written.

    ``peft.PeftModel.from_pretrained(base, path)`` loads the result. Only the adapter is saved (None:
    the only one, else the active one); the base weights are not touched.
    """
    configs = getattr(model, "peft_config", {})
    adapter_name = pick_adapter(model, configs, adapter_name)
    config = {**asdict(configs[adapter_name]), "peft_type": PEFT_TYPE, "inference_mode": True,
              "base_model_name_or_path": files.base_model_name(model)}
    return files.write_adapter(path, config, lora_tensors(model, adapter_name))


def read_adapter_config(path) -> LoraConfig:
    """Read an ``adapter_config.json`` (ours or HF peft's) into a :class:`LoraConfig`."""
    raw = files.read_config(path)
    file = os.path.join(path, files.ADAPTER_CONFIG)
    if raw.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        raise files.AdapterFileError(f"{file} holds a {raw['peft_type']} adapter, not LoRA")
    for key in ("alpha_pattern", "rank_pattern", "layers_to_transform"):
        if raw.get(key):
            raise files.AdapterFileError(f"{file}: {key}={raw[key]!r} is not supported by peftlab's LoRA")
    to_save = raw.get("modules_to_save")  # HF peft lists the head twice for SEQ_CLS: de-duplicate
    return files.make_config(path, LoraConfig, raw, modules_to_save=list(dict.fromkeys(to_save)) if to_save else None)


def load_lora(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Load an adapter directory (written by :func:`save_lora` or by HF peft) into ``model``.

    Raises :class:`peftlab.files.AdapterFileError` (a ``ValueError``) when the file was made for
    another model: a tensor whose layer this model lacks, or whose shape differs.
    """
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"this model already has a LoRA adapter named {adapter_name!r}: load under another "
                         f"adapter_name")
    config, tensors = read_adapter_config(path), files.read_tensors(path)
    dora.check_file(path, config.use_dora, tensors)  # use_dora and the file's magnitude vectors must agree
    if config.modules_to_save:  # HF peft adds "score" for SEQ_CLS: keep the heads this model has
        config.modules_to_save = present(model, config.modules_to_save)
    with unchanged_on_error(model):  # a file that does not fit leaves the model as it was
        try:
            apply_lora(model, config, adapter_name)
        except ValueError as e:
            raise files.AdapterFileError(f"adapter at {path} does not fit this model: {e}") from None
        files.copy_into(path, lora_tensors(model, adapter_name), tensors)
    return model


files.register(PEFT_TYPE, save=save_lora, load=load_lora, applied=is_lora_model)
