"""What a wrapped model does and where its head is: shared by prefix tuning, prompt tuning and P-tuning.

Those methods wrap a causal LM (``CAUSAL_LM``) or a sequence classifier (``SEQ_CLS``), read the task
from the model, and for a classifier also train its new head (``classifier`` or ``score``), whose
tensors go into the adapter file under HF peft's keys ``base_model.<head>.<param>``.

References:
    - HF peft ``PeftModelForSequenceClassification`` (``modules_to_save`` = the head) and
      ``PeftModel.save_pretrained`` (the head's file keys).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .inject import CLASSIFIER_HEADS  # a sequence classifier's new head: it trains too, as in HF peft

TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", None)  # None: read from the model


def task_type_of(model: nn.Module) -> str:
    """``"SEQ_CLS"`` for a ``*ForSequenceClassification`` model, ``"CAUSAL_LM"`` for a causal LM."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    raise ValueError(f"{name} is neither a *ForSequenceClassification nor a causal LM: prefix and prompt "
                     f"tuning here support those two (load_classifier(), load_causal_lm())")


def with_task_type(config, model: nn.Module):
    """A copy of ``config`` whose ``task_type`` is the model's (the caller's config is left as it is)."""
    task_type = task_type_of(model)
    if config.task_type not in (None, task_type):
        raise ValueError(f"config.task_type={config.task_type!r} but the model is a {task_type} model")
    return replace(config, task_type=task_type)


def unfreeze_head(base: nn.Module) -> None:
    """Let a sequence classifier's head (``classifier`` or ``score``) train: it starts random."""
    heads = [m for n, m in base.named_children() if n in CLASSIFIER_HEADS]
    if not heads:
        children = [n for n, _ in base.named_children()]
        raise ValueError(f"no classification head named {CLASSIFIER_HEADS} among {children}")
    for p in heads[0].parameters():
        p.requires_grad_(True)


def head_tensors(base: nn.Module) -> dict[str, torch.Tensor]:
    """The head's live tensors under HF peft's file keys (``base_model.classifier.weight``...); {} for an LM."""
    return {f"base_model.{n}.{k}": v for n, m in base.named_children() if n in CLASSIFIER_HEADS
            for k, v in m.state_dict(keep_vars=True).items()}


@contextmanager
def base_alone(model: nn.Module, cls: type, caller: str, made_by: str) -> Iterator[nn.Module]:
    """Inside the block, a wrapper of ``cls`` (whose forward reads ``.disabled``) runs its base alone.

    A classifier keeps its trained head: these methods train the base's own head in place.
    """
    if not isinstance(model, cls):
        raise ValueError(f"{caller} needs a {cls.__name__} ({made_by}), got {type(model).__name__}")
    was, model.disabled = model.disabled, True
    try:
        yield model
    finally:
        model.disabled = was


def refuse_wrapped(base: nn.Module) -> None:
    """A prefix or prompt wrapper (a module with ``.base`` and ``.disabled``) cannot take a second one."""
    if isinstance(getattr(base, "base", None), nn.Module) and hasattr(base, "disabled"):
        raise ValueError(f"{type(base).__name__} already wraps a model: load into its .base (or a fresh model)")


class WrapsBase:
    """What a model that wraps its base (prefix, prompt and p-tuning) forwards to it, as HF peft's PeftModel does.

    The wrapper keeps its method's config as ``.peft_config``; ``.config`` is the base model's transformers config,
    which trainers read (TRL's SFTTrainer: ``model.config.model_type``, ``model.add_model_tags``).
    """

    @property
    def config(self):
        return self.base.config

    # The base model's methods that trainers call on the model they are given (transformers.Trainer, TRL).
    FORWARDED: tuple[str, ...] = ("add_model_tags", "gradient_checkpointing_enable", "gradient_checkpointing_disable",
                                  "is_gradient_checkpointing", "enable_input_require_grads", "get_input_embeddings",
                                  "get_output_embeddings", "can_generate", "generation_config", "name_or_path")

    def __getattr__(self, name: str):
        if name in WrapsBase.FORWARDED:
            return getattr(self.base, name)
        return super().__getattr__(name)  # nn.Module's: parameters, buffers, submodules
