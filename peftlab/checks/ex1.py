"""Checkers for exercise 1 (motivation): parameter counts, bytes of full fine-tuning and of storing copies.

Expected values come from closed forms written here and from a real ``BertModel`` built on the meta
device, never from the student's code.

References:
    - Rajbhandari et al., "ZeRO", arXiv:1910.02054 (16 bytes per parameter for Adam training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .core import Report, bert_config, call


def meta_param_count(config) -> int:
    """Parameters of a real ``BertModel`` (with pooler) built on the meta device: the independent reference."""
    from transformers import BertModel

    with torch.device("meta"):
        model = BertModel(config)
    return sum(p.numel() for p in model.parameters())


def check_param_count(fn: Callable, name: str = "minilm-l6", **overrides) -> None:
    """``fn(config)`` must equal the parameter count of ``BertModel(config)`` (embeddings, layers, pooler)."""
    config = bert_config(name, **overrides)
    shape = (f"V={config.vocab_size}, h={config.hidden_size}, L={config.num_hidden_layers}, "
             f"i={config.intermediate_size}, P={config.max_position_embeddings}, T={config.type_vocab_size}")
    with Report(f"bert_param_count on {name} ({shape})") as r:
        got = call("bert_param_count(config)", fn, config)
        r.expect("parameters of BertModel(config) (counted on the meta device)", meta_param_count(config), got)


def adam_bytes_reference(n_params: int, weight_bytes: int) -> int:
    """Weights + gradients at ``weight_bytes`` + two fp32 Adam moments + an fp32 master copy below fp32."""
    master = 4 if weight_bytes < 4 else 0
    return n_params * (2 * weight_bytes + 8 + master)


def check_full_finetune_bytes(fn: Callable, cases: tuple = ((1_000_000, 4), (1_000_000, 2))) -> None:
    """``fn(n_params, weight_bytes)``: bytes of weights, gradients and Adam state (no activations)."""
    with Report("full_finetune_bytes: weights + gradients + Adam moments (+ fp32 master copy)") as r:
        for n, b in cases:
            got = call(f"full_finetune_bytes({n}, weight_bytes={b})", fn, n, weight_bytes=b)
            r.expect(f"n_params={n:,}, weight_bytes={b} ({adam_bytes_reference(1, b)} bytes/param)",
                     adam_bytes_reference(n, b), got)


def check_storage_bytes(fn: Callable, cases: tuple = ((1_000_000, 10, 1_000, 2),)) -> None:
    """``fn(n_params, n_tasks, adapter_params, bytes_per_param)`` -> ``(full_copies, base_plus_adapters)``."""
    with Report("storage_bytes: N full copies vs one base model + N adapters") as r:
        for n, tasks, a, b in cases:
            got = call("storage_bytes(...)", fn, n, tasks, a, bytes_per_param=b)
            expected = (tasks * n * b, (n + tasks * a) * b)
            r.expect(f"P={n:,}, N={tasks}, adapter={a:,}, {b} B/param", expected,
                     tuple(got) if isinstance(got, (tuple, list)) else got)
