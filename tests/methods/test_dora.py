"""peftlab's DoRA (LoraConfig(use_dora=True), peftlab.dora) against HF peft 0.21.2 and closed forms."""

import copy
import json
from dataclasses import replace

import peft
import pytest
import torch
from lora_helpers import randomize_lora
from safetensors.torch import load_file, save_file
from torch import nn

from peftlab import (
    LoraConfig,
    LoraLinear,
    add_weighted_adapter,
    apply_lora,
    count_parameters,
    disable_lora,
    load_lora,
    merge_lora,
    save_lora,
    set_adapter,
    unmerge_lora,
)
from peftlab.dora import MAGNITUDE_KEY
from peftlab.experiments.memory import MemoryConfig, activation_bytes, estimate, prepare_model
from peftlab.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError
from peftlab.lora import lora_layers
from peftlab.models import build_from_config
from peftlab.quant import Linear4bit

# tiny-llama: d=64, ff=128, 2 KV heads (kv width 32), 2 layers, vocab 256. tiny-bert: d=64, ff=128, 2 layers.
D, FF, KV, L, V = 64, 128, 32, 2, 256
TARGETS = {"tiny-llama": ["q_proj", "v_proj", "down_proj"], "tiny-bert": ["query", "value", "dense"],
           "tiny-gpt2": ["c_attn"]}


def _model(name: str) -> nn.Module:
    return build_from_config(name, task="classification" if name == "tiny-bert" else "causal_lm")


def _ids() -> torch.Tensor:
    return torch.randint(3, V, (2, 9))


def _hf_config(cfg: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                           lora_dropout=cfg.lora_dropout, fan_in_fan_out=cfg.fan_in_fan_out, use_dora=cfg.use_dora)


def _copy_into_hf(ours: nn.Module, theirs: nn.Module) -> None:
    """Copy A, B and m of every adapter from our layers into HF peft's, module by module."""
    hf = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            for adapter, a in layer.adapters.items():
                hf[name].lora_A[adapter].weight.copy_(a.lora_A)
                hf[name].lora_B[adapter].weight.copy_(a.lora_B)
                if a.magnitude is not None:
                    hf[name].lora_magnitude_vector[adapter].weight.copy_(a.magnitude)


def _dora(name: str, r: int = 4, **kw) -> tuple[nn.Module, nn.Module, LoraConfig]:
    """(our DoRA model with random A, B, m; an untouched copy of the base; the config)."""
    model = _model(name)
    base = copy.deepcopy(model)
    cfg = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=TARGETS[name], use_dora=True,
                     fan_in_fan_out=name == "tiny-gpt2", **kw)
    apply_lora(model, cfg)
    randomize_lora(model, magnitude_jitter=0.2)
    return model, base, cfg


# --- (1) logits equal HF peft's, through files both ways -------------------------------------------------------
def test_magnitude_starts_at_the_row_norms_of_w_and_the_model_is_unchanged():
    model = _model("tiny-llama")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    apply_lora(model, LoraConfig(r=4, target_modules=TARGETS["tiny-llama"], use_dora=True))
    m = model.model.layers[0].self_attn.q_proj.adapters["default"].magnitude
    assert m.shape == (D,) and m.requires_grad
    torch.testing.assert_close(m, weight.pow(2).sum(1).sqrt())  # ||W||_c: B = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])  # BERT's linears have biases: y0 - b is tested
