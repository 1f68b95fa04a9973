"""Prompt tuning (soft prompts): P learned vectors prepended to the input embeddings, nothing else.

Where prefix tuning gives *every* layer its own learned keys and values, prompt tuning only adds
P "virtual tokens" at the input: the model embeds the real tokens, the soft prompt (P x d) is
concatenated in front, and the frozen model runs on P + T positions. That is ``P * d`` trainable
numbers (0.01 % of SmolLM2 for P = 20). Lester et al. show it approaches full fine-tuning as
models grow, and that initialising from real word embeddings helps small models.

**Positions and BERT's pooled output.** The virtual tokens take positions ``0 .. P-1`` and the
text starts at P (HF peft's layout, matched here). On BERT that puts them *before* ``[CLS]``, which
moves from position 0 to P. BERT's pooler reads position 0, so the pooled output (and the
classifier's input) is the final hidden state of the *first virtual token*, not of ``[CLS]``:
the pretrained pooler now reads a learned vector that attends to the whole input, and trains
through it. A test asserts this.

**Initialisation.** ``"RANDOM"``: uniform in [-0.5, 0.5] (Lester et al., section 3; HF peft
uses N(0, 1), far larger than real embeddings). ``"SAMPLE_VOCAB"``: embeddings of random vocabulary
tokens. ``"TEXT"``: embeddings of the tokens of ``prompt_tuning_init_text`` (no special tokens),
repeated to fill P as HF peft does; a text *longer* than P is an error here, where HF peft silently
cuts it. HF peft also embeds the special tokens (BERT's ``[CLS]`` and ``[SEP]``); here only the text.

Compared against transformers 5.23.0 and peft 0.21.2.

References:
    - Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691.
    - HF peft ``tuners/prompt_tuning`` and ``PeftModelForCausalLM.forward`` (layout, file format).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from . import files
from .heads import (
    TASK_TYPES,
    WrapsBase,
    base_alone,
    head_tensors,
    refuse_wrapped,
    task_type_of,
    unfreeze_head,
    with_task_type,
)
from .inject import freeze, unchanged_on_error
from .validate import one_of, positive_int

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig:
    """Prompt-tuning hyper-parameters (HF peft's ``PromptTuningConfig`` field names).

    >>> PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT")
    Traceback (most recent call last):
    ...
    ValueError: prompt_tuning_init='TEXT' needs prompt_tuning_init_text, e.g. 'Classify the sentiment:'
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    num_virtual_tokens: int = 20  # P
    prompt_tuning_init: str = "RANDOM"  # "RANDOM" | "SAMPLE_VOCAB" | "TEXT"
    prompt_tuning_init_text: str | None = None
    task_type: str | None = None  # "SEQ_CLS" or "CAUSAL_LM"; None: read from the model

    def __post_init__(self):
        positive_int("num_virtual_tokens", self.num_virtual_tokens)
        one_of("prompt_tuning_init", self.prompt_tuning_init, INITS)
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, "
                             "e.g. 'Classify the sentiment:'")
        one_of("task_type", self.task_type, TASK_TYPES)


class SoftPrompt(nn.Module):
    """The soft prompt itself: a (P, d) parameter, returned as is."""

    def __init__(self, num_virtual_tokens: int, token_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, token_dim).uniform_(-0.5, 0.5))

    def forward(self) -> torch.Tensor:
        return self.embedding  # (P, d)


