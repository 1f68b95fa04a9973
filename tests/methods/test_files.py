"""Adapter files for every method: save -> load gives the same logits, and a bad directory gets an error
that names the file and the problem (peftlab.files; one peftlab.save_adapter / load_adapter for all)."""

import json
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab
from peftlab import files
from peftlab.adapters import AdapterConfig, apply_adapters, load_adapters, save_adapters
from peftlab.bitfit import apply_bitfit, load_bitfit, save_bitfit
from peftlab.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError
from peftlab.ia3 import DEFAULT_TARGETS, IA3Config, apply_ia3, load_ia3, save_ia3
from peftlab.lora import LoraConfig, apply_lora, load_lora, save_lora
from peftlab.models import build_from_config
from peftlab.prefix import PrefixConfig, apply_prefix, load_prefix, save_prefix
from peftlab.prompt import PromptTuningConfig, apply_prompt, load_prompt, save_prompt
from peftlab.ptuning import PTuningConfig, apply_ptuning


@dataclass(frozen=True)
class Case:
    """One method: the tiny model it runs on, how to apply it, its save_* / load_* and its peft_type."""

    model: str  # "tiny-bert" (a classifier) or "tiny-llama" (a causal LM)
    apply: Callable[[nn.Module], nn.Module]
    save: Callable
    load: Callable
    peft_type: str


CASES = {
    "lora": Case("tiny-bert", lambda m: apply_lora(m, LoraConfig(r=2, target_modules=["query", "value"],
                                                                 modules_to_save=["classifier"])),
                 save_lora, load_lora, "LORA"),
    "adapters": Case("tiny-bert", lambda m: apply_adapters(m, AdapterConfig(placement="pfeiffer")),
                     save_adapters, load_adapters, "BOTTLENECK_ADAPTER"),
    "prefix": Case("tiny-llama", lambda m: apply_prefix(m, PrefixConfig(num_virtual_tokens=3)),
                   save_prefix, load_prefix, "PREFIX_TUNING"),
    "prefix-seq-cls": Case("tiny-bert", lambda m: apply_prefix(m, PrefixConfig(num_virtual_tokens=3)),
                           save_prefix, load_prefix, "PREFIX_TUNING"),
    "prompt": Case("tiny-bert", lambda m: apply_prompt(m, PromptTuningConfig(num_virtual_tokens=3)),
                   save_prompt, load_prompt, "PROMPT_TUNING"),
    "ptuning": Case("tiny-llama", lambda m: apply_ptuning(m, PTuningConfig(num_virtual_tokens=3)),
                    save_prompt, load_prompt, "P_TUNING"),
    "ia3": Case("tiny-bert", lambda m: apply_ia3(m, IA3Config(*DEFAULT_TARGETS["bert"],
                                                              modules_to_save=["classifier"])),
                save_ia3, load_ia3, "IA3"),
    "bitfit": Case("tiny-bert", lambda m: apply_bitfit(m, ["classifier"]), save_bitfit, load_bitfit, "BITFIT"),
}
IDS = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))


def _base(name: str) -> nn.Module:
    torch.manual_seed(0)  # the same frozen base every time
    return build_from_config(name, task="classification" if name == "tiny-bert" else "causal_lm").eval()


