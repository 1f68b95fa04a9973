"""``doctor(model, optimizer, batch)``: the silent failures of PEFT training, found before they cost a run.

Each check is a fault people have shipped without an error message (HF peft and alpaca-lora issue trackers):

- **not in the optimizer**: a trainable parameter the optimizer does not hold never changes (the optimizer was
  built before the adapter was added);
- **no gradient**: an adapter parameter that a real backward pass does not reach (gradient checkpointing
  enabled with inputs that need no grad, a frozen path, a layer the forward never calls); needs ``batch``;
- **eval mode**: training with ``model.eval()`` turns dropout off and makes transformers skip gradient
  checkpointing, silently;
- **B still zero**: LoRA's B starts at zero; after optimizer steps a B that is still all zero never trained;
- **target kinds**: one entry of ``target_modules`` that matched layers of several kinds (``"dense"`` on BERT is
  the attention output, the FFN's two layers and the pooler), which is rarely what was meant;
- **empty adapter file**: a saved ``adapter_model.safetensors`` with no tensors, or all-zero ones (the 888-byte file).

It prints what it found and returns the findings; it changes nothing (gradients and training mode are
restored after the trial backward).

    >>> import torch.nn as nn
    >>> from peftlab.lora import LoraConfig, apply_lora
    >>> m = apply_lora(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    >>> opt = torch.optim.AdamW([p for n, p in m.named_parameters() if "lora_A" in n])  # forgot B
    >>> [f.kind for f in doctor(m, opt, verbose=False)]
    ['not in the optimizer']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .inject import matches
from .lora import lora_layers

NO_GRADIENT_HINT = ("With gradient checkpointing (reentrant), call model.enable_input_require_grads() or use "
                    "use_reentrant=False; else the forward does not use these layers.")


@dataclass(frozen=True)
class Finding:
    kind: str  # one of the bullet names above
    message: str  # what is wrong, where, and what to do

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def _names(params: list[tuple[str, nn.Parameter]], limit: int = 4) -> str:
    shown = ", ".join(n for n, _ in params[:limit])
    return shown + (f" and {len(params) - limit} more" if len(params) > limit else "")


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Finding]:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if not missing:
        return []
    return [Finding("not in the optimizer", f"{len(missing)} trainable parameters are not in the optimizer and will "
                                            f"never change: {_names(missing)}. Build the optimizer after applying "
                                            f"the adapter, from [p for p in model.parameters() if p.requires_grad].")]


def check_gradients(model: nn.Module, batch: dict) -> list[Finding]:
    """One forward and backward on ``batch`` (its ``loss``, or the sum of the logits); gradients are restored."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in trainable]
    was_training = model.training
    try:
        for _, p in trainable:
            p.grad = None
        model.train()
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None:
            logits = out.logits if hasattr(out, "logits") else out
            loss = logits.float().sum()
        if not loss.requires_grad:  # torch would raise "element 0 of tensors does not require grad"
            return [Finding("no gradient", f"the loss does not depend on any of the {len(trainable)} trainable "
                                           f"parameters ({_names(trainable)}). {NO_GRADIENT_HINT}")]
        loss.backward()
        unreached = [(n, p) for n, p in trainable if p.grad is None]
        # LoRA at init: B = 0, so A's gradient is exactly zero; a layer is dead when neither A nor B moves
        dead = [f"{name} ({adapter_name})" for name, layer in lora_layers(model)
                for adapter_name, a in layer.adapters.items()
                if (trained := [p for p in (a.lora_A, a.lora_B) if p.requires_grad])
                and all(p.grad is None or not p.grad.any() for p in trained)]
    finally:
        for (_, p), g in zip(trainable, saved, strict=True):
            p.grad = g
        model.train(was_training)
    found = []
    if unreached:
        found.append(Finding("no gradient", f"{len(unreached)} trainable parameters got no gradient from a backward "
                                            f"pass: {_names(unreached)}. {NO_GRADIENT_HINT}"))
    if dead and not unreached:
        found.append(Finding("no gradient", f"the LoRA layers {', '.join(dead[:4])} got an all-zero gradient."))
    return found


