"""Bottleneck adapters: structure as in the papers' figures, identity at init, closed-form counts, multi-task files.

AdapterHub's ``adapters`` library pins transformers 4.x and cannot be installed beside transformers 5,
so the independent references here are the module names of the placements, hand-derived parameter
counts and the unmodified base model.
"""

import pytest
import torch
from torch import nn

from peftlab.adapters import (
    AdapterConfig,
    AdapterLayer,
    BottleneckAdapter,
    TaskHeads,
    adapter_layers,
    apply_adapters,
    disable_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
    unload_adapters,
)
from peftlab.inject import count_parameters
from peftlab.models import build_from_config


def _inputs(vocab: int = 256, batch: int = 3, length: int = 7):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, vocab, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def _perturb(model: nn.Module, name: str) -> None:
    """Give adapter ``name`` non-zero weights everywhere, so it visibly changes the outputs."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".adapters.{name}." in pname or f".heads.{name}." in pname:
                p.normal_(std=0.2)


TINY = [("tiny-bert", "classification"), ("tiny-llama", "causal_lm")]


@pytest.mark.parametrize("arch,task", TINY)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_untrained_adapter_is_the_identity(arch, task, placement, layer_norm):
    model = build_from_config(arch, task=task)
    x = _inputs()
    with torch.no_grad():
        before = model(**x).logits
        apply_adapters(model, AdapterConfig(placement=placement, layer_norm=layer_norm))
        after = model(**x).logits
    assert adapter_layers(model)
    assert torch.equal(before, after)  # up-projection is zero: h + 0 is exactly h


# The sites are spelled out by hand from the papers' figures and the HF module trees.
EXPECTED_SITES = {
    ("minilm-l6", "houlsby"): {f"bert.encoder.layer.{i}.{s}" for i in range(6)
                               for s in ("attention.output.dense", "output.dense")},
    ("minilm-l6", "pfeiffer"): {f"bert.encoder.layer.{i}.output.dense" for i in range(6)},
    ("smollm2-135m", "houlsby"): {f"model.layers.{i}.{s}" for i in range(30)
                                  for s in ("self_attn.o_proj", "mlp.down_proj")},
    ("smollm2-135m", "pfeiffer"): {f"model.layers.{i}.mlp.down_proj" for i in range(30)},
}


@pytest.mark.parametrize("arch,placement", sorted(EXPECTED_SITES))
def test_placements_wrap_the_sublayer_outputs_of_the_real_architectures(arch, placement):
    task = "classification" if arch == "minilm-l6" else "causal_lm"
    model = build_from_config(arch, task=task, device="meta")  # real module tree, no memory
    apply_adapters(model, AdapterConfig(placement=placement))
    assert {n for n, _ in adapter_layers(model)} == EXPECTED_SITES[arch, placement]


# d, bottleneck and hand-computed trainable counts: sites * (2 d m + d + m [+ 2 d]).
COUNTS = [
    ("minilm-l6", dict(), 384, 24, 12 * (2 * 384 * 24 + 384 + 24)),  # 226,080
    ("minilm-l6", dict(placement="pfeiffer"), 384, 24, 6 * (2 * 384 * 24 + 384 + 24)),
    ("minilm-l6", dict(reduction_factor=8, layer_norm=True), 384, 48, 12 * (2 * 384 * 48 + 384 + 48 + 768)),
    ("smollm2-135m", dict(), 576, 36, 60 * (2 * 576 * 36 + 576 + 36)),
    ("smollm2-135m", dict(placement="pfeiffer", bottleneck_size=64), 576, 64, 30 * (2 * 576 * 64 + 576 + 64)),
]


@pytest.mark.parametrize("arch,kwargs,d,m,expected", COUNTS)
def test_trainable_count_matches_the_closed_form(arch, kwargs, d, m, expected):
    task = "classification" if arch == "minilm-l6" else "causal_lm"
    model = build_from_config(arch, task=task, device="meta")
    apply_adapters(model, AdapterConfig(**kwargs))
    assert count_parameters(model)[0] == expected
    one = next(layer for _, layer in adapter_layers(model)).adapters["default"]
    assert (one.down.weight.shape, one.up.weight.shape) == ((m, d), (d, m))


def test_only_the_active_adapter_and_its_head_require_grad():
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    apply_adapters(model, AdapterConfig(num_labels=3), "a")
    apply_adapters(model, AdapterConfig(num_labels=4, placement="pfeiffer"), "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n or n.startswith("classifier.heads.b.") for n in trainable)
    set_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-2] for n in trainable} == {"down", "up", "a"}  # a's bottlenecks and head "a"
    assert all(".adapters.a." in n or n.startswith("classifier.heads.a.") for n in trainable)


def test_switching_tasks_and_disabling():
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    x = _inputs()
    with torch.no_grad():
        base = model(**x).logits
        apply_adapters(model, AdapterConfig(num_labels=3), "sentiment")
        apply_adapters(model, AdapterConfig(num_labels=5), "topic")
        _perturb(model, "sentiment")
        _perturb(model, "topic")
        topic = model(**x, labels=torch.tensor([0, 4, 2]))  # 5 labels: the loss reads the active head's width
        set_adapter(model, "sentiment")
        sentiment = model(**x, labels=torch.tensor([0, 2, 1]))
        with disable_adapters(model):
            bare = model(**x).logits
        again = model(**x).logits
    assert topic.logits.shape == (3, 5) and sentiment.logits.shape == (3, 3)
    assert torch.isfinite(topic.loss) and torch.isfinite(sentiment.loss)
    assert not torch.allclose(sentiment.logits, base, atol=1e-3)
    assert torch.equal(bare, base)  # disabled: the bare model and its original head
    assert torch.equal(again, sentiment.logits)  # leaving the block restores the active task
    with pytest.raises(ValueError, match="unknown adapter 'news'.*sentiment"):
        set_adapter(model, "news")


def test_unload_gives_the_bare_model_back():
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    x = _inputs()
    with torch.no_grad():
        base = model(**x).logits
    apply_adapters(model, AdapterConfig(num_labels=5), "topic")
    _perturb(model, "topic")
    plain = unload_adapters(model)
    assert not any(isinstance(m, (AdapterLayer, TaskHeads)) for m in plain.modules())
    assert plain.num_labels == plain.config.num_labels == 3 and not hasattr(plain, "adapters_config")
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, base)


def test_save_and_load_one_adapter_alone(tmp_path):
    torch.manual_seed(0)
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    apply_adapters(model, AdapterConfig(num_labels=3, layer_norm=True), "a")
    apply_adapters(model, AdapterConfig(num_labels=5, placement="pfeiffer"), "b")
    _perturb(model, "a")
    _perturb(model, "b")
    x = _inputs()
    with torch.no_grad():
        expected = model(**x).logits  # "b" is active
    size = save_adapter(model, tmp_path / "b", "b")
    fresh = build_from_config("tiny-bert", task="classification", num_labels=3)
    load_adapter(fresh, tmp_path / "b", "b")
    with torch.no_grad():
        assert torch.equal(fresh(**x).logits, expected)
    assert "a" not in fresh.adapters_config  # only the one adapter came along
    # the file holds 2 sites (pfeiffer, 2 layers) * (2*64*4 + 64 + 4) + head 64*5 + 5 floats, plus a json
    floats = 2 * (2 * 64 * 4 + 64 + 4) + 64 * 5 + 5
    assert 4 * floats < size < 4 * floats + 6000


def test_loading_an_adapter_made_for_another_model_fails_clearly(tmp_path):
    small = apply_adapters(build_from_config("tiny-bert", task="classification"), AdapterConfig())
    save_adapter(small, tmp_path / "tiny")
    other = build_from_config("tiny-llama")
    with pytest.raises(ValueError, match="made for another model.*'bert'.*'llama'"):
        load_adapter(other, tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_adapter(other, tmp_path / "nowhere")


def test_bad_configs_and_models_fail_clearly():
    with pytest.raises(ValueError, match=r"placement must be one of \['houlsby', 'pfeiffer'\], got 'parallel'"):
        AdapterConfig(placement="parallel")
    with pytest.raises(ValueError, match="reduction_factor must be a positive integer, got 0"):
        AdapterConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        AdapterConfig(non_linearity="softmax")
    with pytest.raises(ValueError, match="no adapter sites known for model_type None"):
        apply_adapters(nn.Sequential(nn.Linear(4, 4)), AdapterConfig())
    with pytest.raises(ValueError, match="matched no .* Candidates: .*q_proj"):
        apply_adapters(build_from_config("tiny-llama"), AdapterConfig(target_modules=["dense"]))
    model = apply_adapters(build_from_config("tiny-llama"), AdapterConfig())
    with pytest.raises(ValueError, match="already on this model"):
        apply_adapters(model, AdapterConfig())
    with pytest.raises(ValueError, match="num_labels needs a sequence classifier"):
        apply_adapters(model, AdapterConfig(num_labels=3), "second")


def test_adapter_module_math():
    adapter = BottleneckAdapter(8, 2, "relu")
    with torch.no_grad():
        adapter.up.weight.fill_(1.0)
    h = torch.randn(5, 8)
    expected = h + torch.relu(h @ adapter.down.weight.T + adapter.down.bias).sum(-1, keepdim=True)  # up = ones
    assert torch.allclose(adapter(h), expected, atol=1e-6)
    layer = AdapterLayer(nn.Linear(8, 8))
    assert torch.equal(layer(h), layer.base(h))  # no active adapter: the base layer alone


@pytest.mark.slow
def test_a_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    model = build_from_config("tiny-bert", task="classification", num_labels=2)
    apply_adapters(model, AdapterConfig(num_labels=2, reduction_factor=4))
    x = _inputs(batch=32, length=8)
    labels = (x["input_ids"][:, 1] % 2).long()  # the label is a property of the 2nd token
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(**x, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
