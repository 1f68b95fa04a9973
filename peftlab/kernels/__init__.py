"""GPU kernels for the 4-bit path, written in Triton; the pure-PyTorch code in :mod:`peftlab.nf4` stays the reference.

:func:`dequantize_4bit` picks the Triton kernel for CUDA tensors when Triton imports, and the reference
everywhere else (CPU, no Triton), so callers need not care which ran.
"""

from __future__ import annotations

import torch

from peftlab import nf4

try:  # Triton ships with CUDA builds of torch; CPU-only installs lack it
    from peftlab.kernels.nf4_triton import dequantize_nf4_triton, quantize_nf4_triton
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    dequantize_nf4_triton = quantize_nf4_triton = None
    HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and the Triton kernels imported."""
    return HAS_TRITON and t.is_cuda


def dequantize_4bit(packed: torch.Tensor, state: nf4.QuantState) -> torch.Tensor:
    """:func:`peftlab.nf4.dequantize_4bit`, through the Triton kernel on CUDA (same values, bit for bit)."""
    if use_triton(packed):
        return dequantize_nf4_triton(packed, state)
    return nf4.dequantize_4bit(packed, state)


__all__ = ["HAS_TRITON", "use_triton", "dequantize_4bit", "dequantize_nf4_triton", "quantize_nf4_triton"]
