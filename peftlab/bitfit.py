"""BitFit: fine-tune only the bias terms of a frozen model (and its new task head).

Every bias trains: those of the query, key, value and output projections, of both feed-forward
layers, and the LayerNorms' shifts (``beta``). For BERT-base that is about 0.1 % of the weights.
Models built without biases (Llama and SmolLM2 use ``bias=False`` everywhere and RMSNorm has no
shift) have nothing for BitFit to train: :func:`apply_bitfit` says so instead of training nothing.

**File format.** HF peft has no BitFit, so peftlab defines one in HF peft's layout:
``adapter_config.json`` holds ``{"peft_type": "BITFIT", "modules_to_save": [...], ...}`` and
``adapter_model.safetensors`` every bias and every ``modules_to_save`` tensor under its parameter
name with HF peft's prefix (``base_model.model.bert.encoder.layer.0.attention.self.query.bias``).
:func:`load_bitfit` applies BitFit to a fresh model and copies them in; HF peft cannot read it.

References:
    - Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
      Transformer-based Masked Language-models", arXiv:2106.10199.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from . import files
from .inject import freeze, matches, train_in_place, unchanged_on_error


@dataclass
class BitFitConfig:
    """What :func:`apply_bitfit` trained besides the biases (kept on the model as ``bitfit_config``)."""

    peft_type: ClassVar[str] = "BITFIT"  # peftlab's own: HF peft has no BitFit
    modules_to_save: list[str] | None = None  # trained in full, e.g. ["classifier"]


def apply_bitfit(model: nn.Module, modules_to_save: list[str] | None = None) -> nn.Module:
    """Freeze ``model``, then let every ``*.bias`` and each module in ``modules_to_save`` train (in place).

    >>> m = apply_bitfit(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
    >>> [n for n, p in m.named_parameters() if p.requires_grad]
    ['0.bias', '1.bias']
    >>> apply_bitfit(nn.Linear(4, 3, bias=False))
    Traceback (most recent call last):
    ...
    ValueError: Linear has no bias parameters (e.g. Llama uses bias=False): BitFit would train nothing
    """
    freeze(model)
    biases = [p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    if not biases:
        raise ValueError(f"{type(model).__name__} has no bias parameters (e.g. Llama uses bias=False): "
                         f"BitFit would train nothing")
    for p in biases:
        p.requires_grad_(True)
    train_in_place(model, modules_to_save or [])
    model.bitfit_config = BitFitConfig(modules_to_save=list(modules_to_save) if modules_to_save else None)
    return model


# --- files: HF peft's layout, peftlab's peft_type "BITFIT" (see the module docstring) -------------
def bitfit_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live trained tensors (every bias, the ``modules_to_save``) under ``base_model.model.<name>``."""
    config = getattr(model, "bitfit_config", None)
    if config is None:
        raise ValueError("this model has no BitFit: apply_bitfit(model) first")
    saved = [n for n, _ in model.named_modules() if n and matches(n, config.modules_to_save or [])]
    return {f"{files.PREFIX}{n}": p for n, p in model.named_parameters()
            if n == "bias" or n.endswith(".bias") or any(n.startswith(m + ".") for m in saved)}


def save_bitfit(model: nn.Module, path) -> int:
    """Write the biases (and ``modules_to_save``) as ``adapter_config.json`` + ``adapter_model.safetensors``.

    >>> import tempfile
    >>> m = apply_bitfit(nn.Sequential(nn.Linear(4, 3)))
    >>> d = tempfile.mkdtemp()
    >>> save_bitfit(m, d) > 0, sorted(files.read_tensors(d))
    (True, ['base_model.model.0.bias'])
    """
    tensors = bitfit_tensors(model)  # says so when BitFit was never applied
    config = dict(asdict(model.bitfit_config), peft_type=BitFitConfig.peft_type, inference_mode=True,
                  base_model_name_or_path=files.base_model_name(model))
    return files.write_adapter(path, config, tensors)


def load_bitfit(model: nn.Module, path) -> nn.Module:
    """Apply BitFit to ``model`` as saved at ``path`` and copy the saved biases (and heads) in.

    Raises :class:`peftlab.files.AdapterFileError` (a ``ValueError``) when the directory is not a
    BitFit file or was made for another model.
    """
    config = files.make_config(path, BitFitConfig, files.read_config(path, BitFitConfig.peft_type))
    tensors = files.read_tensors(path)
    if hasattr(model, "bitfit_config"):
        raise ValueError("this model already has BitFit applied: load into a fresh model")
    with unchanged_on_error(model):  # a file that does not fit leaves the model as it was
        try:
            apply_bitfit(model, config.modules_to_save)
        except ValueError as e:
            raise files.AdapterFileError(f"adapter at {path} does not fit this model: {e}") from None
        files.copy_into(path, bitfit_tensors(model), tensors)
    return model


files.register(BitFitConfig.peft_type, save=save_bitfit, load=load_bitfit,
               applied=lambda model: hasattr(model, "bitfit_config"))
