"""LoRA initialisations from the weight's SVD: PiSSA (principal part in the adapter) and LoftQ (NF4 + low rank).

LoRA starts with ``B = 0``, so the adapter first has to find the directions that matter. Both methods
here start ``A`` and ``B`` from a truncated SVD instead, and keep ``W = base + scaling * B A``:

- **PiSSA** puts the top-r singular triplets of ``W`` in the adapter and freezes the residual:
  ``base = W - s B A`` with ``s B A = V_r S_r Uh_r``. The model is unchanged at step 0, but training
  moves the principal directions. A trained PiSSA adapter belongs to the residual base;
  :func:`pissa_to_lora` turns it into a plain rank-2r LoRA for the original ``W``.
- **LoftQ** picks ``Q`` (NF4) and ``B A`` together: alternately ``Q_t = NF4(W - s B A)`` and
  ``s B A = SVD_r(W - Q_t)``. Plain QLoRA (``B = 0``) leaves the whole error ``W - NF4(W)`` in the
  model; after one LoftQ iteration its top-r part is in the adapter already.

``s`` is ``LoraConfig.scaling`` (``lora_alpha / r``): both divide the singular values by it, so that
``s B A`` (what the layer adds), not ``B A``, is the low-rank part. HF peft's PiSSA does this too;
its LoftQ does not (it matches only for ``lora_alpha = r``).

References:
    - Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
      Models", arXiv:2404.02948.
    - Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", arXiv:2310.08659.
    - HF peft ``tuners/lora/layer.py`` (``pissa_init``), ``utils/loftq_utils.py`` and
      ``PeftModel.save_pretrained(path_initial_model_for_weight_conversion=...)`` (PiSSA -> LoRA).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace

import torch
from torch import nn

from . import files, kernels
from .inject import pick_adapter
from .lora import PEFT_TYPE, LoraAdapter, LoraConfig, LoraLinear, lora_layers, lora_tensors
from .quant import Linear4bit, QuantConfig

Initial = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A0, B0), what pissa_init returns


def svd_factors(m: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling * B @ A`` the best rank-``r`` approximation of ``m`` (out x in).

    ``m = V S Uh``; ``A = sqrt(S_r / s) Uh_r`` (r x in), ``B = V_r sqrt(S_r / s)`` (out x r): the
    singular values are shared evenly between the two factors, after dividing out the scaling.

    >>> m = torch.randn(6, 4)
    >>> a, b = svd_factors(m, 4, scaling=2.0)
    >>> torch.allclose(2.0 * b @ a, m, atol=1e-5)  # full rank: exact
    True
    """
    if not 1 <= r <= min(m.shape):
        raise ValueError(f"rank r={r} must be in 1..{min(m.shape)} for a {tuple(m.shape)} weight")
    V, S, Uh = torch.linalg.svd(m.float(), full_matrices=False)  # V (out, k), S (k,), Uh (k, in)
    root = torch.sqrt(S[:r] / scaling)  # (r,)
    return root[:, None] * Uh[:r], V[:, :r] * root  # A (r, in), B (out, r)


def _adapter(layer: LoraLinear, adapter_name: str | None) -> LoraAdapter:
    name = adapter_name or layer.adapters.active
    if name not in layer.adapters:
        raise ValueError(f"no LoRA adapter {name!r} on this layer (it has {list(layer.adapters)})")
    if layer.adapters.merged:
        raise ValueError("the adapter is merged into the base weight: unmerge it first")
    return layer.adapters[name]


def _layers(module: nn.Module) -> list[tuple[str, LoraLinear]]:
    layers = lora_layers(module)  # a LoraLinear passed alone is its own layer, named ""
    if not layers:
        raise ValueError(f"this {type(module).__name__} has no LoRA layers: apply_lora(model, config) first")
    return layers


