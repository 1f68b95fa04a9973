"""Prefix tuning: learned keys and values that every attention layer sees before the real tokens.

Each layer ``l`` gets ``P`` extra key/value pairs ``(K_l, V_l)``, each of shape (kv_heads, P, head_dim).
The real tokens attend to them as if P invisible tokens came first; nothing else in the model
changes and only the prefix trains: ``2 * layers * P * kv_heads * head_dim`` numbers. Li & Liang
found training the prefix directly unstable and reparametrise it with an MLP,
``prefix = W2 tanh(W1 E)`` with ``E`` (P x token_dim); after training only the prefix it produces is kept.

**Positions (HF peft's convention, matched here).** The prefix reaches the model as a key/value
cache of length P, as if P tokens had already been read, so the model numbers the real tokens from
P: Llama rotates them as positions ``P .. P+T-1``, BERT adds the position embeddings ``P .. P+T-1``,
and generation continues from there. The prefix itself carries no position (its keys are used as
learned, never rotated). Numbering the text from 0 would work as well in principle, since the
prefix is not text, but a prefix is tied to the convention it was trained under: matching HF peft
lets prefixes and files move between the two libraries and makes the parity test possible. The
cost: BERT reads at most ``512 - P`` real tokens.

Compared against transformers 5.23.0 and peft 0.21.2, which builds the same ``DynamicCache``;
transformers' cache classes and generation's handling of a pre-filled cache changed across 4.x.

References:
    - Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190.
    - Liu et al., "P-Tuning v2" (prefixes for classifiers), arXiv:2110.07602.
    - HF peft ``tuners/prefix_tuning`` and ``PeftModel.get_prompt`` (layout, file format).
"""

from __future__ import annotations

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
from .models import cache_argument, is_checkpointing
from .validate import one_of, positive_int

# transformers' checkpointed layers set past_key_values=None (a cache cannot be recomputed), which drops the
# prefix; HF peft raises the same error (huggingface/peft#2191).
PREFIX_CHECKPOINTING = ("prefix tuning cannot train with gradient checkpointing: the prefix reaches the layers as "
                        "past_key_values, which transformers drops in checkpointed layers; turn checkpointing off "
                        "(or use prompt tuning, LoRA or adapters)")


@dataclass
class PrefixConfig:
    """Prefix-tuning hyper-parameters (HF peft's ``PrefixTuningConfig`` field names).

    >>> PrefixConfig(num_virtual_tokens=10, prefix_projection=True).encoder_hidden_size is None
    True
    >>> PrefixConfig(num_virtual_tokens=0)
    Traceback (most recent call last):
    ...
    ValueError: num_virtual_tokens (the prefix length P) must be a positive integer, got 0
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    num_virtual_tokens: int = 20  # P, the prefix length
    prefix_projection: bool = False  # True: Li & Liang's MLP reparametrisation
    encoder_hidden_size: int | None = None  # MLP width; None: token_dim (HF peft's default)
    task_type: str | None = None  # "SEQ_CLS" or "CAUSAL_LM"; None: read from the model

    def __post_init__(self):
        positive_int("num_virtual_tokens (the prefix length P)", self.num_virtual_tokens)
        if self.encoder_hidden_size is not None:
            positive_int("encoder_hidden_size", self.encoder_hidden_size)
        one_of("task_type", self.task_type, TASK_TYPES)


def kv_dims(config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config: the shape of one layer's keys.

    For grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads of 64) the keys
    are ``kv_heads * head_dim = 192`` wide, not ``hidden_size = 576``.

    >>> from peftlab.models import arch_config
    >>> kv_dims(arch_config("smollm2-135m")), kv_dims(arch_config("minilm-l6"))
    ((30, 3, 64), (6, 12, 32))
    """
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise ValueError(f"cannot read layers/heads/hidden size from a {type(config).__name__}")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv_heads, head_dim


