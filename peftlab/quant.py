"""QLoRA's 4-bit linear layer: a frozen NF4 weight, dequantized on the fly, and the baselines it is compared with.

:class:`Linear4bit` stores a linear layer's weight in one of :mod:`peftlab.nf4`'s 4-bit formats and
computes ``x @ dequantize(W).T`` in ``compute_dtype``; :func:`quantize_model` swaps every targeted
``nn.Linear`` for one (the frozen base of QLoRA, under LoRA's trainable update). The 8-bit row-wise
and uniform baselines measure what NF4 buys. The format functions of :mod:`peftlab.nf4` are
re-exported here (``quant.quantize_nf4``, ``quant.NF4_CODE``, ...), the names exercise 5 uses.

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", arXiv:2208.07339.
    - bitsandbytes ``nn.Linear4bit`` and ``autograd._functions.MatMul4Bit``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels  # Triton dequantize on CUDA; the reference code of nf4 elsewhere
from .inject import HEAD_NAMES, Targets, replace_modules
from .nf4 import (  # noqa: F401 - re-exported: the names exercise 5 and its checkers use
    BLOCKSIZES,
    CODEBOOKS,
    FLOAT_DTYPES,
    FP4_CODE,
    LUT_SIZE,
    NF4_CODE,
    QuantState,
    blockwise_absmax,
    check_input,
    dequantize_4bit,
    dequantize_blockwise,
    dequantize_nf4,
    dynamic_map,
    fp4_codebook,
    int4_codebook,
    model_nbytes,
    nearest_code,
    nf4_codebook,
    pack_nibbles,
    quantize_4bit,
    quantize_blockwise,
    quantize_nf4,
    storage_bits,
    unpack_nibbles,
)


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
        if kernels.use_gemv(x, state):  # a few tokens: the fused GEMV, the dense weight never exists
            return kernels.gemv_4bit(x, packed, state, bias)
        w = kernels.dequantize_4bit(packed, state).to(compute_dtype)  # (out, in): freed when forward returns
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = kernels.dequantize_4bit(packed, ctx.state).to(ctx.compute_dtype)  # the same W as in forward
            # under autocast, forward's F.linear ran in the autocast dtype and grad_out has it too; backward runs
            # outside autocast, so the product is taken in grad_out's dtype (autograd casts grad_x to x's dtype)
            grad_x = grad_out @ w.to(grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
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
        packed, state = kernels.quantize_4bit(linear.weight.detach(), config.blocksize, config.double_quant,
                                              config.quant_type)  # Triton on CUDA: the same bytes
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
        state, xc = self.state, x.to(self.compute_dtype)
        if not (torch.is_grad_enabled() and (xc.requires_grad or bias is not None and bias.requires_grad)) \
                and kernels.use_gemv(xc, state):  # generation: the fused GEMV, no autograd node
            return kernels.gemv_4bit(xc, self.weight, state, bias).to(x.dtype)
        return MatMul4bit.apply(xc, self.weight, bias, state, self.compute_dtype).to(x.dtype)

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
                   skip: list[str] | tuple[str, ...] = HEAD_NAMES) -> nn.Module:
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