def check_mode(model: nn.Module, optimizer) -> list[Finding]:
    if optimizer is None or model.training:
        return []
    return [Finding("eval mode", "the model is in eval mode while an optimizer trains it: dropout is off and "
                                 "transformers skips gradient checkpointing. Call model.train() before the loop.")]


def check_b_zero(model: nn.Module, optimizer, trained: bool | None = None) -> list[Finding]:
    """After training (``trained``, or steps in the optimizer's state), a LoRA B that is still all zero."""
    steps = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            step = state.get("step", 0)
            steps = max(steps, int(step.item() if torch.is_tensor(step) else step))
    if steps == 0 and not trained:
        return []  # B = 0 is LoRA's initialisation, not a fault, before the first step
    zero = [f"{name}.{adapter_name}" for name, layer in lora_layers(model) for adapter_name, a in
            layer.adapters.items() if a.lora_B.requires_grad and not a.lora_B.any()]
    if not zero:
        return []
    when = f"after {steps} optimizer steps" if steps else "after training"
    return [Finding("B still zero", f"{when} lora_B is still all zero in {len(zero)} layers "
                                    f"({', '.join(zero[:4])}): they never trained (see 'not in the optimizer' "
                                    f"and 'no gradient').")]


def _kind(name: str) -> str:
    """A name with its layer numbers folded: 'encoder.layer.3.output.dense' -> 'encoder.layer.N.output.dense'"""
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def check_targets(model: nn.Module) -> list[Finding]:
    found = []
    names = [n for n, _ in lora_layers(model)]
    for adapter_name, config in getattr(model, "peft_config", {}).items():
        targets = getattr(config, "target_modules", None)
        if not targets or isinstance(targets, str):
            continue
        for t in targets:
            kinds = sorted({_kind(n) for n in names if matches(n, [t])})
            if len(kinds) > 1:
                found.append(Finding("target kinds", f"adapter {adapter_name!r}: target_modules entry {t!r} matched "
                                                     f"{len(kinds)} kinds of layer: {', '.join(kinds)}. If you meant "
                                                     f"one, give its longer name (e.g. {kinds[0].split('.N.')[-1]!r}) "
                                                     f"or a regex."))
    return found


def check_adapter_file(path) -> list[Finding]:
    from .files import ADAPTER_WEIGHTS, read_tensors

    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        return [Finding("empty adapter file", f"{file} does not exist")]
    tensors = read_tensors(path)
    if not tensors:
        return [Finding("empty adapter file", f"{file} ({file.stat().st_size} bytes) holds no tensors: the adapter "
                                              f"was not found when saving (saved the base model, or before applying).")]
    zero = [k for k, v in tensors.items() if "lora_B" in k and not v.any()]
    if zero and len(zero) == sum("lora_B" in k for k in tensors):
        return [Finding("empty adapter file", f"every lora_B in {file} is all zero: this adapter is the base model "
                                              f"(saved before training, or training never reached it).")]
    return []


def doctor(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, batch: dict | None = None,
           adapter_dir=None, trained: bool | None = None, verbose: bool = True) -> list[Finding]:
    """Run every check that the given objects allow; print the findings (or that none were found) and return them.

    ``trained=True`` says the model has been trained (for the B-still-zero check when the optimizer's state does not
    show it: an optimizer that holds no adapter parameter keeps no state for them).
    """
    found = check_targets(model) + check_mode(model, optimizer)
    if not any(p.requires_grad for p in model.parameters()):
        found.append(Finding("no gradient", "no parameter requires grad: apply a PEFT method before training"))
    if optimizer is not None:
        found += check_optimizer(model, optimizer)
    found += check_b_zero(model, optimizer, trained)
    if batch is not None:
        found += check_gradients(model, batch)
    if adapter_dir is not None:
        found += check_adapter_file(adapter_dir)
    if verbose:
        print("\n".join(map(str, found)) if found else "doctor: no problems found")
    return found