def test_save_lora_loads_in_hf_peft_with_equal_logits(name, tmp_path):
    model, base, cfg = _dora(name)
    save_lora(model, tmp_path / "ad")
    tensors = load_file(tmp_path / "ad" / ADAPTER_WEIGHTS)
    for layer_name, layer in lora_layers(model):  # HF peft's key: no ".weight" after lora_magnitude_vector
        assert tensors[f"base_model.model.{layer_name}.{MAGNITUDE_KEY}"].shape == (layer.out_features,)
    assert json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ad")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_load_lora_reads_hf_peft_dora_with_equal_logits(name, tmp_path):
    model = _model(name)
    ours = copy.deepcopy(model)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name],
                                                        use_dora=True, init_lora_weights=False))
    with torch.no_grad():  # m off the norm: the file's magnitudes must be read, not re-initialised
        for n, p in theirs.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "hf")
    load_lora(ours, tmp_path / "hf")
    assert ours.peft_config["default"].use_dora
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_minilm_round_trips_both_ways(minilm, tmp_path):
    model, tok = minilm
    base, hf_base = copy.deepcopy(model), copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True))
    randomize_lora(model, magnitude_jitter=0.2)
    save_lora(model, tmp_path / "ours")
    batch = tok(["I love this airline!", "worst delay ever"], return_tensors="pt", padding=True)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    load_lora(base, tmp_path / "theirs")
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(base(**batch).logits, expected, atol=1e-5, rtol=0)


def test_dropout_in_training_matches_hf_peft():
    # HF peft's twist: with dropout active, W x is recomputed on the dropped x (not taken from the base output).
    model, base, cfg = _dora("tiny-llama", lora_dropout=0.3)
    theirs = peft.get_peft_model(base, _hf_config(cfg))
    _copy_into_hf(model, theirs)
    model.train(), theirs.train()
    ids = _ids()
    torch.manual_seed(5)
    ours = model(ids).logits
    torch.manual_seed(5)
    ref = theirs(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, ours, atol=1e-3)  # the dropout really acted


