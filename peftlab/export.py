"""Deploy a LoRA model: merge the updates into the weights of a copy and export that to ONNX.

After ``W <- W + (alpha / r) B A`` the model is a plain transformers model again: no wrapper, no
extra matrix product, and any runtime that reads ONNX can serve it. The export works on a deep
copy, so the model in memory keeps its (unmerged) adapters and the base checkpoint on disk is
never written.

References:
    - Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685 (Section 4.2:
      no added inference latency after merging).
    - PyTorch ``torch.onnx.export``; ONNX Runtime (onnxruntime.ai).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .lora import is_lora_model, unload_lora

INPUT_NAMES = ("input_ids", "attention_mask")


class _Logits(nn.Module):
    """The exported graph: token ids and mask in, logits out (no dicts, no optional outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every LoRA update merged in and the wrappers removed; ``model`` is untouched."""
    merged = unload_lora(copy.deepcopy(model), merge=True) if is_lora_model(model) else copy.deepcopy(model)
    return merged.eval()


def export_onnx(model: nn.Module, path, example: dict[str, torch.Tensor], opset: int = 18) -> Path:
    """Merge a copy of ``model`` and write it to ``path`` (an ``.onnx`` file); batch and length stay dynamic.

    ``example`` is a tokenizer output (``input_ids`` and ``attention_mask``) used to trace the graph.

    Usage (``tests/methods/test_export.py`` runs it on MiniLM-L6)::

        path = export_onnx(model, "model.onnx", tokenizer(["hi"], return_tensors="pt"))
    """
    missing = [k for k in INPUT_NAMES if k not in example]
    if missing:
        raise ValueError(f"example must hold {list(INPUT_NAMES)} (a tokenizer's output); missing {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _Logits(merged_copy(model)).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        torch.onnx.export(graph, tuple(example[k] for k in INPUT_NAMES), str(path), input_names=list(INPUT_NAMES),
                          output_names=["logits"], opset_version=opset, dynamo=True, external_data=False,
                          dynamic_shapes={k: {0: batch, 1: seq} for k in INPUT_NAMES}, verbose=False)
    return path


def run_onnx(path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """Run an exported model with onnxruntime on the CPU; return the logits."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {k: inputs[k].numpy().astype(np.int64) for k in INPUT_NAMES})[0]
