"""peftlab's LoRA against HF peft (the independent reference) on both real offline models."""

import copy
import math

import peft
import pytest
import torch
from lora_helpers import randomize_lora
from torch import nn

from peftlab import (
    LoraConfig,
    LoraLinear,
    add_weighted_adapter,
    apply_lora,
    count_parameters,
    disable_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from peftlab.lora import lora_layers
from peftlab.models import build_from_config


def _batch(tokenizer, texts=("I love this airline!", "worst delay ever, never again", "ok")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def _copy_lora_into_peft(ours: nn.Module, theirs: nn.Module, adapter: str = "default") -> int:
    """Copy A and B (and any trainable bias / head) from our model into HF peft's, module by module."""
    copied = 0
    hf_modules = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            hf = hf_modules[name]
            hf.lora_A[adapter].weight.copy_(layer.adapters[adapter].lora_A)
            hf.lora_B[adapter].weight.copy_(layer.adapters[adapter].lora_B)
            copied += 1
    return copied


def _hf_config(cfg: LoraConfig, **extra) -> peft.LoraConfig:
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                           lora_dropout=cfg.lora_dropout, bias=cfg.bias, use_rslora=cfg.use_rslora,
                           modules_to_save=cfg.modules_to_save, fan_in_fan_out=cfg.fan_in_fan_out, **extra)


# --- parity with HF peft ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("r,targets,bias,rslora", [
    (1, ["query", "value"], "none", False),
    (8, ["query", "key", "value", "dense"], "lora_only", False),
    (4, r".*layer\.[0-2]\..*(query|value)", "all", True),
])
def test_minilm_logits_match_hf_peft(minilm, r, targets, bias, rslora):
    model, tok = minilm
    reference = copy.deepcopy(model)
    cfg = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, bias=bias, use_rslora=rslora)
    apply_lora(model, cfg)
    theirs = peft.get_peft_model(reference, _hf_config(cfg))
    randomize_lora(model)
    assert _copy_lora_into_peft(model, theirs) == len(lora_layers(model)) > 0
    batch = _batch(tok)
    with torch.no_grad():
        ours, ref = model(**batch).logits, theirs(**batch).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert count_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.slow
def test_minilm_with_head_counts_match_hf_peft(minilm):
    model, _ = minilm
    reference = copy.deepcopy(model)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    apply_lora(model, cfg)
    theirs = peft.get_peft_model(reference, _hf_config(cfg))
    trainable, total = theirs.get_nb_trainable_parameters()
    # Closed form: 6 layers x 2 targets x r (384 + 384), plus the head copy 384 x 3 + 3.
    assert count_parameters(model)[:2] == (trainable, total) == (6 * 2 * 8 * (384 + 384) + 384 * 3 + 3, total)


@pytest.mark.slow
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]])
def test_smollm2_logits_match_hf_peft(smollm2, targets):
    model, tok = smollm2
    reference = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    apply_lora(model, cfg)
    theirs = peft.get_peft_model(reference, _hf_config(cfg))
    randomize_lora(model)
    _copy_lora_into_peft(model, theirs)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, theirs(**ids).logits, atol=1e-5, rtol=0)
    assert count_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0]
    # GQA: k_proj/v_proj map 576 -> 192 (3 KV heads x 64), so their LoRA B is (192, r), not (576, r).
    v = model.model.layers[0].self_attn.v_proj
    assert tuple(v.lora_B.shape) == (192, 4) and tuple(v.lora_A.shape) == (4, 576)


def test_gpt2_conv1d_fan_in_fan_out_matches_hf_peft():
    model = build_from_config("tiny-gpt2")
    reference = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    apply_lora(model, cfg)
    theirs = peft.get_peft_model(reference, _hf_config(cfg))
    randomize_lora(model)
    _copy_lora_into_peft(model, theirs)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)
        before = model(ids).logits
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)


def test_count_parameters_closed_form():
    model = build_from_config("tiny-llama")  # hidden 64, 4 heads, 2 KV heads: k/v map 64 -> 32
    base = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    expected = 2 * (2 * (64 + 64) + 2 * (64 + 32))  # layers x (q: r(k+d) + v: r(k+d))
    trainable, total, pct = count_parameters(model)
    assert (trainable, total) == (expected, base + expected)
    assert math.isclose(pct, 100 * expected / (base + expected))


# --- invariants ---------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 3, 8])
def test_zero_init_is_identity_and_merge_unmerge_restore(r):
    model = build_from_config("tiny-llama")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        base_logits = model(ids).logits
    weights = {n: p.clone() for n, p in model.named_parameters()}
    apply_lora(model, LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # B = 0
        randomize_lora(model)
        unmerged = model(ids).logits
        assert not torch.allclose(unmerged, base_logits, atol=1e-4)
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
        unmerge_lora(model)
    for name, layer in lora_layers(model):
        key = name.replace(".", ".", 1) + ".weight"
        torch.testing.assert_close(layer.base.weight, weights[key], atol=1e-6, rtol=0)
    with disable_lora(model), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-6, rtol=0)


def test_disable_lora_after_merge_gives_base_outputs():
    model = build_from_config("tiny-llama")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        base_logits = model(ids).logits
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_lora(model)
    merge_lora(model)
    with disable_lora(model), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)


def test_unload_leaves_no_wrappers_and_keeps_outputs():
    model = build_from_config("tiny-llama")
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
        plain = unload_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        torch.testing.assert_close(plain(ids).logits, before, atol=1e-5, rtol=0)


