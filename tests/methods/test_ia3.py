"""IA3 against HF peft's ``IA3Config`` (the independent reference), and BitFit's closed-form counts."""

import copy

import peft
import pytest
import torch
from torch import nn

from peftlab.bitfit import apply_bitfit
from peftlab.ia3 import DEFAULT_TARGETS, IA3Config, IA3Linear, apply_ia3, disable_ia3, load_ia3, save_ia3
from peftlab.inject import count_parameters
from peftlab.models import build_from_config


def _copy_into_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Copy each of our vectors into HF peft's layer of the same name; check both agree on its kind."""
    hf = dict(theirs.base_model.model.named_modules())
    copied = 0
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, IA3Linear):
                assert hf[name].is_feedforward == layer.is_feedforward, name
                target = hf[name].ia3_l["default"]  # (1, in) for feed-forward layers, else (out, 1)
                target.copy_(layer.ia3_l.view_as(target))
                copied += 1
    return copied


def _train_loss_drops(model: nn.Module, vocab: int = 256) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randint(3, vocab, (32, 8), generator=torch.Generator().manual_seed(1))
    labels = (x[:, 1] % 2).long()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.slow
def test_ia3_logits_equal_hf_peft_on_minilm(minilm):
    base, tokenizer = minilm
    targets, feedforward = DEFAULT_TARGETS["bert"]  # explicit, the same on both sides
    torch.manual_seed(0)
    ours = apply_ia3(copy.deepcopy(base), IA3Config(targets, feedforward, modules_to_save=["classifier"],
                                                    init_ia3_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, task_type="SEQ_CLS"))
    assert _copy_into_peft(ours, theirs) == 18  # 6 layers x (key, value, output.dense)
    x = tokenizer(["I love this airline!", "worst delay ever, never again", "ok"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours_logits, theirs_logits, base_logits = ours(**x).logits, theirs(**x).logits, base(**x).logits
    assert not torch.allclose(ours_logits, base_logits, atol=1e-3)  # random vectors do change the model
    assert torch.allclose(ours_logits, theirs_logits, atol=1e-5, rtol=0)
    # the same trainable count as HF peft: per layer 2 * 384 (k, v) + 1536 (FFN activation), plus the head
    assert count_parameters(ours)[0] == count_parameters(theirs)[0] == 6 * (2 * 384 + 1536) + 384 * 3 + 3


def test_ia3_logits_equal_hf_peft_on_tiny_llama():
    base = build_from_config("tiny-llama")
    lists = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    ours = apply_ia3(copy.deepcopy(base), IA3Config(**lists, init_ia3_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**lists, task_type="CAUSAL_LM"))
    assert _copy_into_peft(ours, theirs) == 6
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-5, rtol=0)


def test_hf_peft_bert_default_also_scales_the_attention_output_input():
    """Why peftlab's BERT default is a regex: HF's ``"output.dense"`` suffix also picks attention.output.dense."""
    model = build_from_config("tiny-bert", task="classification")
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(task_type="SEQ_CLS"))
    hf_ff = {n for n, m in theirs.named_modules() if getattr(m, "is_feedforward", False)}
    assert any(n.endswith("attention.output.dense") for n in hf_ff)
    ours = apply_ia3(copy.deepcopy(model))
    ours_ff = {n for n, m in ours.named_modules() if isinstance(m, IA3Linear) and m.is_feedforward}
    assert ours_ff == {f"bert.encoder.layer.{i}.output.dense" for i in range(2)}


def test_ia3_is_the_identity_at_init_and_trains_only_its_vectors():
    model = build_from_config("tiny-bert", task="classification")
    x = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        before = model(input_ids=x).logits
        apply_ia3(model)
        after = model(input_ids=x).logits
    assert torch.equal(before, after)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("ia3_l") for n in trainable)
    assert count_parameters(model)[0] == 2 * (2 * 64 + 128)  # 2 layers: key, value (64 each), FFN input (128)


def test_ia3_short_run_lowers_the_loss():
    model = apply_ia3(build_from_config("tiny-bert", task="classification"), IA3Config(
        *DEFAULT_TARGETS["bert"], modules_to_save=["classifier"]))
    first, last = _train_loss_drops(model)
    assert last < 0.7 * first


