"""A merged LoRA MiniLM exported to ONNX gives PyTorch's logits under onnxruntime; nothing else changes."""

import hashlib

import pytest
import torch

from peftlab import LoraConfig, apply_lora
from peftlab.export import export_onnx, merged_copy, run_onnx
from peftlab.lora import LoraLinear
from peftlab.models import build_from_config, minilm_path


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lora(model):
    # random B (init_lora_weights=False): a non-zero update, so a merge that forgot it would show
    return apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                        modules_to_save=["classifier"], init_lora_weights=False))


@pytest.mark.slow
def test_onnx_logits_equal_pytorch_and_nothing_else_changes(minilm, tmp_path):
    checkpoint = minilm_path() / "model.safetensors"
    digest = _sha256(checkpoint)
    model, tokenizer = minilm
    _lora(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "merged.onnx", tokenizer(["trace me"], return_tensors="pt"))
    # other batch size and length than the trace: the axes are dynamic; padding exercises the mask
    x = tokenizer(["I love this airline!", "worst delay ever, never again, three hours on the tarmac", "ok"],
                  return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**x).logits.numpy()
    got = run_onnx(path, x)
    assert got.shape == (3, 3)
    assert abs(got - expected).max() < 1e-4
    # the user's model keeps its unmerged adapters, the checkpoint file is unchanged
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoraLinear)
    assert not model.bert.encoder.layer[0].attention.self.query.adapters.merged
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _sha256(checkpoint) == digest


def test_merged_copy_is_plain_and_equal():
    model = build_from_config("tiny-bert", task="classification", num_labels=3)
    _lora(model.train())  # dropout on: merged_copy must hand back an eval-mode model
    x = torch.randint(0, 256, (2, 6))
    merged = merged_copy(model)
    model.eval()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert any(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


def test_export_needs_a_tokenizer_output(tmp_path):
    with pytest.raises(ValueError, match="missing \\['attention_mask'\\]"):
        export_onnx(build_from_config("tiny-bert", task="classification"), tmp_path / "m.onnx",
                    {"input_ids": torch.tensor([[1, 2]])})
