"""Checkers for exercise 4 (prefix and prompt tuning): the student's prefix and soft prompt against peftlab's.

Each checker builds a small real architecture (``tiny-llama``: grouped-query attention, 4 query heads
sharing 2 key/value heads; ``tiny-bert``: a sequence classifier), copies the student's learned values
into peftlab's :class:`~peftlab.prefix.PrefixTuningModel` or :class:`~peftlab.prompt.PromptTuningModel`
(both equal HF peft's logits, see tests/methods/test_prefix_prompt.py) and compares logits.
Shapes come from the model's real module tree (``k_proj.out_features``), never from the student's code.

References:
    - Li & Liang, "Prefix-Tuning", arXiv:2101.00190.
    - Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .core import Report, call, raised_by

TOKENS = ("Classify", "the", "sentiment", ":")


def _model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A small random model of a real architecture: a causal LM for Llama/GPT-2, a 3-way classifier for BERT."""
    from transformers.utils import logging

    from ..models import build_from_config

    task = "classification" if "bert" in name else "causal_lm"
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # nbgrader scores a grade cell with any stderr output as failed
    try:  # (tiny-gpt2 keeps GPT-2's bos/eos id 50256 outside its 256-token vocabulary: a harmless warning)
        return build_from_config(name, task=task, num_labels=3, seed=seed, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)