def text_init_ids(tokenizer, text: str, num_virtual_tokens: int) -> list[int]:
    """Token ids of ``text`` (no special tokens), repeated to fill P; an error if it needs more than P.

    >>> class Tok:  # a stand-in tokenizer: one id per word
    ...     def __call__(self, text, add_special_tokens):
    ...         return {"input_ids": [len(w) for w in text.split()]}
    >>> text_init_ids(Tok(), "Classify the sentiment:", 7)
    [8, 3, 10, 8, 3, 10, 8]
    >>> text_init_ids(Tok(), "Classify the sentiment:", 2)
    Traceback (most recent call last):
    ...
    ValueError: prompt_tuning_init_text 'Classify the sentiment:' is 3 tokens > num_virtual_tokens=2
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {text!r} has no tokens")
    if len(ids) > num_virtual_tokens:
        raise ValueError(f"prompt_tuning_init_text {text!r} is {len(ids)} tokens > "
                         f"num_virtual_tokens={num_virtual_tokens}")
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


class PromptTuningModel(WrapsBase, nn.Module):
    """A frozen causal LM or sequence classifier that reads P learned virtual tokens before its input.

    ``prompt_encoder`` is any module whose ``forward()`` returns the (P, d) virtual tokens:
    a :class:`SoftPrompt` by default, a P-tuning ``PromptEncoder`` for :func:`peftlab.ptuning.apply_ptuning`.

    >>> from peftlab.models import build_from_config
    >>> model = PromptTuningModel(build_from_config("tiny-llama"), PromptTuningConfig(num_virtual_tokens=5))
    >>> from peftlab.inject import count_parameters
    >>> count_parameters(model)[0]  # P * d = 5 * 64
    320
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape  # one output per position: P + T
    torch.Size([1, 8, 256])
    """

    def __init__(self, base: nn.Module, config, tokenizer=None, prompt_encoder: nn.Module | None = None):
        super().__init__()
        if isinstance(base, PromptTuningModel):
            raise ValueError("this model already has a soft prompt")
        self.base, self.peft_config = base, with_task_type(config, base)
        freeze(base)
        embed = base.get_input_embeddings()
        self.prompt_encoder = prompt_encoder or self._soft_prompt(config, embed, tokenizer)
        self.prompt_encoder.to(embed.weight.device)
        self.disabled = False  # True inside disable_prompt(): the base runs alone
        if self.peft_config.task_type == "SEQ_CLS":
            unfreeze_head(base)

    @staticmethod
    def _soft_prompt(config, embed: nn.Embedding, tokenizer) -> SoftPrompt:
        P = config.num_virtual_tokens
        prompt = SoftPrompt(P, embed.embedding_dim)
        init = getattr(config, "prompt_tuning_init", "RANDOM")
        if init == "RANDOM":
            return prompt
        if init == "TEXT":
            if tokenizer is None:
                raise ValueError("prompt_tuning_init='TEXT' needs the tokenizer: "
                                 "PromptTuningModel(base, config, tokenizer)")
            ids = torch.tensor(text_init_ids(tokenizer, config.prompt_tuning_init_text, P))
        else:  # SAMPLE_VOCAB
            ids = torch.randint(0, embed.num_embeddings, (P,))
        with torch.no_grad():
            prompt.embedding.copy_(embed.weight[ids.to(embed.weight.device)].float())  # (P, d)
        return prompt

    def build_inputs(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                     token_type_ids=None) -> dict:
        """The base model's keyword arguments, virtual tokens in front: ``inputs_embeds`` is (B, P+T, d)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.base.get_input_embeddings()(input_ids)  # (B, T, d)
        B, P = inputs_embeds.shape[0], self.peft_config.num_virtual_tokens
        prompts = self.prompt_encoder().to(inputs_embeds.dtype).expand(B, -1, -1)  # (B, P, d)
        out = {"inputs_embeds": torch.cat([prompts, inputs_embeds], dim=1)}  # (B, P + T, d)
        if attention_mask is not None:
            out["attention_mask"] = torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)
        if token_type_ids is not None:  # BERT: the virtual tokens belong to segment 0
            out["token_type_ids"] = torch.cat([token_type_ids.new_zeros(B, P), token_type_ids], dim=1)
        if labels is not None:
            if self.peft_config.task_type == "CAUSAL_LM":  # -100: no loss where a virtual token is the target
                labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
            out["labels"] = labels
        return out

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                token_type_ids=None, **kwargs):
        if self.disabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             labels=labels, token_type_ids=token_type_ids, **kwargs)
        if any(kwargs.get(k) is not None for k in ("position_ids", "past_key_values", "cache")):
            raise ValueError("position_ids and a cache (past_key_values) are not supported: the virtual tokens take "
                             "positions 0..P-1 and the model numbers the rest; use generate() to decode")
        inputs = self.build_inputs(input_ids, attention_mask, inputs_embeds, labels, token_type_ids)
        return self.base(**inputs, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``base.generate`` from the prompted embeddings; returns prompt + new tokens like a plain model.

        Positions come from the extended attention mask, so left padding does not open a gap
        between the virtual tokens and the text: a padded row generates what it generates alone.
        (HF peft 0.21 drops the position ids here and numbers padded rows ``0 .. P+T-1``; on
        unpadded input the two agree token for token.)
        """
        if self.peft_config.task_type != "CAUSAL_LM":
            raise ValueError(f"generate() needs a causal LM, this model is {self.peft_config.task_type}")
        if self.disabled:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        new = self.base.generate(**self.build_inputs(input_ids, attention_mask), **kwargs)  # only new tokens
        return torch.cat([input_ids.repeat_interleave(new.shape[0] // input_ids.shape[0], dim=0), new], dim=1)


def apply_prompt(model: nn.Module, config: PromptTuningConfig | None = None, tokenizer=None) -> PromptTuningModel:
    """Freeze ``model`` and prepend learned virtual tokens; returns the wrapper to train.

    The same as ``PromptTuningModel(model, config, tokenizer)`` (the tokenizer only for ``"TEXT"`` init).

    >>> from peftlab.models import build_from_config
    >>> type(apply_prompt(build_from_config("tiny-llama"), PromptTuningConfig(num_virtual_tokens=2))).__name__
    'PromptTuningModel'
    """
    return PromptTuningModel(model, config or PromptTuningConfig(), tokenizer)


def disable_prompt(model: PromptTuningModel):
    """Run the base model without its virtual tokens inside a ``with`` block (prompt tuning or P-tuning).

    A classifier keeps its trained head.

    >>> from peftlab.models import build_from_config
    >>> m = apply_prompt(build_from_config("tiny-llama"), PromptTuningConfig(num_virtual_tokens=2)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with disable_prompt(m):
    ...     torch.equal(m(ids).logits, m.base(ids).logits)
    True
    """
    return base_alone(model, PromptTuningModel, "disable_prompt", "apply_prompt's or apply_ptuning's result")


# --- files: HF peft's on-disk format (``PeftModel.from_pretrained`` loads them) ------------------
def save_prompt(model: PromptTuningModel, path) -> int:
    """Save the virtual tokens (and a classifier's head) as HF peft does; return the bytes written.

    For P-tuning the file holds the virtual tokens the encoder produces, not the encoder.
    """
    cfg, base = model.peft_config, model.base
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return files.write_adapter(path, dict(
        asdict(cfg), peft_type=cfg.peft_type, token_dim=base.get_input_embeddings().embedding_dim,
        num_layers=text_config.num_hidden_layers, num_attention_heads=text_config.num_attention_heads,
        base_model_name_or_path=files.base_model_name(base), inference_mode=True, num_transformer_submodules=1,
        # HF peft's config insists on a tokenizer for "TEXT" even when it only loads the values.
        tokenizer_name_or_path=files.base_model_name(base) or "unknown",
    ), {"prompt_embeddings": model.prompt_encoder(), **head_tensors(base)})


def load_prompt(base: nn.Module, path) -> PromptTuningModel:
    """Wrap ``base`` with the soft prompt saved at ``path`` (prompt tuning or P-tuning; ours or HF peft's).

    Raises :class:`peftlab.files.AdapterFileError` (a ``ValueError``) when the directory is not a
    soft prompt or was made for another model (other embedding width or task).
    """
    refuse_wrapped(base)
    raw = files.read_config(path, (PromptTuningConfig.peft_type, "P_TUNING"))
    d = base.get_input_embeddings().embedding_dim
    files.check_fields(path, raw, dict(task_type=task_type_of(base), token_dim=d))
    tensors = files.read_tensors(path)
    # A P-tuning file holds f(E) itself, so it loads as a plain soft prompt; its init is already in the values.
    config = files.make_config(path, PromptTuningConfig, raw, prompt_tuning_init="RANDOM",
                               prompt_tuning_init_text=None)
    with unchanged_on_error(base):  # a file that does not fit leaves the model as it was
        model = PromptTuningModel(base, config)
        files.copy_into(path, {"prompt_embeddings": model.prompt_encoder.embedding, **head_tensors(base)}, tensors)
    return model


def is_prompt_model(model: nn.Module, peft_type: str = PromptTuningConfig.peft_type) -> bool:
    """Whether ``model`` is a :class:`PromptTuningModel` of ``peft_type`` (``"P_TUNING"``: an ``apply_ptuning``)."""
    return isinstance(model, PromptTuningModel) and model.peft_config.peft_type == peft_type


files.register(PromptTuningConfig.peft_type, save=save_prompt, load=load_prompt, applied=is_prompt_model)