def _trained(case: Case) -> nn.Module:
    """The method applied, with every trainable tensor moved off its init (as training would)."""
    model = case.apply(_base(case.model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    """A classifier's (B, labels) logits, or a causal LM's at the real tokens (B, T, vocab)."""
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return logits[:, -IDS.shape[1]:] if logits.dim() == 3 else logits  # prompt tuning adds P positions


@pytest.fixture(params=list(CASES))
def saved(request, tmp_path):
    """(case, its directory) for each method, saved with its own save_*."""
    case = CASES[request.param]
    assert case.save(_trained(case), tmp_path / "adapter") > 0
    return case, tmp_path / "adapter"


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trip_gives_the_same_logits(name, tmp_path):
    case = CASES[name]
    model = _trained(case)
    assert case.save(model, tmp_path) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert files.read_config(tmp_path)["peft_type"] == case.peft_type
    fresh = _base(case.model)
    assert not torch.allclose(_logits(fresh), _logits(model), atol=1e-4)  # the adapter changes the output
    loaded = case.load(fresh, tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_peftlab_save_adapter_and_load_adapter_dispatch_on_the_method(name, tmp_path):
    case = CASES[name]
    model = _trained(case)
    assert peftlab.save_adapter(model, tmp_path) > 0
    assert files.read_config(tmp_path)["peft_type"] == case.peft_type
    loaded = peftlab.load_adapter(_base(case.model), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)


def test_save_adapter_on_bottleneck_adapters_writes_that_adapter(tmp_path):
    """The top-level save_adapter used to be LoRA's: "no adapter named 'default'" on this model."""
    model = apply_adapters(_base("tiny-bert"), AdapterConfig(placement="houlsby"))
    peftlab.save_adapter(model, tmp_path)
    assert files.read_config(tmp_path, "BOTTLENECK_ADAPTER")["placement"] == "houlsby"


def test_save_adapter_without_a_method_lists_the_methods():
    with pytest.raises(ValueError, match=r"no PEFT method is applied to this BertForSequenceClassification.*'LORA'"):
        peftlab.save_adapter(_base("tiny-bert"), "unused")


def test_one_adapter_methods_refuse_an_adapter_name(tmp_path):
    model = _trained(CASES["prefix"])
    with pytest.raises(ValueError, match="PREFIX_TUNING model holds one adapter: adapter_name='task'"):
        peftlab.save_adapter(model, tmp_path, adapter_name="task")


# --- a corrupt or foreign directory: AdapterFileError naming the file and the problem ---------------
def _raises(fn, file, match):
    with pytest.raises(AdapterFileError, match=match) as info:
        fn()
    assert str(file) in str(info.value), info.value
    return info.value


def test_missing_directory(saved):
    case, path = saved
    err = _raises(lambda: case.load(_base(case.model), path.parent / "nothing"), path.parent / "nothing",
                  "does not exist: is .* an adapter directory")
    assert isinstance(err, FileNotFoundError)  # as open() would say it, for the callers that catch that


def test_missing_config(saved):
    case, path = saved
    (path / ADAPTER_CONFIG).unlink()
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_CONFIG,
            r"does not exist.*holds \['adapter_model.safetensors'\]")


def test_malformed_json(saved):
    case, path = saved
    (path / ADAPTER_CONFIG).write_text('{"peft_type": "LORA",\n  "r": }')
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_CONFIG,
            "is not valid JSON: Expecting value at line 2 column 8")


def test_json_that_is_not_an_object(saved):
    case, path = saved
    (path / ADAPTER_CONFIG).write_text("[1, 2]")
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_CONFIG, "must hold a JSON object.*list")


def _rewrite_config(path, **changes):
    raw = json.loads((path / ADAPTER_CONFIG).read_text())
    (path / ADAPTER_CONFIG).write_text(json.dumps(raw | changes))


def test_another_methods_file(saved):
    case, path = saved
    other = "IA3" if case.peft_type != "IA3" else "LORA"
    _rewrite_config(path, peft_type=other)
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_CONFIG, f"holds a {other} adapter")


def test_unknown_peft_type_lists_the_known_ones(saved):
    case, path = saved
    _rewrite_config(path, peft_type="ADALORA")
    _raises(lambda: peftlab.load_adapter(_base(case.model), path), path / ADAPTER_CONFIG,
            r"holds a 'ADALORA' adapter, which peftlab cannot load; known: \[.*'BITFIT'.*'LORA'")


def test_missing_weights(saved):
    case, path = saved
    (path / ADAPTER_WEIGHTS).unlink()
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_WEIGHTS, "does not exist")


def test_corrupt_weights(saved):
    case, path = saved
    (path / ADAPTER_WEIGHTS).write_bytes(b"\x00\x01 not a safetensors file")
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_WEIGHTS,
            "is not a readable safetensors file")


def _rewrite_weights(path, change):
    tensors = load_file(path / ADAPTER_WEIGHTS)
    change(tensors)
    save_file(tensors, path / ADAPTER_WEIGHTS)


def test_a_tensor_of_the_wrong_shape(saved):
    case, path = saved
    key = sorted(load_file(path / ADAPTER_WEIGHTS))[0]

    def grow(tensors):
        t = tensors[key]
        tensors[key] = torch.zeros(t.shape[0] + 1, *t.shape[1:])
    _rewrite_weights(path, grow)
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_WEIGHTS,
            f"made for another model: .*{key} has shape")


def test_a_missing_key(saved):
    case, path = saved
    key = sorted(load_file(path / ADAPTER_WEIGHTS))[-1]
    _rewrite_weights(path, lambda tensors: tensors.pop(key))
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_WEIGHTS,
            rf"0 unexpected keys .*1 missing \(e.g. \['{key}'\]\)")


def test_an_unexpected_key(saved):
    case, path = saved
    _rewrite_weights(path, lambda tensors: tensors.update({"base_model.model.nowhere.weight": torch.zeros(2)}))
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_WEIGHTS,
            r"1 unexpected keys \(e.g. \['base_model.model.nowhere.weight'\]\), 0 missing")


# --- the small helpers ---------------------------------------------------------------------------
def test_write_adapter_needs_a_peft_type(tmp_path):
    with pytest.raises(ValueError, match="needs a peft_type"):
        files.write_adapter(tmp_path, {"r": 8}, {})


