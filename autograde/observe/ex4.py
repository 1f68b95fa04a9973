"""Observers of exercise 4 (prefix and prompt tuning): what ``peftlab/checks/ex4.py`` asks, as plain data.

Every ``rep.expect`` / ``rep.close`` of a checker becomes a key of the observation. A random init is returned as
invariants (shape, trainable count, "not all zeros", "within [-0.5, 0.5]"); before a forward the student's prefix or
soft prompt is set to values seeded by the salt, so any correct implementation returns the same keys, values,
embeddings and logits. The models are :func:`core.build_model`'s small real architectures (tiny-llama: grouped-query
attention; tiny-bert: a classifier; tiny-gpt2), weights seeded by the salt; a big config is built on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import core


def _randn(shape, salt: int, *keys, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=core.generator(salt, *keys), dtype=torch.float64).to(dtype)


def _model(name: str, salt: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The checker's ``_model``: a causal LM for Llama/GPT-2, a 3-way classifier for BERT, seeded by the salt."""
    from transformers.utils import logging

    task = "classification" if "bert" in name or name.startswith("minilm") else "causal_lm"
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # tiny-gpt2 keeps GPT-2's bos/eos id outside its vocabulary: a harmless warning
    try:
        return core.build_model(name, task, dtype, num_labels=3, seed=core.seed(salt, "model", name), device=device)
    finally:
        logging.set_verbosity(verbosity)


