"""Checkers for exercise 5 (QLoRA): the student's NF4 codebook, blockwise quantizer, bit accounting and 4-bit layer.

Expected values come from bitsandbytes (its NF4 table and ``quantize_4bit`` bytes on CPU) or, while
the autograder runs, from :mod:`peftlab.quant`, which reproduces those bytes bit for bit (enforced by
tests/methods/test_quant.py) and saves the ~8 s that importing bitsandbytes costs; from closed forms (bits per
parameter); and from :class:`peftlab.quant.Linear4bit` (outputs and input gradients of a 4-bit layer).
The student's functions always run on the inputs; nothing expected is computed with them.

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314 (NF4, double quantization).
    - bitsandbytes ``functional.get_4bit_type``, ``quantize_4bit`` and ``backends/default/ops.py`` (nibble order).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .. import quant
from .core import Report, call, grading

NF4_TOL = 1.2e-7  # one float32 ulp near 1: a float64 derivation may round 10 of the 16 entries the other way


def reference_code() -> tuple[torch.Tensor, str]:
    """bitsandbytes' NF4 table (``get_4bit_type``), or peftlab's literal copy of it while grading (fast)."""
    if not grading():
        try:
            import bitsandbytes.functional as bf

            return bf.get_4bit_type("nf4", device="cpu").float(), "bitsandbytes.functional.get_4bit_type('nf4')"
        except ImportError:
            pass
    return quant.NF4_CODE.clone(), "bitsandbytes' NF4 table (literal in peftlab.quant, tied to bitsandbytes by a test)"


def reference_quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(packed bytes (flat uint8), absmax fp32, source)`` of bitsandbytes' NF4 quantization (no double quant)."""
    if not grading():
        try:
            import bitsandbytes.functional as bf

            packed, state = bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
            return packed.reshape(-1).view(torch.uint8), state.absmax.float(), "bitsandbytes.functional.quantize_4bit"
        except ImportError:
            pass
    packed, state = quant.quantize_nf4(w, blocksize)
    return packed.reshape(-1), state.absmax.float(), "peftlab.quant.quantize_nf4 (bit-exact with bitsandbytes)"


# --- (a) the NF4 codebook -------------------------------------------------------------------------
def check_nf4_codebook(fn: Callable) -> None:
    """``fn()`` returns bitsandbytes' 16 NF4 values (sorted, float32) within one float32 ulp."""
    expected, source = reference_code()
    with Report(f"nf4_codebook() vs {source}") as rep:
        got = call("nf4_codebook()", fn)
        if not isinstance(got, torch.Tensor):
            rep.expect("returns a torch.Tensor", "torch.Tensor", type(got).__name__)
            return
        rep.expect("shape", (16,), tuple(got.shape))
        if tuple(got.shape) != (16,):
            return
        rep.expect("dtype", torch.float32, got.dtype)
        g = got.detach().double()
        rep.expect("sorted ascending", True, bool((g[1:] > g[:-1]).all()))
        rep.expect("exactly one zero, 7 negative and 8 positive values", (1, 7, 8),
                   (int((g == 0).sum()), int((g < 0).sum()), int((g > 0).sum())))
        rep.expect("normalised: min -1, max 1", (-1.0, 1.0), (g.min().item(), g.max().item()))
        err = (g - expected.double()).abs().max().item()
        rep.expect("every value equals bitsandbytes'", f"max |difference| <= {NF4_TOL:g}", f"{err:.3g}",
                   err <= NF4_TOL)
        if err > NF4_TOL:
            i = int((g - expected.double()).abs().argmax())
            print(f"        worst entry {i}: expected {expected[i].item():.9f}, got {got[i].item():.9f}")


# --- (b) blockwise absmax quantization ------------------------------------------------------------
def _tie_positions(w: torch.Tensor, blocksize: int, code: torch.Tensor) -> torch.Tensor:
    """Values within 1e-6 of a midpoint between two codes after scaling: either neighbour is acceptable there."""
    scaled, _ = quant.blockwise_absmax(w, blocksize)
    sorted_code = code.sort().values
    mid = (sorted_code[:-1] + sorted_code[1:]) / 2
    return (scaled.unsqueeze(-1) - mid).abs().min(-1).values < 1e-6


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1).view(torch.uint8)
    return torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()  # high nibble first