def test_one_step_changes_every_B_and_no_frozen_weight():
    model = build_from_config("tiny-llama")
    model.train()
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    bs = {n: layer.lora_B.clone() for n, layer in lora_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 12))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(not torch.equal(layer.lora_B, bs[n]) for n, layer in lora_layers(model))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoraLinear(base, LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=True)).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout on the LoRA path cannot touch the base output


# --- files: HF peft format round trips ----------------------------------------------------------
@pytest.mark.slow
def test_save_adapter_loads_in_hf_peft(minilm, tmp_path):
    model, tok = minilm
    base = copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], bias="lora_only",
                                 modules_to_save=["classifier"], task_type="SEQ_CLS"))
    randomize_lora(model)
    with torch.no_grad():
        for layer in (m for _, m in lora_layers(model)):
            layer.base.bias.add_(0.01)
        model.classifier.copies["default"].weight.mul_(2.0)
    size = save_adapter(model, tmp_path / "ad")
    assert size < 1_000_000  # A, B, 12 biases and a head: kilobytes, not the 90 MB model
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ad")
    batch = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_load_adapter_reads_hf_peft_directory(minilm, tmp_path):
    model, tok = minilm
    ours = copy.deepcopy(model)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                        init_lora_weights=False, modules_to_save=["classifier"]))
    with torch.no_grad():
        theirs.base_model.model.classifier.modules_to_save["default"].bias.add_(0.5)
    theirs.save_pretrained(tmp_path / "hf")
    load_adapter(ours, tmp_path / "hf")
    batch = _batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)


def test_multiple_adapters_switch_and_weighted_cat(tmp_path):
    model = build_from_config("tiny-llama")
    ids = torch.randint(0, 256, (1, 8))
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), adapter_name="a")
    apply_lora(model, LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"]), adapter_name="b")
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert sorted(layer.adapters) == ["a", "b"] and layer.adapters.active == "b"
    set_adapter(model, "a")
    with torch.no_grad():
        out_a = model(ids).logits
    set_adapter(model, "b")
    with torch.no_grad():
        out_b = model(ids).logits
    assert not torch.allclose(out_a, out_b)
    add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix", combination_type="cat")
    a, b = layer.adapters["a"], layer.adapters["b"]
    expected = 0.5 * (4 / 2) * (a.lora_B @ a.lora_A) + 2.0 * (3 / 3) * (b.lora_B @ b.lora_A)
    torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=0)
    assert layer.adapters["mix"].r == 5
    save_adapter(model, tmp_path / "a", adapter_name="a")
    fresh = build_from_config("tiny-llama")
    load_adapter(fresh, tmp_path / "a", adapter_name="a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, out_a, atol=1e-6, rtol=0)


# --- bad input ----------------------------------------------------------------------------------
def test_unknown_target_lists_candidates():
    model = build_from_config("tiny-bert", task="classification")
    with pytest.raises(ValueError, match=r"matched no.*Candidates:.*query.*value"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("kwargs,msg", [({"r": 0}, "r must be a positive integer"), ({"r": -2}, "positive"),
                                        ({"lora_alpha": 0}, "lora_alpha must be > 0"),
                                        ({"bias": "some"}, "bias must be one of"),
                                        ({"lora_dropout": 1.0}, "lora_dropout")])
def test_bad_config(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        LoraConfig(**kwargs)


def test_applying_twice_is_an_error():
    model = build_from_config("tiny-llama")
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        LoraLinear(model.model.layers[0].self_attn.q_proj, LoraConfig())


def test_adapter_for_another_model_is_rejected(tmp_path):
    small = build_from_config("tiny-llama")
    apply_lora(small, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(small, tmp_path / "ad")
    other = build_from_config("tiny-bert", task="classification")
    with pytest.raises(ValueError, match="does not fit this model|made for another model"):
        load_adapter(other, tmp_path / "ad")
    bigger = build_from_config({**__import__("peftlab.models", fromlist=["x"]).ARCH_CONFIGS["tiny-llama"],
                                "hidden_size": 96, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="made for another model.*shape"):
        load_adapter(bigger, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_adapter(build_from_config("tiny-llama"), tmp_path / "nothing")


def test_disable_lora_on_a_merged_model_runs_the_base_and_merges_again():
    from peftlab.models import build_from_config

    base = build_from_config("tiny-llama").eval()
    ids = torch.randint(3, 256, (1, 5))
    with torch.no_grad():
        expected_base = base(ids).logits
    model = apply_lora(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    merge_lora(model)
    with torch.no_grad():
        merged = model(ids).logits
        with disable_lora(model):
            torch.testing.assert_close(model(ids).logits, expected_base, atol=1e-5, rtol=0)
        assert all(layer.adapters.merged for _, layer in lora_layers(model))
        torch.testing.assert_close(model(ids).logits, merged, atol=1e-5, rtol=0)


def test_bias_all_with_modules_to_save_trains_what_hf_peft_trains():
    """bias="all" + modules_to_save: the head copy and every bias train, the frozen original head does not."""
    import peft

    from peftlab.inject import count_parameters

    targets = dict(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], bias="all")
    def base():
        return build_from_config("tiny-bert", task="classification", num_labels=3)

    ours = apply_lora(base(), LoraConfig(**targets))
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**targets))
    hf_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert count_parameters(ours)[0] == hf_trainable
    heads = [m for m in ours.modules() if type(m).__name__ == "ModulesToSave"]
    assert heads and not any(p.requires_grad for m in heads for p in m.original.parameters())
