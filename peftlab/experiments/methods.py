"""The studies' method table: each PEFT method once, with what the comparison and the memory model need of it.

Every method is applied by one function, ``apply(model, tokenizer=None, <its options>, *, head=None)``, which
changes the model in place and returns ``(model to train, save)``; ``save(model, directory)`` writes the file
a user would keep and returns its bytes. ``head`` names a sequence classifier's task head that trains beside
the method, as HF peft's ``modules_to_save`` does (the fine-tuning comparison passes ``"classifier"``); the
memory model passes none and unfreezes the head in place. QLoRA is LoRA whose frozen linears are 4-bit
(:func:`quantize_frozen_linears`, one of :data:`QUANT_BACKENDS`). Imports are inside the functions so that
importing this module stays cheap.

References:
    - Hu et al., "LoRA", arXiv:2106.09685; Dettmers et al., "QLoRA", arXiv:2305.14314.
    - Houlsby et al., arXiv:1902.00751; Pfeiffer et al., "AdapterFusion", arXiv:2005.00247.
    - Li & Liang, "Prefix-Tuning", arXiv:2101.00190; Lester et al., "Prompt Tuning", arXiv:2104.08691.
    - Liu et al. (IA3), arXiv:2205.05638; Ben Zaken et al., "BitFit", arXiv:2106.10199.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..inject import CLASSIFIER_HEADS, HEAD_NAMES, targets_for

SaveFn = Callable[[nn.Module, str], int]  # save(model, directory) -> bytes written


# --- saving what a method trains that has no file format of its own -----------------------------------------
def save_full(model: nn.Module, path: str) -> int:
    """Full fine-tuning's file: the whole model (``save_pretrained``)."""
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in Path(path).iterdir())


def _full(model: nn.Module, tokenizer=None, *, head: str | None = None) -> tuple[nn.Module, SaveFn]:
    for p in model.parameters():
        p.requires_grad_(True)
    return model, save_full


def _lora(model: nn.Module, tokenizer=None, r: int = 8, lora_alpha: float = 16.0,
          target_modules: list[str] | None = None, *, head: str | None = None) -> tuple[nn.Module, SaveFn]:
    from ..lora import DEFAULT_TARGETS, LoraConfig, apply_lora, save_lora

    # Named explicitly (not left to apply_lora's defaults) so the saved config records them.
    targets = list(target_modules) if target_modules else targets_for(model, DEFAULT_TARGETS)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                        modules_to_save=[head] if head else None, task_type="SEQ_CLS" if head else None)
    return apply_lora(model, config), save_lora


def _adapters(placement: str) -> Callable[..., tuple[nn.Module, SaveFn]]:
    def apply(model: nn.Module, tokenizer=None, reduction_factor: int = 16, *,
              head: str | None = None) -> tuple[nn.Module, SaveFn]:
        from ..adapters import AdapterConfig, apply_adapters, save_adapters

        # With a head, the adapter gets a head of its own, starting from the model's (same labels).
        config = AdapterConfig(placement=placement, reduction_factor=reduction_factor,
                               num_labels=model.config.num_labels if head else None)
        return apply_adapters(model, config), save_adapters
    return apply


def _prefix(model: nn.Module, tokenizer=None, num_virtual_tokens: int = 20, prefix_projection: bool = False, *,
            head: str | None = None) -> tuple[nn.Module, SaveFn]:
    from ..prefix import PrefixConfig, PrefixTuningModel, save_prefix

    # A sequence classifier's head trains with the prefix whatever ``head`` says (PrefixTuningModel, as HF peft).
    config = PrefixConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection)
    return PrefixTuningModel(model, config), save_prefix


def _prompt(model: nn.Module, tokenizer=None, num_virtual_tokens: int = 20, prompt_tuning_init: str = "TEXT",
            prompt_tuning_init_text: str | None = "Classify the sentiment:", *,
            head: str | None = None) -> tuple[nn.Module, SaveFn]:
    from ..prompt import PromptTuningConfig, PromptTuningModel, save_prompt

    # Lester et al. (Section 3.2): initialising from real words' embeddings beats random at small scale.
    config = PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=prompt_tuning_init,
                                prompt_tuning_init_text=prompt_tuning_init_text)
    return PromptTuningModel(model, config, tokenizer), save_prompt


def _ia3(model: nn.Module, tokenizer=None, *, head: str | None = None) -> tuple[nn.Module, SaveFn]:
    from ..ia3 import DEFAULT_TARGETS, IA3Config, apply_ia3, save_ia3

    # Named explicitly (not left to apply_ia3's defaults) so the saved config records them.
    targets, feedforward = targets_for(model, DEFAULT_TARGETS, what="IA3 default targets", hint="")
    config = IA3Config(targets, feedforward, modules_to_save=[head] if head else None)
    return apply_ia3(model, config), save_ia3


def _bitfit(model: nn.Module, tokenizer=None, *, head: str | None = None) -> tuple[nn.Module, SaveFn]:
    from ..bitfit import apply_bitfit, save_bitfit

    return apply_bitfit(model, modules_to_save=[head] if head else None), save_bitfit


def classifier_head(model: nn.Module) -> str:
    """The name of a sequence classifier's task head (one of ``inject.CLASSIFIER_HEADS``).

    >>> from peftlab.models import build_from_config
    >>> classifier_head(build_from_config("tiny-bert", task="classification", device="meta"))
    'classifier'
    """
    for name in CLASSIFIER_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has no classification head (looked for {CLASSIFIER_HEADS})")


