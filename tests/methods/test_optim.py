"""LoRA+ parameter groups against HF peft's create_loraplus_optimizer on the same models."""

import copy
import re

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from torch import nn

from peftlab import LoraConfig, apply_lora, loraplus_optimizer, loraplus_param_groups
from peftlab.inject import NamedAdapters
from peftlab.lora import LoraAdapter
from peftlab.models import build_from_config


def hf_name(ours: str) -> str:
    """Our parameter name -> HF peft's (``...query.adapters.default.lora_A`` -> ``...query.lora_A.default.weight``)."""
    name = re.sub(r"\.adapters\.(\w+)\.(lora_[AB])$", r".\2.\1.weight", ours)
    name = re.sub(r"\.copies\.(\w+)\.", r".modules_to_save.\1.", name)
    name = re.sub(r"\.base\.(weight|bias)$", r".base_layer.\1", name)
    return "base_model.model." + name


def groups_by_name(model, param_groups, rename=lambda n: n):
    """{(lr, weight_decay): set of parameter names} over the non-empty groups (HF peft keeps empty ones)."""
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    out = {}
    for g in param_groups:
        if g["params"]:
            key = (round(g["lr"], 12), g["weight_decay"])
            out.setdefault(key, set()).update(names[id(p)] for p in g["params"])  # no decay: B's two groups agree
    return out


CASES = {
    # BERT: LoRA on q/v with their biases, the head is a trained copy, one LayerNorm trains too (no decay).
    "bert": ("tiny-bert", "classification", dict(target_modules=["query", "value"], bias="lora_only",
                                                 modules_to_save=["classifier"]), "bert.embeddings.LayerNorm"),
    # BERT, every bias trains (B's group without decay). Not with modules_to_save: peftlab's bias="all" also
    # unfreezes the bias of the frozen original head there, which HF peft does not (a lora.py issue).
    "bert-all-biases": ("tiny-bert", "classification", dict(target_modules=["query", "key", "value"], bias="all"),
                        "bert.encoder.layer.1.output.LayerNorm"),
    # Llama: all projections, an RMSNorm trains (not a LayerNorm: weight decay applies, as in HF).
    "llama": ("tiny-llama", "causal_lm", dict(target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"]),
              "model.layers.0.input_layernorm"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_groups_match_hf_peft(case, weight_decay):
    arch, task, lora_kwargs, norm = CASES[case]
    model = build_from_config(arch, task=task)
    reference = copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, **lora_kwargs))
    theirs = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8, **lora_kwargs))
    model.get_submodule(norm).requires_grad_(True)
    theirs.base_model.model.get_submodule(norm).requires_grad_(True)
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=3e-4, loraplus_lr_ratio=8,
                                    loraplus_weight_decay=weight_decay)
    ours = loraplus_param_groups(model, lr=3e-4, ratio=8, weight_decay=weight_decay)
    expected = groups_by_name(theirs, ref.param_groups)
    assert groups_by_name(model, ours, hf_name) == expected
    assert {lr for lr, _ in expected} >= {round(3e-4, 12), round(3e-4 * 8, 12)}  # A and B: not two empty lists


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_trainable_parameter_exactly_once(case):
    arch, task, lora_kwargs, norm = CASES[case]
    model = apply_lora(build_from_config(arch, task=task), LoraConfig(r=4, **lora_kwargs))
    model.get_submodule(norm).requires_grad_(True)
    grouped = [id(p) for g in loraplus_param_groups(model, lr=1e-3) for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(set(grouped)) == len(grouped)


@pytest.mark.parametrize("ratio", [0, -2.0])
def test_bad_ratio_raises(ratio):
    model = apply_lora(build_from_config("tiny-llama"), LoraConfig(r=2))
    with pytest.raises(ValueError, match="ratio"):
        loraplus_param_groups(model, lr=1e-3, ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        loraplus_optimizer(model, lr=1e-3, ratio=ratio)


def test_sgd_step_moves_b_ratio_times_faster():
    # Closed form: one SGD step changes each parameter by -lr_group * grad.
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    opt = loraplus_optimizer(model, torch.optim.SGD, lr=0.1, ratio=4)
    model(torch.randn(3, 8)).pow(2).sum().backward()
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    ga, gb = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.lora_A.detach(), a0 - 0.1 * ga)
    torch.testing.assert_close(layer.lora_B.detach(), b0 - 0.4 * gb)


def test_lora_on_an_embedding_gets_lr_embedding():
    class EmbeddingLora(nn.Module):  # the shape of a LoRA embedding wrapper: a frozen base, named adapters
        def __init__(self):
            super().__init__()
            self.base = nn.Embedding(10, 4).requires_grad_(False)
            self.adapters = NamedAdapters()
            self.adapters.add("default", LoraAdapter(10, 4, LoraConfig(r=2)))

    model = nn.Sequential(EmbeddingLora(), nn.Linear(4, 4))
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16, lr_embedding=1e-6)
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    adapter = model[0].adapters["default"]
    assert lrs[id(adapter.lora_A)] == lrs[id(adapter.lora_B)] == 1e-6  # HF peft's loraplus_lr_embedding
    assert lrs[id(model[1].weight)] == 1e-3 and lrs[id(model[1].bias)] == pytest.approx(16e-3)  # 1-d: with B
