"""Observers of exercise 5 (QLoRA): the NF4 codebook, blockwise 4-bit quantization, bit accounting, a 4-bit layer.

Each re-expresses one checker of ``peftlab/checks/ex5.py`` (same name and signature, plus ``salt``); every
``rep.expect`` / ``rep.close`` there is a key of the observation here. Where the checker compares with bitsandbytes
(its bytes, its table), the solution's observation, made on the same inputs, is the answer. Differences from the
checker, all in the direction of accepting every answer the checker accepts:

- **ties**: a value exactly halfway between two codes may take either neighbour's index (the checker's rule); the
  observed index there is the lower neighbour's whenever the answer is one of the two, so ``torch.bucketize`` and an
  ``argmin`` give the same observation;
- **the codebook** is compared with the solution's within ``2 * NF4_TOL``: the solution's float64 derivation is itself
  up to one ``NF4_TOL`` away from bitsandbytes' table, which a student may reproduce exactly;
- **dequantize** reads random bytes and absmax (every index, any block scale) instead of bitsandbytes' bytes of ``w``;
- **tolerances that scale with the answer** (``2 eps max |w|``, ``4 eps max |y|``) are written as a division: the
  observation is ``value / unit`` compared within 1, with ``unit`` computed from the inputs only (``max |y|`` of the
  layer's unquantized float64 forward, not of the 4-bit reference, which the worker does not have).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .core import generator, observes

NF4_TOL = 1.2e-7  # peftlab.checks.ex5.NF4_TOL: one float32 ulp near 1
TIE = 1e-6  # a scaled value this close to a midpoint between two codes is a tie (the checker's window)
# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): the code the checkers pass to the student's functions.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def _name(x) -> str:
    return type(x).__name__


# --- (a) the NF4 codebook ---------------------------------------------------------------------------------------
@observes("check_nf4_codebook", tolerance={"values": 2 * NF4_TOL})
def check_nf4_codebook(fn: Callable, *, salt: int) -> dict:
    got = fn()
    if not isinstance(got, torch.Tensor):
        return {"type": _name(got)}
    obs = {"type": "Tensor", "shape": tuple(got.shape)}
    if obs["shape"] != (16,):
        return obs
    g = got.detach().cpu().double()
    return {**obs, "dtype": got.dtype, "sorted": bool((g[1:] > g[:-1]).all()),
            "signs": (int((g == 0).sum()), int((g < 0).sum()), int((g > 0).sum())),
            "min_max": (g.min().item(), g.max().item()), "values": g}


# --- (b) blockwise absmax quantization ----------------------------------------------------------------------------
def case_tensor(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, zero_block: int | None,
                blocksize: int) -> torch.Tensor:
    """The checker's kind of weight: N(0, 0.05) with a seventh of larger values, maybe one all-zero block."""
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[: w.numel() // 7].mul_(3)  # some larger values, as real weights have outliers
    if zero_block is not None:
        w.view(-1)[zero_block * blocksize: (zero_block + 1) * blocksize] = 0
    return w.to(dtype)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit indices of ``packed`` (high nibble first), int64."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()


def tie_midpoints(w: torch.Tensor, blocksize: int, code: torch.Tensor = NF4_CODE) -> torch.Tensor:
    """Per value of ``w`` (flat): ``m`` where it lies within :data:`TIE` of the midpoint of ``code[m], code[m + 1]``
    after absmax scaling (either index is right there), else -1. Computed in float64 from the input alone."""
    x = w.detach().reshape(-1).double()
    n = x.numel()
    blocks = nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().max(dim=1, keepdim=True).values
    scaled = torch.where(absmax > 0, blocks / absmax.clamp(min=1e-300), 0.0).reshape(-1)[:n]
    sorted_code = code.double().sort().values
    mid = (sorted_code[:-1] + sorted_code[1:]) / 2  # (15,)
    dist, m = (scaled.unsqueeze(-1) - mid).abs().min(-1)
    return torch.where(dist < TIE, m, -1)


def indices(packed: torch.Tensor, w: torch.Tensor, blocksize: int) -> dict:
    """The indices of ``packed`` with ties made canonical, and the padding nibble of an odd length."""
    n = w.numel()
    q = unpack(packed, n)
    m = tie_midpoints(w, blocksize)
    q = torch.where((m >= 0) & ((q == m) | (q == m + 1)), m, q)  # either neighbour of a tie: the lower one
    out = {"indices": q}
    if n % 2:
        out["pad"] = int(packed.reshape(-1)[-1] & 0x0F)
    return out


@observes("check_blockwise_quant", tolerance={"absmax_log": 1e-7, "dequantize": 1.0})
def check_blockwise_quant(quantize: Callable, dequantize: Callable, shape: tuple[int, ...] = (8, 48),
                          blocksize: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0,
                          zero_block: int | None = None, *, salt: int) -> dict:
    g = generator(salt, "check_blockwise_quant", tuple(shape), blocksize, str(dtype), seed, zero_block)
    w = case_tensor(tuple(shape), dtype, g, zero_block, blocksize)
    n, n_blocks = w.numel(), math.ceil(w.numel() / blocksize)
    got = quantize(w.clone(), NF4_CODE.clone(), blocksize)
    if not (isinstance(got, tuple | list) and len(got) == 2):
        return {"returns": _name(got)}
    packed, absmax = got
    meta = {"packed": (str(getattr(packed, "dtype", None)), _numel(packed)),
            "absmax": (_numel(absmax), str(getattr(absmax, "dtype", None)))}
    if meta != {"packed": ("torch.uint8", (n + 1) // 2), "absmax": (n_blocks, "torch.float32")}:
        return meta  # the checker stops here too
    a = absmax.detach().reshape(-1).double()
    zero = a.abs() <= 1e-30  # an all-zero block: 0 or a tiny value, as bitsandbytes (1e-38)
    obs = {**meta, "absmax_zero": zero, "absmax_log": torch.where(zero, 0.0, a.log()),  # relative error = log error
           **indices(packed.detach(), w, blocksize)}
    # dequantize random bytes and block scales: every index, every block, an all-zero block where the checker has one
    g2 = generator(salt, "check_blockwise_quant/dequantize", tuple(shape), blocksize, str(dtype), seed, zero_block)
    rand_packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g2, dtype=torch.uint8)
    rand_absmax = torch.rand(n_blocks, generator=g2) * 0.3 + 0.01
    if zero_block is not None:
        rand_absmax[zero_block] = 0.0
    out = dequantize(rand_packed.clone(), rand_absmax.clone(), NF4_CODE.clone(), w.shape, blocksize, dtype)
    obs["dequantize_meta"] = (tuple(getattr(out, "shape", ())), str(getattr(out, "dtype", None)))
    if isinstance(out, torch.Tensor) and out.shape == w.shape:
        tol = 0.0 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * rand_absmax.max().item()
        obs["dequantize"] = out.detach().double() / max(tol, 1e-12)  # in units of the checker's tolerance
    return obs


def _numel(t):
    return t.numel() if isinstance(t, torch.Tensor) else None


# --- (c) double quantization: bits per parameter --------------------------------------------------------------------
@observes("check_double_quant_bits")
def check_double_quant_bits(fn: Callable, cases: tuple = ((4096 * 4096, 64, False), (4096 * 4096, 64, True)),
                            blocksize2: int = 256, *, salt: int) -> dict:
    bits = []
    for n, bs, dq in cases:
        got = fn(n, bs, dq)
        bits.append(float(got) if isinstance(got, int | float) else f"not a number: {_name(got)}")
    return {"bits": bits}


# --- (d) a 4-bit linear layer -------------------------------------------------------------------------------------
@observes("check_linear4bit", tolerance={"forward": 1.0, "input_grad": 1.0})
def check_linear4bit(cls: type, in_features: int = 96, out_features: int = 40, blocksize: int = 64,
                     compute_dtype: torch.dtype = torch.float32, bias: bool = True, input_dtype=torch.float32,
                     seed: int = 0, *, salt: int) -> dict:
    g = generator(salt, "check_linear4bit", in_features, out_features, blocksize, str(compute_dtype), bias,
                  str(input_dtype), seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    bound = 1 / math.sqrt(in_features)  # nn.Linear's init range, drawn from the salt
    with torch.no_grad():
        linear.weight.copy_((torch.rand(linear.weight.shape, generator=g) * 2 - 1) * bound)
        if bias:
            linear.bias.copy_((torch.rand(out_features, generator=g) * 2 - 1) * bound)
    w0, b0 = linear.weight.detach().clone(), None if linear.bias is None else linear.bias.detach().clone()
    layer = cls(linear, NF4_CODE.clone(), blocksize, compute_dtype)
    n = in_features * out_features
    weight = getattr(layer, "weight", None)
    obs = {"weight": (str(getattr(weight, "dtype", None)), _numel(weight), isinstance(weight, nn.Parameter))}
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8 and weight.numel() == (n + 1) // 2:
        obs["weight_bytes"] = indices(weight.detach(), w0, blocksize)
    obs["trainable"] = sorted(name for name, p in layer.named_parameters() if p.requires_grad)
    stored = sum(t.numel() * t.element_size() for name, t in layer.state_dict().items() if "bias" not in name)
    obs["weight_stored_small"] = stored <= (n + 1) // 2 + 4 * math.ceil(n / blocksize) + 16 * 4 + 64

    x = torch.randn(2, 3, in_features, generator=g).to(input_dtype)
    x_mine = x.clone().requires_grad_(True)
    got = layer(x_mine)
    if compute_dtype == torch.float32 and input_dtype == torch.float32:
        unit = 1e-5
    else:  # the checker's 4 eps max |y|, with y of the unquantized layer in float64 (the 4-bit y is not known here)
        y = nn.functional.linear(x.double(), w0.double(), None if b0 is None else b0.double())
        unit = 4 * torch.finfo(torch.bfloat16).eps * y.abs().max().item()
    if not isinstance(got, torch.Tensor):
        return {**obs, "forward": _name(got)}
    obs["forward"] = got.detach().double() / unit
    obs["output_dtype"] = got.dtype
    obs["output_requires_grad"] = got.requires_grad
    if got.requires_grad:
        w_out = torch.randn((2, 3, out_features), generator=g).to(input_dtype)
        (got * w_out).sum().backward()
        grad = x_mine.grad
        obs["input_grad"] = None if grad is None else grad.double() / (4 * unit)
    return obs
