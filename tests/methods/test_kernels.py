"""The Triton NF4 kernels against peftlab's pure-PyTorch reference (GPU), and the CPU fallback."""

import pytest
import torch

from peftlab import kernels, nf4, quant

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.HAS_TRITON),
                         reason="the Triton NF4 kernels need a CUDA GPU and Triton")
SHAPES = [(256, 512), (1000, 333), (7, 5)]  # full blocks; a partial last block; an odd element count


def test_cpu_falls_back_to_the_reference():
    w = torch.randn(64, 96)
    packed, state = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    assert not kernels.use_triton(packed)
    assert torch.equal(kernels.dequantize_4bit(packed, state), nf4.dequantize_4bit(packed, state))
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(96, 64))
    x = torch.randn(3, 96)
    cd = layer.compute_dtype  # the layer's output before the kernels existed: the reference dequantize
    expected = torch.nn.functional.linear(x.to(cd), layer.dequantize().to(cd), layer.bias.to(cd)).to(x.dtype)
    assert torch.equal(layer(x), expected)


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_bit_for_bit(shape, dtype, blocksize, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    packed, state = nf4.quantize_nf4(w, blocksize, double_quant)
    got = kernels.dequantize_nf4_triton(packed, state)
    want = nf4.dequantize_4bit(packed, state)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8) if dtype != torch.float32 else got.view(torch.int32),
                       want.view(torch.uint8) if dtype != torch.float32 else want.view(torch.int32))


@gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_byte_for_byte(shape, dtype, blocksize):
    torch.manual_seed(0)
    w = torch.randn(shape, device="cuda", dtype=dtype)
    w.view(-1)[:blocksize] = 0  # an all-zero block: absmax floored at 1e-38 in the scale only
    packed, state = kernels.quantize_nf4_triton(w, blocksize)
    ref_packed, ref_state = nf4.quantize_nf4(w, blocksize)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)


@gpu
def test_linear4bit_uses_the_kernel_and_matches_the_reference():
    torch.manual_seed(0)
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(256, 128)).cuda()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    cd = layer.compute_dtype
    w_ref = nf4.dequantize_4bit(layer.weight, layer.state).to(cd)  # the pure-PyTorch reference
    want = torch.nn.functional.linear(x.to(cd), w_ref, layer.bias.to(cd))
    assert torch.equal(layer(x), want.to(x.dtype))