# --- PiSSA -----------------------------------------------------------------------------------------
@torch.no_grad()
def pissa_init(module: nn.Module, adapter_name: str | None = None) -> Initial:
    """Set every LoRA layer of ``module`` (a model or one :class:`LoraLinear`) to PiSSA, in place.

    ``A, B`` = the top-r singular triplets of ``W`` (:func:`svd_factors`); the base becomes the residual
    ``W - s B A``, so the output is unchanged. Returns the initial ``(A0, B0)`` per layer name: keep
    them for :func:`pissa_to_lora`.

    >>> layer = LoraLinear(nn.Linear(16, 8), LoraConfig(r=2, lora_alpha=4))
    >>> x = torch.randn(3, 16); before = layer(x)
    >>> initial = pissa_init(layer)
    >>> torch.allclose(layer(x), before, atol=1e-5), bool(layer.lora_B.detach().abs().sum() > 0)
    (True, True)
    """
    initial = {}
    for name, layer in _layers(module):
        lora, base = _adapter(layer, adapter_name), layer.base
        if isinstance(base, Linear4bit):
            raise ValueError(f"layer {name!r} has a 4-bit base: PiSSA needs the full-precision weight. Run "
                             f"pissa_init before quantize_model (which then quantizes the residual)")
        w = base.weight.float().T if layer.fan_in_fan_out else base.weight.float()  # (out, in)
        a, b = svd_factors(w, lora.r, lora.scaling)
        lora.lora_A.copy_(a)
        lora.lora_B.copy_(b)
        residual = w - lora.scaling * b @ a  # the part the adapter does not hold; it stays frozen
        base.weight.copy_(residual.T if layer.fan_in_fan_out else residual)
        initial[name] = (lora.lora_A.detach().clone(), lora.lora_B.detach().clone())
    return initial


def _initial_from_file(path) -> Initial:
    """The ``(A0, B0)`` of an adapter directory saved (``save_lora``) right after :func:`pissa_init`."""
    tensors = files.read_tensors(path)
    suffix = ".lora_A.weight"
    return {key[len(files.PREFIX):-len(suffix)]: (t, tensors[key[:-len(suffix)] + ".lora_B.weight"])
            for key, t in tensors.items() if key.endswith(suffix)}