# --- (2) merge and unmerge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])  # GPT-2: Conv1D, fan_in_fan_out
def test_merge_keeps_logits_equals_hf_merge_and_unmerge_restores(name):
    model, base, cfg = _dora(name)
    original = {n: p.clone() for n, p in base.named_parameters()}
    theirs = peft.get_peft_model(copy.deepcopy(base), _hf_config(cfg))
    _copy_into_hf(model, theirs)
    ids = _ids()
    with torch.no_grad():
        base_logits = base(ids).logits
        unmerged = model(ids).logits
        torch.testing.assert_close(unmerged, theirs(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(unmerged, base_logits, atol=1e-3)
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
        hf_merged = theirs.merge_and_unload()
        torch.testing.assert_close(hf_merged(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
        hf_weights = dict(hf_merged.named_parameters())
        for layer_name, layer in lora_layers(model):  # W' = (m / ||W + dW||_c) (W + dW), as HF peft merges
            torch.testing.assert_close(layer.base.weight, hf_weights[f"{layer_name}.weight"], atol=1e-6, rtol=0)
        with disable_lora(model):  # takes the merged update out first
            torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)
        unmerge_lora(model)
        for layer_name, layer in lora_layers(model):
            torch.testing.assert_close(layer.base.weight, original[f"{layer_name}.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)


# --- (3) gradients --------------------------------------------------------------------------------------------
def test_gradients_by_hand_on_one_layer_with_the_norm_constant():
    base = nn.Linear(6, 5).requires_grad_(False)  # frozen, as apply_lora leaves it
    layer = LoraLinear(base, LoraConfig(r=2, lora_alpha=3, use_dora=True, init_lora_weights=False))
    lora = layer.adapters["default"]
    with torch.no_grad():
        lora.magnitude.mul_(torch.linspace(0.5, 1.5, 5))
    x, c = torch.randn(4, 6), torch.randn(4, 5)
    (layer(x) * c).sum().backward()  # L = sum c * y, so dL/dy = c
    A, B, m, s = lora.lora_A.detach(), lora.lora_B.detach(), lora.magnitude.detach(), 3 / 2
    V = base.weight.detach() + s * B @ A  # (out, in)
    n = V.norm(dim=1)
    g = m / n
    with torch.no_grad():
        torch.testing.assert_close(layer(x), g * (x @ V.T) + base.bias)  # eq. 5
    # y = g (V x) + b with n a constant: dL/dm = sum_t c (V x) / n; dL/dB = s (g c)^T (x A^T); dL/dA = s B^T (g c)^T x
    torch.testing.assert_close(lora.magnitude.grad, ((x @ V.T) * c).sum(0) / n)
    torch.testing.assert_close(lora.lora_B.grad, s * (c * g).T @ (x @ A.T))
    torch.testing.assert_close(lora.lora_A.grad, s * B.T @ (c * g).T @ x)
    assert base.weight.grad is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_one_training_step_gradients_equal_hf_peft(name):
    model, base, cfg = _dora(name)
    theirs = peft.get_peft_model(base, _hf_config(cfg))
    _copy_into_hf(model, theirs)
    ids = _ids()
    labels = ids if name == "tiny-llama" else torch.tensor([0, 1])
    model.train(), theirs.train()  # BERT's own dropout runs: the same seed gives both the same masks
    torch.manual_seed(7)
    model(input_ids=ids, labels=labels).loss.backward()
    torch.manual_seed(7)
    theirs(input_ids=ids, labels=labels).loss.backward()
    hf = dict(theirs.base_model.model.named_modules())
    for layer_name, layer in lora_layers(model):
        a, h = layer.adapters["default"], hf[layer_name]
        for ours, ref in ((a.magnitude, h.lora_magnitude_vector["default"].weight),
                          (a.lora_A, h.lora_A["default"].weight), (a.lora_B, h.lora_B["default"].weight)):
            assert ours.grad is not None and ours.grad.abs().sum() > 0
            torch.testing.assert_close(ours.grad, ref.grad, atol=1e-6, rtol=1e-4)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B", "magnitude"))}


def test_trainable_count_closed_form_and_hf_peft():
    model, base, cfg = _dora("tiny-llama")
    theirs = peft.get_peft_model(base, _hf_config(cfg))
    r = cfg.r  # q: 64 -> 64, v: 64 -> 32, down: 128 -> 64; DoRA adds one m per output row
    expected = L * (r * (D + D) + D + r * (D + KV) + KV + r * (FF + D) + D)
    assert count_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0] == expected


# --- several adapters, 4-bit base -----------------------------------------------------------------------------
def test_dora_and_lora_adapters_side_by_side_match_hf_peft_and_disable_gives_the_base():
    model = _model("tiny-llama")
    base = copy.deepcopy(model)
    cfg_a = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    cfg_b = LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"])
    apply_lora(model, cfg_a, adapter_name="dora")
    apply_lora(model, cfg_b, adapter_name="plain")
    randomize_lora(model, magnitude_jitter=0.2)
    theirs = peft.get_peft_model(copy.deepcopy(base), _hf_config(cfg_a), adapter_name="dora")
    theirs.add_adapter("plain", _hf_config(cfg_b))
    _copy_into_hf(model, theirs)
    ids = _ids()
    with torch.no_grad():
        base_logits = base(ids).logits
        outs = {}
        for name in ("dora", "plain"):
            set_adapter(model, name)
            theirs.set_adapter(name)
            outs[name] = model(ids).logits
            torch.testing.assert_close(outs[name], theirs(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(outs["dora"], outs["plain"], atol=1e-3)
        q = model.model.layers[0].self_attn.q_proj
        assert not q.adapters["dora"].magnitude.requires_grad and q.adapters["plain"].magnitude is None
        with disable_lora(model):
            torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="DoRA adapters \\['dora'\\] cannot be combined"):
        add_weighted_adapter(model, ["dora", "plain"], [1.0, 1.0], "mix")


def test_dora_over_a_4bit_base_starts_as_the_base():
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(64, 32)), LoraConfig(r=4, use_dora=True))
    m = layer.adapters["default"].magnitude
    torch.testing.assert_close(m, layer.base.dequantize().float().pow(2).sum(1).sqrt())  # ||dequantized W||_c
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x), atol=1e-6, rtol=0)


# --- (4) bad input --------------------------------------------------------------------------------------------
def test_a_dora_file_without_magnitudes_is_refused_and_leaves_the_model_unchanged(tmp_path):
    model, _, _ = _dora("tiny-llama")
    save_lora(model, tmp_path / "ad")
    file = tmp_path / "ad" / ADAPTER_WEIGHTS
    save_file({k: v for k, v in load_file(file).items() if not k.endswith(MAGNITUDE_KEY)}, file)
    fresh = _model("tiny-llama")
    with pytest.raises(AdapterFileError, match="use_dora=true, but .* has no lora_magnitude_vector for 6 of its 6"):
        load_lora(fresh, tmp_path / "ad")
    assert not any(isinstance(m, LoraLinear) for m in fresh.modules())


def test_magnitudes_in_a_file_whose_config_lacks_use_dora_are_refused(tmp_path):
    model, _, _ = _dora("tiny-llama")
    save_lora(model, tmp_path / "ad")
    cfg_file = tmp_path / "ad" / ADAPTER_CONFIG
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "use_dora": False}))
    with pytest.raises(AdapterFileError, match="holds 6 lora_magnitude_vector tensors .* does not say use_dora"):
        load_lora(_model("tiny-llama"), tmp_path / "ad")


