"""Checkers for exercise 2 (LoRA): the student's layer, injection, merge, counts and files against peftlab's.

Expected values come from closed forms (``r (d + k)`` parameters, ``B = 0`` at init, the ``alpha / r``
scaling), from peftlab's reference :mod:`peftlab.lora` holding the same weights, and from HF peft.

References:
    - Hu et al., "LoRA", arXiv:2106.09685 (shapes, init and the alpha / r scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .core import Report, call, raised_by, tiny_model


def _lora_layer(cls, d: int, k: int, r: int, alpha: float, dtype=torch.float32, dropout: float | None = None,
                seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(k, d).to(dtype)
    kwargs = {} if dropout is None else {"lora_dropout": dropout}
    return base, call(f"{cls.__name__}(nn.Linear({k}, {d}), r={r}, lora_alpha={alpha})", cls, base, r, alpha,
                       **kwargs)


def check_lora_init(cls: type, d: int = 32, k: int = 16, r: int = 4, alpha: float = 8.0,
                    dtype: torch.dtype = torch.float32) -> None:
    """Shapes A (r x k), B (d x r); B zero; A Kaiming-uniform; base frozen; scaling alpha / r; identity at init."""
    base, layer = _lora_layer(cls, d, k, r, alpha, dtype)
    with Report(f"{cls.__name__}(nn.Linear({k} -> {d}), r={r}, lora_alpha={alpha}), {dtype}, seed 0") as rep:
        a, b = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        rep.expect("layer.base is the wrapped nn.Linear", True, getattr(layer, "base", None) is base)
        rep.expect("lora_A.shape (r, k)", (r, k), tuple(a.shape) if a is not None else None)
        rep.expect("lora_B.shape (d, r)", (d, r), tuple(b.shape) if b is not None else None)
        if a is None or b is None or tuple(a.shape) != (r, k) or tuple(b.shape) != (d, r):
            return
        rep.expect("lora_A, lora_B are trainable nn.Parameters", True,
                   isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and a.requires_grad and b.requires_grad)
        rep.expect("base weight and bias frozen (requires_grad False)", [False, False],
                   [base.weight.requires_grad, base.bias.requires_grad])
        rep.expect("lora_B starts at zero", True, bool((b == 0).all()))
        bound = 1 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(k), 1/sqrt(k)), as nn.Linear
        spread = a.detach().double().abs().max().item()
        rep.expect("lora_A ~ U(-1/sqrt(k), 1/sqrt(k)) (Kaiming-uniform, a=sqrt(5))", f"max |A| <= {bound:.4f}, "
                   f"not all zero", f"max |A| = {spread:.4f}", 0 < spread <= bound + 1e-6 and a.std() > bound / 4)
        rep.expect("dtype of A and B follows the base layer", [dtype, dtype], [a.dtype, b.dtype])
        rep.expect("scaling = lora_alpha / r", alpha / r, getattr(layer, "scaling", None),
                   ok=math.isclose(float(getattr(layer, "scaling", float("nan"))), alpha / r))
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        rep.expect("trainable parameters = r (d + k)", r * (d + k), trainable)
        x = torch.randn(3, k, dtype=dtype)
        with torch.no_grad():
            rep.close("output at init equals base(x) (B = 0)", base(x), call("layer(x)", layer, x), 1e-6)


def check_lora_forward(cls: type, d: int = 32, k: int = 16, r: int = 4, alpha: float = 8.0,
                       dtype: torch.dtype = torch.float32, lead: tuple[int, ...] = (2, 5)) -> None:
    """With non-zero B: ``forward(x) == x W^T + b + (alpha / r) x A^T B^T`` and ``delta_weight() == (alpha/r) B A``."""
    base, layer = _lora_layer(cls, d, k, r, alpha, dtype)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(d, r, dtype=dtype))  # a trained-looking update
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), alpha / r
    x = torch.randn(*lead, k, dtype=dtype)
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    with Report(f"{cls.__name__} forward, d={d}, k={k}, r={r}, alpha={alpha}, x {tuple(x.shape)} {dtype}") as rep:
        expected = x @ base.weight.T + base.bias + s * (x @ a.T @ b.T)  # (..., d)
        with torch.no_grad():
            got = call("layer(x)", layer, x)
            rep.close("h = W x + b + (alpha / r) B A x", expected.detach(), got, atol)
            rep.expect("output dtype", dtype, getattr(got, "dtype", None))
            rep.close("delta_weight() = (alpha / r) B A, shape (d, k)", s * b @ a,
                      call("layer.delta_weight()", layer.delta_weight), atol)
        out = call("layer(x)", layer, x)
        out.sum().backward()
        rep.expect("gradients reach A and B, not the base", [True, True, False],
                   [layer.lora_A.grad is not None, layer.lora_B.grad is not None, base.weight.grad is not None])


def check_lora_dropout(cls: type, d: int = 8, k: int = 8, r: int = 2) -> None:
    """Dropout acts on the LoRA path only: in train mode with B = 0 the output is still exactly base(x)."""
    base, layer = _lora_layer(cls, d, k, r, 4.0, dropout=0.5)
    layer.train()
    x = torch.randn(64, k)
    with Report("lora_dropout=0.5, train mode, B = 0") as rep, torch.no_grad():
        rep.close("output equals base(x): dropout must not touch the frozen path", base(x), layer(x), 1e-6)


def _linear_shapes(model: nn.Module, targets) -> dict[str, tuple[int, int]]:
    """Independent matcher (HF peft's rule: equal, or ends with "." + target), nn.Linear only."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}


def check_add_lora(add_lora: Callable, cls: type, name: str = "tiny-bert", targets=("query", "value"),
                   r: int = 4, alpha: float = 8.0) -> None:
    """``add_lora(model, targets, r, alpha)`` wraps exactly the matching nn.Linear layers in ``cls``, rest frozen."""
    model = tiny_model(name)
    expected = _linear_shapes(model, targets)
    ids = torch.randint(5, 200, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with Report(f"add_lora on {name}, target_modules={list(targets)}, r={r}") as rep:
        got = call("add_lora(model, ...)", add_lora, model, list(targets), r=r, lora_alpha=alpha)
        rep.expect("returned names (in named_modules order)", list(expected), list(got) if got is not None else None)
        wrapped = [n for n, m in model.named_modules() if isinstance(m, cls)]
        rep.expect(f"modules that are now {cls.__name__}", list(expected), wrapped)
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        bad = [n for n in trainable if not n.endswith(("lora_A", "lora_B"))]
        rep.expect("trainable parameters other than lora_A / lora_B", [], bad[:4])
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rep.expect("trainable count = sum of r (d + k)", sum(r * (d + k) for d, k in expected.values()), n_train)
        with torch.no_grad():
            rep.close("logits unchanged right after injection (B = 0)", before, model(input_ids=ids).logits, 1e-5)


def check_add_lora_no_match(add_lora: Callable) -> None:
    """A target that matches nothing must raise ``ValueError`` (a typo must not silently train nothing)."""
    model = tiny_model("tiny-bert")
    with Report("add_lora(model, ['q_proj']) on a BERT model (no module is called q_proj)") as rep:
        rep.expect("exception", "ValueError", raised_by(add_lora, model, ["q_proj"], r=2, lora_alpha=4.0))


def _random_update(model: nn.Module, cls: type, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, cls):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=m.lora_B.dtype) * 0.1)


