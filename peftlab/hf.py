"""``transformers.Trainer`` (and TRL's ``SFTTrainer``) with adapter-only checkpoints, as HF peft's ``PeftModel`` gets.

Trainer saves ``model.save_pretrained`` (the whole model) into every ``checkpoint-N/`` unless the model is
HF peft's ``PeftModel``. :class:`AdapterTrainer` is ``Trainer`` with the three hooks Trainer itself routes
through for a ``PeftModel``: ``_save`` writes :func:`peftlab.save_adapter`'s directory (``adapter_config.json``
+ ``adapter_model.safetensors``, HF peft's format: ``PeftModel.from_pretrained`` loads it),
``_load_from_checkpoint`` (``resume_from_checkpoint``) and ``_load_best_model`` copy a checkpoint's adapter
back into the model being trained, in place, so that the optimizer's state still matches its parameters.

Every method with a save format works: LoRA, bottleneck adapters, prefix tuning, prompt tuning, P-tuning,
IA3, BitFit, and their ``modules_to_save`` (a classifier's head). Prefix tuning with ``prefix_projection``
and P-tuning save the prefix their network *produces* (HF peft does the same); resuming needs the network
itself, so their checkpoints also hold ``prompt_encoder.safetensors`` (read by resume only).

>>> import contextlib, io, tempfile, torch, peftlab
>>> from transformers import TrainingArguments
>>> from peftlab.models import build_from_config
>>> model = peftlab.apply_lora(build_from_config("tiny-llama"), peftlab.LoraConfig(r=2))
>>> ids = torch.randint(0, 256, (8,))
>>> out = tempfile.mkdtemp()
>>> args = TrainingArguments(out, max_steps=2, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
>>> with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints its summary
...     _ = AdapterTrainer(model, args, train_dataset=[dict(input_ids=ids, labels=ids)] * 4).train()
>>> sorted(f for f in os.listdir(f"{out}/checkpoint-2") if f.startswith(("adapter", "model")))
['adapter_config.json', 'adapter_model.safetensors']

References:
    - transformers ``Trainer._save`` / ``_load_from_checkpoint`` / ``_load_best_model`` (their ``PeftModel`` branches).
    - HF peft ``PeftModel.save_pretrained`` / ``load_adapter``; TRL ``SFTTrainer``.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn
from transformers import Trainer

from . import files
from .adapters import adapter_tensors
from .bitfit import bitfit_tensors
from .heads import WrapsBase, head_tensors
from .ia3 import ia3_tensors
from .inject import pick_adapter
from .lora import lora_tensors
from .prefix import PrefixTuningModel
from .prompt import PromptTuningModel, SoftPrompt

ENCODER_WEIGHTS = "prompt_encoder.safetensors"  # a reparametrised prefix / P-tuning network, for resuming


def _encoder(model: nn.Module) -> nn.Module | None:
    """The prefix / prompt module of a prompt-learning wrapper (None for the methods that change the model in place)."""
    if isinstance(model, PrefixTuningModel):
        return model.prefix_encoder
    if isinstance(model, PromptTuningModel):
        return model.prompt_encoder
    return None


def _reparametrised(model: nn.Module) -> bool:
    """Whether the adapter file holds an encoder's output rather than its parameters (projection, P-tuning)."""
    if isinstance(model, PrefixTuningModel):
        return model.prefix_encoder.prefix_projection
    return isinstance(model, PromptTuningModel) and not isinstance(model.prompt_encoder, SoftPrompt)


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """File key -> the live tensor of ``model`` it is read into: what resuming copies into a model in place.

    For a reparametrised prefix or prompt only the head is here (its encoder is in :data:`ENCODER_WEIGHTS`).

    >>> import peftlab
    >>> from peftlab.models import build_from_config
    >>> m = peftlab.apply_ia3(build_from_config("tiny-llama"))
    >>> sorted(live_tensors(m))[0]
    'base_model.model.model.layers.0.mlp.down_proj.ia3_l'
    """
    found = files.applied_methods(model)
    if len(found) != 1:
        raise ValueError(f"an adapter checkpoint needs exactly one PEFT method on the model, found {found or 'none'} "
                         f"(methods that can be saved: {sorted(files.METHODS)})")
    peft_type = found[0]
    if peft_type == "LORA":
        return lora_tensors(model, pick_adapter(model, model.peft_config, None))
    if peft_type == "BOTTLENECK_ADAPTER":
        return adapter_tensors(model, pick_adapter(model, model.adapters_config, None))
    if peft_type == "IA3":
        return ia3_tensors(model)
    if peft_type == "BITFIT":
        return bitfit_tensors(model)
    encoder = _encoder(model)
    if encoder is None:
        raise ValueError(f"peftlab.hf does not know where a {peft_type} adapter lives in the model")
    heads = head_tensors(model.base)
    if _reparametrised(model):
        return heads
    weight = encoder.embedding.weight if isinstance(model, PrefixTuningModel) else encoder.embedding
    return {"prompt_embeddings": weight, **heads}


