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

from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from . import files
from .inject import Targets, freeze, matches, present, replace_modules, targets_for, train_in_place, unchanged_on_error

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
        self.disabled = False  # True inside disable_ia3(): the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        if self.is_feedforward:
            return self.base(x * self.ia3_l)  # l_ff * f(W_1 x), then W_2
        return self.base(x) * self.ia3_l  # l_k * K or l_v * V


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
        targets, feedforward = targets_for(model, DEFAULT_TARGETS, what="default target_modules and "
                                           "feedforward_modules", hint="pass both")
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("this model already has IA3 vectors")
    freeze(model)
    replace_modules(model, targets, lambda name, mod: IA3Linear(mod, matches(name, feedforward),
                                                                config.init_ia3_weights).to(mod.weight.device),
                    what="layer (IA3 wraps nn.Linear)")
    train_in_place(model, config.modules_to_save or [])
    # The resolved targets, so that a saved config (and HF peft reading it) picks the same modules.
    model.ia3_config = replace(config, target_modules=targets, feedforward_modules=feedforward)
    return model


@contextmanager
def disable_ia3(model: nn.Module):
    """Run the model without its IA3 scaling inside a ``with`` block (``modules_to_save`` train in place and stay).

    >>> from peftlab.models import build_from_config
    >>> m = apply_ia3(build_from_config("tiny-llama"), IA3Config(["k_proj"], [], init_ia3_weights=False))
    >>> layer = m.model.layers[0].self_attn.k_proj
    >>> x = torch.randn(1, 64)
    >>> with disable_ia3(m):
    ...     torch.equal(layer(x), layer.base(x))
    True
    """
    layers = [m for m in model.modules() if isinstance(m, IA3Linear)]
    if not layers:
        raise ValueError("this model has no IA3 vectors: apply_ia3(model) first")
    was = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, w in zip(layers, was, strict=True):
            layer.disabled = w


# --- files: HF peft's on-disk format (``PeftModel.from_pretrained`` loads them) ------------------
def ia3_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live trained tensors under HF peft's keys: every ``ia3_l`` and the ``modules_to_save`` weights.

    HF peft stores a vector as (out, 1), or (1, in) for a feed-forward layer; these are views of ours.
    """
    config = getattr(model, "ia3_config", None)
    if config is None:
        raise ValueError("this model has no IA3 vectors: apply_ia3(model) first")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, IA3Linear):
            shape = (1, -1) if module.is_feedforward else (-1, 1)
            out[f"{files.PREFIX}{name}.ia3_l"] = module.ia3_l.view(shape)
        elif name and matches(name, config.modules_to_save or []):
            out.update({f"{files.PREFIX}{name}.{k}": p for k, p in module.named_parameters()})
    return out


def save_ia3(model: nn.Module, path) -> int:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as HF peft does; return the bytes written.

    ``peft.PeftModel.from_pretrained(base, path)`` loads the result.
    """
    tensors = ia3_tensors(model)
    return files.write_adapter(path, dict(asdict(model.ia3_config), peft_type="IA3", inference_mode=True,
                                          base_model_name_or_path=files.base_model_name(model)), tensors)


def load_ia3(model: nn.Module, path) -> nn.Module:
    """Apply IA3 to ``model`` with the config saved at ``path`` (ours or HF peft's) and copy the vectors in.

    Raises :class:`peftlab.files.AdapterFileError` (a ``ValueError``) when the directory is not an
    IA3 adapter or was made for another model.
    """
    raw = files.read_config(path, "IA3")
    if hasattr(model, "ia3_config"):
        raise ValueError("this model already has IA3 vectors: load into a fresh model")
    # HF peft lists both head names ("classifier", "score") for SEQ_CLS: keep those this model has.
    to_save = present(model, raw.get("modules_to_save") or [])
    config = files.make_config(path, IA3Config, raw, modules_to_save=to_save or None)
    tensors = files.read_tensors(path)
    with unchanged_on_error(model):  # a file that does not fit leaves the model as it was
        try:
            apply_ia3(model, config)
        except ValueError as e:
            raise files.AdapterFileError(f"adapter at {path} does not fit this model: {e}") from None
        files.copy_into(path, ia3_tensors(model), tensors)
    return model


files.register("IA3", save=save_ia3, load=load_ia3, applied=lambda model: hasattr(model, "ia3_config"))
