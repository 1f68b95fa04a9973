"""Mixed-adapter batches (peftlab.mixed_batch) against HF peft's ``model(..., adapter_names=[...])``.

The adapters travel by file: peftlab's save_lora into HF peft's PeftModel.from_pretrained / load_adapter
(tiny Llama), and HF peft's save_pretrained into peftlab's load_lora (tiny BERT with a trained head).
"""

import copy

import peft
import pytest
import torch
from lora_helpers import randomize_lora
from torch import nn

from peftlab import LoraConfig, apply_lora, disable_lora, load_lora, merge_lora, mixed_batch, save_lora, set_adapter
from peftlab.lora import lora_layers
from peftlab.models import build_from_config

# Three adapters that differ in rank, scale and layers: "c" lacks q_proj/v_proj, "a" lacks o_proj/up_proj.
LLAMA_ADAPTERS = {
    "a": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "b": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    "c": LoraConfig(r=8, lora_alpha=32, target_modules=["o_proj", "up_proj"], use_rslora=True,
                    init_lora_weights=False),
}
NAMES = ["b", "__base__", "a", "c", "a", "__base__"]  # repeated names, base rows, rows out of order


@pytest.fixture
def llama_pair(tmp_path):
    """(base, ours, theirs): tiny Llama with adapters a, b, c in peftlab and, through the files, in HF peft."""
    base = build_from_config("tiny-llama").eval()
    ours = copy.deepcopy(base)
    for name, cfg in LLAMA_ADAPTERS.items():
        apply_lora(ours, cfg, name)
    randomize_lora(ours, scale=0.3)
    for name in LLAMA_ADAPTERS:
        save_lora(ours, tmp_path / name, name)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.load_adapter(tmp_path / "c", adapter_name="c")
    return base, ours.eval(), theirs.eval()


def _ids(rows: int, length: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


# --- parity with HF peft ----------------------------------------------------------------------------------------
def test_llama_mixed_logits_match_hf_peft(llama_pair):
    base, ours, theirs = llama_pair
    x = _ids(len(NAMES))
    with torch.no_grad():
        with mixed_batch(ours, NAMES):
            mixed = ours(input_ids=x).logits
        ref = theirs(input_ids=x, adapter_names=NAMES).logits
        plain = base(input_ids=x).logits
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=0)
    # the test can fail: every adapter row moved away from the base, every base row did not
    for i, name in enumerate(NAMES):
        moved = (mixed[i] - plain[i]).abs().max().item()
        assert (moved > 1e-2) if name != "__base__" else (moved < 1e-5), (name, moved)


def test_each_row_equals_its_adapter_alone(llama_pair):
    base, ours, _ = llama_pair
    x = _ids(len(NAMES))
    with torch.no_grad():
        with mixed_batch(ours, NAMES):
            mixed = ours(input_ids=x).logits
        for i, name in enumerate(NAMES):
            if name == "__base__":
                alone = base(input_ids=x[i:i + 1]).logits
            else:
                set_adapter(ours, name)
                alone = ours(input_ids=x[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0, msg=f"row {i} ({name})")


def test_bert_hf_adapters_with_heads_loaded_into_peftlab(tmp_path):
    """HF peft's SEQ_CLS adapters (each with its own classifier copy) loaded by load_lora; the classifier
    sees (batch, features) inputs, the attention layers (batch, seq, features)."""
    base = build_from_config("tiny-bert", task="classification", num_labels=3).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False),
        adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["key", "dense"], task_type="SEQ_CLS",
                                            init_lora_weights=False))
    with torch.no_grad():  # the two trained heads differ from the frozen original and from each other
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path)  # adapters not named "default" go to tmp_path / name
    ours = copy.deepcopy(base)
    load_lora(ours, tmp_path / "x", "x")
    load_lora(ours, tmp_path / "y", "y")
    ours.eval(), theirs.eval()
    names = ["y", "x", "__base__", "x"]
    x = _ids(len(names), length=9)
    with torch.no_grad():
        with mixed_batch(ours, names):
            mixed = ours(input_ids=x).logits
        ref = theirs(input_ids=x, adapter_names=names).logits
        plain = base(input_ids=x).logits
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], plain[2], atol=1e-6, rtol=0)  # the base row used the original head
    assert (mixed[[0, 1, 3]] - plain[[0, 1, 3]]).abs().amax(-1).min() > 1e-2


