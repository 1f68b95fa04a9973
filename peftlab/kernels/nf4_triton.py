"""NF4 dequantize, quantize and a fused 4-bit GEMV in Triton: the same bytes and values as :mod:`peftlab.nf4`.

The pure-PyTorch code in :mod:`peftlab.nf4` is the reference (exercise 5); these kernels follow it value
for value. Layout (bitsandbytes'): the weight is flattened, value ``i`` lives in byte ``i // 2`` (even ``i``:
high nibble), block ``i // blocksize`` has one fp32 ``absmax``, or, double-quantized, a uint8 code that
decodes to ``code2[q] * absmax2[block // blocksize2] + offset``. Each kernel reads a byte once and makes
its two values. They run with ``enable_fp_fusion=False``: the reference rounds after every multiply and
add, a fused multiply-add would not, and the bits would differ.

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Tillet et al., "Triton: an intermediate language and compiler for tiled neural network computations", 2019.
    - bitsandbytes ``csrc/kernels.cu`` (``kDequantizeBlockwise``, ``kgemm_4bit_inference_naive``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.nf4 import LUT_SIZE, QuantState, check_input, dynamic_map, nf4_codebook, quantize_4bit

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
GEMV_MAX_ROWS = 16  # gemv_4bit takes inputs of up to this many rows (tokens)
# Layers dispatch only 1-row inputs to it: for 2-16 rows its tensor-core path measured 2-11x slower than
# dequantize + cuBLAS on an H200 (benchmarks/results/nf4_kernels_sweep_h200.json), so those take that path.
GEMV_DISPATCH_ROWS = 1


@triton.jit
def _block_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask,
                  NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """The fp32 absmax of blocks ``blk``: stored as is, or decoded from 8 bits (``QuantState.scales``)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask,
                                                                    other=0.0)
        return s + tl.load(offset_ptr)  # two roundings, as dequantize_blockwise(...) + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def _dequantize_kernel(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BYTES: tl.constexpr):
    # One program: BYTES bytes = ROWS whole quantization blocks, a (ROWS, HALF) tile, one scale per row.
    HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per block
    ROWS: tl.constexpr = BYTES // HALF
    blk = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) block indices
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    b = tl.load(packed_ptr + byte, mask=2 * byte < n, other=0).to(tl.int32)
    scale = _block_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, blk * BLOCKSIZE < n,
                          NESTED, BLOCKSIZE2)[:, None]  # (ROWS, 1)
    # the 16-entry codebook stays in L1; fp32 product, then one rounding to the output dtype (reference order)
    hi = tl.load(code_ptr + (b >> 4)) * scale  # value 2j: high nibble
    lo = tl.load(code_ptr + (b & 0x0F)) * scale  # value 2j + 1
    values = tl.reshape(tl.join(hi, lo), (2 * BYTES,))  # (ROWS, HALF, 2) -> hi, lo interleaved
    offs = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < n)


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


