"""NF4 dequantize and quantize in Triton: the same bytes and values as :mod:`peftlab.nf4`, at GPU speed.

The pure-PyTorch code in :mod:`peftlab.nf4` is the reference (exercise 5); these kernels follow it value
for value: one program handles ``BLOCK`` consecutive 4-bit values, the high nibble of a byte is the first
value, the per-block ``absmax`` (fp32, already decoded when double-quantized) scales each value.

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Tillet et al., "Triton: an intermediate language and compiler for tiled neural network computations", 2019.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.nf4 import QuantState, check_input, nf4_codebook, quantize_4bit


@triton.jit
def _dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, out_ptr, n, blocksize, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # indices of the 4-bit values this program writes
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    idx = tl.where(offs % 2 == 0, byte >> 4, byte & 0x0F)  # even index: high nibble (pack_nibbles' order)
    value = tl.load(code_ptr + idx, mask=mask, other=0.0)  # the 16-entry codebook stays in L1
    scale = tl.load(absmax_ptr + offs // blocksize, mask=mask, other=0.0)
    # fp32 product, then one rounding to the output dtype: the reference's `.float() * absmax` then `.to(dtype)`
    tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(w_ptr, mid_ptr, packed_ptr, absmax_ptr, BLOCKSIZE: tl.constexpr):
    # One program per full block of BLOCKSIZE values (BLOCKSIZE / 2 bytes).
    block = tl.program_id(0)
    pairs = tl.arange(0, BLOCKSIZE // 2)
    base = block * BLOCKSIZE
    hi = tl.load(w_ptr + base + 2 * pairs).to(tl.float32)  # values that go to the high nibbles
    lo = tl.load(w_ptr + base + 2 * pairs + 1).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(hi), axis=0), tl.max(tl.abs(lo), axis=0))
    floor = tl.full((), 1e-38, tl.float32)  # fp32 constants: a bare literal is fp64 to div_rn
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), tl.maximum(absmax, floor))  # IEEE `1.0 / absmax`
    inv = tl.where(absmax == 0, 0.0, inv)  # zero block: 0 either way, and no 0 * inf if 1e-38 flushes to 0
    hi = tl.clamp(hi * inv, -1.0, 1.0)
    lo = tl.clamp(lo * inv, -1.0, 1.0)
    q_hi = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    q_lo = tl.zeros([BLOCKSIZE // 2], dtype=tl.int32)
    for i in tl.static_range(15):  # index = number of midpoints strictly below x (torch.bucketize's rule)
        m = tl.load(mid_ptr + i)
        q_hi += (hi > m).to(tl.int32)
        q_lo += (lo > m).to(tl.int32)
    tl.store(packed_ptr + block * (BLOCKSIZE // 2) + pairs, ((q_hi << 4) | q_lo).to(tl.uint8))
    tl.store(absmax_ptr + block, absmax)


def dequantize_nf4_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                          BLOCK: int = 1024) -> torch.Tensor:
    """Triton twin of :func:`peftlab.nf4.dequantize_4bit` (any 16-entry codebook), bit for bit.

    ``dtype`` defaults to ``state.dtype``; the double-quantized absmax is decoded by the reference code
    (a few thousand values), the 4-bit weight itself by the kernel.
    """
    n = state.shape.numel()
    out = torch.empty(n, dtype=dtype or state.dtype, device=packed.device)
    code = torch.nn.functional.pad(state.code.to(packed.device).float(), (0, 16 - state.code.numel()))
    absmax = state.scales().float().contiguous()
    _dequantize_kernel[(triton.cdiv(n, BLOCK),)](packed.reshape(-1).view(torch.uint8), code, absmax, out, n,
                                                 state.blocksize, BLOCK=BLOCK)
    return out.reshape(state.shape)


def quantize_nf4_triton(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, QuantState]:
    """Triton twin of :func:`peftlab.nf4.quantize_nf4` (no double quantization), byte for byte.

    The kernel handles the full blocks; a last partial block (the reference divides there, not multiplies)
    is rare in weights and is quantized by the reference code.
    """
    check_input(w, blocksize)
    x = w.reshape(-1).contiguous()
    n = x.numel()
    code = nf4_codebook().to(w.device)
    mid = ((code[:-1] + code[1:]) / 2).contiguous()  # the 15 midpoints, fp32 as in nearest_code
    n_full = n // blocksize
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(triton.cdiv(n, blocksize), dtype=torch.float32, device=w.device)
    if n_full:
        _quantize_kernel[(n_full,)](x, mid, packed, absmax, BLOCKSIZE=blocksize)
    if n % blocksize:  # tail block: the reference rule (blockwise_absmax divides, floors at 1e-38)
        tail_packed, tail_state = quantize_4bit(x[n_full * blocksize:], blocksize)
        packed[n_full * blocksize // 2:] = tail_packed
        absmax[-1] = tail_state.absmax[0]
    return packed, QuantState(absmax, w.shape, w.dtype, blocksize, code, "nf4")