class PrefixEncoder(nn.Module):
    """Produces the prefix of every layer at once: a (P, 2 * layers * kv_heads * head_dim) tensor.

    Without projection the prefix is the parameter itself; with it, ``E`` (P x token_dim) goes
    through ``Linear -> tanh -> Linear`` (Li & Liang, section 4.3). ``token_dim = kv_heads * head_dim``.

    >>> enc = PrefixEncoder(PrefixConfig(num_virtual_tokens=4), layers=2, kv_heads=3, head_dim=8)
    >>> tuple(enc().shape)  # (P, 2 * layers * kv_heads * head_dim)
    (4, 96)
    """

    def __init__(self, config: PrefixConfig, layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        token_dim = kv_heads * head_dim
        out = 2 * layers * token_dim  # a key and a value per layer
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            # N(0, 1) init, nn.Embedding's default and HF peft's.
            self.embedding = nn.Embedding(config.num_virtual_tokens, out)

    def forward(self) -> torch.Tensor:
        prefix = self.embedding.weight  # (P, token_dim) or (P, out)
        return self.transform(prefix) if self.prefix_projection else prefix  # (P, 2 * L * kv * hd)


class PrefixTuningModel(WrapsBase, nn.Module):
    """A frozen causal LM or sequence classifier whose every attention layer sees a learned prefix.

    >>> from peftlab.models import build_from_config
    >>> base = build_from_config("tiny-llama")  # 2 layers, 2 kv heads of 16
    >>> model = PrefixTuningModel(base, PrefixConfig(num_virtual_tokens=5))
    >>> from peftlab.inject import count_parameters
    >>> count_parameters(model)[0]  # 2 * layers * P * kv_heads * head_dim = 2 * 2 * 5 * 2 * 16
    640
    >>> model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 256])
    """

    def __init__(self, base: nn.Module, config: PrefixConfig):
        super().__init__()
        if isinstance(base, PrefixTuningModel):
            raise ValueError("this model already has a prefix")
        self.base, self.peft_config = base, with_task_type(config, base)
        self.layers, self.kv_heads, self.head_dim = kv_dims(base.config)
        freeze(base)
        self.prefix_encoder = PrefixEncoder(config, self.layers, self.kv_heads, self.head_dim)
        self.prefix_encoder.to(next(base.parameters()).device)
        self.disabled = False  # True inside disable_prefix(): the base runs alone
        if self.peft_config.task_type == "SEQ_CLS":
            unfreeze_head(base)

    def past_key_values(self, batch_size: int):
        """The prefix as a transformers ``DynamicCache`` holding P positions for every layer."""
        from transformers import DynamicCache

        P, L = self.peft_config.num_virtual_tokens, self.layers
        dtype = next(self.base.parameters()).dtype
        kv = self.prefix_encoder().to(dtype)  # (P, 2 * L * kv * hd)
        # HF peft's layout: index 2l holds layer l's keys, 2l + 1 its values.
        kv = kv.view(P, 2 * L, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2L, kv, P, hd)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, kv, P, hd): same prefix per row
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(L)])

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None, **kwargs):
        if self.disabled:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             position_ids=position_ids, **kwargs)
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            raise ValueError("PrefixTuningModel builds the cache itself (the prefix); for decoding "
                             "with a cache use generate()")
        if self.training and is_checkpointing(self.base):
            raise ValueError(PREFIX_CHECKPOINTING)
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        P = self.peft_config.num_virtual_tokens
        if attention_mask is not None:
            # Every real token may attend to all P prefix positions: (B, T) -> (B, P + T).
            attention_mask = torch.cat([attention_mask.new_ones(batch_size, P), attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + P  # the real tokens come after the prefix (see module docstring)
        cache = self.past_key_values(batch_size)
        return self.base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         position_ids=position_ids, **{cache_argument(self.base): cache}, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """``base.generate`` with the prefix pre-filled as the cache; returns prompt + new tokens.

        The attention mask is extended by P ones, so generation numbers positions from the mask
        (``cumsum - 1``) and the real tokens again start at P, left-padded rows included (as in HF
        peft). ``forward()`` numbers every row ``P .. P+T-1`` whatever its padding, as HF peft and a
        plain transformers forward without ``position_ids`` do.
        """
        if self.peft_config.task_type != "CAUSAL_LM":
            raise ValueError(f"generate() needs a causal LM, this model is {self.peft_config.task_type}")
        if self.disabled:
            return self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # generate() repeats every row max(num_beams, num_return_sequences) times (transformers 5.x),
        # but not a cache: build the cache at that size (every row holds the same prefix).
        gen = kwargs.get("generation_config") or self.base.generation_config
        rows = input_ids.shape[0] * max(kwargs.get("num_beams") or gen.num_beams or 1,
                                        kwargs.get("num_return_sequences") or gen.num_return_sequences or 1)
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], self.peft_config.num_virtual_tokens),
                          attention_mask], dim=1)  # (B, P + T)
        # A mask longer than input_ids tells generate() that the cache already holds those P positions.
        return self.base.generate(input_ids=input_ids, attention_mask=mask,
                                  **{cache_argument(self.base): self.past_key_values(rows)}, **kwargs)


