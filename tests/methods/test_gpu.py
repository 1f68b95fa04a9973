"""peftlab's NF4 and QLoRA on a CUDA GPU, against peftlab on the CPU and against bitsandbytes' CUDA kernels.

Marked ``gpu``: ``make test`` deselects them (``-m "not gpu"``); run them on a GPU machine with

    PYTHONPATH=. python -m pytest -q -m gpu tests/methods/test_gpu.py     # or: python tests/methods/test_gpu.py

Needs torch with CUDA, bitsandbytes, transformers (and pytest for the first form).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

try:
    import pytest

    gpu = pytest.mark.gpu
except ImportError:  # `python tests/methods/test_gpu.py` on a machine without pytest
    def gpu(f):
        return f

from peftlab.lora import LoraConfig, apply_lora, lora_layers  # noqa: E402
from peftlab.models import ARCH_CONFIGS, build_from_config  # noqa: E402
from peftlab.quant import (  # noqa: E402
    Linear4bit,
    QuantConfig,
    QuantState,
    dequantize_nf4,
    quantize_model,
    quantize_nf4,
)

SHAPES = [(4096, 4096), (1000, 333), (33, 17), (7,)]  # full blocks, a partial last block, odd lengths


def _weights(shape, dtype):
    torch.manual_seed(0)
    return (torch.randn(shape) * 0.02).to(dtype)


@gpu
def test_quantize_nf4_on_cuda_equals_cpu_byte_for_byte():
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = _weights(shape, dtype)
            for blocksize in (64, 128, 4096):
                p_cpu, s_cpu = quantize_nf4(w, blocksize)
                p_gpu, s_gpu = quantize_nf4(w.cuda(), blocksize)
                assert p_gpu.is_cuda and torch.equal(p_gpu.cpu(), p_cpu), (shape, dtype, blocksize)
                assert torch.equal(s_gpu.absmax.cpu(), s_cpu.absmax), (shape, dtype, blocksize)
                assert torch.equal(dequantize_nf4(p_gpu, s_gpu).cpu(), dequantize_nf4(p_cpu, s_cpu))
                # Double quantization: the packed nibbles are the same; the 8-bit absmax codes may differ in
                # a few places because the mean (the offset) is summed in another order on the GPU.
                p2, s2 = quantize_nf4(w.cuda(), blocksize, double_quant=True)
                _, c2 = quantize_nf4(w, blocksize, double_quant=True)
                assert torch.equal(p2.cpu(), p_cpu)
                torch.testing.assert_close(s2.offset.cpu(), c2.offset, rtol=1e-6, atol=0)
                differ = int((s2.absmax.cpu() != c2.absmax).sum())
                assert differ <= max(1, c2.absmax.numel() // 1000), (shape, dtype, blocksize, differ)


def _bnb_state_as_peftlab(qs) -> QuantState:
    state = QuantState(qs.absmax, qs.shape, qs.dtype, qs.blocksize, qs.code.float(), qs.quant_type)
    if qs.nested:
        state.offset = qs.offset
        state.state2 = QuantState(qs.state2.absmax, torch.Size([qs.absmax.numel()]), torch.float32,
                                  qs.state2.blocksize, qs.state2.code, "dynamic8")
    return state


@gpu
def test_linear4bit_forward_on_cuda_matches_bitsandbytes():
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    torch.manual_seed(0)
    for (k, n), compute_dtype in [((1024, 768), torch.bfloat16), ((576, 1536), torch.float32)]:
        lin = torch.nn.Linear(k, n)
        ref = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=compute_dtype, compress_statistics=True,
                                quant_type="nf4")
        ref.load_state_dict(lin.state_dict())
        ref = ref.cuda()  # bitsandbytes quantizes on the device
        qs = ref.weight.quant_state
        packed = ref.weight.data.view(torch.uint8)
        mine = Linear4bit(packed, _bnb_state_as_peftlab(qs), lin.bias.cuda(), compute_dtype)
        # The same packed weights and state dequantize to exactly bitsandbytes' dense weight ...
        torch.testing.assert_close(mine.dequantize(), BF.dequantize_4bit(packed, qs), rtol=0, atol=0)
        # ... and the forward agrees within the compute dtype's rounding (different matmul kernels).
        x = torch.randn(4, 32, k, device="cuda", dtype=compute_dtype)
        with torch.no_grad():
            y, y_ref = mine(x).float(), ref(x).float()
        tol = 2e-2 if compute_dtype == torch.bfloat16 else 1e-4
        assert (y - y_ref).abs().max().item() <= tol * y_ref.abs().max().item(), (k, n, compute_dtype)
        # peftlab's own quantization of the same weights, on the GPU, picks (nearly) the same nibbles.
        own = Linear4bit.from_linear(lin.cuda(), QuantConfig(compute_dtype=compute_dtype))
        assert (own.weight.reshape(-1) != packed.reshape(-1)).float().mean().item() < 1e-4


@gpu
def test_qlora_training_step_on_cuda():
    torch.manual_seed(0)
    model = build_from_config({**ARCH_CONFIGS["tiny-llama"], "initializer_range": 0.1}, device="cuda")
    quantize_model(model, QuantConfig(compute_dtype=torch.bfloat16), skip=("lm_head",))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    layers = lora_layers(model)
    assert all(isinstance(layer.base, Linear4bit) and layer.base.weight.is_cuda for _, layer in layers)
    assert all(layer.lora_A.dtype == torch.float32 and layer.lora_A.is_cuda for _, layer in layers)
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (8, 16), device="cuda")
    model.train()
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in layers)


if __name__ == "__main__":
    import traceback

    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    passed = failed = 0
    for test in tests:
        try:
            test()
            passed += 1
            print(f"PASSED {test.__name__}", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {test.__name__}\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