def _batch(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and a mask; the first row is left-padded by 2 (when long enough) to test the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if length > 3:
        mask[0, :2] = 0
        ids[0, :2] = 0
    return ids, mask


def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` read off the real attention modules (the independent reference)."""
    config = model.config
    heads = config.num_attention_heads
    if hasattr(model, "transformer"):  # GPT-2: one fused Conv1D c_attn of width 3 x hidden (q, k, v)
        layers = model.transformer.h
        width = layers[0].attn.c_attn.weight.shape[1] // 3
        return len(layers), heads, width // heads
    if hasattr(model, "bert"):
        layers = model.bert.encoder.layer
        attn = layers[0].attention.self
        q_out, k_out = attn.query.out_features, attn.key.out_features
    else:
        layers = model.model.layers
        attn = layers[0].self_attn
        q_out, k_out = attn.q_proj.out_features, attn.k_proj.out_features
    head_dim = q_out // heads
    return len(layers), k_out // head_dim, head_dim


def _student_prefix(cls: type, model: nn.Module, P: int, dtype: torch.dtype, seed: int = 1):
    torch.manual_seed(seed)
    prefix = call(f"{cls.__name__}(model.config, num_virtual_tokens={P})", cls, model.config, P)
    prefix = prefix.to(dtype)
    with torch.no_grad():  # a trained-looking prefix, the same for any init the student chose
        g = torch.Generator().manual_seed(seed)
        prefix.prefix.copy_(torch.randn(prefix.prefix.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
    return prefix


def _reference_prefix(model: nn.Module, values: torch.Tensor):
    """peftlab's PrefixTuningModel on a copy of ``model`` holding ``values`` (layers, 2, kv, P, hd)."""
    from ..prefix import PrefixConfig, PrefixTuningModel

    L, _, kv, P, hd = values.shape
    ref = PrefixTuningModel(copy.deepcopy(model), PrefixConfig(num_virtual_tokens=P))
    ref.prefix_encoder.to(values.dtype)
    # peftlab (and HF peft) keep one (P, 2 L kv hd) table: index 2l of the second axis = layer l's keys.
    flat = values.detach().permute(3, 0, 1, 2, 4).reshape(P, 2 * L * kv * hd)  # (P, 2 L kv hd)
    with torch.no_grad():
        ref.prefix_encoder.embedding.weight.copy_(flat)
    return ref.eval()


def check_prefix_kv(cls: type, name: str = "tiny-llama", P: int = 4, batch: int = 2,
                    dtype: torch.dtype = torch.float32) -> None:
    """``cls(config, P)`` holds ``prefix`` (layers, 2, kv_heads, P, head_dim); ``forward(B)`` gives per-layer (K, V)."""
    model = _model(name, dtype)
    L, kv, hd = kv_layout(model)
    with Report(f"{cls.__name__} on {name} ({L} layers, {kv} key/value heads of {hd}), P={P}, batch {batch}, "
                f"{dtype}") as rep:
        torch.manual_seed(0)
        prefix = call(f"{cls.__name__}(model.config, num_virtual_tokens={P})", cls, model.config, P)
        p = getattr(prefix, "prefix", None)
        rep.expect("prefix.shape (layers, 2, kv_heads, P, head_dim)", (L, 2, kv, P, hd),
                   tuple(p.shape) if isinstance(p, torch.Tensor) else None)
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (L, 2, kv, P, hd):
            return
        rep.expect("prefix is a trainable nn.Parameter", True, isinstance(p, nn.Parameter) and p.requires_grad)
        rep.expect("trainable parameters = 2 * layers * P * kv_heads * head_dim", 2 * L * P * kv * hd,
                   sum(q.numel() for q in prefix.parameters() if q.requires_grad))
        rep.expect("prefix is not all zeros (random init)", True, bool(p.detach().abs().sum() > 0))
        prefix = _student_prefix(cls, model, P, dtype)
        values = prefix.prefix.detach()
        out = call(f"prefix({batch})", prefix, batch)
        pairs = list(out) if isinstance(out, (list, tuple)) else []
        rep.expect("forward(batch_size) returns one (key, value) pair per layer", L, len(pairs))
        if len(pairs) != L:
            return
        k0, v0 = pairs[0] if len(pairs[0]) == 2 else (None, None)
        shape = tuple(k0.shape) if isinstance(k0, torch.Tensor) else None
        rep.expect("key shape (batch, kv_heads, P, head_dim) — kv_heads, not query heads", (batch, kv, P, hd), shape)
        if shape != (batch, kv, P, hd):
            return
        last = L - 1
        rep.close(f"layer {last} keys = prefix[{last}, 0] for every row", values[last, 0].expand(batch, -1, -1, -1),
                  pairs[last][0], 0)
        rep.close(f"layer {last} values = prefix[{last}, 1] for every row", values[last, 1].expand(batch, -1, -1, -1),
                  pairs[last][1], 0)
        rep.expect("dtype follows the prefix", dtype, k0.dtype)
        out = call(f"prefix({batch})", prefix, batch)
        total = sum(k.sum() + v.sum() for k, v in out)
        if total.requires_grad:
            total.backward()
        grad = prefix.prefix.grad
        rep.expect("gradients reach the prefix (no detach / copy)", True,
                   grad is not None and bool(grad.abs().sum() > 0))


def check_gqa_shapes(cls: type, name: str = "smollm2-135m", P: int = 10) -> None:
    """On a real config (meta device; SmolLM2: keys are 3 heads x 64 = 192 wide, not hidden_size = 576)."""
    from ..models import build_from_config

    task = "classification" if name.startswith(("minilm", "tiny-bert")) else "causal_lm"
    model = build_from_config(name, task=task, device="meta")
    L, kv, hd = kv_layout(model)
    c = model.config
    with Report(f"{cls.__name__} on {name}'s config: hidden {c.hidden_size}, {c.num_attention_heads} query heads, "
                f"{kv} key/value heads of {hd}") as rep:
        prefix = call(f"{cls.__name__}(config, num_virtual_tokens={P})", cls, c, P)
        p = getattr(prefix, "prefix", None)
        rep.expect("prefix.shape (layers, 2, kv_heads, P, head_dim)", (L, 2, kv, P, hd),
                   tuple(p.shape) if isinstance(p, torch.Tensor) else None)
        rep.expect("trainable parameters (2 * layers * P * k_proj.out_features)", 2 * L * P * kv * hd,
                   sum(q.numel() for q in prefix.parameters() if q.requires_grad))


def check_extend_mask(fn: Callable, P: int = 3) -> None:
    """``fn(mask, P)``: P ones in front of every row, (B, T) -> (B, P + T), same dtype and device."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    with Report(f"extend_attention_mask(mask {tuple(mask.shape)}, P={P})") as rep:
        got = call("extend_attention_mask(mask, P)", fn, mask.clone(), P)
        expected = torch.cat([torch.ones(3, P, dtype=mask.dtype), mask], dim=1)
        rep.expect("shape (B, P + T)", tuple(expected.shape),
                   tuple(got.shape) if isinstance(got, torch.Tensor) else got)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape:
            rep.expect("ones in front (the prefix), the original mask after it", expected.tolist(), got.tolist())
            rep.expect("dtype kept", mask.dtype, got.dtype)
        f = call("extend_attention_mask(float mask, 1)", fn, torch.ones(1, 2, dtype=torch.float64), 1)
        rep.expect("float64 mask stays float64", torch.float64, getattr(f, "dtype", None))


def check_prefix_forward(cls: type, extend: Callable, forward: Callable, name: str = "tiny-llama", P: int = 4,
                         batch: int = 2, length: int = 7, dtype: torch.dtype = torch.float32) -> None:
    """``forward(base, prefix, ids, mask)`` logits equal peftlab's PrefixTuningModel with the same prefix values."""
    model = _model(name, dtype)
    L, kv, hd = kv_layout(model)
    prefix = _student_prefix(cls, model, P, dtype)
    ids, mask = _batch(batch, length, model.config.vocab_size)
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    with Report(f"prefix_forward on {name}, P={P}, ids {tuple(ids.shape)} (row 0 left-padded), {dtype}") as rep:
        if not rep.expect("prefix.shape (layers, 2, kv_heads, P, head_dim)", (L, 2, kv, P, hd),
                          tuple(prefix.prefix.shape)):
            return
        ref = _reference_prefix(model, prefix.prefix)
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=mask).logits
            plain = model(input_ids=ids, attention_mask=mask).logits
            got = call("prefix_forward(base, prefix, input_ids, attention_mask)", forward, model, prefix, ids, mask)
            got = getattr(got, "logits", got)
            rep.close("logits vs peftlab.PrefixTuningModel with the same prefix", expected, got, atol)
            rep.expect("the prefix changes the logits", True,
                       isinstance(got, torch.Tensor) and got.shape == plain.shape
                       and bool((got - plain).abs().max() > 1e-4))
            again = call("prefix_forward a second time", forward, model, prefix, ids, mask)
            rep.close("a second call gives the same logits (a fresh cache per call)", expected,
                      getattr(again, "logits", again), atol)


# --- soft prompt (prompt tuning) --------------------------------------------------------------------
def check_soft_prompt_init(cls: type, name: str = "tiny-llama", P: int = 5, init_ids: tuple = (11, 42, 7),
                           dtype: torch.dtype = torch.float32) -> None:
    """``cls(embedding, P, init_ids)``: a (P, d) parameter, random U(-0.5, 0.5) or the rows of ``init_ids`` repeated."""
    model = _model(name, dtype)
    emb = model.get_input_embeddings()
    d = emb.embedding_dim
    with Report(f"{cls.__name__}(embedding {emb.num_embeddings} x {d}, P={P}) on {name}, {dtype}") as rep:
        torch.manual_seed(0)
        soft = call(f"{cls.__name__}(embedding, {P})", cls, emb, P)
        p = getattr(soft, "prompt", None)
        rep.expect("prompt.shape (P, d)", (P, d), tuple(p.shape) if isinstance(p, torch.Tensor) else None)
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (P, d):
            return
        rep.expect("prompt is a trainable nn.Parameter", True, isinstance(p, nn.Parameter) and p.requires_grad)
        rep.expect("trainable parameters = P * d (the embedding table stays frozen)", P * d,
                   sum(q.numel() for q in soft.parameters() if q.requires_grad))
        lo, hi = p.detach().min().item(), p.detach().max().item()
        rep.expect("random init ~ U(-0.5, 0.5) (Lester et al.)", "values in [-0.5, 0.5], spread > 0.2",
                   f"[{lo:.3f}, {hi:.3f}]", -0.5 <= lo and hi <= 0.5 and hi - lo > 0.2)
        rep.expect("dtype follows the embedding", dtype, p.dtype)
        ids = list(init_ids)
        soft = call(f"{cls.__name__}(embedding, {P}, init_ids={ids})", cls, emb, P, ids)
        rows = (ids * P)[:P]  # the text's ids repeated until P are filled
        rep.close(f"text init: rows {rows} of the embedding table", emb.weight[rows].detach(), soft.prompt, 0)
        with torch.no_grad():
            soft.prompt.add_(1.0)
        rep.expect("the prompt is a copy: training it leaves the embedding table unchanged", True,
                   not torch.equal(emb.weight[rows], soft.prompt.detach()))


def check_soft_prompt_too_long(cls: type, P: int = 2, init_ids: tuple = (11, 42, 7)) -> None:
    """An init text of more tokens than P must raise ``ValueError`` (not be cut silently)."""
    emb = _model("tiny-llama").get_input_embeddings()
    with Report(f"{cls.__name__}(embedding, P={P}, init_ids of {len(init_ids)} tokens)") as rep:
        rep.expect("exception", "ValueError", raised_by(cls, emb, P, list(init_ids)))


def check_soft_prompt_forward(cls: type, name: str = "tiny-llama", P: int = 5, batch: int = 2, length: int = 6,
                              dtype: torch.dtype = torch.float32) -> None:
    """``soft(ids, mask)`` -> ``(inputs_embeds, mask)``; the base model's logits equal peftlab's PromptTuningModel."""
    from ..prompt import PromptTuningConfig, PromptTuningModel

    model = _model(name, dtype)
    emb = model.get_input_embeddings()
    torch.manual_seed(1)
    soft = call(f"{cls.__name__}(embedding, {P})", cls, emb, P)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking values
        soft.prompt.copy_(torch.randn(soft.prompt.shape, generator=g, dtype=torch.float64).to(soft.prompt.dtype))
    ref = PromptTuningModel(copy.deepcopy(model), PromptTuningConfig(num_virtual_tokens=P)).to(dtype).eval()
    with torch.no_grad():
        ref.prompt_encoder.embedding.copy_(soft.prompt)
    ids, mask = _batch(batch, length, model.config.vocab_size)
    d = emb.embedding_dim
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    with Report(f"{cls.__name__} forward on {name}, P={P}, ids {tuple(ids.shape)} (row 0 left-padded), {dtype}") as rep:
        out = call("soft_prompt(input_ids, attention_mask)", soft, ids, mask)
        embeds, new_mask = out if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
        rep.expect("inputs_embeds shape (B, P + T, d)", (batch, P + length, d),
                   tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else None)
        if not isinstance(embeds, torch.Tensor) or tuple(embeds.shape) != (batch, P + length, d):
            return
        rep.close("the first P positions hold the prompt, in every row", soft.prompt.detach().expand(batch, -1, -1),
                  embeds[:, :P], 0)
        rep.close("then the token embeddings", emb(ids).detach(), embeds[:, P:], 0)
        expected_mask = torch.cat([torch.ones(batch, P, dtype=mask.dtype), mask], dim=1)
        rep.expect("attention mask (B, P + T): ones in front", expected_mask.tolist(),
                   new_mask.tolist() if isinstance(new_mask, torch.Tensor) else new_mask)
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=mask).logits
            got = model(inputs_embeds=embeds.detach(), attention_mask=new_mask).logits
        rep.close("base(inputs_embeds, attention_mask) logits vs peftlab.PromptTuningModel", expected, got, atol)
        embeds.sum().backward()
        rep.expect("gradients reach the prompt, not the embedding table", [True, False],
                   [soft.prompt.grad is not None, emb.weight.grad is not None])
