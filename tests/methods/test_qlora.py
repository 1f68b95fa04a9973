"""QLoRA = quantize_model + apply_lora: peftlab's LoraLinear over peftlab's Linear4bit."""

import torch

from peftlab import LoraConfig, apply_lora, merge_lora, unmerge_lora
from peftlab.lora import lora_layers
from peftlab.models import ARCH_CONFIGS, build_from_config
from peftlab.quant import Linear4bit, QuantConfig, quantize_model


def _qlora_model():
    model = build_from_config({**ARCH_CONFIGS["tiny-llama"], "initializer_range": 0.1})
    quantize_model(model, QuantConfig(compute_dtype=torch.float32), skip=("lm_head",))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def test_lora_wraps_4bit_layers_with_fp32_adapters():
    model = _qlora_model()
    layers = lora_layers(model)
    assert len(layers) == 2 * 3 and all(isinstance(layer.base, Linear4bit) for _, layer in layers)
    q = model.model.layers[0].self_attn.q_proj
    assert (q.in_features, q.out_features) == (64, 64) and q.lora_A.dtype == torch.float32
    v = model.model.layers[0].self_attn.v_proj
    assert tuple(v.lora_B.shape) == (32, 4)  # 2 KV heads x 16
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_qlora_trains_adapters_and_never_touches_the_4bit_base(lm_losses):
    model = _qlora_model().train()
    packed = {n: b.clone() for n, b in model.named_buffers()}
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (8, 16))
    losses = lm_losses(model, ids, steps=25, lr=1e-2)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers())
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in lora_layers(model))


def test_merge_into_4bit_base_requantizes_with_small_error():
    model = _qlora_model().eval()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.02)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
        unmerge_lora(model)
    # Requantizing W + BA rounds every weight to the NF4 grid again, and where a block's absmax moves the
    # whole block lands on a new grid: the merged model is close to the unmerged one, never equal.
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert 0 < rel < 0.25, rel
    layer = model.model.layers[0].self_attn.q_proj.base
    before = layer.dequantize().float()
    delta = torch.full_like(before, 1e-3)
    rounding = layer.merge_delta(delta)  # the layer reports the rounding error it made
    torch.testing.assert_close(torch.as_tensor(rounding).float().norm(),
                               (layer.dequantize().float() - (before + delta)).norm(), rtol=1e-4, atol=1e-6)