def save_checkpoint_adapter(model: nn.Module, path) -> int:
    """Write the adapter of ``model`` (and a reparametrised encoder) into the directory ``path``; return bytes."""
    from safetensors.torch import save_file

    size = files.save_adapter(model, path)
    if _reparametrised(model):
        file = os.path.join(path, ENCODER_WEIGHTS)
        save_file({k: v.detach().cpu().contiguous() for k, v in _encoder(model).state_dict().items()}, file,
                  metadata={"format": "pt"})
        size += os.path.getsize(file)
    return size


def restore_adapter(model: nn.Module, path) -> nn.Module:
    """Copy the adapter saved at ``path`` into ``model``, which has the same method applied (in place).

    Raises :class:`peftlab.files.AdapterFileError` when the checkpoint holds another method or another shape.
    """
    found = files.applied_methods(model)
    files.read_config(path, tuple(found) or None)  # the same method as the model's, or a clear error
    tensors = files.read_tensors(path)
    live = live_tensors(model)
    if _reparametrised(model):
        file = os.path.join(path, ENCODER_WEIGHTS)
        if not os.path.isfile(file):
            raise files.AdapterFileNotFoundError(f"{file} does not exist: a reparametrised prefix or P-tuning "
                                                 f"network resumes from it (the adapter file holds its output only)")
        from safetensors.torch import load_file

        encoder = _encoder(model).state_dict(keep_vars=True)
        files.copy_into(path, encoder, load_file(file))
        tensors = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
    files.copy_into(path, live, tensors)
    return model


def _base_forward(model: nn.Module):
    """The forward whose arguments name the dataset's columns: the wrapped model's for prefix / prompt tuning."""
    return (model.base if _encoder(model) is not None else model).forward


def move_fused_head_to_base(model: nn.Module) -> bool:
    """Undo TRL's fused LM head on a prefix / prompt wrapper and put it on the wrapped model instead.

    TRL's SFTTrainer (1.16) computes its loss through a "fused LM head": it replaces the forward of the model it is
    given by one that, with ``fused_lm_head=True``, runs ``model.base_model`` (the backbone) and the LM head itself.
    On a wrapper that skips the wrapper, so the virtual tokens never reach the model. HF peft's PeftModel is patched
    on its base instead; so is a peftlab wrapper here: its own forward adds the prefix (or the soft prompt, with
    -100 labels under it) and passes ``fused_lm_head`` on to the base. Returns whether anything was moved.
    """
    patched = model.__dict__.get("forward") if isinstance(model, WrapsBase) else None
    fn = getattr(patched, "__func__", None)
    if fn is None or "original_forward" not in fn.__code__.co_freevars:
        return False  # not TRL's patch
    settings = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__), strict=True))
    from trl.trainer.utils import add_fused_lm_head

    del model.forward  # the wrapper's own forward again
    add_fused_lm_head(model.base, **{k: settings[k] for k in ("temperature", "cast_lm_head_to_fp32", "outputs")
                                     if k in settings})
    return True


class AdapterCheckpoints:
    """The three Trainer hooks that save and load the adapter instead of the model (mix in before a Trainer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        move_fused_head_to_base(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_checkpoint_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        restore_adapter(self.accelerator.unwrap_model(model if model is not None else self.model),
                        resume_from_checkpoint)

    def _load_best_model(self) -> None:
        restore_adapter(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    def _set_signature_columns_if_needed(self) -> None:
        # A prefix / prompt wrapper takes **kwargs: keep the columns the wrapped model reads (Trainer does so
        # for a PeftModel through get_base_model()).
        if self._signature_columns is None:
            names = list(inspect.signature(_base_forward(self.model)).parameters)
            self._signature_columns = names + list({"label", "label_ids", *self.label_names})


def adapter_trainer(trainer_class: type = Trainer) -> type:
    """``trainer_class`` (``Trainer`` or a subclass such as TRL's ``SFTTrainer``) with adapter-only checkpoints.

    >>> adapter_trainer().__name__
    'AdapterTrainer'
    """
    return type(f"Adapter{trainer_class.__name__}", (AdapterCheckpoints, trainer_class),
                {"__doc__": f"{trainer_class.__name__} whose checkpoints hold only the adapter (peftlab.hf)."})


AdapterTrainer = adapter_trainer(Trainer)
