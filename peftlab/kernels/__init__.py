"""GPU kernels for the 4-bit path, written in Triton; the pure-PyTorch code in :mod:`peftlab.nf4` stays the reference.

:func:`dequantize_4bit`, :func:`quantize_4bit` and :func:`linear_4bit` pick the Triton kernels for CUDA
tensors when Triton imports, and the reference everywhere else (CPU, no Triton), so callers need not care
which ran: the values are the same (dequantize, quantize: bit for bit; the fused GEMV of
:func:`linear_4bit`: the same weights, fp32 sums in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab import nf4

try:  # Triton ships with CUDA builds of torch; CPU-only installs lack it
    from peftlab.kernels.nf4_triton import (
        GEMV_DISPATCH_ROWS,
        GEMV_MAX_ROWS,
        _gemv,
        can_gemv,
        dequantize_nf4_triton,
        gemv_4bit,
        quantize_nf4_triton,
    )
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    dequantize_nf4_triton = quantize_nf4_triton = gemv_4bit = _gemv = can_gemv = None
    GEMV_MAX_ROWS, GEMV_DISPATCH_ROWS = 16, 1
    HAS_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device and the Triton kernels imported."""
    return HAS_TRITON and t.is_cuda


def dequantize_4bit(packed: torch.Tensor, state: nf4.QuantState) -> torch.Tensor:
    """:func:`peftlab.nf4.dequantize_4bit`, through the Triton kernel on CUDA (same values, bit for bit)."""
    if use_triton(packed):
        return dequantize_nf4_triton(packed, state)
    return nf4.dequantize_4bit(packed, state)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                  quant_type: str = "nf4") -> tuple[torch.Tensor, nf4.QuantState]:
    """:func:`peftlab.nf4.quantize_4bit`, through the Triton kernels for NF4 on CUDA (same bytes)."""
    if use_triton(w) and quant_type == "nf4":
        return quantize_nf4_triton(w, blocksize, double_quant)
    return nf4.quantize_4bit(w, blocksize, double_quant, quant_type)


def use_gemv(x: torch.Tensor, state: nf4.QuantState) -> bool:
    """True when ``linear_4bit(x, ...)`` runs the fused GEMV: CUDA, Triton, one row (a token), whole blocks per row.

    :func:`gemv_4bit` itself takes up to 16 rows; from 2 rows on, dequantize + cuBLAS measured faster.
    """
    return use_triton(x) and x.numel() <= GEMV_DISPATCH_ROWS * state.shape[-1] and can_gemv(x, state)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: nf4.QuantState,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(W).to(x.dtype), bias)``: fused GEMV for few rows on CUDA, else dequantize, matmul."""
    if use_gemv(x, state):
        return _gemv(x, packed, state, bias)
    return F.linear(x, dequantize_4bit(packed, state).to(x.dtype), bias)


__all__ = ["HAS_TRITON", "GEMV_MAX_ROWS", "use_triton", "use_gemv", "dequantize_4bit", "quantize_4bit",
           "linear_4bit", "dequantize_nf4_triton", "quantize_nf4_triton", "gemv_4bit"]
