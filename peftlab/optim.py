"""LoRA+: a larger learning rate for ``B`` than for ``A`` (``lr_B = ratio * lr_A``), as optimizer parameter groups.

With one learning rate for both factors, LoRA's feature learning is inefficient in wide models: ``B``
(d x r) should move faster than ``A`` (r x k). LoRA+ sets ``lr_B = ratio * lr``, ``ratio`` about 16.
The groups follow the paper's code and HF peft's ``create_loraplus_optimizer`` exactly:

- A: ``lora_A`` and the other trainable matrices (ndim >= 2, e.g. a head's weight): ``lr``;
- embedding: LoRA on an ``nn.Embedding`` (peftlab has none so far): ``lr_embedding``;
- B: ``lora_B`` and every 1-d parameter (a norm's scale): ``lr * ratio``;
- B without weight decay: the same for biases and ``nn.LayerNorm`` parameters: ``lr * ratio``, decay 0.
  The other groups get ``weight_decay``.

Note the reference's rule ``"lora_B" in name or param.ndim == 1``: trained biases and norm weights get
``lr * ratio`` too. It is kept here so that results transfer.

References:
    - Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354.
    - github.com/nikhil-ghosh-berkeley/loraplus and HF peft ``optimizers/loraplus.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

from .lora import LoraAdapter


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                          lr_embedding: float = 1e-6) -> list[dict]:
    """The LoRA+ parameter groups of ``model``'s trainable parameters (empty groups left out).

    Each trainable parameter is in exactly one group; pass the list to any ``torch.optim`` optimizer.

    >>> from peftlab import LoraConfig, apply_lora
    >>> m = apply_lora(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    >>> [(g["lr"], [tuple(p.shape) for p in g["params"]]) for g in loraplus_param_groups(m, lr=1e-3)]
    [(0.001, [(2, 8)]), (0.016, [(8, 2)])]
    >>> loraplus_param_groups(m, lr=1e-3, ratio=0)
    Traceback (most recent call last):
    ...
    ValueError: ratio (lr_B / lr_A) must be > 0, got 0
    """
    if not ratio > 0:
        raise ValueError(f"ratio (lr_B / lr_A) must be > 0, got {ratio!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    b_matrices = {id(m.lora_B) for m in model.modules() if isinstance(m, LoraAdapter)}
    # LoRA on an embedding: the parameters of a wrapper (one with .adapters) whose frozen base is an nn.Embedding.
    embedding = {id(p) for m in model.modules() if isinstance(getattr(m, "base", None), nn.Embedding)
                 and hasattr(m, "adapters") for p in m.adapters.parameters()}
    # No weight decay on biases and inside LayerNorm (transformers' Trainer rule, which HF peft reuses).
    no_decay = {id(p) for m in model.modules() if isinstance(m, tuple(ALL_LAYERNORM_LAYERS)) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in model.parameters():  # each tensor once (tied weights too)
        if not p.requires_grad:
            continue
        if id(p) in embedding:
            groups["embedding"].append(p)
        elif id(p) in b_matrices or p.ndim == 1:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay), "B": (lr * ratio, weight_decay),
                "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": params, "lr": settings[k][0], "weight_decay": settings[k][1]}
            for k, params in groups.items() if params]


def loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                       lr: float = 2e-4, ratio: float = 16.0, weight_decay: float = 0.0, lr_embedding: float = 1e-6,
                       **kwargs) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups` (``kwargs``: the optimizer's other options).

    >>> from peftlab import LoraConfig, apply_lora
    >>> m = apply_lora(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    >>> [g["lr"] for g in loraplus_optimizer(m, lr=1e-4, ratio=4).param_groups]
    [0.0001, 0.0004]
    """
    return optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay, lr_embedding), lr=lr, **kwargs)