@torch.no_grad()
def pissa_to_lora(model: nn.Module, initial: Initial | str | os.PathLike, path=None,
                  adapter_name: str | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A trained PiSSA adapter as a plain LoRA adapter for the *original* base weights (HF peft's conversion).

    ``W = W_res + s B0 A0`` and the trained model is ``W_res + s B A``, so the update to ``W`` is
    ``s (B A - B0 A0) = s [B | -B0] [A; A0]``: rank 2r, and ``lora_alpha`` doubled (times sqrt 2 with
    rsLoRA) so the scaling stays ``s``. ``initial`` is what :func:`pissa_init` returned, or the directory
    of the adapter saved right after it. Returns ``(config, tensors)`` with HF peft's file keys
    (trained biases and head copies unchanged); with ``path``, also writes them there, for
    ``load_lora`` or ``peft.PeftModel.from_pretrained`` on the original model.
    """
    configs = getattr(model, "peft_config", {})
    adapter_name = pick_adapter(model, configs, adapter_name)
    if isinstance(initial, (str, os.PathLike)):
        initial = _initial_from_file(initial)
    tensors = {k: v.detach().clone() for k, v in lora_tensors(model, adapter_name).items()}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        if name not in initial:
            raise ValueError(f"no initial (A0, B0) for layer {name!r}; initial has {sorted(initial)[:5]}...")
        lora, (a0, b0) = layer.adapters[adapter_name], initial[name]
        if a0.shape != lora.lora_A.shape or b0.shape != lora.lora_B.shape:
            raise ValueError(f"layer {name!r}: initial A0 {tuple(a0.shape)}, B0 {tuple(b0.shape)} do not fit "
                             f"A {tuple(lora.lora_A.shape)}, B {tuple(lora.lora_B.shape)}")
        key = files.PREFIX + name
        tensors[f"{key}.lora_A.weight"] = torch.cat([lora.lora_A, a0.to(lora.lora_A)])  # (2r, in)
        tensors[f"{key}.lora_B.weight"] = torch.cat([lora.lora_B, -b0.to(lora.lora_B)], dim=1)  # (out, 2r)
    config = configs[adapter_name]
    config = replace(config, r=2 * config.r, lora_alpha=config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2))
    if path is not None:
        files.write_adapter(path, {**asdict(config), "peft_type": PEFT_TYPE, "inference_mode": True,
                                   "base_model_name_or_path": files.base_model_name(model)}, tensors)
    return config, tensors


# --- LoftQ -----------------------------------------------------------------------------------------
@torch.no_grad()
def loftq_layer(layer: LoraLinear, num_iters: int = 1, quant_config: QuantConfig | None = None,
                adapter_name: str | None = None) -> list[float]:
    """LoftQ on one LoRA layer over an ``nn.Linear``: its base becomes a :class:`Linear4bit`; the errors.

    Iteration t: ``Q_t = NF4(W - s B A)`` (``B A = 0`` at t = 1: plain QLoRA's base), then
    ``A, B = svd_factors(W - Q_t)``. Returns ``||W - (Q_t + s B_t A_t)||_F`` for t = 1..num_iters. The
    layer keeps the last ``Q`` bit for bit (the packed bytes of that iteration) and the last ``A, B``.

    Each SVD step is optimal for its ``Q``, but the error need not fall at every iteration: NF4 scales
    each block by its own absmax, which moves with the input, so the quantization step is no projection
    onto one fixed grid. On MiniLM's layers it fell over 5 iterations (``reports/lora_init.json``); on
    Gaussian random weights it falls for about 3, then creeps up again. The paper uses 1-5.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    lora, base = _adapter(layer, adapter_name), layer.base
    if type(base) is not nn.Linear:
        raise ValueError(f"LoftQ needs a full-precision nn.Linear base, got {type(base).__name__}: apply_lora on "
                         f"the unquantized model, then loftq_init (it quantizes the LoRA layers' bases)")
    config = quant_config or QuantConfig()
    w = base.weight.float()  # (out, in)
    low_rank = torch.zeros_like(w)  # s B A
    errors = []
    for _ in range(num_iters):
        packed, state = kernels.quantize_4bit((w - low_rank).to(base.weight.dtype), config.blocksize,
                                              config.double_quant, config.quant_type)  # Triton on CUDA: same bytes
        q = kernels.dequantize_4bit(packed, state).float()  # what the 4-bit layer will compute with
        a, b = svd_factors(w - q, lora.r, lora.scaling)
        low_rank = lora.scaling * b @ a
        errors.append((w - q - low_rank).norm().item())
    lora.lora_A.copy_(a)
    lora.lora_B.copy_(b)
    layer.base = Linear4bit(packed, state, base.bias, config.compute_dtype)
    return errors


def loftq_init(module: nn.Module, num_iters: int = 1, quant_config: QuantConfig | None = None,
               adapter_name: str | None = None) -> dict[str, list[float]]:
    """LoftQ on every LoRA layer of ``module`` (a model, or one :class:`LoraLinear`: name ``""``), in place.

    Call it on a model with LoRA applied and *not* quantized: each LoRA layer's base becomes NF4
    (``quant_config``), and its adapter the low-rank part of the quantization error. Layers without LoRA
    stay as they are (``quantize_model`` may quantize them afterwards). Returns the errors per layer.

    >>> torch.manual_seed(0) and None
    >>> layer = LoraLinear(nn.Linear(64, 64), LoraConfig(r=8, lora_alpha=16))
    >>> errors = loftq_init(layer, num_iters=3)[""]
    >>> type(layer.base).__name__, len(errors), errors[-1] <= errors[0]
    ('Linear4bit', 3, True)
    """
    return {name: loftq_layer(layer, num_iters, quant_config, adapter_name) for name, layer in _layers(module)}