def _batch(batch: int, length: int, vocab: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a mask; the first row left-padded by 2 (when long enough), as the checker's ``_batch``."""
    ids = torch.randint(3, vocab, (batch, length), generator=core.generator(salt, "batch", batch, length))
    mask = torch.ones_like(ids)
    if length > 3:
        mask[0, :2] = 0
        ids[0, :2] = 0
    return ids, mask


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _seeded_prefix(cls: type, model: nn.Module, P: int, dtype: torch.dtype, salt: int):
    """The checker's ``_student_prefix``: ``cls(config, P)`` holding trained-looking values seeded by the salt."""
    core.seed_everything(salt, "prefix init")
    prefix = cls(model.config, P).to(dtype)
    p = getattr(prefix, "prefix", None)
    if isinstance(p, torch.Tensor):
        with torch.no_grad():
            p.copy_(_randn(p.shape, salt, "prefix", P, dtype=dtype) * 0.5)
    return prefix


# --- prefix tuning ------------------------------------------------------------------------------------
@core.observes("check_prefix_kv")
def prefix_kv(cls: type, name: str = "tiny-llama", P: int = 4, batch: int = 2, dtype: torch.dtype = torch.float32, *,
              salt: int) -> dict:
    """``check_prefix_kv``: the prefix's shape, trainability, count and init; per-layer (K, V) of seeded values; the
    dtype; gradients back to the prefix."""
    model = _model(name, salt, dtype, device="meta")  # only its config is read
    core.seed_everything(salt, "prefix_kv")
    first = cls(model.config, P)
    p = getattr(first, "prefix", None)
    obs = {"shape": _shape(p)}
    if not isinstance(p, torch.Tensor):
        return obs
    obs.update(is_parameter=isinstance(p, nn.Parameter) and p.requires_grad,
               n_trainable=sum(q.numel() for q in first.parameters() if q.requires_grad),
               nonzero_init=bool(p.detach().abs().sum() > 0))
    prefix = _seeded_prefix(cls, model, P, dtype, salt)
    out = prefix(batch)
    pairs = list(out) if isinstance(out, list | tuple) else []
    obs["n_layers"] = len(pairs)
    if not pairs or not all(isinstance(kv, list | tuple) and len(kv) == 2 for kv in pairs):
        return obs
    obs["key_shape"] = _shape(pairs[0][0])
    obs["pairs"] = [(k.detach(), v.detach()) if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
                    else (_shape(k), _shape(v)) for k, v in pairs]
    obs["dtype"] = getattr(pairs[0][0], "dtype", None)
    total = sum(k.sum() + v.sum() for k, v in prefix(batch))
    if isinstance(total, torch.Tensor) and total.requires_grad:
        total.backward()
    grad = prefix.prefix.grad
    obs["grad_reaches_prefix"] = grad is not None and bool(grad.abs().sum() > 0)
    return obs


@core.observes("check_gqa_shapes")
def gqa_shapes(cls: type, name: str = "smollm2-135m", P: int = 10, *, salt: int) -> dict:
    """``check_gqa_shapes``: the prefix's shape and trainable count on a real config (meta device)."""
    model = _model(name, salt, device="meta")
    core.seed_everything(salt, "gqa_shapes")
    prefix = cls(model.config, P)
    return {"shape": _shape(getattr(prefix, "prefix", None)),
            "n_trainable": sum(q.numel() for q in prefix.parameters() if q.requires_grad)}


@core.observes("check_extend_mask")
def extend_mask(fn: Callable, P: int = 3, *, salt: int) -> dict:
    """``check_extend_mask``: the extended (3, P + 5) mask of a random 0/1 mask, its dtype; a float64 mask's dtype."""
    mask = torch.randint(0, 2, (3, 5), generator=core.generator(salt, "mask", P))
    mask[:, -1] = 1  # every row attends to something, as a real mask
    got = fn(mask.clone(), P)
    f = fn(torch.ones(1, 2, dtype=torch.float64), 1)
    return {"shape": _shape(got), "mask": got if isinstance(got, torch.Tensor) else type(got).__name__,
            "dtype": getattr(got, "dtype", None), "float64_dtype": getattr(f, "dtype", None)}


@core.observes("check_prefix_forward")
def prefix_forward(cls: type, extend: Callable, forward: Callable, name: str = "tiny-llama", P: int = 4,
                   batch: int = 2, length: int = 7, dtype: torch.dtype = torch.float32, *, salt: int) -> dict:
    """``check_prefix_forward``: the logits of ``forward(base, prefix, ids, mask)`` with a seeded prefix, whether
    the prefix changed them, and a second call's logits."""
    model = _model(name, salt, dtype)
    prefix = _seeded_prefix(cls, model, P, dtype, salt)
    obs = {"shape": _shape(getattr(prefix, "prefix", None))}
    ids, mask = _batch(batch, length, model.config.vocab_size, salt)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        got = forward(model, prefix, ids, mask)
        got = getattr(got, "logits", got)
        obs["logits"] = got if isinstance(got, torch.Tensor) else type(got).__name__
        obs["changed"] = isinstance(got, torch.Tensor) and got.shape == plain.shape and \
            bool((got - plain).abs().max() > 1e-4)
        again = forward(model, prefix, ids, mask)
        again = getattr(again, "logits", again)
        obs["logits_again"] = again if isinstance(again, torch.Tensor) else type(again).__name__
    return obs


# --- soft prompt (prompt tuning) --------------------------------------------------------------------
@core.observes("check_soft_prompt_init")
def soft_prompt_init(cls: type, name: str = "tiny-llama", P: int = 5, init_ids: tuple = (11, 42, 7),
                     dtype: torch.dtype = torch.float32, *, salt: int) -> dict:
    """``check_soft_prompt_init``: the random prompt's shape, trainability, count, range and dtype; the text init's
    rows; the table left unchanged when the prompt trains."""
    emb = _model(name, salt, dtype).get_input_embeddings()
    core.seed_everything(salt, "soft_prompt_init")
    soft = cls(emb, P)
    p = getattr(soft, "prompt", None)
    obs = {"shape": _shape(p)}
    if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[0] != P:
        return obs
    lo, hi = p.detach().min().item(), p.detach().max().item()
    obs.update(is_parameter=isinstance(p, nn.Parameter) and p.requires_grad,
               n_trainable=sum(q.numel() for q in soft.parameters() if q.requires_grad),
               uniform_init=-0.5 <= lo and hi <= 0.5 and hi - lo > 0.2, dtype=p.dtype)
    table = emb.weight.detach().clone()
    soft = cls(emb, P, list(init_ids))
    obs["text_init"] = soft.prompt.detach().clone()
    with torch.no_grad():
        soft.prompt.add_(1.0)
    obs["table_unchanged"] = torch.equal(table, emb.weight.detach())
    return obs


@core.observes("check_soft_prompt_too_long")
def soft_prompt_too_long(cls: type, P: int = 2, init_ids: tuple = (11, 42, 7), *, salt: int) -> dict:
    """``check_soft_prompt_too_long``: the exception an init text longer than P raises."""
    emb = _model("tiny-llama", salt).get_input_embeddings()
    status, what = core.attempt(cls, emb, P, list(init_ids))
    return {"raised": what if status == "raised" else "nothing"}


@core.observes("check_soft_prompt_forward")
def soft_prompt_forward(cls: type, name: str = "tiny-llama", P: int = 5, batch: int = 2, length: int = 6,
                        dtype: torch.dtype = torch.float32, *, salt: int) -> dict:
    """``check_soft_prompt_forward``: with a seeded prompt, ``(inputs_embeds, mask)``, the base model's logits on
    them, and where the gradients go."""
    model = _model(name, salt, dtype)
    emb = model.get_input_embeddings()
    core.seed_everything(salt, "soft_prompt_forward")
    soft = cls(emb, P)
    with torch.no_grad():  # trained-looking values
        soft.prompt.copy_(_randn(soft.prompt.shape, salt, "prompt", P, dtype=soft.prompt.dtype))
    ids, mask = _batch(batch, length, model.config.vocab_size, salt)
    out = soft(ids, mask)
    embeds, new_mask = out if isinstance(out, tuple | list) and len(out) == 2 else (out, None)
    obs = {"embeds_shape": _shape(embeds)}
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
        return obs
    obs["embeds"] = embeds.detach()  # the prompt in every row, then the token embeddings
    obs["mask"] = new_mask.to(torch.float64) if isinstance(new_mask, torch.Tensor) else type(new_mask).__name__
    with torch.no_grad():
        obs["logits"] = model(inputs_embeds=embeds.detach(), attention_mask=new_mask).logits
    embeds.sum().backward()
    obs["grads"] = [soft.prompt.grad is not None, emb.weight.grad is not None]
    return obs
