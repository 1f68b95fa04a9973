"""QLoRA's 4-bit NormalFloat (NF4) from scratch: codebooks, blockwise absmax, double quantization, 4-bit layers.

A weight is cut into blocks of ``blocksize`` values; each block is divided by its absolute maximum
(``absmax``) so it lies in [-1, 1], and every value is replaced by the index of the nearest of 16
code values, two indices per byte. NF4's 16 values are quantiles of a normal distribution, so each
is used about equally often by normally distributed weights. Double quantization stores the fp32
``absmax`` values themselves in 8 bits (blocks of 256), cutting the constants from 0.5 to ~0.127
bits per parameter. Everything here follows bitsandbytes bit for bit (its CPU reference ops).

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
    - Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (dynamic map), arXiv:1511.04561.
    - Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", arXiv:2208.07339.
    - bitsandbytes ``backends/default/ops.py`` (4-bit index choice, nibble order) and ``csrc/cpu_ops.cpp``
      (8-bit lookup-table quantizer used for double quantization on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .inject import Targets, replace_modules

# --- codebooks -------------------------------------------------------------------------------
# bitsandbytes' NF4 table (``get_4bit_type("nf4")``) as a literal; nf4_codebook() regenerates it.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, not value order: index
# 0b0010 is 8/12. Its exponent bias (2) differs from IEEE's, so the table is the clearest definition.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12.0
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def nf4_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values from normal quantiles (QLoRA, section 3): 8 positive, 7 negative, an exact 0.

    Positive side: quantiles at 8 probabilities evenly spaced from ``offset`` down to 0.5 (excluded);
    negative side: 7 of them. ``offset`` = mean of 1 - 1/(2*15) and 1 - 1/(2*16), so the extreme
    quantile is finite. Divided by the largest, the values span [-1, 1]. The probabilities are
    float32 and the quantiles float64, as in bitsandbytes' ``create_normal_map``: this reproduces its
    table exactly (a pure float64 derivation differs by one float32 ulp in 10 of the 16 entries).

    >>> torch.equal(nf4_codebook(), NF4_CODE)
    True
    """
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 quantiles > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 quantiles < 0
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values.float()
    return values / values.max()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 code values in index (bit-pattern) order; two of them are +0 and -0."""
    return FP4_CODE.clone()


def int4_codebook() -> torch.Tensor:
    """Uniform symmetric 4-bit: the 15 levels k/7, k = -7..7 (plain absmax int4; one index unused)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


CODEBOOKS = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}