def test_two_dimensional_rows_closed_form():
    """(batch, features) through one layer: row i is W x_i + b + scaling_i B_i A_i x_i, written out."""
    model = nn.Sequential(nn.Linear(6, 5))
    apply_lora(model, LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False), "p")
    apply_lora(model, LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False), "q")
    model.eval()
    layer, x = model[0], torch.randn(4, 6)
    names = ["q", "p", "__base__", "q"]
    with torch.no_grad():
        with mixed_batch(model, names):
            y = model(x)
        W, b = layer.base.weight, layer.base.bias
        for i, name in enumerate(names):
            expected = W @ x[i] + b
            if name != "__base__":
                a = layer.adapters[name]
                expected = expected + (6 / 2 if name == "p" else 3 / 3) * a.lora_B @ (a.lora_A @ x[i])
            torch.testing.assert_close(y[i], expected, atol=1e-6, rtol=0)


# --- generate -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_matches_hf_peft_and_rows_alone(llama_pair, num_beams):
    _, ours, theirs = llama_pair
    names = ["a", "__base__", "c", "b"]
    x = _ids(len(names), length=5, seed=3)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        with mixed_batch(ours, names, num_beams=num_beams):
            mixed = ours.generate(input_ids=x, **gen)
        ref = theirs.generate(input_ids=x, adapter_names=names, **gen)
        assert torch.equal(mixed, ref)
        for i, name in enumerate(names):  # batching does not change what a row generates
            with mixed_batch(ours, [name], num_beams=num_beams):
                assert torch.equal(ours.generate(input_ids=x[i:i + 1], **gen), mixed[i:i + 1]), (i, name)


# --- errors ---------------------------------------------------------------------------------------------------
def test_unknown_name_lists_the_adapters(llama_pair):
    _, ours, theirs = llama_pair
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['bb', 'z'\].*this model has \['a', 'b', 'c'\]"):
        with mixed_batch(ours, ["a", "bb", "z", "__base__"]):
            pass
    with pytest.raises(ValueError, match="non-existing adapter"):  # HF peft refuses the same batch
        theirs(input_ids=_ids(4), adapter_names=["a", "bb", "z", "__base__"])


def test_wrong_length_names_both_numbers(llama_pair):
    _, ours, _ = llama_pair
    with torch.no_grad(), mixed_batch(ours, ["a", "b", "c"]):
        with pytest.raises(ValueError, match=r"adapter_names has 3 names but the batch .* has 5 rows"):
            ours(input_ids=_ids(5))


def test_merged_dora_training_and_nesting_are_refused(llama_pair):
    _, ours, _ = llama_pair
    with pytest.raises(ValueError, match="merged"):
        with mixed_batch(merge_lora(copy.deepcopy(ours)), ["a"]):
            pass
    dora = copy.deepcopy(ours)
    dora.peft_config["b"].use_dora = True  # whatever LoraConfig's fields, mixed_batch reads use_dora
    with pytest.raises(ValueError, match=r"\['b'\] use DoRA"):
        with mixed_batch(dora, ["a", "b"]):
            pass
    with mixed_batch(dora, ["a", "c"]):  # the other adapters still mix
        pass
    with pytest.raises(ValueError, match="model.eval"):
        with mixed_batch(copy.deepcopy(ours).train(), ["a"]):
            pass
    with mixed_batch(ours, ["a"]):
        with pytest.raises(ValueError, match="nested"):
            with mixed_batch(ours, ["b"]):
                pass


# --- the block leaves the model as it was ---------------------------------------------------------------------
def test_normal_behaviour_after_the_block_also_after_an_error(llama_pair):
    base, ours, _ = llama_pair
    set_adapter(ours, "b")
    x = _ids(3)
    with torch.no_grad():
        before = ours(input_ids=x).logits
        with mixed_batch(ours, ["a", "c", "__base__"]):
            ours(input_ids=x)
        torch.testing.assert_close(ours(input_ids=x).logits, before, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="boom"):
            with mixed_batch(ours, ["a", "c", "__base__"]):
                raise RuntimeError("boom")
        torch.testing.assert_close(ours(input_ids=x).logits, before, atol=0, rtol=0)
        with pytest.raises(ValueError, match="3 names"):  # an error raised inside a layer's hook
            with mixed_batch(ours, ["a", "c", "__base__"]):
                ours(input_ids=_ids(2))
        torch.testing.assert_close(ours(input_ids=x).logits, before, atol=0, rtol=0)
        with disable_lora(ours):
            torch.testing.assert_close(ours(input_ids=x).logits, base(input_ids=x).logits, atol=1e-6, rtol=0)
    assert all(layer.adapters.active == ("b" if "b" in layer.adapters else None) for _, layer in lora_layers(ours))
    assert not any(layer._forward_hooks for _, layer in lora_layers(ours))
