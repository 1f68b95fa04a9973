"""QLoRA = quantize_model + apply_lora: peftlab's LoraLinear over peftlab's Linear4bit, and a hand-written LoRA
over Linear4bit as an independent reference. (The instruction-tuning recipe: tests/experiments/test_qlora_recipe.py;
NF4 itself: test_quant.py.)"""

import math
from itertools import repeat

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, apply_lora, merge_lora, unmerge_lora
from peftlab import quant as Q
from peftlab.inject import replace_modules
from peftlab.lora import lora_layers
from peftlab.models import ARCH_CONFIGS, build_from_config
from peftlab.quant import Linear4bit, QuantConfig, quantize_model
from peftlab.train import train


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


# --- a hand-written LoRA over Linear4bit (moved from test_quant.py): a frozen 4-bit base, a high-precision adapter
class QLoraLinear(nn.Module):
    """Test-only LoRA around a Linear4bit (until LoraLinear accepts it): W4 x + (alpha / r) B A x."""

    def __init__(self, base: Q.Linear4bit, r: int = 8, alpha: float = 16):
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return self.base(x) + (x.float() @ self.lora_A.T @ self.lora_B.T * self.scaling).to(x.dtype)


def qlora(model, targets, head=None):
    Q.quantize_model(model, Q.QuantConfig(compute_dtype=torch.float32), skip=[head] if head else ["lm_head"])
    for p in model.parameters():
        p.requires_grad_(False)
    replace_modules(model, targets, lambda n, m: QLoraLinear(m), types=(Q.Linear4bit,))
    if head:
        model.get_submodule(head).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_steps(model, batch, steps, lr=1e-2):
    """peftlab's training loop on one batch: AdamW's default weight decay (0.01), the test's seed left as it is."""
    return train(model, repeat(batch), steps=steps, lr=lr, weight_decay=0.01, seed=None, progress=False).losses


def test_qlora_trains_tiny_llama_and_base_never_changes():
    model = build_from_config("tiny-llama").train()
    qlora(model, ["q_proj", "v_proj", "up_proj"])
    bases = {n: b.clone() for n, b in model.named_buffers()}
    A0 = model.model.layers[0].self_attn.q_proj.lora_A.detach().clone()
    ids = (torch.arange(24) * 7 % 256).repeat(4, 1)  # a fixed pattern the adapters can learn
    losses = train_steps(model, {"input_ids": ids, "labels": ids}, 30, lr=5e-2)
    assert losses[-1] < 0.9 * losses[0]  # from ln(256) = 5.55 (a random model) to below 5.0
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_A, A0)
    assert all(torch.equal(bases[n], b) for n, b in model.named_buffers())  # the 4-bit base is untouched


@pytest.mark.slow
def test_qlora_trains_minilm_classifier(minilm):
    model, tok = minilm
    model.train()
    qlora(model, ["query", "value"], head="classifier")
    packed = model.bert.encoder.layer[0].attention.self.query.base.weight.clone()
    texts = ["I love this", "worst day ever", "it is a table", "so happy today",
             "I hate waiting", "the meeting is at 3", "great news!", "terrible service"]
    batch = dict(tok(texts, return_tensors="pt", padding=True), labels=torch.tensor([2, 0, 1, 2, 0, 1, 2, 0]))
    losses = train_steps(model, batch, 12, lr=5e-3)
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.base.weight, packed)


def test_4bit_layer_trains_under_autocast():
    """bf16 autocast (accelerate's mixed precision): the input gradient is ones @ W, in the input's dtype.

    Before the fix, backward (which runs outside autocast) multiplied the bf16 grad_out by the fp32 weight and failed.
    """
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32), QuantConfig(compute_dtype=torch.float32))
    w = layer.dequantize().float()
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ w, atol=0.05, rtol=0.02)  # bf16 products
