"""The 4-bit formats of QLoRA from scratch: NF4 (and FP4, INT4) codebooks, blockwise absmax, double quantization.

A weight is cut into blocks of ``blocksize`` values; each block is divided by its absolute maximum
(``absmax``) so it lies in [-1, 1], and every value is replaced by the index of the nearest of 16
code values, two indices per byte. NF4's 16 values are quantiles of a normal distribution, so each
is used about equally often by normally distributed weights. Double quantization stores the fp32
``absmax`` values themselves in 8 bits (blocks of 256), cutting the constants from 0.5 to ~0.127
bits per parameter. Everything here follows bitsandbytes bit for bit (its CPU reference ops). The
4-bit linear layer built on these is in :mod:`peftlab.quant`.

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
    - Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (dynamic map), arXiv:1511.04561.
    - bitsandbytes ``backends/default/ops.py`` (4-bit index choice, nibble order) and ``csrc/cpu_ops.cpp``
      (8-bit lookup-table quantizer used for double quantization on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