# --- the memory model's DoRA terms ----------------------------------------------------------------------------
def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded): an independent count."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


def test_memory_model_dora_terms_closed_form():
    lora = MemoryConfig(model="tiny-llama", method="lora", r=4, dtype="fp32", batch=2, seq=8)
    plain, dora = estimate(lora), estimate(replace(lora, use_dora=True))
    m = L * (D + KV)  # one magnitude per output row of q (64) and v (32), per layer
    assert dora.trainable - plain.trainable == m == 192
    assert (dora.weights - plain.weights, dora.grads - plain.grads, dora.optimizer - plain.optimizer) == \
        (4 * m, 4 * m, 8 * m)  # fp32 m, its fp32 gradient, AdamW's two fp32 moments
    # m's gradient needs W x and B A x of every DoRA layer: 2 x 4 B x (64 + 32) per token per layer.
    tokens = 2 * 8
    act_plain, act_dora = plain.detail["activations"], dora.detail["activations"]
    assert act_dora["saved"] - act_plain["saved"] == L * tokens * 2 * 4 * (D + KV) == 24576
    # The norm's scratch W + dW, fp32, of the largest DoRA layer (q_proj, 64 x 64); with 16 tokens the loss's
    # transient (logits) is larger, so the peak moves by the saved tensors only.
    assert act_dora["dora_scratch"] == 4 * D * D
    assert act_dora["peak"] - act_plain["peak"] == 24576
    # One token: the loss holds 4 d + 4 + 4 V saved + 8 V transient bytes (3,332) < 16,384: the scratch is the peak.
    one = activation_bytes(MemoryConfig(model="tiny-llama", method="lora", r=4, dtype="fp32", batch=1, seq=1,
                                        use_dora=True))
    assert one["peak"] == one["saved"] - (4 * D + 4 + 4 * V) + 4 * D * D
    with pytest.raises(ValueError, match="use_dora models DoRA over LoRA: it needs method='lora'"):
        MemoryConfig(model="tiny-llama", method="qlora", use_dora=True)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_model_dora_saved_tensors_match_autograd(dtype):
    ids = torch.randint(3, V, (2, 32))  # 64 tokens: the (out,) vectors DoRA also keeps are ~2 % of its term
    counted, predicted = {}, {}
    for use_dora in (False, True):
        cfg = MemoryConfig(model="tiny-llama", method="lora", r=4, dtype=dtype, batch=2, seq=32, use_dora=use_dora)
        model = build_from_config("tiny-llama", dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
        model = prepare_model(model, cfg).train()
        counted[use_dora], predicted[use_dora] = _saved_bytes(model, ids), activation_bytes(cfg)["saved"]
    # DoRA's extra saved bytes (W x, B A x per layer) as autograd counts them; small (out,) vectors left out.
    assert predicted[True] - predicted[False] == pytest.approx(counted[True] - counted[False], rel=0.05)