def dynamic_map(max_exponent_bits: int = 7) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted values in [-1, 1]) used by double quantization.

    Each decade 10^(i-6), i = 0..6, gets 2^i linearly spaced values (the bin centres of
    ``linspace(0.1, 1, 2^i + 1)``), mirrored for negatives, plus 0 and 1: fine steps near zero,
    coarse near one, like a float with a dynamic exponent (arXiv:1511.04561).

    >>> m = dynamic_map(); m.shape, m[-1].item(), (m == 0).sum().item()
    (torch.Size([256]), 1.0, 1)
    """
    data = [0.0, 1.0]
    for i in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()  # same float ops as bitsandbytes
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)


# --- blockwise absmax quantization -------------------------------------------------------------
def check_input(w: torch.Tensor, blocksize: int, what: str = "quantize") -> None:
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{what} needs a floating-point tensor (float32, bfloat16 or float16), got {got}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in {BLOCKSIZES}, got {blocksize!r}")
    if w.numel() == 0:
        raise ValueError(f"{what} needs a non-empty tensor, got shape {tuple(w.shape)}")


def blockwise_absmax(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block of the flattened ``w`` into [-1, 1]: returns ``(scaled, absmax)``, both fp32.

    As bitsandbytes: full blocks are multiplied by ``1 / absmax``, the last partial block is
    divided by its absmax (the two can differ by one ulp, which moves a value lying on a midpoint),
    and only the partial block's absmax is floored at 1e-38 (an all-zero block then stores 1e-38).
    """
    x = w.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)  # (n_blocks, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / tail_max, -1, 1)])
    return scaled, absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` (any order) of the value nearest to each entry of ``scaled`` (int64).

    Counting the midpoints strictly below x (``bucketize``) sends a value exactly on a midpoint
    to the lower code, as bitsandbytes' CUDA decision tree (``x > threshold``) does; an
    ``argmin(|x - code|)`` would agree except on these ties.
    """
    order = torch.argsort(code)  # NF4 is sorted (identity); FP4 is in bit-pattern order
    sorted_code = code[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints, out_int32=True)]


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, first in the high nibble; an odd length is padded first."""
    q = idx.to(torch.uint8)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1)  # (n_bytes, 1): bitsandbytes' layout


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``n`` indices (int64)."""
    p = packed.reshape(-1).view(torch.uint8)
    return torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()  # (2 n_bytes,) -> (n,)


@dataclass
class QuantState:
    """What is needed to undo a blockwise quantization (field names as in bitsandbytes' ``QuantState``).

    ``absmax``: fp32 per-block scales, or their uint8 codes when double-quantized; then ``offset``
    (the mean subtracted first) and ``state2`` (the second-level state: fp32 scales of blocks of 256
    and the 8-bit ``code``) restore them.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None
    state2: QuantState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def scales(self) -> torch.Tensor:
        """The fp32 per-block absmax (decoded from 8 bits first when double-quantized)."""
        if not self.nested:
            return self.absmax.float()
        return dequantize_blockwise(self.absmax, self.state2) + self.offset


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                  quant_type: str = "nf4") -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization with any 16-entry codebook (``"nf4"``, ``"fp4"`` or ``"int4"``)."""
    check_input(w, blocksize)
    if quant_type not in CODEBOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODEBOOKS)}, got {quant_type!r}")
    code = CODEBOOKS[quant_type]().to(w.device)
    scaled, absmax = blockwise_absmax(w, blocksize)
    if scaled.numel() % 2:  # odd length: pad with a 0 (NF4 index 7) so the last byte is full
        scaled = F.pad(scaled, (0, 1))
    packed = pack_nibbles(nearest_code(scaled, code))
    state = QuantState(absmax, w.shape, w.dtype, blocksize, code, quant_type)
    if double_quant:
        # The fp32 scales are all positive and similar: centring them on their mean lets the signed
        # 8-bit map spend its codes on the differences (QLoRA, section 3, "Double Quantization").
        state.offset = absmax.mean()
        state.absmax, state.state2 = quantize_blockwise(absmax - state.offset, blocksize=256)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: code value times block absmax, in the original shape and dtype."""
    n = state.shape.numel()
    code = F.pad(state.code.to(packed.device), (0, 16 - state.code.numel()))  # int4 has 15 levels
    # One lookup per byte instead of two: a (256, 2) table maps a byte to its (high, low) code values.
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # (256, 2)
    # index_select: the same gather as pairs[idx], ~3x faster on CPU (it runs at every 4-bit forward)
    values = pairs.index_select(0, packed.reshape(-1).view(torch.uint8).int()).reshape(-1)[:n]  # (n,) in [-1, 1]
    absmax = state.scales()
    full = n - n % state.blocksize
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    out[:full] = (values[:full].view(-1, state.blocksize) * absmax[: full // state.blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.reshape(state.shape).to(state.dtype)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False
                 ) -> tuple[torch.Tensor, QuantState]:
    """NF4-quantize ``w``: packed uint8 of shape ``(ceil(numel / 2), 1)`` and its :class:`QuantState`.

    Byte for byte what ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")`` returns on CPU.

    >>> w = torch.tensor([[0.5, -1.0, 0.25, 0.0, 1.0]])
    >>> packed, state = quantize_nf4(w, blocksize=32)
    >>> [f"{b:08b}" for b in packed.flatten().tolist()], state.absmax.tolist()  # odd length: pad is 0111
    (['11000000', '10100111', '11110111'], [1.0])
    >>> dequantize_nf4(packed, state)
    tensor([[ 0.4407, -1.0000,  0.2461,  0.0000,  1.0000]])
    """
    return quantize_4bit(w, blocksize, double_quant, "nf4")


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4` (equals bitsandbytes' ``dequantize_4bit``)."""
    return dequantize_4bit(packed, state)


# --- 8-bit blockwise (double quantization of the absmax values) --------------------------------
LUT_SIZE = 65536


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = 256,
                       snap_to_grid: bool = True) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise absmax quantization with a 256-entry ``code`` (default: :func:`dynamic_map`).

    bitsandbytes' CPU kernel does not search the code per value: it first snaps ``x / absmax``
    to a grid of 65,536 points on [-1, 1] and reads the nearest code of that grid point from a
    lookup table (``snap_to_grid=True``, reproduced exactly). Its CUDA kernel compares the value
    itself with the midpoints (``snap_to_grid=False``). The two disagree where a value lies within
    half a grid step (1.5e-5) of a midpoint, and near zero, where the map's steps are finer than the
    grid: this is why bitsandbytes' CPU and CUDA double-quantized states differ in a few codes.
    """
    code = (dynamic_map() if code is None else code).to(x.device)
    x = x.reshape(-1).float()
    blocks = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)  # (n_blocks, blocksize); 0-padding
    absmax = blocks.abs().max(dim=-1)[0]
    inv = (1.0 / absmax).masked_fill(absmax == 0, 0.0)  # an all-zero block gets code 0 below
    scaled = (blocks * inv.view(-1, 1)).reshape(-1)[: x.numel()]
    midpoints = 0.5 * (code[:-1] + code[1:])
    if snap_to_grid:
        # bitsandbytes' norm_to_lut_index, in float32: round (v + 1) / 2 * 65535 to the nearest point.
        grid = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5).long()
        points = -1.0 + (2.0 * torch.arange(LUT_SIZE, device=x.device, dtype=torch.float32)) / (LUT_SIZE - 1)
        lut = torch.searchsorted(midpoints, points)  # number of midpoints < point: ties go down
        q = lut[grid]
    else:
        q = torch.bucketize(scaled, midpoints)  # CUDA's binary search: x > midpoint -> upper code
    q = torch.where(absmax.repeat_interleave(blocksize)[: x.numel()] == 0, 0, q)  # zero block: code 0
    return q.to(torch.uint8), QuantState(absmax, torch.Size([x.numel()]), torch.float32, blocksize, code,
                                         quant_type="dynamic8")


def dequantize_blockwise(q: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax`` per block, fp32."""
    values = state.code.to(q.device)[q.reshape(-1).long()]
    scale = state.absmax.repeat_interleave(state.blocksize)[: values.numel()]
    return values * scale


