"""The shared core: one container of named adapters, one switch and one bypass over it, default targets per model.

References here are the unmodified base model (disabled adapters must give its outputs exactly) and the
parameters each adapter owns (only the active one may train).
"""

import pytest
import torch
from torch import nn

from peftlab.adapters import AdapterConfig, apply_adapters
from peftlab.inject import (
    CLASSIFIER_HEADS,
    HEAD_NAMES,
    LM_HEAD,
    ModulesToSave,
    NamedAdapters,
    adapter_containers,
    adapter_names,
    disable_adapters,
    set_adapter,
    targets_for,
    wrap_modules_to_save,
)
from peftlab.lora import DEFAULT_TARGETS, LoraConfig, apply_lora, merge_lora, unmerge_lora
from peftlab.models import build_from_config


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-zero weights for every adapter in every container, so each visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in adapter_containers(model):
            for p in c.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _trainable_owners(model: nn.Module) -> set[str]:
    """The names of the adapters whose parameters require grad (read off the containers, not the names)."""
    return {name for c in adapter_containers(model) for name, m in c.items()
            if any(p.requires_grad for p in m.parameters())}


def _two_lora_model():
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    for name in ("a", "b"):
        apply_lora(model, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), name)
    _randomize(model)
    return model


def _inputs():
    return {"input_ids": torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))}


def test_container_holds_one_active_adapter_and_only_it_trains():
    c = NamedAdapters()
    assert c.active is None
    c.add("a", nn.Linear(2, 2))
    c.add("b", nn.Linear(2, 2))
    assert c.active == "b" and not c["a"].weight.requires_grad and c["b"].weight.requires_grad
    c.activate("a")
    assert c.active == "a" and c["a"].weight.requires_grad and not c["b"].weight.requires_grad
    c.activate(None)
    assert not any(p.requires_grad for p in c.parameters())
    with pytest.raises(ValueError, match=r"adapter 'a' already exists on this layer \(it has \['a', 'b'\]\)"):
        c.add("a", nn.Linear(2, 2))


@pytest.mark.parametrize("method", ["lora", "adapters"])
def test_set_adapter_switches_output_and_what_trains(method):
    if method == "lora":
        model = _two_lora_model()
    else:
        model = build_from_config("tiny-bert", task="classification", num_labels=3)
        apply_adapters(model, AdapterConfig(num_labels=3), "a")
        apply_adapters(model, AdapterConfig(num_labels=3, placement="pfeiffer"), "b")
        _randomize(model)
    x = _inputs()
    assert adapter_names(model) == ["a", "b"] and _trainable_owners(model) == {"b"}  # the newest runs and trains
    with torch.no_grad():
        out_b = model(**x).logits
        set_adapter(model, "a")
        out_a = model(**x).logits
        set_adapter(model, "b")
        assert torch.equal(model(**x).logits, out_b)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    set_adapter(model, "a")
    assert _trainable_owners(model) == {"a"}
    assert all(c.active == "a" for c in adapter_containers(model))
    # every trainable parameter lies in a container: the frozen base stays frozen
    in_containers = {id(p) for c in adapter_containers(model) for p in c.parameters()}
    assert all(id(p) in in_containers for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "adapters"])
def test_disable_runs_the_base_alone_and_restores(method):
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    x = _inputs()
    with torch.no_grad():
        base = model(**x).logits
    if method == "lora":
        apply_lora(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    else:
        apply_adapters(model, AdapterConfig(num_labels=5))
    _randomize(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        adapted = model(**x).logits
        with disable_adapters(model):
            assert all(c.active is None for c in adapter_containers(model))
            assert model.num_labels == 3  # the original head runs, and the loss reads its width
            bare = model(**x).logits
        again = model(**x).logits
    assert torch.equal(bare, base)
    assert torch.equal(again, adapted) and model.num_labels == adapted.shape[-1]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # disabling changes no training


def test_unknown_adapter_lists_the_names_that_exist():
    model = _two_lora_model()
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; this model has \['a', 'b'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match=r"this Linear has no named adapters"):
        set_adapter(nn.Linear(2, 2), "a")


def test_a_merged_adapter_cannot_be_switched_or_bypassed():
    model = _two_lora_model()
    merge_lora(model)
    with pytest.raises(ValueError, match="merged into the base weights: unmerge"):
        set_adapter(model, "a")
    with pytest.raises(ValueError, match="merged into the base weights: unmerge"), disable_adapters(model):
        pass
    unmerge_lora(model)
    set_adapter(model, "a")


def test_modules_to_save_copies_per_adapter_and_runs_the_original_when_none_is_active():
    head = nn.Linear(4, 3)
    model = nn.Sequential(nn.Linear(4, 4), head)
    wrap_modules_to_save(model, "1", "a")
    wrap_modules_to_save(model, "1", "b")  # the existing wrapper gets a second copy, no wrapper in a wrapper
    wrapper = model[1]
    assert isinstance(wrapper, ModulesToSave) and wrapper.original is head and list(wrapper.copies) == ["a", "b"]
    assert sum(isinstance(m, ModulesToSave) for m in model.modules()) == 1
    x = torch.randn(2, 4)
    with torch.no_grad():
        wrapper.copies["b"].weight.add_(1.0)
        assert torch.equal(model(x), nn.Sequential(model[0], wrapper.copies["b"])(x))
        with disable_adapters(model):
            assert torch.equal(model(x), head(model[0](x)))
    with pytest.raises(ValueError, match=r"matched no module\. Top-level modules: \['0', '1'\]"):
        wrap_modules_to_save(model, "classifier", "c")


def test_targets_for_a_model_or_a_model_type():
    assert targets_for("llama", DEFAULT_TARGETS) == ["q_proj", "v_proj"]
    assert targets_for(build_from_config("tiny-bert", task="classification"), DEFAULT_TARGETS) == ["query", "value"]
    with pytest.raises(ValueError, match=r"no default target_modules known for model_type 't5' \(known: \['bert', "
                                         r"'gpt2', 'llama', 'mistral', 'qwen2'\]\); pass target_modules"):
        targets_for("t5", DEFAULT_TARGETS)
    with pytest.raises(ValueError, match=r"no sites known for model_type None .*; name them"):
        targets_for(nn.Linear(2, 2), {"bert": 1}, what="sites", hint="name them")


def test_head_names():
    assert HEAD_NAMES == (*CLASSIFIER_HEADS, LM_HEAD) == ("classifier", "score", "lm_head")