def _case_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, zero_block: int | None,
                 blocksize: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[: w.numel() // 7].mul_(3)  # some larger values, as real weights have outliers
    if zero_block is not None:
        w.view(-1)[zero_block * blocksize: (zero_block + 1) * blocksize] = 0
    return w.to(dtype)


def check_blockwise_quant(quantize: Callable, dequantize: Callable, shape: tuple[int, ...] = (8, 48),
                          blocksize: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0,
                          zero_block: int | None = None) -> None:
    """``quantize(w, code, blocksize) -> (packed, absmax)`` gives bitsandbytes' bytes and absmax;
    ``dequantize(packed, absmax, code, shape, blocksize, dtype)`` gives bitsandbytes' dequantized tensor."""
    code, _ = reference_code()
    w = _case_tensor(shape, dtype, seed, zero_block, blocksize)
    n = w.numel()
    ref_packed, ref_absmax, source = reference_quantize(w, blocksize)
    n_blocks = math.ceil(n / blocksize)
    title = (f"quantize/dequantize w {tuple(shape)} {dtype}, blocksize {blocksize} ({n} values: {n // blocksize} "
             f"full block(s){', one partial' if n % blocksize else ''}{', odd length' if n % 2 else ''}"
             f"{f', block {zero_block} all zero' if zero_block is not None else ''}) vs {source}")
    with Report(title) as rep:
        got = call(f"quantize(w, code, blocksize={blocksize})", quantize, w, code, blocksize)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            rep.expect("returns (packed, absmax)", "a pair of tensors", type(got).__name__)
            return
        packed, absmax = got
        rep.expect("packed dtype", torch.uint8, getattr(packed, "dtype", None))
        rep.expect("packed bytes: ceil(n / 2)", (n + 1) // 2, getattr(packed, "numel", lambda: None)())
        rep.expect("absmax: one fp32 value per block", (n_blocks, torch.float32),
                   (getattr(absmax, "numel", lambda: None)(), getattr(absmax, "dtype", None)))
        if rep.failed:
            return
        a, ra = absmax.reshape(-1).double(), ref_absmax.double()
        zero = ra <= 1e-30  # an all-zero block: bitsandbytes stores 0 (full block) or 1e-38 (partial); both fine
        err = ((a - ra).abs() / ra.clamp(min=1e-30))[~zero].max().item() if (~zero).any() else 0.0
        rep.expect("absmax per block = max |w| of the block", "relative error <= 1e-7",
                   f"{err:.3g}" + (f"; all-zero block stores {a[zero].tolist()}" if zero.any() else ""),
                   err <= 1e-7 and bool((a[zero].abs() <= 1e-30).all()) and not a.isnan().any())
        mine, ref = _unpack(packed, n), _unpack(ref_packed, n)
        ties = _tie_positions(w, blocksize, code)
        bad = (mine != ref) & ~(ties & ((mine - ref).abs() == 1))
        swapped = _unpack(packed.reshape(-1).view(torch.uint8).bitwise_left_shift(4)
                          | packed.reshape(-1).view(torch.uint8).bitwise_right_shift(4), n)
        note = ""
        if bad.any() and bool((swapped == ref).float().mean() > 0.9):
            note = "  <- your nibbles are swapped: the FIRST index goes in the HIGH 4 bits"
        rep.expect("4-bit indices (two per byte, first in the high nibble; ties may go either way)",
                   "all equal", f"{int(bad.sum())} of {n} differ", not bad.any(), note=note)
        if n % 2:
            pad = packed.reshape(-1).view(torch.uint8)[-1] & 0x0F
            rep.expect("odd length: the last low nibble is padding, the index of 0.0", 7, int(pad))
        if bad.any():
            i = int(bad.nonzero()[0])
            print(f"        first difference at value {i}: w = {w.view(-1)[i].item():.6g}, block absmax = "
                  f"{ref_absmax[i // blocksize].item():.6g}, expected index {int(ref[i])}, got {int(mine[i])}")
        expected_w = quant.dequantize_4bit(ref_packed.reshape(-1, 1), quant.QuantState(
            ref_absmax, w.shape, dtype, blocksize, code))
        out = call("dequantize(packed, absmax, code, shape, blocksize, dtype)", dequantize,
                    ref_packed.reshape(-1, 1).clone(), ref_absmax.clone(), code, w.shape, blocksize, dtype)
        rep.expect("dequantize: shape and dtype of the original", (tuple(w.shape), dtype),
                   (tuple(getattr(out, "shape", ())), getattr(out, "dtype", None)))
        if isinstance(out, torch.Tensor) and out.shape == w.shape:
            tol = 0.0 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * w.abs().max().item()
            rep.close("dequantize(bitsandbytes' bytes) = code[index] * absmax of the block", expected_w, out,
                      max(tol, 1e-12))


# --- (c) double quantization: bits per parameter -----------------------------------------------------
def constant_bits_reference(n: int, blocksize: int = 64, double_quant: bool = False, blocksize2: int = 256) -> float:
    """Closed form: fp32 absmax per block; with double quant uint8 per block + fp32 per 256 blocks + fp32 offset."""
    blocks = math.ceil(n / blocksize)
    if not double_quant:
        return 32 * blocks / n
    return (8 * blocks + 32 * math.ceil(blocks / blocksize2) + 32) / n


def check_double_quant_bits(fn: Callable, cases: tuple = ((4096 * 4096, 64, False), (4096 * 4096, 64, True)),
                            blocksize2: int = 256) -> None:
    """``fn(n_params, blocksize, double_quant)`` -> bits per parameter spent on quantization constants."""
    with Report("constant_bits: bits per parameter of the quantization constants") as rep:
        for n, bs, dq in cases:
            got = call(f"constant_bits({n}, blocksize={bs}, double_quant={dq})", fn, n, bs, dq)
            expected = constant_bits_reference(n, bs, dq, blocksize2)
            ok = isinstance(got, (int, float)) and math.isclose(float(got), expected, rel_tol=1e-9)
            rep.expect(f"n={n:,}, blocksize={bs}, double_quant={dq}", round(expected, 6),
                       round(float(got), 6) if isinstance(got, (int, float)) else got, ok)


# --- (d) a 4-bit linear layer ---------------------------------------------------------------------------
def check_linear4bit(cls: type, in_features: int = 96, out_features: int = 40, blocksize: int = 64,
                     compute_dtype: torch.dtype = torch.float32, bias: bool = True, input_dtype=torch.float32,
                     seed: int = 0) -> None:
    """``cls(linear, code, blocksize, compute_dtype)`` stores 4-bit weights and computes Linear4bit's forward."""
    code, _ = reference_code()
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    ref = quant.Linear4bit.from_linear(linear, quant.QuantConfig(blocksize=blocksize, double_quant=False,
                                                                 compute_dtype=compute_dtype))
    title = (f"{cls.__name__}(nn.Linear({in_features}, {out_features}, bias={bias}), blocksize={blocksize}, "
             f"compute_dtype={compute_dtype}) on x {input_dtype} vs peftlab.quant.Linear4bit")
    with Report(title) as rep:
        layer = call(f"{cls.__name__}(linear, code, blocksize, compute_dtype)", cls, linear, code, blocksize,
                      compute_dtype)
        weight = getattr(layer, "weight", None)
        rep.expect("layer.weight is the packed uint8 tensor (n / 2 bytes), not a Parameter",
                   (torch.uint8, (in_features * out_features + 1) // 2, False),
                   (getattr(weight, "dtype", None), getattr(weight, "numel", lambda: None)(),
                    isinstance(weight, nn.Parameter)))
        if isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8:
            same = torch.equal(weight.reshape(-1), ref.weight.reshape(-1))
            rep.expect("packed weight equals bitsandbytes' bytes", True, same)
        trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
        rep.expect("no trainable parameters (the 4-bit base is frozen)", [], trainable)
        stored = sum(t.numel() * t.element_size() for n, t in layer.state_dict().items() if "bias" not in n)
        n = in_features * out_features
        rep.expect("state_dict bytes of the weight (4 bits + fp32 absmax per block)",
                   f"<= {(n + 1) // 2 + 4 * math.ceil(n / blocksize) + 16 * 4 + 64}", stored,
                   stored <= (n + 1) // 2 + 4 * math.ceil(n / blocksize) + 16 * 4 + 64)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2, 3, in_features, generator=g).to(input_dtype)
        x_ref, x_mine = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        expected = ref(x_ref)
        got = call("layer(x)", layer, x_mine)
        tol = 1e-5 if compute_dtype == torch.float32 and input_dtype == torch.float32 else \
            4 * torch.finfo(torch.bfloat16).eps * expected.detach().abs().max().item()
        rep.close("forward: x @ dequantize(W).T + b (in compute_dtype)", expected.detach(), got, tol)
        rep.expect("output dtype follows the input", input_dtype, getattr(got, "dtype", None))
        if isinstance(got, torch.Tensor) and got.requires_grad:
            w_out = torch.randn(expected.shape, generator=g).to(input_dtype)
            (expected * w_out).sum().backward()
            (got * w_out).sum().backward()
            rep.close("gradient reaches the input x (QLoRA backpropagates through the 4-bit base)",
                      x_ref.grad, x_mine.grad, tol * 4)
        else:
            rep.expect("output requires grad (gradients must flow to x)", True, False)