# --- storage accounting --------------------------------------------------------------------------
def storage_bits(packed: torch.Tensor, state: QuantState, code_tables: bool = False) -> dict[str, float]:
    """Bits per parameter of a 4-bit tensor, counted from the tensors actually stored.

    ``constants`` counts absmax (fp32, or uint8 + fp32 second-level scales + the fp32 offset when
    double-quantized); ``code_tables=True`` adds the 16-entry 4-bit and 256-entry 8-bit code tables
    (shared by a whole model in practice, so per matrix they are an upper bound).

    >>> packed, state = quantize_nf4(torch.randn(4096, 4096), double_quant=True)
    >>> {k: round(v, 3) for k, v in storage_bits(packed, state).items()}
    {'weights': 4.0, 'constants': 0.127, 'total': 4.127}
    """
    n = state.shape.numel()
    tensors = [state.absmax]
    if state.nested:
        tensors += [state.offset.reshape(1), state.state2.absmax]
    if code_tables:
        tensors += [state.code] + ([state.state2.code] if state.nested else [])
    constants = sum(t.numel() * t.element_size() * 8 for t in tensors)
    weights = packed.numel() * packed.element_size() * 8
    return {"weights": weights / n, "constants": constants / n, "total": (weights + constants) / n}


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each distinct tensor once (what the model holds in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --- 8-bit and uniform baselines, and error comparison -------------------------------------------
def quantize_int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax int8 per output row (LLM.int8()'s vector-wise quantization): ``round(127 w / absmax)``.

    >>> q, absmax = quantize_int8_rowwise(torch.tensor([[0.5, -1.0, 0.25]]))
    >>> q.tolist(), absmax.tolist()
    ([[64, -127, 32]], [1.0])
    """
    check_input(w, BLOCKSIZES[0], "quantize_int8_rowwise")
    absmax = w.abs().max(dim=-1).values.float()
    return torch.round(w * (127.0 / absmax.unsqueeze(-1))).to(torch.int8), absmax


def dequantize_int8_rowwise(q: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return q.float() * (absmax.unsqueeze(-1) / 127.0)


def compare_quantizers(weights: torch.Tensor | list[torch.Tensor], blocksize: int = 64) -> dict[str, dict[str, float]]:
    """Mean squared error and stored bits per parameter of NF4, FP4, uniform int4 and int8 on weight matrices.

    The three 4-bit formats share ``blocksize`` and fp32 absmax, so they cost the same bits
    (4 + 32 / blocksize): only the placement of the 16 levels differs. int8 keeps one absmax per row.

    >>> res = compare_quantizers(torch.randn(256, 256))
    >>> res["nf4"]["mse"] < res["int4"]["mse"] < res["fp4"]["mse"], res["nf4"]["bits"]
    (True, 4.5)
    """
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    n = sum(w.numel() for w in weights)
    sq_err = {name: 0.0 for name in ("nf4", "fp4", "int4", "int8_rowwise")}
    bits = dict.fromkeys(sq_err, 0.0)
    for w in weights:
        w = w.detach().float()
        for name in ("nf4", "fp4", "int4"):
            packed, state = quantize_4bit(w, blocksize, quant_type=name)
            sq_err[name] += (dequantize_4bit(packed, state) - w).pow(2).sum().item()
            bits[name] += storage_bits(packed, state)["total"] * w.numel()
        q, absmax = quantize_int8_rowwise(w)
        sq_err["int8_rowwise"] += (dequantize_int8_rowwise(q, absmax) - w).pow(2).sum().item()
        bits["int8_rowwise"] += 8 * w.numel() + 32 * absmax.numel()
    return {name: {"mse": sq_err[name] / n, "bits": bits[name] / n} for name in sq_err}


def requantized_update_error(weight: torch.Tensor, update: torch.Tensor, fmt: str = "nf4",
                             blocksize: int = 64) -> float:
    """How much of ``update`` survives being stored into ``weight`` in ``fmt``: relative error.

    ``fmt`` is ``"nf4"`` (quantize, add, requantize) or a torch dtype name (``"bfloat16"``,
    ``"float32"``). Returns ``||(stored(w + u) - stored(w)) - u|| / ||u||``: 0 keeps the update,
    1 loses it entirely. Small updates (a training step, a LoRA delta) are far below one NF4 step,
    which is why QLoRA keeps the adapter, and its optimizer updates, in 16/32-bit.

    >>> w = torch.randn(64, 64); u = 1e-3 * torch.randn(64, 64)
    >>> requantized_update_error(w, u, "float32") < 1e-3, requantized_update_error(w, u, "nf4") > 0.5
    (True, True)
    """
    def store(t: torch.Tensor) -> torch.Tensor:
        if fmt == "nf4":
            return dequantize_nf4(*quantize_nf4(t.float(), blocksize)).float()
        return t.to(getattr(torch, fmt)).float()

    w = weight.float()
    effective = store(w + update.float()) - store(w)
    return ((effective - update.float()).norm() / update.float().norm()).item()


# --- 4-bit linear layer ---------------------------------------------------------------------------
@dataclass
class QuantConfig:
    """How :func:`quantize_model` stores linear weights (the fields of ``transformers.BitsAndBytesConfig``).

    >>> QuantConfig(blocksize=48)
    Traceback (most recent call last):
    ...
    ValueError: blocksize must be a power of two in (32, 64, 128, 256, 512, 1024, 2048, 4096), got 48
    """

    blocksize: int = 64
    double_quant: bool = True
    quant_type: str = "nf4"
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self):
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be a power of two in {BLOCKSIZES}, got {self.blocksize!r}")
        if self.quant_type not in CODEBOOKS:
            raise ValueError(f"quant_type must be one of {sorted(CODEBOOKS)}, got {self.quant_type!r}")
        if self.compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {self.compute_dtype!r}")


class MatMul4bit(torch.autograd.Function):
    """``F.linear(x, W, bias)`` for a frozen 4-bit ``W`` that autograd never keeps dense (bitsandbytes' MatMul4Bit).

    ``F.linear(x, dequantized_w)`` would make autograd save the (out, in) dense weight for the input
    gradient: 2 B per quantized parameter in bf16, alive from forward to backward for every layer at
    once. Here forward dequantizes, multiplies and lets the dense weight go; backward dequantizes
    again for ``grad_x = grad_out @ W``. ``W`` is frozen, so there is no weight gradient and ``x``
    need not be kept either: autograd saves only the packed uint8 weight, which the layer holds anyway.
    The price is one more dequantization per layer and backward.

    >>> layer = Linear4bit.from_linear(nn.Linear(64, 32), QuantConfig(compute_dtype=torch.float32))
    >>> saved = []
    >>> with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
    ...     y = layer(torch.randn(2, 64, requires_grad=True))
    >>> [(t.dtype, tuple(t.shape)) for t in saved]  # the packed weight (32 x 64 / 2 bytes), no dense (32, 64)
    [(torch.uint8, (1024, 1))]
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, state: QuantState,
                compute_dtype: torch.dtype) -> torch.Tensor:
        ctx.state, ctx.compute_dtype = state, compute_dtype
        ctx.save_for_backward(packed)
        w = dequantize_4bit(packed, state).to(compute_dtype)  # (out, in): freed when forward returns
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(packed, ctx.state).to(ctx.compute_dtype)  # the same W as in forward
            grad_x = grad_out @ w  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[2]:  # a bias someone unfroze (BitFit on a 4-bit model)
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, None, grad_bias, None, None


class Linear4bit(nn.Module):
    """A frozen linear layer stored in 4 bits, dequantized to ``compute_dtype`` at every forward (and backward).

    ``weight`` is the packed uint8 buffer; the state tensors are buffers too, so ``state_dict``
    saves them and no optimizer ever sees them. Gradients flow to the input (QLoRA backpropagates
    through the frozen 4-bit base into the LoRA adapters), never to the 4-bit weight.

    >>> torch.manual_seed(0) and None
    >>> layer = Linear4bit.from_linear(nn.Linear(64, 32), QuantConfig(compute_dtype=torch.float32))
    >>> x = torch.randn(2, 64, requires_grad=True)
    >>> layer(x).sum().backward(); tuple(x.grad.shape), layer.weight.dtype, layer.weight.requires_grad
    ((2, 64), torch.uint8, False)
    """

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.compute_dtype = compute_dtype
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.set_quantized(packed, state)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None) -> Linear4bit:
        config = config or QuantConfig()
        packed, state = quantize_4bit(linear.weight.detach(), config.blocksize, config.double_quant,
                                      config.quant_type)
        return cls(packed, state, linear.bias, config.compute_dtype)

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Store packed weights and state as buffers (replacing any previous ones)."""
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        for name in ("offset", "absmax2", "code2"):
            self.register_buffer(name, None)
        if state.nested:
            self.register_buffer("offset", state.offset.reshape(()))
            self.register_buffer("absmax2", state.state2.absmax)
            self.register_buffer("code2", state.state2.code)
        self.blocksize, self.quant_type, self.weight_dtype = state.blocksize, state.quant_type, state.dtype

    @property
    def state(self) -> QuantState:
        state = QuantState(self.absmax, torch.Size([self.out_features, self.in_features]), self.weight_dtype,
                           self.blocksize, self.code, self.quant_type)
        if self.absmax2 is not None:
            n_blocks = self.absmax.numel()
            state.offset = self.offset
            state.state2 = QuantState(self.absmax2, torch.Size([n_blocks]), torch.float32, 256, self.code2,
                                      "dynamic8")
        return state

    def dequantize(self) -> torch.Tensor:
        """The dense weight (out, in) in the dtype it was quantized from."""
        return dequantize_4bit(self.weight, self.state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # MatMul4bit, not F.linear on self.dequantize(): autograd would keep that dense weight until backward.
        bias = self.bias.to(self.compute_dtype) if self.bias is not None else None
        return MatMul4bit.apply(x.to(self.compute_dtype), self.weight, bias, self.state, self.compute_dtype).to(x.dtype)

    def merge_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """Add ``delta`` (out, in) into the 4-bit weight: dequantize, add, requantize (in place).

        Returns the rounding error ``new_weight - (old_weight + delta)`` (fp32, (out, in)): the
        requantization moves every value to a code again, so updates smaller than half a code step
        (about 0.02-0.08 absmax for NF4) are largely lost. See :func:`requantized_update_error`.
        """
        if delta.shape != (self.out_features, self.in_features):
            raise ValueError(f"delta must have shape {(self.out_features, self.in_features)}, got "
                             f"{tuple(delta.shape)}")
        with torch.no_grad():
            target = self.dequantize().float() + delta.float()
            packed, state = quantize_4bit(target.to(self.weight_dtype), self.blocksize, self.absmax2 is not None,
                                          self.quant_type)
            self.set_quantized(packed, state)
            return self.dequantize().float() - target

    def requires_grad_(self, requires_grad: bool = True) -> Linear4bit:
        if requires_grad:
            raise ValueError("Linear4bit's 4-bit weight is frozen and cannot train; train a LoRA adapter on it "
                             "(apply_lora) or dequantize() it into an nn.Linear first")
        return super().requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the 4-bit state along but never round its fp32 scales.
        buffers, self._buffers = self._buffers, {}
        super()._apply(fn, recurse)
        for name, buf in buffers.items():
            if buf is not None:
                moved = fn(buf)
                buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        self._buffers = buffers
        return self

    def get_extra_state(self) -> dict:
        return {"blocksize": self.blocksize, "quant_type": self.quant_type, "double_quant": self.absmax2 is not None}

    def set_extra_state(self, extra: dict) -> None:
        mine = self.get_extra_state()
        if extra != mine:
            raise ValueError(f"state dict was quantized with {extra} but this Linear4bit uses {mine}; "
                             "build the layer with the same QuantConfig")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}, "
                f"blocksize={self.blocksize}, double_quant={self.absmax2 is not None}, "
                f"compute_dtype={self.compute_dtype}")


def quantize_model(model: nn.Module, config: QuantConfig | None = None, target: Targets = r".*",
                   skip: list[str] | tuple[str, ...] = ("classifier", "lm_head", "score")) -> nn.Module:
    """Replace the ``nn.Linear`` layers matching ``target`` (all by default) by :class:`Linear4bit`, in place.

    The task heads in ``skip`` stay in full precision, as QLoRA and transformers' bitsandbytes
    integration do (the head is small and trained or tied to the embeddings).

    >>> m = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)), target=["0"])
    >>> type(m[0]).__name__, type(m[2]).__name__
    ('Linear4bit', 'Linear')
    """
    config = config or QuantConfig()
    replace_modules(model, target, lambda name, lin: Linear4bit.from_linear(lin, config), exclude=skip,
                    what="layer to quantize")
    return model
