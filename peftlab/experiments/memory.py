"""Peak memory of fine-tuning: an analytic model (weights, grads, optimizer, activations), checked by measurement.

Peak training memory of one step, in bytes, for a Llama-style decoder (or BERT encoder) and a method:

- **weights**: every parameter at its storage width (fp32 4 B, bf16 2 B, NF4 0.5 B + 0.127 bit of constants).
- **gradients**: one per *trainable* parameter, at the parameter's width.
- **optimizer**: AdamW keeps two fp32 moments (8 B/param); bf16 training adds an fp32 master copy (4 B/param),
  so bf16 weights + bf16 grads + master + moments = 16 B/param (ZeRO). 8-bit AdamW: 2 B/param of moments.
  Paged optimizers put the moments in CUDA managed memory, which ``torch.cuda.max_memory_allocated`` does not
  count (and which must never exceed the card's free memory); they are reported as ``managed``.
- **activations**: the tensors autograd saves for the backward pass, summed tensor by tensor over what
  PyTorch eager (HF transformers, SDPA attention) actually saves, plus the loss's transient logits.

Gradients and activations are not alive at once: backward frees activations layer by layer while it writes
gradients, so the peak is ``weights + optimizer + max(activations + head gradient, gradients + optimizer
step scratch)``, not the sum of the four columns.

References:
    - Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", arXiv:1910.02054
      (16 bytes per parameter for mixed-precision Adam).
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314 (NF4, double
      quantization 0.127 bit/param, paged optimizers).
    - Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv:2110.02861.
    - Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198
      (activation memory per layer, ``sbh(34 + 5as/h)``; adapted here to what eager PyTorch saves).
    - Chen et al., "Training Deep Nets with Sublinear Memory Cost" (gradient checkpointing), arXiv:1604.06174.
    - Hu et al., "LoRA", arXiv:2106.09685; Houlsby et al., arXiv:1902.00751; Pfeiffer et al., arXiv:2005.00247;
      Liu et al. (DoRA, ``use_dora``), arXiv:2402.09353;
      Li & Liang (prefix tuning), arXiv:2101.00190; Lester et al. (prompt tuning), arXiv:2104.08691.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..inject import HEAD_NAMES, targets_for
from ..models import arch_config, config_of
from ..prefix import PREFIX_CHECKPOINTING
from .methods import METHODS as METHOD_TABLE
from .methods import MODELLED, QUANT_BACKENDS, SAVED_WEIGHT_BACKEND, apply_method, classifier_head

GB = 1e9  # decimal gigabytes, as the QLoRA paper and GPU spec sheets use

METHODS = MODELLED  # the methods with formulas here, from the studies' one method table (.methods)
DTYPES = ("fp32", "bf16")  # fp32: everything fp32; bf16: bf16 weights/activations, fp32 master + moments
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
NF4_BYTES = 0.5  # two 4-bit codes per byte (QLoRA section 3)
DOUBLE_QUANT_BITS = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax per 64 weights + fp32 per 256 absmax = 0.127 bit
get_model_config = arch_config  # the name of earlier releases: a notebook begun on one imports it from here


@dataclass
class MemoryConfig:
    """One training setup to predict (and optionally measure).

    >>> MemoryConfig(model="llama-7b", method="dora")
    Traceback (most recent call last):
    ...
    ValueError: method must be one of ('full', 'lora', 'qlora', 'houlsby', 'pfeiffer', 'prefix', 'prompt'), got 'dora'
    """

    model: str = "smollm2-135m"
    method: str = "lora"
    r: int = 8
    target_modules: list[str] | None = None  # None: HF peft's default for the architecture (q, v)
    dtype: str = "bf16"
    optimizer: str = "adamw"
    batch: int = 8
    seq: int = 512
    grad_checkpointing: bool = False
    reduction_factor: int = 16  # bottleneck adapters: m = d / reduction_factor
    num_virtual_tokens: int = 20  # prefix and prompt tuning
    task: str = "causal_lm"  # or "classification" (BERT-style encoders)
    quant_backend: str = "bnb"  # QLoRA's 4-bit layer: bitsandbytes or peftlab.quant.Linear4bit (QUANT_BACKENDS)
    use_dora: bool = False  # method "lora" only: DoRA (peftlab.dora), a trained magnitude per output row

    def __post_init__(self):
        for name, value, allowed in (("method", self.method, METHODS), ("dtype", self.dtype, DTYPES),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("task", self.task, ("causal_lm", "classification")),
                                     ("quant_backend", self.quant_backend, QUANT_BACKENDS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("r", "batch", "seq", "reduction_factor", "num_virtual_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.method == "prefix" and self.grad_checkpointing:
            raise ValueError(PREFIX_CHECKPOINTING)
        if self.use_dora and self.method != "lora":
            raise ValueError(f"use_dora models DoRA over LoRA: it needs method='lora', got {self.method!r}")


@dataclass
class Estimate:
    """Predicted bytes per term; ``total`` is the peak (see the module docstring), not the column sum."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    total: float
    trainable: int
    params: int
    managed: float = 0.0  # paged optimizer states in CUDA managed memory (not in max_memory_allocated)
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --- parameter counts from the real module tree ---------------------------------------------------------------
def _meta_model(cfg: MemoryConfig) -> nn.Module:
    from ..models import build_from_config

    # num_labels=2 only matters for classification heads; a meta model allocates nothing.
    return build_from_config(arch_config(cfg.model), task=cfg.task, device="meta")