def test_read_config_without_a_peft_type(tmp_path):
    files.write_adapter(tmp_path, {"peft_type": "LORA"}, {})
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    _raises(lambda: files.read_config(tmp_path, "LORA"), tmp_path / ADAPTER_CONFIG, "has no peft_type; expected LORA")
    _raises(lambda: peftlab.load_adapter(_base("tiny-bert"), tmp_path), tmp_path / ADAPTER_CONFIG, "has no peft_type")


BAD_VALUES = {"prefix": ("num_virtual_tokens", 0), "prompt": ("num_virtual_tokens", 0),
              "ptuning": ("num_virtual_tokens", 0), "lora": ("r", 0), "adapters": ("placement", "parallel")}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_config_value_names_the_file(name, tmp_path):
    case, path = CASES[name], tmp_path / "adapter"
    case.save(_trained(case), path)
    field, value = BAD_VALUES[name]
    _rewrite_config(path, **{field: value})
    _raises(lambda: case.load(_base(case.model), path), path / ADAPTER_CONFIG, f"{field}.*{value}")


# --- a load that fails leaves the model as it was; loading twice is refused before anything changes ---
def _state(model: nn.Module):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            {k: v for k, v in vars(model).items() if not k.startswith("_") and k != "training"})


@pytest.mark.parametrize("name", list(CASES))
def test_a_file_that_does_not_fit_leaves_the_model_unchanged(name, tmp_path):
    case, path = CASES[name], tmp_path / "adapter"
    case.save(_trained(case), path)
    key = sorted(load_file(path / ADAPTER_WEIGHTS))[0]
    _rewrite_weights(path, lambda t: t.update({key: torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])}))
    model = _base(case.model)
    before, logits = _state(model), _logits(model)
    with pytest.raises(AdapterFileError, match="made for another model"):
        case.load(model, path)
    assert _state(model) == before
    torch.testing.assert_close(_logits(model), logits, atol=0, rtol=0)
    path.joinpath(ADAPTER_WEIGHTS).unlink()
    case.save(_trained(case), path)  # a good file now loads into the same model
    torch.testing.assert_close(_logits(case.load(model, path).eval()), _logits(_trained(case)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_loading_into_a_model_that_has_it_already_is_refused_first(name, tmp_path):
    case = CASES[name]
    case.save(_trained(case), tmp_path)
    model = case.load(_base(case.model), tmp_path)
    before = _state(model)
    with pytest.raises(ValueError, match="already") as info:
        case.load(model, tmp_path)
    assert not isinstance(info.value, AdapterFileError)  # the model is the problem, not the file
    assert _state(model) == before


@pytest.mark.parametrize("name", ["lora", "adapters"])
def test_save_adapter_picks_the_only_or_the_active_adapter(name, tmp_path):
    model = _base("tiny-bert")
    apply = {"lora": lambda m, n: apply_lora(m, LoraConfig(r=2, target_modules=["query"]), adapter_name=n),
             "adapters": lambda m, n: apply_adapters(m, AdapterConfig(placement="pfeiffer"), adapter_name=n)}[name]
    apply(model, "task")  # the only adapter is not called "default"
    assert peftlab.save_adapter(model, tmp_path / "one") > 0
    apply(model, "other")  # the newest is active
    peftlab.save_adapter(model, tmp_path / "active")
    peftlab.inject.set_adapter(model, "task")
    peftlab.save_adapter(model, tmp_path / "switched")
    with pytest.raises(ValueError, match=r"no adapter named 'default'; this model has \['other', 'task'\]"):
        peftlab.save_adapter(model, tmp_path / "x", adapter_name="default")
    tensors = {d: load_file(tmp_path / d / ADAPTER_WEIGHTS) for d in ("one", "active", "switched")}
    assert tensors["one"].keys() == tensors["switched"].keys()
    assert all(torch.equal(tensors["one"][k], tensors["switched"][k]) for k in tensors["one"])
    assert any(not torch.equal(tensors["one"][k], tensors["active"][k]) for k in tensors["one"])


def test_a_dotted_modules_to_save_entry_round_trips(tmp_path):
    model = apply_lora(_base("tiny-bert"), LoraConfig(r=2, target_modules=["query"],
                                                      modules_to_save=["bert.pooler.dense", "classifier"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    save_lora(model, tmp_path)
    torch.testing.assert_close(_logits(load_lora(_base("tiny-bert"), tmp_path).eval()), _logits(model.eval()))


@pytest.mark.parametrize("name", ["ia3", "prefix", "prompt", "bitfit"])
def test_the_named_adapter_walks_refuse_one_adapter_methods(name):
    model = _trained(CASES[name])
    with pytest.raises(ValueError, match="no named adapters.*disable_"):
        with peftlab.inject.disable_adapters(model):
            pass
    with pytest.raises(ValueError, match="no named adapters"):
        peftlab.inject.set_adapter(model, "default")
