"""The Triton NF4 kernels against peftlab's pure-PyTorch reference (GPU), and the CPU fallback."""

import pytest
import torch

from peftlab import kernels, nf4, quant

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAS_TRITON),
                         reason="the Triton NF4 kernels need a CUDA GPU and Triton")
SHAPES = [(256, 512), (1000, 333), (7, 5)]  # full blocks; a partial last block; an odd element count
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}  # one ulp, relative


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def test_cpu_falls_back_to_the_reference():
    w = torch.randn(64, 96)
    packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    assert not kernels.use_triton(packed) and not kernels.use_gemv(torch.randn(1, 96), state)
    assert torch.equal(kernels.dequantize_4bit(packed, state), nf4.dequantize_4bit(packed, state))
    p2, s2 = kernels.quantize_4bit(w, 64, double_quant=True)
    assert torch.equal(p2, packed) and torch.equal(s2.absmax, state.absmax)
    x = torch.randn(3, 96)
    want = torch.nn.functional.linear(x, nf4.dequantize_4bit(packed, state))
    assert torch.equal(kernels.linear_4bit(x, packed, state), want)
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(96, 64))
    cd = layer.compute_dtype  # the layer's output before the kernels existed: the reference dequantize
    expected = torch.nn.functional.linear(x.to(cd), layer.dequantize().to(cd), layer.bias.to(cd)).to(x.dtype)
    assert torch.equal(layer(x), expected)


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 1024])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bit_for_bit(shape, dtype, blocksize, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    packed, state = nf4.quantize_nf4(w, blocksize, double_quant)
    want = nf4.dequantize_4bit(packed, state)
    for bytes_, warps in [(1024, 4), (4096, 8)]:  # the tiles the benchmark chooses between
        got = kernels.dequantize_nf4_triton(packed, state, BYTES=bytes_, num_warps=warps)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(bits(got), bits(want))
    as_fp32 = kernels.dequantize_nf4_triton(packed, state, dtype=torch.float32)  # another output dtype
    assert torch.equal(as_fp32.to(dtype), want)


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_byte_for_byte(shape, dtype, blocksize, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    w.view(-1)[:blocksize] = 0  # an all-zero block: absmax floored at 1e-38 in the scale only
    packed, state = kernels.quantize_nf4_triton(w, blocksize, double_quant)
    ref_packed, ref_state = nf4.quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(packed, ref_packed)
    assert state.absmax.dtype == ref_state.absmax.dtype and torch.equal(state.absmax, ref_state.absmax)
    assert state.nested == double_quant
    if double_quant:  # the 8-bit codes above, and the second-level state that decodes them
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(state.state2.code, ref_state.state2.code)
        assert state.state2.blocksize == ref_state.state2.blocksize


def check_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``got`` within one output ulp (plus the fp32 summation bound) of the fp64 ``x @ w.T + bias``."""
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    scale = x.double().abs() @ w.double().abs().T  # sum |x w|: bounds the summation error
    tol = EPS[got.dtype] * want.abs() + 2 * x.shape[-1] * 2.0 ** -24 * scale + 1e-30
    assert got.shape == want.shape
    assert ((got.double() - want).abs() <= tol).all(), (got.double() - want).abs().max().item()


@gpu
@pytest.mark.parametrize("shape", [(256, 512), (1000, 320), (37, 4096), (4096, 128)])  # N odd, K % BLOCK_K != 0
@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_within_rounding_of_dequantize_matmul(shape, rows, dtype, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    packed, state = nf4.quantize_nf4(w, 64, double_quant)
    w_ref = nf4.dequantize_4bit(packed, state)  # the pure-PyTorch reference weight
    x = torch.randn(rows, shape[1], device="cuda", dtype=dtype)
    for bias in (None, torch.randn(shape[0], device="cuda", dtype=dtype)):
        assert kernels.nf4_triton.can_gemv(x, state) and kernels.use_gemv(x, state) == (rows == 1)
        check_close(kernels.gemv_4bit(x, packed, state, bias), x, w_ref, bias)


@gpu
def test_gemv_shapes_and_dtypes_of_a_layer():
    torch.manual_seed(0)
    w = torch.randn(96, 256, device="cuda")
    packed, state = nf4.quantize_nf4(w, 128, double_quant=True)  # fp32 state, bf16 input: W rounds twice
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)  # 6 rows in a (batch, seq) shape
    got = kernels.gemv_4bit(x, packed, state)
    assert got.shape == (2, 3, 96) and got.dtype == torch.bfloat16
    check_close(got.reshape(6, 96), x.reshape(6, 256), nf4.dequantize_4bit(packed, state).to(torch.bfloat16), None)
    x_t = torch.randn(256, 4, device="cuda", dtype=torch.bfloat16).T  # non-contiguous rows
    check_close(kernels.gemv_4bit(x_t, packed, state), x_t, nf4.dequantize_4bit(packed, state).bfloat16(), None)
    assert not kernels.nf4_triton.can_gemv(torch.randn(17, 256, device="cuda"), state)  # too many rows
    odd_packed, odd_state = nf4.quantize_nf4(torch.randn(10, 100, device="cuda"), 64)  # blocks cross rows
    x_odd = torch.randn(1, 100, device="cuda")
    assert not kernels.use_gemv(x_odd, odd_state)
    with pytest.raises(ValueError, match="whole blocks"):
        kernels.gemv_4bit(x_odd, odd_packed, odd_state)
    want = torch.nn.functional.linear(x_odd, nf4.dequantize_4bit(odd_packed, odd_state))
    assert torch.equal(kernels.linear_4bit(x_odd, odd_packed, odd_state), want)  # the fallback


@gpu
def test_linear4bit_uses_the_kernels_and_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(256, 128)).cuda()
    cd = layer.compute_dtype
    w_ref = nf4.dequantize_4bit(layer.weight, layer.state).to(cd)  # the pure-PyTorch reference
    calls = []
    gemv = kernels.gemv_4bit
    monkeypatch.setattr(kernels, "gemv_4bit", lambda *a, **k: calls.append(a[0].shape) or gemv(*a, **k))
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)  # many tokens: dequantize kernel + matmul
    assert torch.equal(layer(x), torch.nn.functional.linear(x.to(cd), w_ref, layer.bias.to(cd)).to(x.dtype))
    assert calls == []
    with torch.no_grad():  # generation: the fused GEMV
        check_close(layer(x[:1]), x[:1], w_ref, layer.bias.to(cd))
    assert len(calls) == 1
    with torch.no_grad():  # 4 tokens: dequantize + matmul (faster than the GEMV's tile path)
        assert torch.equal(layer(x[:4]), torch.nn.functional.linear(x[:4], w_ref, layer.bias.to(cd)))
    assert len(calls) == 1
    x1 = x[:1].clone().requires_grad_(True)  # training with one token: GEMV forward, dequantize backward
    y = layer(x1)
    check_close(y.detach(), x1.detach(), w_ref, layer.bias.to(cd))
    g = torch.randn_like(y)
    y.backward(g)
    assert len(calls) == 2
    assert torch.equal(x1.grad, g @ w_ref)
