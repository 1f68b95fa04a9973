"""DoRA: LoRA that splits the adapted weight into a trained magnitude and a direction, ``m (W + dW) / ||W + dW||_c``.

Liu et al. write a weight ``W`` (d x k, out x in) as a magnitude times a unit direction, ``W = m V / ||V||_c``,
where ``||.||_c`` is the L2 norm of each output row (the paper's "column": it lays ``W`` out as k x d).
DoRA trains the magnitude ``m`` (d numbers, one per output) directly and the direction through LoRA,
``V = W + dW`` with ``dW = s B A`` (``s = lora_alpha / r``):

    W' = m (W + s B A) / ||W + s B A||_c                                   (paper, eq. 5)

``m`` starts at ``||W + s B A||_c`` (``= ||W||_c``, since ``B`` starts at zero), so ``W' = W`` at step 0. The norm
is a constant for backward: "we suggest treating ||V + dV||_c in Eq. (5) as a constant, thereby detaching it from
the gradient graph" (section 4.3), so gradients reach ``m``, ``A`` and ``B`` but not through the norm, and its
(out x in) working copy is freed right after the forward computes it.

With ``y0 = W x + b`` (the frozen layer's output) and ``g = m / ||W + s B A||_c``, the layer returns

    y = g (W x + s B A x) + b = y0 + (g - 1) (y0 - b) + g s B A x            (eq. 5, applied to x)

so the base layer runs once, as in LoRA. HF peft's one twist, followed here: with dropout active (training,
``lora_dropout > 0``) both ``W`` and ``B A`` see the dropped input, ``y0 + (g - 1) W drop(x) + g s B A drop(x)``.

This module holds the maths; :class:`peftlab.lora.LoraLinear` calls it for an adapter made with
``LoraConfig(use_dora=True)`` (its :class:`~peftlab.lora.LoraAdapter` then has ``magnitude``), and
``save_lora`` / ``load_lora`` store ``m`` under HF peft's key, ``<layer>.lora_magnitude_vector`` (shape (out,)).

References:
    - Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353.
    - HF peft ``tuners/lora/dora.py`` (``DoraLinearLayer``) and ``tuners/lora/variants.py``
      (``DoraLinearVariant``): the forward, the merge and the file key followed here, so files and logits transfer.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import files

MAGNITUDE_KEY = "lora_magnitude_vector"  # HF peft's file key for m: "<layer>.lora_magnitude_vector", shape (out,)


@torch.no_grad()  # a constant for backward (paper, section 4.3): no graph, and its (out, in) copy dies at once
def weight_norm(weight: torch.Tensor, lora: nn.Module) -> torch.Tensor:
    """``||W + s B A||_c``: the L2 norm of each output row of the adapted weight, shape (out,).

    ``weight`` is the base weight laid out (out, in); ``lora`` a :class:`peftlab.lora.LoraAdapter`.

    >>> from peftlab.lora import LoraAdapter, LoraConfig
    >>> lora = LoraAdapter(2, 2, LoraConfig(r=1))  # B = 0: the norm of W's rows
    >>> weight_norm(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), lora)
    tensor([5., 2.])
    """
    adapted = torch.addmm(weight.to(lora.lora_A.dtype), lora.lora_B, lora.lora_A, alpha=lora.scaling)  # (out, in)
    return torch.linalg.vector_norm(adapted, dim=1)


def init_magnitude(lora: nn.Module, weight: torch.Tensor) -> None:
    """Give ``lora`` DoRA's trainable magnitude ``m = ||W + s B A||_c`` (shape (out,)), so the layer starts as ``W``."""
    lora.magnitude = nn.Parameter(weight_norm(weight, lora))


def forward(lora: nn.Module, x: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """What DoRA adds to the base output ``base_out = W x + b``: ``(g - 1) W x + g s B A x``, ``g = m / ||W + dW||_c``.

    ``x`` (..., in), ``base_out`` (..., out), ``weight`` (out, in) and ``bias`` in the adapter's dtype.
    """
    g = lora.magnitude / weight_norm(weight, lora)  # (out,): broadcasts over the last dim of (..., out)
    dropped = lora.dropout(x)
    if lora.training and isinstance(lora.dropout, nn.Dropout):  # HF peft: W sees the dropped x too
        wx = F.linear(dropped, weight)  # (..., out), no bias
    else:  # the base layer already computed W x: take the bias back out
        wx = base_out if bias is None else base_out - bias
    lora_out = dropped @ lora.lora_A.T @ lora.lora_B.T  # (..., in) -> (..., r) -> (..., out)
    return (g - 1) * wx + g * lora_out * lora.scaling


# --- merge: W' = g (W + dW), written as an update W' - W so a 4-bit base can add it too ---------------------------
@torch.no_grad()
def merge_update(lora: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``W' - W`` with ``W' = (m / ||W + dW||_c) (W + dW)`` (eq. 5), the norm from the current weights; (out, in).

    The norm is kept on ``lora`` (``merged_norm``): :func:`unmerge_update` needs it, and ``W'`` cannot give it
    back (each row of ``W'`` has norm ``m``, whatever ``W`` was).
    """
    weight = weight.to(lora.lora_A.dtype)
    lora.merged_norm = weight_norm(weight, lora)
    g = (lora.magnitude / lora.merged_norm).unsqueeze(1)  # (out, 1): scales each output row
    return g * (weight + lora.delta_weight()) - weight


@torch.no_grad()
def unmerge_update(lora: nn.Module, merged: torch.Tensor) -> torch.Tensor:
    """``W - W'`` with ``W = W' ||W + dW||_c / m - dW`` (the norm kept by :func:`merge_update`); (out, in)."""
    merged = merged.to(lora.lora_A.dtype)
    g = (lora.magnitude / lora.merged_norm).unsqueeze(1)  # (out, 1)
    lora.merged_norm = None
    return merged / g - lora.delta_weight() - merged


# --- files ----------------------------------------------------------------------------------------------------------
def check_file(path, use_dora: bool, tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`peftlab.files.AdapterFileError` when the config's ``use_dora`` and the file's magnitudes disagree.

    >>> check_file("ad", True, {"base_model.model.q.lora_A.weight": torch.zeros(1, 2)})
    Traceback (most recent call last):
    ...
    peftlab.files.AdapterFileError: ad/adapter_config.json says use_dora=true, but ad/adapter_model.safetensors \
has no lora_magnitude_vector for 1 of its 1 LoRA layers (e.g. base_model.model.q): a DoRA adapter stores m for \
every layer
    """
    config, weights = os.path.join(path, files.ADAPTER_CONFIG), os.path.join(path, files.ADAPTER_WEIGHTS)
    layers = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
    with_m = {k.removesuffix("." + MAGNITUDE_KEY) for k in tensors if k.endswith("." + MAGNITUDE_KEY)}
    if use_dora and layers - with_m:
        missing = sorted(layers - with_m)
        raise files.AdapterFileError(f"{config} says use_dora=true, but {weights} has no {MAGNITUDE_KEY} for "
                                     f"{len(missing)} of its {len(layers)} LoRA layers (e.g. {missing[0]}): a DoRA "
                                     f"adapter stores m for every layer")
    if not use_dora and with_m:
        raise files.AdapterFileError(f"{weights} holds {len(with_m)} {MAGNITUDE_KEY} tensors (a DoRA adapter), but "
                                     f"{config} does not say use_dora=true")
