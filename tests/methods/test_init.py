"""PiSSA and LoftQ initialisation: HF peft's PiSSA, the closed-form SVD and bitsandbytes' NF4 as references."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

from peftlab import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_lora,
    loftq_init,
    pissa_init,
    pissa_to_lora,
    quantize_model,
    save_lora,
)
from peftlab.lora import lora_layers
from peftlab.models import build_from_config
from peftlab.quant import Linear4bit, QuantConfig
from peftlab.train import train

warnings.filterwarnings("ignore", message=".*bitsandbytes.*")
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = QuantConfig(compute_dtype=torch.float32, double_quant=False)


def _inputs():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --- PiSSA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,task,targets,r,alpha,rslora,fan_in_fan_out", [
    ("tiny-bert", "classification", ["query", "value"], 4, 8, False, False),
    ("tiny-llama", "causal_lm", LLAMA_ALL, 8, 4, True, False),  # scaling 4 / sqrt(8) < 1
    ("tiny-gpt2", "causal_lm", ["c_attn"], 2, 16, False, True),  # Conv1D: weight stored (in, out)
])
def test_pissa_matches_hf_peft(arch, task, targets, r, alpha, rslora, fan_in_fan_out):
    model = build_from_config(arch, task=task)
    reference = copy.deepcopy(model)
    original = copy.deepcopy(model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, fan_in_fan_out=fan_in_fan_out)
    pissa_init(apply_lora(model, cfg))
    theirs = peft.get_peft_model(reference, peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, fan_in_fan_out=fan_in_fan_out,
        init_lora_weights="pissa"))
    hf = dict(theirs.base_model.model.named_modules())
    layers = lora_layers(model)
    assert len(layers) == len([m for m in hf.values() if hasattr(m, "lora_A")]) > 0
    for name, layer in layers:
        torch.testing.assert_close(layer.lora_A, hf[name].lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B, hf[name].lora_B["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base.weight, hf[name].base_layer.weight, atol=1e-5, rtol=0)  # residual
        assert layer.lora_B.abs().sum() > 0  # not LoRA's B = 0
    batch = _inputs()
    ours = _logits(model, batch)
    torch.testing.assert_close(ours, _logits(theirs, batch), atol=1e-5, rtol=0)
    # Right after PiSSA the model computes what the original did (up to fp32 rounding of W - s B A + s B A).
    torch.testing.assert_close(ours, _logits(original, batch), atol=1e-5, rtol=0)


def test_pissa_adapter_is_the_principal_part():
    # Closed form: s B A = the top-r SVD terms of W, and the residual holds the other singular values.
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    layer = LoraLinear(nn.Linear(40, 24), LoraConfig(r=3, lora_alpha=12))  # s = 4
    layer.base.weight.data.copy_(w)
    pissa_init(layer)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(4.0 * layer.lora_B @ layer.lora_A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5,
                               rtol=0)
    # The residual keeps the other singular values (and r zeros): rank-r less, nothing else changed.
    torch.testing.assert_close(torch.linalg.svdvals(layer.base.weight), torch.cat([S[3:], torch.zeros(3)]),
                               atol=1e-5, rtol=0)


def test_pissa_refuses_a_4bit_base():
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(64, 64), FP32), LoraConfig(r=2))
    with pytest.raises(ValueError, match="4-bit base"):
        pissa_init(layer)


def test_pissa_to_lora_runs_on_the_original_base(tmp_path):
    model = build_from_config("tiny-llama")
    original, for_hf, hf_init = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    apply_lora(model, cfg)
    initial = pissa_init(model)
    save_lora(model, tmp_path / "init")  # the HF workflow: the initial adapter on disk
    ids = torch.randint(0, 256, (4, 16))
    train(model, [dict(input_ids=ids, labels=ids)], steps=4, lr=1e-2, progress=False)
    assert all(not torch.equal(layer.lora_A, initial[n][0]) for n, layer in lora_layers(model))  # it trained
    batch = {"input_ids": ids[:2]}
    trained = _logits(model, batch)
    assert (trained - _logits(original, batch)).abs().max() > 1e-2  # training changed the model's output

    config, tensors = pissa_to_lora(model, initial, path=tmp_path / "lora")
    assert (config.r, config.lora_alpha) == (8, 16)  # rank 2r, the same scaling alpha / r
    _, from_file = pissa_to_lora(model, tmp_path / "init")  # the initial adapter read from its directory
    assert tensors.keys() == from_file.keys() and all(torch.equal(tensors[k], from_file[k]) for k in tensors)
    # Reference 1: the original base + the converted adapter, loaded by peftlab, gives the trained logits.
    torch.testing.assert_close(_logits(load_lora(original, tmp_path / "lora"), batch), trained, atol=1e-4, rtol=0)
    # Reference 2: HF peft loads the file onto the original base and computes the same.
    theirs = peft.PeftModel.from_pretrained(for_hf, str(tmp_path / "lora"))
    torch.testing.assert_close(_logits(theirs, batch), trained, atol=1e-4, rtol=0)
    # Reference 3: HF peft's own conversion (save_pretrained with the initial model) writes the same tensors.
    hf = peft.get_peft_model(hf_init, peft.LoraConfig(r=4, lora_alpha=8, target_modules=cfg.target_modules,
                                                      init_lora_weights="pissa"))
    hf.save_pretrained(str(tmp_path / "hf_init"))
    hf_modules = dict(hf.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model):
            hf_modules[name].lora_A["default"].weight.copy_(layer.lora_A)
            hf_modules[name].lora_B["default"].weight.copy_(layer.lora_B)
    hf.save_pretrained(str(tmp_path / "hf_lora"), path_initial_model_for_weight_conversion=str(tmp_path / "hf_init"))
    from safetensors.torch import load_file

    ref = load_file(str(tmp_path / "hf_lora" / "adapter_model.safetensors"))
    assert ref.keys() == tensors.keys()
    for k in ref:
        torch.testing.assert_close(tensors[k], ref[k], atol=1e-5, rtol=0)


# --- LoftQ ---------------------------------------------------------------------------------------
def _nf4(w, double_quant=False):
    """NF4 round trip by bitsandbytes (the independent reference), blocksize 64."""
    BF = pytest.importorskip("bitsandbytes.functional")
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return BF.dequantize_4bit(packed, state)


def _layer(out=96, inp=128, r=8, alpha=8, seed=0):
    torch.manual_seed(seed)  # in = 128: whole blocks per row (bitsandbytes' CPU kernel is right there)
    return LoraLinear(nn.Linear(inp, out), LoraConfig(r=r, lora_alpha=alpha))


@pytest.mark.parametrize("r,alpha", [(8, 8), (4, 16), (16, 8)])  # scaling 1, 4, 0.5
def test_loftq_one_iteration_is_the_svd_of_the_nf4_error(r, alpha):
    layer = _layer(r=r, alpha=alpha)
    w, s = layer.base.weight.detach().clone(), alpha / r
    x = torch.randn(5, 128)
    errors = loftq_init(layer, num_iters=1, quant_config=FP32)[""]
    q = _nf4(w)  # plain QLoRA's base: NF4(W), from bitsandbytes
    assert isinstance(layer.base, Linear4bit) and torch.equal(layer.base.dequantize(), q)
    U, S, Vh = torch.linalg.svd(w - q, full_matrices=False)
    root = torch.sqrt(S[:r] / s)
    torch.testing.assert_close(layer.lora_A, torch.diag(root) @ Vh[:r], atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_B, U[:, :r] @ torch.diag(root), atol=1e-5, rtol=0)
    # The scaling is honoured: s B A (what the layer adds) is the residual's rank-r part, not B A.
    best = S[r:].pow(2).sum().sqrt().item()  # Eckart-Young: the least error of any rank-r correction
    assert errors[0] == pytest.approx(best, rel=1e-4)
    assert (w - q - s * layer.lora_B @ layer.lora_A).norm().item() == pytest.approx(best, rel=1e-4)
    if s != 1:  # B A alone would recover (2 / s - 1 / s^2) of the error energy s B A removes: 7/16 at s = 4, 0 at 1/2
        e0 = (w - q).norm().item() ** 2
        unscaled = e0 - (w - q - layer.lora_B @ layer.lora_A).norm().item() ** 2
        assert unscaled < 0.5 * (e0 - best ** 2)
    expected = x @ (q + U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]).T + layer.base.bias  # s B A = U_r S_r Vh_r
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=0)  # the layer that runs: NF4 base + LoftQ A, B


@pytest.mark.parametrize("double_quant", [False, True])
def test_loftq_errors_fall_below_plain_qlora(double_quant):
    layer = _layer(out=128, inp=256, r=16, alpha=32)  # s = 2
    one_less = copy.deepcopy(layer)
    w = layer.base.weight.detach().clone()
    config = QuantConfig(compute_dtype=torch.float32, double_quant=double_quant)
    errors = loftq_init(layer, num_iters=5, quant_config=config)[""]
    qlora = (w - _nf4(w, double_quant)).norm().item()  # plain QLoRA init: B = 0, the whole NF4 error stays
    assert len(errors) == 5 and max(errors) < qlora, (errors, qlora)  # every iteration beats plain QLoRA
    # Non-increasing over the first iterations, not for ever: NF4's absmax moves with its input, so the
    # quantization step is no projection onto a fixed grid (on such weights the error rises again from
    # iteration 4 or 5 on, in 20 of 20 seeds tried; see loftq_layer).
    assert errors[0] > errors[1] >= errors[2], errors
    # The 4-bit weight that runs is bitsandbytes' NF4 of W - s B A, with B A from iteration 4 (run separately).
    assert errors[:4] == loftq_init(one_less, num_iters=4, quant_config=config)[""]
    q = layer.base.dequantize()
    assert torch.equal(q, _nf4(w - 2.0 * one_less.lora_B.detach() @ one_less.lora_A.detach(), double_quant))
    # ... and A, B are the rank-r SVD of W minus it: the error reported is that of the layer as it runs.
    assert (w - q - 2.0 * layer.lora_B @ layer.lora_A).norm().item() == pytest.approx(errors[-1], rel=1e-5)
    S = torch.linalg.svdvals(w - q)
    assert errors[-1] == pytest.approx(S[16:].pow(2).sum().sqrt().item(), rel=1e-4)


def test_loftq_model_is_closer_to_full_precision_than_qlora():
    model = build_from_config("tiny-llama")
    qlora = copy.deepcopy(model)
    batch = _inputs()
    reference = _logits(model, batch)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_ALL)
    errors = loftq_init(apply_lora(model, cfg), num_iters=3, quant_config=FP32)
    assert len(errors) == 14 and all(isinstance(layer.base, Linear4bit) for _, layer in lora_layers(model))
    apply_lora(quantize_model(qlora, FP32, target=LLAMA_ALL), cfg)
    gap_loftq = (_logits(model, batch) - reference).norm()
    gap_qlora = (_logits(qlora, batch) - reference).norm()
    assert gap_loftq < 0.8 * gap_qlora, (gap_loftq, gap_qlora)
    # Only the adapters train: r (in + out) per layer; the 4-bit bases are buffers.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        8 * (layer.in_features + layer.out_features) for _, layer in lora_layers(model))


def test_loftq_refuses_bad_input():
    with pytest.raises(ValueError, match="num_iters"):
        loftq_init(_layer(), num_iters=0)
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(64, 64), FP32), LoraConfig(r=2))
    with pytest.raises(ValueError, match="full-precision nn.Linear"):
        loftq_init(layer)
    with pytest.raises(ValueError, match="no LoRA layers"):
        loftq_init(nn.Linear(4, 4))