def test_ia3_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = apply_ia3(build_from_config("tiny-bert", task="classification"),
                      IA3Config(*DEFAULT_TARGETS["bert"], modules_to_save=["classifier"], init_ia3_weights=False))
    x = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    size = save_ia3(model, tmp_path)
    assert 4 * (2 * (2 * 64 + 128) + 64 * 2 + 2) < size < 20_000  # vectors + head, a few KB
    fresh = build_from_config("tiny-bert", task="classification")
    nn.init.normal_(fresh.classifier.weight)  # another head: the file must bring its own
    load_ia3(fresh, tmp_path)
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=x).logits, expected, atol=1e-6)
    with pytest.raises(ValueError, match="matched no"):
        load_ia3(build_from_config("tiny-llama"), tmp_path)


def test_ia3_config_errors():
    with pytest.raises(ValueError, match="must also be in target_modules"):
        IA3Config(target_modules=["key"], feedforward_modules=["output.dense"])
    with pytest.raises(ValueError, match="both target_modules and feedforward_modules"):
        IA3Config(target_modules=["key"])
    with pytest.raises(ValueError, match=r"known for model_type 'gpt2' \(known: \['bert', 'llama'\]\)"):
        apply_ia3(build_from_config("tiny-gpt2"))


# --- BitFit ------------------------------------------------------------------------------------
def test_bitfit_count_on_minilm_matches_the_closed_form():
    model = apply_bitfit(build_from_config("minilm-l6", task="classification", num_labels=3, device="meta"))
    d, d_ff, layers = 384, 1536, 6
    # per layer: q, k, v, attention output (4 d), LayerNorm 1 (d), intermediate (d_ff), output (d),
    # LayerNorm 2 (d); then the embeddings' LayerNorm (d), the pooler (d) and the classifier (3)
    assert count_parameters(model)[0] == layers * (7 * d + d_ff) + 2 * d + 3
    assert all(n.endswith(".bias") for n, p in model.named_parameters() if p.requires_grad)
    with_head = apply_bitfit(build_from_config("minilm-l6", task="classification", num_labels=3, device="meta"),
                             modules_to_save=["classifier"])
    assert count_parameters(with_head)[0] == layers * (7 * d + d_ff) + 2 * d + 3 + d * 3


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ValueError, match="no bias parameters"):
        apply_bitfit(build_from_config("tiny-llama"))


@pytest.mark.slow
def test_bitfit_short_run_lowers_the_loss():
    model = apply_bitfit(build_from_config("tiny-bert", task="classification"), modules_to_save=["classifier"])
    first, last = _train_loss_drops(model)
    assert last < 0.7 * first


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_ia3_files_transfer_both_ways_with_hf_peft(name, tmp_path):
    """HF peft's PeftModel.from_pretrained reads our file, and load_ia3 reads HF peft's save_pretrained."""
    task = "classification" if name == "tiny-bert" else "causal_lm"
    base = build_from_config(name, task=task).eval()
    targets, feedforward = DEFAULT_TARGETS["bert" if name == "tiny-bert" else "llama"]
    heads = ["classifier"] if name == "tiny-bert" else None
    x = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    ours = apply_ia3(copy.deepcopy(base), IA3Config(targets, feedforward, modules_to_save=heads,
                                                    init_ia3_weights=False)).eval()
    if heads:
        nn.init.normal_(ours.classifier.weight)  # a trained head: the file must carry it
    save_ia3(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert not torch.allclose(ours(input_ids=x).logits, base(input_ids=x).logits, atol=1e-3)
        torch.testing.assert_close(theirs(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5, rtol=0)

    hf = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False,
        task_type="SEQ_CLS" if heads else "CAUSAL_LM")).eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_ia3(copy.deepcopy(base), tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-5, rtol=0)


def test_disable_ia3_runs_the_base_alone():
    base = build_from_config("tiny-llama").eval()
    model = apply_ia3(copy.deepcopy(base), IA3Config(init_ia3_weights=False)).eval()
    x = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        scaled = model(input_ids=x).logits
        with disable_ia3(model):
            torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, atol=0, rtol=0)
        torch.testing.assert_close(model(input_ids=x).logits, scaled, atol=0, rtol=0)
