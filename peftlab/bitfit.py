"""BitFit: fine-tune only the bias terms of a frozen model (and its new task head).

Every bias trains: those of the query, key, value and output projections, of both feed-forward
layers, and the LayerNorms' shifts (``beta``). For BERT-base that is about 0.1 % of the weights.
Models built without biases (Llama and SmolLM2 use ``bias=False`` everywhere and RMSNorm has no
shift) have nothing for BitFit to train: :func:`apply_bitfit` says so instead of training nothing.

References:
    - Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
      Transformer-based Masked Language-models", arXiv:2106.10199.
"""

from __future__ import annotations

from torch import nn

from .inject import freeze, matches


def apply_bitfit(model: nn.Module, modules_to_save: list[str] | None = None) -> nn.Module:
    """Freeze ``model``, then let every ``*.bias`` and each module in ``modules_to_save`` train (in place).

    >>> m = apply_bitfit(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
    >>> [n for n, p in m.named_parameters() if p.requires_grad]
    ['0.bias', '1.bias']
    >>> apply_bitfit(nn.Linear(4, 3, bias=False))
    Traceback (most recent call last):
    ...
    ValueError: Linear has no bias parameters (e.g. Llama uses bias=False): BitFit would train nothing
    """
    freeze(model)
    biases = [p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if not biases:
        raise ValueError(f"{type(model).__name__} has no bias parameters (e.g. Llama uses bias=False): "
                         f"BitFit would train nothing")
    for p in biases:
        p.requires_grad_(True)
    for target in modules_to_save or []:
        found = [m for n, m in model.named_modules() if n and matches(n, [target])]
        if not found:
            raise ValueError(f"modules_to_save entry {target!r} matched no module")
        for module in found:
            module.requires_grad_(True)
    return model