@dataclass(frozen=True)
class Method:
    """A method of the studies.

    ``apply``: see the module docstring. ``lr``: its AdamW learning rate in the fine-tuning comparison (None: not
    compared). ``claim``: the trainable share (%, task head excluded) the course notes claim, if any.
    ``quantized``: its frozen linears are 4-bit (QLoRA). ``modelled``: the memory model has its formulas.
    """

    apply: Callable[..., tuple[nn.Module, SaveFn]]
    lr: float | None = None
    claim: tuple[float, float] | None = None
    quantized: bool = False
    modelled: bool = False

    @property
    def options(self) -> list[str]:
        """The options ``apply`` takes after ``(model, tokenizer)`` (keyword-only plumbing such as ``head`` aside)."""
        params = list(inspect.signature(self.apply).parameters.values())[2:]
        return [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]


# Learning rates: the usual order of magnitude for each method (its paper or HF peft's examples); the
# methods that train few numbers want larger steps (LoRA paper, App. D; Lester et al. use 0.3 for prompts).
# Claims: the course notes' tables (seeds 001 and 002), which disagree with each other for prefix
# tuning (0.1-0.5 % vs 1-2 %): the union is checked. None: the notes make no claim.
METHODS: dict[str, Method] = {
    "full": Method(_full, lr=5e-5, modelled=True),
    "lora": Method(_lora, lr=1e-3, claim=(0.1, 1.0), modelled=True),
    "qlora": Method(_lora, quantized=True, modelled=True),
    "houlsby": Method(_adapters("houlsby"), lr=1e-3, claim=(1.0, 5.0), modelled=True),
    "pfeiffer": Method(_adapters("pfeiffer"), lr=1e-3, claim=(1.0, 5.0), modelled=True),
    "prefix": Method(_prefix, lr=1e-2, claim=(0.1, 2.0), modelled=True),
    "prompt": Method(_prompt, lr=3e-2, claim=(0.0, 0.1), modelled=True),
    "ia3": Method(_ia3, lr=3e-3),
    "bitfit": Method(_bitfit, lr=1e-3),
}
COMPARED = tuple(name for name, m in METHODS.items() if m.lr is not None)  # the fine-tuning comparison's
MODELLED = tuple(name for name, m in METHODS.items() if m.modelled)  # the memory model's

# QLoRA's 4-bit layer: bitsandbytes' or peftlab.quant.Linear4bit. The third is analytic only: a 4-bit layer whose
# backward keeps each dequantized weight (autograd saving F.linear's weight argument), as peftlab's Linear4bit did
# before MatMul4bit; it predicts the GPU rows measured with that layer. Its string stays the one the committed
# report (reports/memory_comparison.md) and the old measurements were written with.
SAVED_WEIGHT_BACKEND = "peftlab-legacy"
QUANT_BACKENDS = ("bnb", "peftlab", SAVED_WEIGHT_BACKEND)
MEASURED_BACKENDS = ("peftlab", "bnb")  # the layers that exist as code


def apply_method(name: str, model: nn.Module, tokenizer=None, *, head: str | None = None,
                 quant_backend: str | None = "peftlab", **options) -> tuple[nn.Module, SaveFn]:
    """Apply method ``name`` to ``model`` (in place); return ``(model to train, save)``.

    A quantized method (QLoRA) then turns its frozen linears into 4-bit layers of ``quant_backend``
    (None: leave them, e.g. to count parameters). ``options`` go to the method (``r=`` for LoRA).

    >>> from peftlab.models import build_from_config
    >>> from peftlab.inject import count_parameters
    >>> model, save = apply_method("lora", build_from_config("tiny-llama"), r=4)
    >>> count_parameters(model)[0]  # 2 layers x (q: 4 (64 + 64) + v: 4 (64 + 32))
    1792
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    method = METHODS[name]
    for key in options:
        if key not in method.options:
            raise ValueError(f"method {name!r} takes no option {key!r}; its options: {method.options}")
    model, save = method.apply(model, tokenizer, head=head, **options)
    if method.quantized and quant_backend is not None:
        quantize_frozen_linears(model, quant_backend)
    return model, save


def quantize_frozen_linears(model: nn.Module, backend: str) -> None:
    """Replace every frozen body ``nn.Linear`` (LoRA bases included) by a 4-bit layer of ``backend``; heads stay."""
    import torch

    from ..inject import replace_modules

    if backend == "peftlab":
        from ..quant import Linear4bit, QuantConfig

        qc = QuantConfig(compute_dtype=next(model.parameters()).dtype)
        make = lambda name, lin: Linear4bit.from_linear(lin, qc)  # noqa: E731
    elif backend == "bnb":
        import bitsandbytes as bnb

        def make(name, lin):
            layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=lin.weight.dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(lin.weight.device)  # quantizes on .to
            if lin.bias is not None:  # built on meta above: take the real bias (BERT's linears have one)
                layer.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            return layer
    else:  # SAVED_WEIGHT_BACKEND exists as a formula only: it predicts old measurements
        raise ValueError(f"quant_backend must be {' or '.join(map(repr, MEASURED_BACKENDS))} to measure, "
                         f"got {backend!r}")
    replace_modules(model, r".*", make, exclude=list(HEAD_NAMES), what="layer to quantize")