def apply_prefix(model: nn.Module, config: PrefixConfig | None = None) -> PrefixTuningModel:
    """Freeze ``model`` and give every attention layer a learned prefix; returns the wrapper to train.

    The same as ``PrefixTuningModel(model, config)``; the base stays reachable as ``.base``.

    >>> from peftlab.models import build_from_config
    >>> type(apply_prefix(build_from_config("tiny-llama"), PrefixConfig(num_virtual_tokens=2))).__name__
    'PrefixTuningModel'
    """
    return PrefixTuningModel(model, config or PrefixConfig())


def disable_prefix(model: PrefixTuningModel):
    """Run the base model without its prefix inside a ``with`` block (a classifier keeps its trained head).

    >>> from peftlab.models import build_from_config
    >>> m = apply_prefix(build_from_config("tiny-llama"), PrefixConfig(num_virtual_tokens=2)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with disable_prefix(m):
    ...     torch.equal(m(ids).logits, m.base(ids).logits)
    True
    """
    return base_alone(model, PrefixTuningModel, "disable_prefix", "apply_prefix's result")


# --- files: HF peft's on-disk format (``PeftModel.from_pretrained`` loads them) ------------------
def save_prefix(model: PrefixTuningModel, path) -> int:
    """Save the prefix (and a classifier's head) as HF peft does; return the bytes written.

    With ``prefix_projection`` the file holds the prefix the MLP produces, not the MLP: the
    reparametrisation only helps training (HF peft does the same).
    """
    cfg, token_dim = model.peft_config, model.kv_heads * model.head_dim
    tensors = {"prompt_embeddings": model.prefix_encoder(), **head_tensors(model.base)}
    return files.write_adapter(path, dict(
        asdict(cfg), peft_type=cfg.peft_type, num_layers=model.layers, num_attention_heads=model.kv_heads,
        token_dim=token_dim, encoder_hidden_size=cfg.encoder_hidden_size or token_dim,
        base_model_name_or_path=files.base_model_name(model.base), inference_mode=True,
        num_transformer_submodules=1,
    ), tensors)


def load_prefix(base: nn.Module, path) -> PrefixTuningModel:
    """Wrap ``base`` with the prefix saved at ``path`` (by :func:`save_prefix` or by HF peft).

    Raises :class:`peftlab.files.AdapterFileError` (a ``ValueError``) when the directory is not a
    prefix or was made for another model (other layer count or key width).
    """
    refuse_wrapped(base)
    raw = files.read_config(path, PrefixConfig.peft_type)
    layers, kv_heads, head_dim = kv_dims(base.config)
    files.check_fields(path, raw, dict(task_type=task_type_of(base), num_layers=layers,
                                       num_attention_heads=kv_heads, token_dim=kv_heads * head_dim))
    tensors = files.read_tensors(path)
    # No projection: the file holds the prefix itself.
    with unchanged_on_error(base):  # a file that does not fit leaves the model as it was
        model = PrefixTuningModel(base, files.make_config(path, PrefixConfig, raw, prefix_projection=False,
                                                          encoder_hidden_size=None))
        files.copy_into(path, {"prompt_embeddings": model.prefix_encoder.embedding.weight, **head_tensors(base)},
                        tensors)
    return model


files.register(PrefixConfig.peft_type, save=save_prefix, load=load_prefix,
               applied=lambda model: isinstance(model, PrefixTuningModel))