@triton.jit
def _quantize_8bit_kernel(x_ptr, offset_ptr, lut_ptr, q_ptr, absmax_ptr, n, BLOCKSIZE: tl.constexpr):
    # Double quantization: one program per block of (x - offset), nf4.quantize_blockwise's grid + lookup rule.
    offs = tl.program_id(0) * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0) - tl.load(offset_ptr)  # 0-padding after the subtraction
    x = tl.where(offs < n, x, 0.0)
    absmax = tl.max(tl.abs(x), axis=0)
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), absmax)
    inv = tl.where(absmax == 0, 0.0, inv)
    # snap x / absmax to the 65,536-point grid on [-1, 1], then read the nearest 8-bit code from the table
    grid = ((tl.clamp(x * inv, -1.0, 1.0) + 1.0) * 0.5 * 65535.0 + 0.5).to(tl.int32)  # LUT_SIZE - 1
    q = tl.where(absmax == 0, 0, tl.load(lut_ptr + grid))
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=offs < n)
    tl.store(absmax_ptr + tl.program_id(0), absmax)


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, bias_ptr, y_ptr,
                 M, N, K, stride_xm, stride_ym, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                 NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, W_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for BLOCK_N output features; W is dequantized tile by tile in
    # registers and never written out. K % BLOCKSIZE == 0: a row holds whole blocks, (NB, HALF) bytes per chunk.
    HALF: tl.constexpr = BLOCKSIZE // 2
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE  # quantization blocks per K chunk
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    nb, hb = tl.arange(0, NB), tl.arange(0, HALF)
    rm = tl.arange(0, BLOCK_M)
    blocks_per_row = K // BLOCKSIZE
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, NB, HALF), dtype=tl.float32)  # summed over its last two axes at the end
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // BLOCKSIZE + nb  # (NB,) block index along the row
        mask = (rn[:, None] < N) & (kb[None, :] < blocks_per_row)  # (BLOCK_N, NB)
        blk = rn[:, None] * blocks_per_row + kb[None, :]  # (BLOCK_N, NB) flat block index: one scale each
        scale = _block_scales(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, NESTED, BLOCKSIZE2)
        byte = blk[:, :, None] * HALF + hb[None, None, :]  # (BLOCK_N, NB, HALF)
        b = tl.load(packed_ptr + byte, mask=mask[:, :, None], other=0).to(tl.int32)
        # the dense weight rounds to the state's dtype (as dequantize does), then to the input's (as .to does)
        w_hi = (tl.load(code_ptr + (b >> 4)) * scale[:, :, None]).to(W_DTYPE).to(x_ptr.dtype.element_ty)
        w_lo = (tl.load(code_ptr + (b & 0x0F)) * scale[:, :, None]).to(W_DTYPE).to(x_ptr.dtype.element_ty)
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        x_hi, x_lo = tl.split(tl.reshape(x, (BLOCK_M, NB, HALF, 2)))  # even k meet high nibbles, odd k low ones
        if BLOCK_M == 1:  # one token: a multiply-add per weight, no tensor cores needed
            acc += w_hi.to(tl.float32) * x_hi.to(tl.float32) + w_lo.to(tl.float32) * x_lo.to(tl.float32)
        else:  # up to 16 tokens: the tile product on tensor cores (PRECISION: fp32 input in IEEE, no TF32)
            HALF_K: tl.constexpr = BLOCK_K // 2
            acc += tl.dot(tl.reshape(x_hi, (BLOCK_M, HALF_K)), tl.trans(tl.reshape(w_hi, (BLOCK_N, HALF_K))),
                          input_precision=PRECISION)
            acc += tl.dot(tl.reshape(x_lo, (BLOCK_M, HALF_K)), tl.trans(tl.reshape(w_lo, (BLOCK_N, HALF_K))),
                          input_precision=PRECISION)
    if BLOCK_M == 1:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # (1, BLOCK_N)
    else:
        y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_COMPILED: dict = {}


def _launch(kernel, grid: tuple, args: tuple, **meta) -> None:
    """``kernel[grid](*args, **meta)`` through a cache of compiled kernels: Triton's own launcher costs ~17 us a
    call on the H200 host, as long as the whole kernel for a 4096 x 4096 weight. The key is what Triton
    specialises on (each tensor's dtype and 16-byte alignment; each int's == 1, % 16 and width), so a hit
    runs exactly the binary Triton would pick; a miss (or the CPU interpreter) goes through Triton."""
    key = (kernel, tuple(meta.items()), tuple(
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0, a < 2 ** 31)
        for a in args))
    hit = _COMPILED.get(key)
    if hit is not None:
        compiled, constexprs = hit
        compiled[(*grid, 1, 1)[:3]](*args, *constexprs)  # the compiled launcher takes all three grid sizes
        return
    compiled = kernel[grid](*args, **meta)
    if hasattr(compiled, "packed_metadata"):  # a compiled kernel (the interpreter returns none)
        _COMPILED[key] = compiled, tuple(meta[name] for name in kernel.arg_names[len(args):])


def _state_args(state: QuantState, device: torch.device) -> tuple:
    """(code, absmax, code2, absmax2, offset) as the kernels read them; unused pointers repeat absmax."""
    code = state.code
    if code.numel() < 16:  # int4 has 15 levels: pad so every nibble indexes the table
        code = torch.nn.functional.pad(code, (0, 16 - code.numel()))
    if code.dtype != torch.float32 or code.device != device:
        code = code.to(device=device, dtype=torch.float32)
    if state.nested:
        return code, state.absmax, state.state2.code, state.state2.absmax, state.offset
    absmax = state.absmax
    return code, absmax, absmax, absmax, absmax