def _lora_targets(model_type: str, cfg: MemoryConfig) -> list[str]:
    from ..lora import DEFAULT_TARGETS

    return list(cfg.target_modules) if cfg.target_modules else targets_for(model_type, DEFAULT_TARGETS)


def method_options(cfg: MemoryConfig) -> dict:
    """The options ``cfg`` gives its method (the method table's names): e.g. ``r`` and ``target_modules`` for LoRA.

    >>> method_options(MemoryConfig(model="tiny-llama", method="pfeiffer", reduction_factor=8))
    {'reduction_factor': 8}
    """
    given = dict(r=cfg.r, lora_alpha=2 * cfg.r, target_modules=cfg.target_modules,
                 reduction_factor=cfg.reduction_factor, num_virtual_tokens=cfg.num_virtual_tokens,
                 # random virtual tokens: how a prompt starts does not change memory, and needs no tokenizer
                 prompt_tuning_init="RANDOM", prompt_tuning_init_text=None)
    return {k: v for k, v in given.items() if k in METHOD_TABLE[cfg.method].options}


def parameter_breakdown(cfg: MemoryConfig) -> dict:
    """Parameter counts of the method, read off the real module tree (the method applied to a ``meta`` model).

    Returns ``params`` (the base model), ``trainable``, ``frozen`` (kept at the compute width), ``quantized``
    (frozen linear weights stored in NF4 by QLoRA), ``head`` (the output layer), ``lora_modules`` (layers
    carrying a LoRA pair), ``adapters_per_layer`` and ``bottleneck`` (bottleneck adapters) and ``max_param``
    (numel of the largest trainable tensor: the optimizer's scratch is sized by it). With ``use_dora``:
    ``magnitude`` (DoRA's trained m, one per output row of each LoRA layer, already in ``trainable``) and
    ``dora_weight`` (numel of the largest LoRA weight: the ``W + dW`` that DoRA's norm materialises).
    ``tests/experiments/test_memory.py`` checks these against the papers' closed forms.

    >>> c = parameter_breakdown(MemoryConfig(model="tiny-llama", method="lora", r=4))
    >>> c["trainable"]  # 2 layers x (q: 4*(64+64) + v: 4*(64+32))
    1792
    """
    from ..adapters import AdapterConfig, AdapterLayer
    from ..inject import matches
    from ..lora import LoraLinear

    model = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())  # .parameters() counts tied weights once
    body_linear = [m for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and not any(matches(n, [h]) for h in HEAD_NAMES)]
    head = sum(p.numel() for n, m in model.named_children() if n in HEAD_NAMES for p in m.parameters())
    quantized = sum(m.weight.numel() for m in body_linear) if METHOD_TABLE[cfg.method].quantized else 0
    # The method as training applies it (prepare_model), without quantizing: NF4 bytes are counted below.
    model = prepare_model(model, replace(cfg, grad_checkpointing=False), quantize=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    lora = [m for m in model.modules() if isinstance(m, LoraLinear)]
    lora_modules = len(lora)  # apply_lora refused zero matches
    magnitude = sum(a.magnitude.numel() for m in lora for a in m.adapters.values() if a.magnitude is not None)
    dora_weight = max(m.in_features * m.out_features for m in lora) if magnitude else 0
    sites = sum(isinstance(m, AdapterLayer) for m in model.modules())
    arch = config_of(model)
    n_layers, d = arch.num_hidden_layers, arch.hidden_size
    return dict(params=total, trainable=n_trainable, frozen=n_all - n_trainable - quantized, quantized=quantized,
                head=head, lora_modules=lora_modules, adapters_per_layer=sites // n_layers,
                bottleneck=AdapterConfig(reduction_factor=cfg.reduction_factor).size(d),
                max_param=max(p.numel() for p in trainable), magnitude=magnitude, dora_weight=dora_weight)


# --- activations: what eager PyTorch saves for backward, per token ------------------------------------------------
def llama_layer_activations(arch, cfg: MemoryConfig, counts: dict) -> dict:
    """Bytes saved for backward per token by one Llama decoder layer (HF eager modules, SDPA attention).

    Korthikanti et al. count ``34 h`` bytes per token per layer for GPT with fp16 and dropout; here the
    tensors are listed as HF's ``LlamaDecoderLayer`` creates them, and a tensor is counted only when
    autograd keeps it: ``F.linear`` keeps its input only if its weight trains (or a LoRA ``A`` reads it),
    a multiplication keeps an operand only if the other one needs a gradient.
    """
    a = 2 if cfg.dtype == "bf16" else 4  # activation width (bf16 compute, or fp32)
    d, ff, heads = arch.hidden_size, arch.intermediate_size, arch.num_attention_heads
    kv = getattr(arch, "num_key_value_heads", heads) * (d // heads)
    full = cfg.method == "full"
    lora = cfg.method in ("lora", "qlora")
    targets = _lora_targets(arch.model_type, cfg) if lora else []

    def reads(*names: str) -> int:  # does any of these linears keep its input for backward?
        return int(full or any(n in targets for n in names))

    # RMSNorm computes in fp32: x.float() is kept (4 B) by pow and mul; rsqrt (4 B per token) too; the
    # normalised x before the weight (a B) is kept when the weight trains; the output (a B) when a linear reads it.
    norm_attn = 4 * d + 4 + full * a * d + reads("q_proj", "k_proj", "v_proj") * a * d
    norm_mlp = 4 * d + 4 + full * a * d + reads("gate_proj", "up_proj") * a * d
    # SDPA (flash / CPU flash kernel) keeps q, k, v after RoPE, its output, and a fp32 log-sum-exp per head.
    # The output is laid out (B, T, H, hd), so o_proj's input is a view of it: no extra copy.
    attention = a * (d + kv + kv + d) + 4 * heads
    if cfg.method == "prefix":
        # The prefix arrives as a cache, so transformers passes SDPA an explicit mask (T x (P + T) per row, kept
        # at the compute width, in every layer); with a mask it repeats the kv heads to all heads (repeat_kv, no
        # enable_gqa): keys and values are kept P + T long and d wide, per real token (T + P) / T of that.
        T, P = cfg.seq, cfg.num_virtual_tokens
        attention = a * (d + 2 * d * (T + P) / T + d) + 4 * heads + a * (T + P)
    # SwiGLU: silu keeps gate (a ff), the product keeps silu(gate) and up (2 a ff); down_proj keeps its input.
    mlp = a * 3 * ff + reads("down_proj") * a * ff
    # LoRA keeps x @ A^T (r values) for B's gradient, per wrapped layer.
    lora_mid = a * cfg.r * counts.get("lora_modules", 0) / arch.num_hidden_layers
    lora_mid += dora_saved(arch, cfg, counts)
    adapters = 0
    if cfg.method in ("houlsby", "pfeiffer"):  # down keeps its input (d), the activation and up keep m each
        adapters = counts["adapters_per_layer"] * a * (d + 2 * counts["bottleneck"])
    total = norm_attn + attention + norm_mlp + mlp + lora_mid + adapters
    # Layer 0 keeps nothing for backward before the first trainable tensor: its input (the frozen embeddings)
    # needs no gradient. Adapters train only after the attention output (Houlsby) or the MLP (Pfeiffer); a
    # prefix joins inside the attention, so only the first norm is skipped. LoRA and prompts reach layer 0's input.
    first_layer_skip = {"houlsby": norm_attn + attention, "prefix": norm_attn, "pfeiffer": total - adapters,
                        "lora": 4 * d + 4, "qlora": 4 * d + 4}.get(cfg.method, 0)  # LoRA: the norm's internals
    return dict(norm_attn=norm_attn, attention=attention, norm_mlp=norm_mlp, mlp=mlp, lora=lora_mid,
                adapters=adapters, total=total, first_layer_skip=first_layer_skip)


def bert_layer_activations(arch, cfg: MemoryConfig, counts: dict, seq: int) -> dict:
    """Bytes saved per token by one BERT layer (post-LayerNorm, GELU, dropout 0.1, eager attention).

    BERT's attention with a padding mask runs SDPA's math path, which keeps the scores' softmax, the dropout
    mask and the dropped-out probabilities: ``3 H T`` values per token, the ``5as/h`` term of Korthikanti et al.
    Checked against autograd's saved tensors on the CPU, fp32 and bf16 (``tests/experiments/test_memory.py``).
    """
    a = 2 if cfg.dtype == "bf16" else 4
    d, ff, heads = arch.hidden_size, arch.intermediate_size, arch.num_attention_heads
    full = cfg.method == "full"
    lora = cfg.method in ("lora", "qlora")
    targets = _lora_targets(arch.model_type, cfg) if lora else []
    qkv_in = int(full or any(t in targets for t in ("query", "key", "value")))
    # A prefix lengthens the keys and values (and the score rows) to P + T; the queries stay T.
    kv_len = seq + cfg.num_virtual_tokens if cfg.method == "prefix" else seq
    # The input (if q/k/v train); q, k, v, the softmax, its dropout mask and the dropped probabilities, which the
    # math path keeps in fp32 even for bf16 inputs (it upcasts on the CPU; a GPU would run a fused kernel).
    attention = a * qkv_in * d + 4 * (d + 2 * d * kv_len / seq + 3 * heads * kv_len)
    # attention.output: dense input (if it trains), dropout mask, LayerNorm input and its mean/rstd
    attn_out = a * (full * d + d + d) + 8
    # intermediate input (LayerNorm output, if it trains), GELU input, output.dense input, dropout mask, LN
    ffn = a * (full * d + ff + full * ff + d + d) + 8
    lora_mid = a * cfg.r * counts.get("lora_modules", 0) / arch.num_hidden_layers + dora_saved(arch, cfg, counts)
    adapters = 0
    if cfg.method in ("houlsby", "pfeiffer"):  # on the dense outputs, before dropout and LayerNorm
        adapters = counts["adapters_per_layer"] * a * (d + 2 * counts["bottleneck"])
    total = attention + attn_out + ffn + lora_mid + adapters
    # Layer 0 before the first trainable tensor keeps nothing (see llama_layer_activations). LoRA on q/v: the
    # keys need no gradient there, so the queries are not kept; a prefix: the queries need none, so the keys are
    # not kept; Pfeiffer keeps only output.dense's dropout + LN.
    first_layer_skip = {"houlsby": attention, "pfeiffer": total - adapters - (a * 2 * d + 8),
                        "lora": a * d, "qlora": a * d, "prefix": a * d * kv_len / seq}.get(cfg.method, 0)
    return dict(attention=attention, attn_out=attn_out, ffn=ffn, lora=lora_mid, adapters=adapters, total=total,
                first_layer_skip=first_layer_skip)


def dora_saved(arch, cfg: MemoryConfig, counts: dict) -> float:
    """DoRA's extra bytes saved per token per layer: ``g = m / ||W + dW||_c`` multiplies ``W x`` and ``B A x``
    (``peftlab.dora.forward``), and m's gradient needs both, ``2 a out`` per LoRA layer (the norm itself is a
    constant: no graph). HF peft's DoRA saves the same two tensors."""
    a = 2 if cfg.dtype == "bf16" else 4
    return 2 * a * counts.get("magnitude", 0) / arch.num_hidden_layers  # magnitude = sum of out over the layers


def activation_bytes(cfg: MemoryConfig, counts: dict | None = None) -> dict:
    """Peak activation bytes of one forward + backward (see :func:`llama_layer_activations`)."""
    arch = arch_config(cfg.model)
    counts = counts or parameter_breakdown(cfg)
    n_layers, d = arch.num_hidden_layers, arch.hidden_size
    virtual = cfg.num_virtual_tokens if cfg.method == "prompt" else 0
    tokens = cfg.batch * (cfg.seq + virtual)  # prompt tuning lengthens every sequence
    a = 2 if cfg.dtype == "bf16" else 4
    if arch.model_type == "bert":
        layer = bert_layer_activations(arch, cfg, counts, cfg.seq + virtual)
        # embeddings: LayerNorm input + its statistics + dropout mask, kept only when the embeddings' output
        # needs a gradient (full fine-tuning; prompt tuning's virtual tokens); pooler and classifier are tiny
        head_saved = tokens * (2 * a * d + 8) * (cfg.method in ("full", "prompt"))
        # Transient in backward, at the last layer's attention (math path, fp32): the gradients of the dropped
        # probabilities, of the probabilities and of the scores, (B, H, T, T_kv) each (found by measurement:
        # the CPU rows of MiniLM were ~20 MB short without it).
        q_len = cfg.seq + virtual
        kv_len = q_len + (cfg.num_virtual_tokens if cfg.method == "prefix" else 0)
        head_transient = 3 * 4 * cfg.batch * arch.num_attention_heads * q_len * kv_len
    elif arch.model_type in ("llama", "mistral", "qwen2"):
        layer = llama_layer_activations(arch, cfg, counts)
        vocab = arch.vocab_size
        # final RMSNorm as above; HF's loss upcasts logits to fp32 and log_softmax keeps its fp32 output (4 V).
        head_saved = tokens * (4 * d + 4 + (cfg.method == "full") * 2 * a * d + 4 * vocab)
        # Transient at the loss: forward holds a-byte logits + the fp32 copy beside the kept output; backward
        # holds nll's fp32 gradient and log_softmax's fp32 input gradient (2 x 4 V) next to the kept 4 V.
        head_transient = tokens * max(a * vocab + 4 * vocab, 8 * vocab)
    else:
        raise ValueError(f"activation formulas exist for llama/mistral/qwen2 and bert, not {arch.model_type!r}")
    per_layer = tokens * layer["total"]
    # DoRA: each layer's forward materialises W + dW (out x in) to take its norm, freed at once (no graph);
    # HF peft's forward holds more then: an (in x in) identity, B A, s B A and W + s B A.
    dora_scratch = a * counts.get("dora_weight", 0)
    if cfg.grad_checkpointing:
        # Only each layer's input (a d per token) is kept; backward recomputes one layer at a time (Chen et al.).
        saved = n_layers * tokens * a * d
        peak = saved + max(head_saved + head_transient, per_layer + head_saved + dora_scratch)
    else:
        saved = n_layers * per_layer - tokens * layer.get("first_layer_skip", 0)
        peak = saved + max(head_saved + head_transient, dora_scratch)
    return dict(peak=peak, per_layer=per_layer, saved=saved + head_saved, head_transient=head_transient,
                per_token_layer=layer, dora_scratch=dora_scratch)


def estimate(cfg: MemoryConfig) -> Estimate:
    """Predict the peak memory of one training step (after the first, when optimizer states exist).

    >>> e = estimate(MemoryConfig(model="llama-65b", method="full", dtype="bf16", batch=1, seq=512))
    >>> round(e.weights / e.params), round((e.weights + e.grads + e.optimizer) / e.params)  # ZeRO's 16 B/param
    (2, 16)
    """
    counts = parameter_breakdown(cfg)
    w = DTYPE_BYTES[cfg.dtype]
    trainable, frozen, quantized = counts["trainable"], counts["frozen"], counts["quantized"]
    # Weights: trainable and frozen at the compute width; QLoRA's frozen linears in NF4 + double-quant constants.
    weights = w * (trainable + frozen) + quantized * (NF4_BYTES + DOUBLE_QUANT_BITS / 8)
    grads = w * trainable  # one gradient per trainable parameter, same dtype as the parameter
    # AdamW: exp_avg + exp_avg_sq in fp32 (8 B); bf16 adds the fp32 master weights (4 B): 2+2+4+8 = 16 (ZeRO 3.1)
    master = 4 * trainable if cfg.dtype == "bf16" else 0
    moments = (2 if "8bit" in cfg.optimizer else 8) * trainable  # 8-bit AdamW: one byte per moment
    paged = cfg.optimizer.startswith("paged")
    optimizer = master + (0 if paged else moments)
    act = activation_bytes(cfg, counts)
    # The step's scratch, for the largest tensor: fp32 grad copy + sqrt(v) denominator (bf16), or the denominator.
    step_scratch = (8 if cfg.dtype == "bf16" else 4) * counts["max_param"]
    # First gradient to appear in backward: the head's (the LM head / tied embedding is the largest matrix).
    head_grad = w * counts["head"] if cfg.method == "full" else 0
    # QLoRA dequantizes one weight at a time, in forward and again in backward (bitsandbytes' MatMul4Bit and
    # peftlab's MatMul4bit alike): a transient copy of the largest linear at the compute width.
    dequant = 0
    if cfg.method == "qlora":
        arch = arch_config(cfg.model)
        dequant = w * arch.hidden_size * arch.intermediate_size
        if cfg.quant_backend == SAVED_WEIGHT_BACKEND:
            # Found by measurement (the committed GPU rows): peftlab's Linear4bit used to call
            # F.linear(x, dequantized_w), and autograd kept that bf16 weight for the input gradient: 2 B per
            # quantized param alive until backward (one layer's worth under checkpointing). MatMul4bit fixed it.
            held = quantized if not cfg.grad_checkpointing else quantized / arch.num_hidden_layers
            dequant += 2 * held
    total = weights + optimizer + max(act["peak"] + head_grad + dequant, grads + step_scratch)
    return Estimate(weights=weights, grads=grads, optimizer=optimizer, activations=act["peak"], total=total,
                    trainable=trainable, params=counts["params"], managed=moments if paged else 0.0,
                    detail=dict(counts=counts, activations=act, step_scratch=step_scratch, head_grad=head_grad,
                                dequant=dequant, config=asdict(cfg)))


# --- measurement --------------------------------------------------------------------------------------------------
class MasterAdamW:
    """AdamW over fp32 master copies of bf16 parameters, one tensor at a time (ZeRO's 16 B/param layout).

    Stepping tensor by tensor keeps the scratch to one fp32 gradient and one denominator of the largest
    tensor, instead of a full fp32 copy of every gradient.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        self.m = [torch.zeros_like(x) for x in self.master]
        self.v = [torch.zeros_like(x) for x in self.master]
        self.lr, self.betas, self.eps, self.wd, self.t = lr, betas, eps, weight_decay, 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for p, w, m, v in zip(self.params, self.master, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad.float()
            p.grad = None  # the bf16 gradient is no longer needed
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.mul_(1 - self.lr * self.wd).addcdiv_(m, (v.sqrt() / bc2).add_(self.eps), value=-self.lr / bc1)
            p.copy_(w)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def prepare_model(model: nn.Module, cfg: MemoryConfig, quant_backend: str | None = None,
                  quantize: bool = True) -> nn.Module:
    """Apply ``cfg.method`` to a built model and return the model to train (prefix and prompt tuning wrap it).

    QLoRA's frozen linears become 4-bit layers of ``quant_backend`` (``"peftlab"`` or ``"bnb"``; default
    ``cfg.quant_backend``) unless ``quantize`` is False (parameter counting). A classifier's head trains in
    place (the memory of HF peft's copy of it is not modelled).
    """
    backend = (quant_backend or cfg.quant_backend) if quantize else None
    model, _ = apply_method(cfg.method, model, quant_backend=backend, **method_options(cfg))
    if cfg.use_dora:  # the method table's LoRA has no use_dora: give its adapters DoRA's magnitude m here
        from ..dora import init_magnitude
        from ..lora import lora_layers

        for _, layer in lora_layers(model):
            for adapter in layer.adapters.values():
                init_magnitude(adapter, layer.base_weight())
        for c in model.peft_config.values():
            c.use_dora = True
    base = getattr(model, "base", model)
    if cfg.task == "classification":  # the new head trains too (HF peft's modules_to_save)
        for p in getattr(base, classifier_head(base)).parameters():
            p.requires_grad_(True)
    if cfg.grad_checkpointing:
        from ..models import enable_checkpointing

        enable_checkpointing(base)
    return model


def train_steps(model: nn.Module, cfg: MemoryConfig, steps: int = 2, reset=None) -> None:
    """Run ``steps`` training steps on random tokens (:func:`peftlab.train.train`); ``reset()`` is called after
    the first (peak bookkeeping: the optimizer states exist from then on)."""
    from ..train import train

    device = next(model.parameters()).device

    def batches():  # drawn once, after train() seeds: the same tokens at every step
        ids = torch.randint(0, config_of(model).vocab_size, (cfg.batch, cfg.seq), device=device)
        labels = ids if cfg.task == "causal_lm" else torch.zeros(cfg.batch, dtype=torch.long, device=device)
        extra = dict(use_cache=False) if cfg.task == "causal_lm" else {}  # a KV cache is for generation only
        yield from itertools.repeat(dict(input_ids=ids, labels=labels, **extra))

    def optimizer(params):
        return MasterAdamW(params) if cfg.dtype == "bf16" else torch.optim.AdamW(params, lr=1e-4, foreach=False)

    after_step = None if reset is None else (lambda step: reset() if step == 0 else None)
    train(model, batches(), steps=steps, seed=0, progress=False, optimizer=optimizer, after_step=after_step)


def training_rss(cfg: dict, source: str = "config") -> dict:
    """Peak RSS of two training steps of ``cfg`` in this process, minus the baseline: run it in a fresh process
    (:func:`measure_cpu` does, via ``train.run_isolated``).

    The baseline is this process's RSS after importing torch and transformers (interpreter + libraries),
    so the figure holds weights, gradients, optimizer states, activations and allocator slack. Large
    allocations are forced to mmap so freed memory leaves the RSS at once (glibc otherwise keeps it).
    """
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD = 64 KiB, fixed (no dynamic growth)
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (part of the baseline)

    from ..models import build_from_config, load_causal_lm, load_classifier
    from ..train import reset_peak_memory, rss_kib

    c = MemoryConfig(**cfg)
    # A tiny model of the same family, trained one step, loads every module the real run needs (modeling
    # code, autograd engine, kernels' scratch): all of that is library, part of the baseline.
    tiny_name = "tiny-bert" if arch_config(c.model).model_type == "bert" else "tiny-llama"
    tiny_cfg = MemoryConfig(**{**cfg, "model": tiny_name, "batch": 1, "seq": 8})
    tiny = build_from_config(tiny_name, task=c.task, num_labels=2)
    train_steps(prepare_model(tiny, tiny_cfg), tiny_cfg, steps=1)
    del tiny
    gc.collect()
    libc.malloc_trim(0)
    baseline = rss_kib("VmRSS")
    if source == "pretrained" and c.model == "smollm2-135m":  # the loaders copy the weights out of the
        model = load_causal_lm()[0]  # mapped file (models.own_memory): RSS then counts what training keeps
    elif source == "pretrained" and c.model == "minilm-l6":
        model = load_classifier(num_labels=2)[0]
    else:
        model = build_from_config(arch_config(c.model), task=c.task, num_labels=2)
    gc.collect()
    model = prepare_model(model, c)
    gc.collect()
    libc.malloc_trim(0)
    reset_peak_memory("cpu")  # VmHWM: loading may have peaked higher
    loaded = rss_kib("VmRSS")
    train_steps(model, c, steps=2)
    peak = rss_kib("VmHWM")
    return dict(peak_bytes=(peak - baseline) * 1024, loaded_bytes=(loaded - baseline) * 1024,
                baseline_bytes=baseline * 1024)


def measure_cpu(cfg: MemoryConfig, source: str = "config", timeout: float = 600) -> dict:
    """Peak CPU memory (bytes above the interpreter + libraries) of two training steps, in a subprocess."""
    from ..train import run_isolated

    return run_isolated("peftlab.experiments.memory:training_rss", timeout=timeout, cfg=asdict(cfg), source=source)


def measure_gpu(cfg: MemoryConfig, quant_backend: str | None = None) -> dict:
    """``torch.cuda.max_memory_allocated`` of the second training step of a model built on the GPU."""
    from ..models import build_from_config

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = build_from_config(arch_config(cfg.model), task=cfg.task, device="cuda", dtype=dtype, num_labels=2)
    model = prepare_model(model, cfg, quant_backend)
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated() - base
    train_steps(model, cfg, steps=2, reset=torch.cuda.reset_peak_memory_stats)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model
    torch.cuda.empty_cache()
    return dict(peak_bytes=peak, loaded_bytes=loaded)


# --- the printed table (``peftlab memory``) --------------------------------------------------------------------
def format_table(e: Estimate, measured: dict | None = None) -> str:
    rows = [("weights", e.weights), ("grads", e.grads), ("optimizer", e.optimizer),
            ("activations", e.activations), ("total (peak)", e.total)]
    if e.managed:
        rows.append(("managed (paged, not in max_memory_allocated)", e.managed))
    lines = [f"{'term':<46} {'GB':>10}"] + [f"{n:<46} {v / GB:>10.3f}" for n, v in rows]
    lines.append(f"trainable {e.trainable:,} of {e.params:,} parameters ({100 * e.trainable / e.params:.3f} %)")
    if measured:
        m = measured["peak_bytes"]
        lines.append(f"measured peak {m / GB:.3f} GB; predicted {e.total / GB:.3f} GB "
                     f"({100 * (e.total - m) / m:+.1f} %)")
    return "\n".join(lines)


# --- more than one GPU: DDP replicates the model, FSDP shards it (``peftlab memory --gpus N --sharding fsdp``) ----
SHARDINGS = ("ddp", "fsdp")


@dataclass
class ShardedEstimate:
    """Predicted bytes on *each* of ``gpus`` GPUs; ``batch`` and ``seq`` of the config are per GPU."""

    gpus: int
    sharding: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    comm: float  # DDP: the reducer's gradient buckets; FSDP: the units gathered whole at one time
    total: float
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def fsdp_units(cfg: MemoryConfig) -> dict:
    """Float parameters of FSDP's units, one per decoder layer (the largest) and the root (the rest: embeddings,
    final norm, head), as :func:`peftlab.distributed.fsdp_plugin` wraps them; QLoRA's 4-bit weights excluded.

    >>> u = fsdp_units(MemoryConfig(model="tiny-llama", method="lora", r=4))
    >>> u["layers"], u["layer"], u["root"]  # layer: q, k, v, o, MLP, 2 norms + LoRA; root: embed + head + norm
    (2, 37888, 32832)
    """
    model = prepare_model(_meta_model(cfg), replace(cfg, grad_checkpointing=False), quantize=False)
    base = getattr(model, "base", model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    quantized = METHOD_TABLE[cfg.method].quantized

    def float_params(module: nn.Module) -> int:
        n = sum(p.numel() for p in module.parameters())
        if quantized:  # QLoRA: the frozen linear weights are 4-bit, ignored by FSDP (whole on every GPU)
            n -= sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and
                     not m.weight.requires_grad)
        return n

    per_layer = [float_params(m) for m in layers]
    in_layers = sum(p.numel() for m in layers for p in m.parameters())
    root = sum(p.numel() for p in model.parameters()) - in_layers  # QLoRA's 4-bit weights are all in the layers
    return dict(layers=len(layers), layer=max(per_layer), root=root)


def sharded_estimate(cfg: MemoryConfig, gpus: int, sharding: str = "ddp") -> ShardedEstimate:
    """Per-GPU memory of data-parallel training on ``gpus`` GPUs, each with ``cfg.batch`` examples.

    - **DDP** replicates everything: weights, gradients and optimizer state as on one GPU, plus the reducer's
      buckets, a flat copy of every trainable gradient (``gradient_as_bucket_view=False``, the default).
    - **FSDP** (FULL_SHARD, ZeRO-3) keeps 1/N of the weights, gradients and optimizer state on each GPU, and
      gathers units whole while it computes: the root unit (embeddings, head) for the whole step, and two
      decoder layers at once (the one computing and the one prefetched). QLoRA's 4-bit weights are not
      sharded (peftlab's :class:`~peftlab.quant.Linear4bit` layers are FSDP's ``ignored_modules``).

    Activations do not shrink: each GPU runs its own micro-batch (data parallelism, not tensor parallelism).

    >>> one = estimate(MemoryConfig(model="llama-3.1-8b", method="full"))
    >>> four = sharded_estimate(MemoryConfig(model="llama-3.1-8b", method="full"), gpus=4, sharding="fsdp")
    >>> round((four.weights + four.grads + four.optimizer) / one.params, 3)  # ZeRO-3: 16 B/param over 4 GPUs
    4.0
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus!r}")
    e = estimate(cfg)
    counts = e.detail["counts"]
    w = DTYPE_BYTES[cfg.dtype]
    four_bit = counts["quantized"] * (NF4_BYTES + DOUBLE_QUANT_BITS / 8)
    act = e.activations + e.detail["head_grad"] + e.detail["dequant"]  # forward + backward, as on one GPU
    scratch = e.detail["step_scratch"]
    if sharding == "ddp":
        weights, grads, optimizer, comm = e.weights, e.grads, e.optimizer, e.grads
        detail = dict(buckets=comm)
    else:
        units = fsdp_units(cfg)
        weights = (e.weights - four_bit) / gpus + four_bit
        grads, optimizer, scratch = e.grads / gpus, e.optimizer / gpus, scratch / gpus
        comm = w * (units["root"] + min(2, units["layers"]) * units["layer"]) if gpus > 1 else 0.0
        detail = dict(units=units, four_bit_replicated=four_bit)
    total = weights + optimizer + comm + max(act, grads + scratch)
    return ShardedEstimate(gpus=gpus, sharding=sharding, weights=weights, grads=grads, optimizer=optimizer,
                           activations=e.activations, comm=comm, total=total, detail=dict(detail, one_gpu=e.total))


def format_sharded(s: ShardedEstimate) -> str:
    comm = "DDP gradient buckets" if s.sharding == "ddp" else "FSDP gathered units (root + 2 layers)"
    rows = [("weights", s.weights), ("grads", s.grads), ("optimizer", s.optimizer), ("activations", s.activations),
            (comm, s.comm), ("total (peak)", s.total)]
    lines = [f"{'per GPU, ' + str(s.gpus) + ' GPUs, ' + s.sharding.upper():<46} {'GB':>10}"]
    return "\n".join(lines + [f"{n:<46} {v / GB:>10.3f}" for n, v in rows])