def check_merge(add_lora: Callable, merge_lora: Callable, unmerge_lora: Callable, cls: type, name: str = "tiny-bert",
                targets=("query", "value"), r: int = 4, alpha: float = 16.0) -> None:
    """Merging adds (alpha / r) B A into W once (same logits), unmerging restores W; no double merge."""
    model = tiny_model(name)
    call("add_lora", add_lora, model, list(targets), r=r, lora_alpha=alpha)
    _random_update(model, cls)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, cls)}
    w0 = {n: m.base.weight.detach().clone() for n, m in layers.items()}
    ids = torch.randint(5, 200, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with Report(f"merge_lora / unmerge_lora on {name}, r={r}, alpha={alpha}") as rep, torch.no_grad():
        call("merge_lora(model)", merge_lora, model)
        n0, m0 = next(iter(layers.items()))
        expected_w = w0[n0] + (alpha / r) * m0.lora_B @ m0.lora_A
        rep.close(f"{n0}: merged weight = W + (alpha / r) B A", expected_w, m0.base.weight, 1e-5)
        rep.close("logits after merge equal logits before", ref, model(input_ids=ids).logits, 1e-4)
        call("merge_lora(model) a second time", merge_lora, model)
        rep.close("merging twice adds the update once", expected_w, m0.base.weight, 1e-5)
        call("unmerge_lora(model)", unmerge_lora, model)
        err = max((m.base.weight - w0[n]).abs().max().item() for n, m in layers.items())
        rep.expect("unmerge restores every base weight", "max |W - W0| <= 1e-6", f"{err:.2g}", err <= 1e-6)
        rep.close("logits after unmerge equal logits before", ref, model(input_ids=ids).logits, 1e-4)


def check_lora_counts(lora_param_count: Callable, count_lora_params: Callable, name: str = "tiny-bert",
                      targets=("query", "value"), r: int = 4, shapes=((384, 384, 8), (1536, 384, 16))) -> None:
    """``lora_param_count(d, k, r) == r (d + k)``; ``count_lora_params(model, targets, r)`` equals peftlab's count."""
    from ..lora import LoraConfig, apply_lora  # the reference implementation

    with Report("LoRA parameter counts") as rep:
        for d, k, rr in shapes:
            rep.expect(f"lora_param_count(d={d}, k={k}, r={rr})", rr * (d + k),
                       call("lora_param_count", lora_param_count, d, k, rr))
        model = tiny_model(name)
        got = call("count_lora_params", count_lora_params, model, list(targets), r)
        reference = apply_lora(tiny_model(name), LoraConfig(r=r, target_modules=list(targets)))
        expected = sum(p.numel() for p in reference.parameters() if p.requires_grad)
        rep.expect(f"count_lora_params({name}, {list(targets)}, r={r}) vs peftlab.apply_lora", expected, got)
        rep.expect("count_lora_params left the model untouched (no LoRA layers added)", 0,
                   sum("lora" in n for n, _ in model.named_parameters()))


def check_hf_lora(make_hf_lora: Callable) -> None:
    """``make_hf_lora(model)`` returns HF peft's model: r=8, alpha=16, query/value, SEQ_CLS (head trainable)."""
    from peft import PeftModel

    model = tiny_model("tiny-bert")
    h, layers = model.config.hidden_size, model.config.num_hidden_layers
    with Report("make_hf_lora(tiny-bert) with HF peft") as rep:
        peft_model = call("make_hf_lora(model)", make_hf_lora, model)
        rep.expect("returns a peft.PeftModel", True, isinstance(peft_model, PeftModel))
        if not isinstance(peft_model, PeftModel):
            return
        cfg = peft_model.peft_config["default"]
        rep.expect("r, lora_alpha", (8, 16), (cfg.r, cfg.lora_alpha))
        rep.expect("target_modules", ["query", "value"], sorted(cfg.target_modules or []))
        rep.expect("task_type", "SEQ_CLS", str(getattr(cfg.task_type, "value", cfg.task_type)))
        head = h * 3 + 3  # classifier copy trained as modules_to_save
        lora = layers * 2 * 8 * (h + h)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        rep.expect("trainable = LoRA (L x 2 x r (d + k)) + classifier head", lora + head, trainable)


def check_lora_state(add_lora: Callable, lora_state_dict: Callable, load_lora_state_dict: Callable, cls: type,
                     name: str = "tiny-bert", targets=("query", "value"), r: int = 2) -> None:
    """Only A and B are saved, and loading them into a fresh model with LoRA reproduces the logits."""
    model = tiny_model(name)
    call("add_lora", add_lora, model, list(targets), r=r, lora_alpha=4.0)
    _random_update(model, cls)
    ids = torch.randint(5, 200, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with Report(f"lora_state_dict / load_lora_state_dict on {name}, r={r}") as rep:
        state = call("lora_state_dict(model)", lora_state_dict, model)
        n_layers = len(_linear_shapes(tiny_model(name), targets))
        keys = sorted(state) if isinstance(state, dict) else []
        rep.expect("number of tensors (A and B per wrapped layer)", 2 * n_layers, len(keys))
        rep.expect("keys that are not lora_A / lora_B", [], [k for k in keys if not k.endswith(("lora_A", "lora_B"))])
        fresh = tiny_model(name)  # same seed: same base weights, as a base model loaded from disk
        call("add_lora(fresh model)", add_lora, fresh, list(targets), r=r, lora_alpha=4.0)
        call("load_lora_state_dict(fresh, state)", load_lora_state_dict, fresh, state)
        with torch.no_grad():
            rep.close("fresh model + loaded A, B gives the same logits", ref, fresh(input_ids=ids).logits, 1e-5)
        try:
            load_lora_state_dict(fresh, {"not.a.layer.lora_A": torch.zeros(1)})
            raised = "nothing"
        except (KeyError, ValueError, RuntimeError) as e:
            raised = type(e).__name__
        rep.expect("a key this model lacks raises", "KeyError/ValueError/RuntimeError", raised,
                   ok=raised != "nothing")
