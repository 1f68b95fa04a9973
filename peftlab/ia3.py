"""IA3: learned vectors that rescale the keys, the values and the feed-forward activations of a frozen model.

Liu et al. (2022) multiply three activations element-wise by learned vectors that start at one:
``l_k * K`` and ``l_v * V`` in every attention layer and ``l_ff * f(W_1 x)`` in every feed-forward
block. A key or value vector scales a linear layer's *output* (``(W x + b) * l``, bias included, as
HF peft does); the feed-forward vector scales the *input* of the feed-forward output layer
(``W_2 (l_ff * x)``), the same thing as scaling the activation. That is ``2 d_kv + d_ff`` numbers per
layer: 3,840 for a MiniLM layer, far fewer than LoRA.

**Which modules.** HF peft's BERT defaults, ``target_modules=["key", "value", "output.dense"]`` and
``feedforward_modules=["output.dense"]``, match by name suffix, so ``"output.dense"`` also selects
``attention.output.dense`` and scales its *input* (the attention context), which the paper does not
do. peftlab's defaults name the paper's modules exactly.

References:
    - Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
      Learning" (IA3), arXiv:2205.05638.
    - HF peft ``tuners/ia3`` (layout and vector shapes followed here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .inject import Targets, freeze, matches, replace_modules

# (target_modules, feedforward_modules) per model_type: the paper's three places.
DEFAULT_TARGETS: dict[str, tuple[Targets, Targets]] = {
    "bert": (r".*\.attention\.self\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
}


@dataclass
class IA3Config:
    """IA3 hyper-parameters (HF peft's ``IA3Config`` field names).

    >>> IA3Config(target_modules=["key"], feedforward_modules=["output.dense"])
    Traceback (most recent call last):
    ...
    ValueError: feedforward_modules ['output.dense'] must also be in target_modules ['key']
    """

    target_modules: Targets | None = None  # names or one regex; None: the paper's modules for the model type
    feedforward_modules: Targets | None = None  # the subset whose input (not output) is scaled
    modules_to_save: list[str] | None = None  # trained in full, e.g. ["classifier"]
    init_ia3_weights: bool = True  # False: random vectors (tests use it to get a visible effect)

    def __post_init__(self):
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ValueError("give both target_modules and feedforward_modules, or neither (defaults)")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            if not set(self.feedforward_modules) <= set(self.target_modules):
                raise ValueError(f"feedforward_modules {self.feedforward_modules!r} must also be in "
                                 f"target_modules {self.target_modules!r}")


class IA3Linear(nn.Module):
    """A frozen ``nn.Linear`` whose output (or, for a feed-forward layer, input) is scaled by ``ia3_l``.

    >>> layer = IA3Linear(nn.Linear(4, 3), is_feedforward=False)
    >>> x = torch.randn(2, 4)
    >>> torch.equal(layer(x), layer.base(x)), tuple(layer.ia3_l.shape)  # ones: unchanged at step 0
    (True, (3,))
    """

    def __init__(self, base: nn.Linear, is_feedforward: bool, init_ones: bool = True):
        super().__init__()
        self.base, self.is_feedforward = base, is_feedforward
        n = base.in_features if is_feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(n) if init_ones else torch.randn(n), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_feedforward:
            return self.base(x * self.ia3_l)  # l_ff * f(W_1 x), then W_2
        return self.base(x) * self.ia3_l  # l_k * K or l_v * V


def _is_feedforward(name: str, feedforward: Targets) -> bool:
    return re.fullmatch(feedforward, name) is not None if isinstance(feedforward, str) else matches(name, feedforward)


def apply_ia3(model: nn.Module, config: IA3Config | None = None) -> nn.Module:
    """Freeze ``model`` and wrap its key, value and feed-forward output layers in :class:`IA3Linear`.

    >>> from peftlab.models import build_from_config
    >>> m = apply_ia3(build_from_config("tiny-llama"))
    >>> from peftlab.inject import count_parameters
    >>> count_parameters(m)[0]  # per layer: k (32) + v (32) + down_proj input (128); 2 layers
    384
    """
    config = config or IA3Config()
    targets, feedforward = config.target_modules, config.feedforward_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"target_modules and feedforward_modules are required for model_type "
                             f"{model_type!r} (defaults exist for {sorted(DEFAULT_TARGETS)})")
        targets, feedforward = DEFAULT_TARGETS[model_type]
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("this model already has IA3 vectors")
    freeze(model)
    replace_modules(model, targets, lambda name, mod: IA3Linear(mod, _is_feedforward(name, feedforward),
                                                                config.init_ia3_weights).to(mod.weight.device),
                    what="layer (IA3 wraps nn.Linear)")
    for target in config.modules_to_save or []:
        found = [m for n, m in model.named_modules() if n and matches(n, [target])]
        if not found:
            raise ValueError(f"modules_to_save entry {target!r} matched no module")
        for module in found:
            module.requires_grad_(True)
    model.ia3_config = config
    return model


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors: every ``ia3_l`` and the ``modules_to_save`` weights, under the model's names."""
    config = getattr(model, "ia3_config", None)
    if config is None:
        raise ValueError("this model has no IA3 vectors: apply_ia3(model) first")
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if n.endswith("ia3_l") or any(matches(n.rsplit(".", 1)[0], [t]) for t in config.modules_to_save or [])}


def save_ia3(model: nn.Module, path) -> int:
    """Write ``ia3_config.json`` + ``ia3_model.safetensors``; return the bytes written."""
    import json
    import os
    from dataclasses import asdict

    from safetensors.torch import save_file

    tensors = ia3_state_dict(model)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "ia3_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "ia3_config.json"), "w") as f:
        json.dump({"peft_type": "IA3", **asdict(model.ia3_config)}, f, indent=2)
    return sum(os.path.getsize(os.path.join(path, f)) for f in ("ia3_model.safetensors", "ia3_config.json"))


def load_ia3(model: nn.Module, path) -> nn.Module:
    """Apply IA3 to ``model`` with the saved config and copy the saved vectors in (checked against it)."""
    import json
    import os

    from safetensors.torch import load_file

    with open(os.path.join(path, "ia3_config.json")) as f:
        raw = json.load(f)
    if raw.pop("peft_type", None) != "IA3":
        raise ValueError(f"{path} does not hold an IA3 adapter")
    apply_ia3(model, IA3Config(**raw))
    mine, saved = dict(model.named_parameters()), load_file(os.path.join(path, "ia3_model.safetensors"))
    with torch.no_grad():
        for key, value in saved.items():
            if key not in mine or mine[key].shape != value.shape:
                raise ValueError(f"IA3 file at {path} was made for another model: {key} "
                                 f"{tuple(value.shape)} does not fit")
            mine[key].copy_(value)
    return model