def dequantize_nf4_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None,
                          BYTES: int = 2048, num_warps: int = 4) -> torch.Tensor:
    """Triton twin of :func:`peftlab.nf4.dequantize_4bit` (any 16-entry codebook, double quant too), bit for bit.

    ``dtype`` defaults to ``state.dtype``. One launch: the double-quantized absmax is decoded in the kernel.
    """
    n = state.shape.numel()
    out = torch.empty(state.shape, dtype=dtype or state.dtype, device=packed.device)
    code, absmax, code2, absmax2, offset = _state_args(state, packed.device)
    BYTES = max(BYTES, state.blocksize // 2)  # whole blocks per program
    bs2 = state.state2.blocksize if state.nested else 256
    _launch(_dequantize_kernel, (triton.cdiv(n, 2 * BYTES),),
            (packed.view(torch.uint8), code, absmax, code2, absmax2, offset, out, n), BLOCKSIZE=state.blocksize,
            BLOCKSIZE2=bs2, NESTED=state.nested, BYTES=BYTES, num_warps=num_warps, enable_fp_fusion=False)
    return out


def can_gemv(x: torch.Tensor, state: QuantState) -> bool:
    """True when :func:`gemv_4bit` applies: CUDA, at most 16 rows, whole blocks per weight row."""
    k = state.shape[-1]
    return (x.is_cuda and x.dtype in TL_DTYPES and x.shape[-1] == k and len(state.shape) == 2
            and k % state.blocksize == 0 and x.numel() <= GEMV_MAX_ROWS * k)


def _gemv_config(n: int, k: int, m: int, blocksize: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), chosen by a sweep on an H200 (benchmarks/nf4_kernels.py --sweep)."""
    block_n, block_k, warps, stages = (4, 1024, 4, 3) if m == 1 else (16, 256, 4, 1)
    return block_n, max(block_k, blocksize), warps, stages


def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
              config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(W).to(x.dtype), bias)`` for x of at most 16 rows, W never materialised.

    The weight values equal the reference's (rounded to ``state.dtype``, then ``x.dtype``); only the order of
    the fp32 sums differs from a matmul. ``config`` = (BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the
    tuned choice.
    """
    if not can_gemv(x, state):
        raise ValueError(f"gemv_4bit needs a CUDA input of at most {GEMV_MAX_ROWS} rows of {state.shape[-1]} "
                         f"values and a weight whose rows hold whole blocks, got x {tuple(x.shape)}, "
                         f"weight {tuple(state.shape)}, blocksize {state.blocksize}")
    return _gemv(x, packed, state, bias, config)


def _gemv(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
          config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """:func:`gemv_4bit` without the argument check (callers that checked :func:`can_gemv`)."""
    n, k = state.shape
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    code, absmax, code2, absmax2, offset = _state_args(state, x.device)
    block_n, block_k, warps, stages = config or _gemv_config(n, k, m, state.blocksize)
    if m > 1:
        block_n = max(block_n, 16)  # tl.dot tiles: at least 16 on each side
    _launch(_gemv_kernel, (triton.cdiv(n, block_n),),
            (x2, packed.view(torch.uint8), code, absmax, code2, absmax2, offset, x2 if bias is None else bias, y,
             m, n, k, x2.stride(0), n), BLOCKSIZE=state.blocksize,
            BLOCKSIZE2=state.state2.blocksize if state.nested else 256, NESTED=state.nested,
            HAS_BIAS=bias is not None, W_DTYPE=TL_DTYPES[state.dtype],
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=1 if m == 1 else 16,
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return y


_LUTS: dict = {}


def _dynamic_lut(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit map and nf4.quantize_blockwise's 65,536-entry grid-to-code table, built once per device."""
    if device not in _LUTS:
        code = dynamic_map().to(device)
        midpoints = 0.5 * (code[:-1] + code[1:])
        points = -1.0 + (2.0 * torch.arange(LUT_SIZE, device=device, dtype=torch.float32)) / (LUT_SIZE - 1)
        _LUTS[device] = code, torch.searchsorted(midpoints, points).to(torch.int32)
    return _LUTS[device]


def quantize_nf4_triton(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False
                        ) -> tuple[torch.Tensor, QuantState]:
    """Triton twin of :func:`peftlab.nf4.quantize_nf4`, double quantization included, byte for byte.

    The kernel handles the full blocks; a last partial block (the reference divides there, not multiplies)
    is rare in weights and is quantized by the reference code. Double quantization: ``offset`` is torch's
    ``absmax.mean()`` (the reference's own reduction), then one kernel codes ``absmax - offset`` in 8 bits.
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
    state = QuantState(absmax, w.shape, w.dtype, blocksize, code, "nf4")
    if double_quant:
        code2, lut = _dynamic_lut(w.device)
        nb = absmax.numel()
        state.offset = absmax.mean()
        q = torch.empty(nb, dtype=torch.uint8, device=w.device)
        absmax2 = torch.empty(triton.cdiv(nb, 256), dtype=torch.float32, device=w.device)
        _quantize_8bit_kernel[(absmax2.numel(),)](absmax, state.offset, lut, q, absmax2, nb, BLOCKSIZE=256,
                                                  enable_fp_fusion=False)
        state.absmax = q
        state.state2 = QuantState(absmax2, torch.Size([nb]), torch.float32, 256, code2, quant_type="dynamic8")
    return packed, state
