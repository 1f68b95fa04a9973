"""Shared by the LoRA test modules (tests/ is on sys.path, see conftest.py)."""

import torch
from torch import nn

from peftlab.lora import lora_layers


def randomize_lora(model: nn.Module, seed: int = 1, scale: float = 0.1, magnitude_jitter: float = 0.0) -> None:
    """Give every adapter's A and B random values (N(0, scale^2)), so the LoRA path really contributes.

    With ``magnitude_jitter``, DoRA's m is also moved off ``||W + dW||_c`` (else ``m / ||W + dW||_c = 1`` and DoRA's
    rescaling would not show): ``m <- m (1 + jitter N(0, 1))``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for a in layer.adapters.values():
                a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g) * scale)
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * scale)
                if magnitude_jitter and a.magnitude is not None:
                    a.magnitude.mul_(1 + magnitude_jitter * torch.randn(a.magnitude.shape, generator=g))
