"""QLoRA instruction tuning: a 4-bit NF4 base, LoRA adapters in full precision, loss on the assistant's tokens only.

QLoRA = :func:`peftlab.quant.quantize_model` (frozen NF4 base, dequantized per forward) +
:func:`peftlab.lora.apply_lora` (trainable ``A``, ``B`` in fp32). For instruction tuning each example
is a chat (system, user, assistant) written with the model's chat template; the prompt tokens get
label ``-100``, so only the answer (and the end-of-turn token that teaches the model to stop) is
learned. :func:`plot_codebooks` draws why NF4 suits normally distributed weights.

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
    - Ouyang et al., "Training language models to follow instructions with human feedback" (loss on
      the response only), arXiv:2203.02155.
    - Allal et al., "SmolLM2", arXiv:2502.02737 (the chat model and its template).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..lora import LoraConfig, apply_lora, lora_layers
from ..quant import (
    CODEBOOKS,
    Linear4bit,
    QuantConfig,
    blockwise_absmax,
    compare_quantizers,
    model_nbytes,
    nearest_code,
    quantize_model,
)
from ..train import TrainResult, train

IGNORE_INDEX = -100  # cross_entropy's ignore_index: these positions add nothing to the loss
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A small instruction set in one consistent voice (short answers about this course's methods), so a
# few steps visibly move the model towards it.
INSTRUCTIONS: list[tuple[str, str]] = [
    ("What does LoRA train?", "Two small matrices, B and A, beside each frozen weight: W x + (alpha / r) B A x."),
    ("Why does LoRA start with B = 0?", "So the model is unchanged at step 0; training moves B away from zero."),
    ("What is NF4?", "A 4-bit code whose 16 values are quantiles of a normal distribution, scaled to [-1, 1]."),
    ("Why is NF4 good for weights?", "Weights are roughly normal, so each of the 16 NF4 values is used equally."),
    ("What is double quantization?", "Storing the per-block absmax scales in 8 bits too: 0.127 instead of 0.5 bits."),
    ("What does QLoRA keep in 16 or 32 bits?", "The LoRA adapters and their optimizer state; the base stays 4-bit."),
    ("How many bits does an NF4 weight cost?", "4 bits plus the block's scale: about 4.127 bits with double quant."),
    ("What is a blocksize?", "How many weights share one absmax scale; QLoRA uses blocks of 64."),
    ("Can a 4-bit weight be trained?", "No: it is frozen. Gradients pass through it to the LoRA adapters."),
    ("What does merging LoRA into 4 bits do?", "Dequantize, add B A, requantize: small updates round away."),
    ("What is prompt tuning?", "Learning a few input embeddings in front of the text while the model stays frozen."),
    ("What are bottleneck adapters?", "Small down-project, nonlinearity, up-project blocks inserted in each layer."),
]


def tokenize_chat(tokenizer, pairs: list[tuple[str, str]], max_length: int = 64,
                  system: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Each (question, answer) as chat tokens: ``input_ids`` and ``labels`` (``-100`` on the prompt).

    The labels keep the answer and the end-of-turn token after it: the model learns what to say
    and when to stop, not to repeat the system and user text it is given. Examples longer than
    ``max_length`` are cut from the right (the answer is cut, the prompt kept).

    >>> from peftlab.models import load_causal_lm_tokenizer
    >>> tok = load_causal_lm_tokenizer()
    >>> ex = tokenize_chat(tok, [("2+2?", "4.")])[0]
    >>> tok.decode(ex["input_ids"][ex["labels"] != -100])
    '4.<|im_end|>'
    """
    if not pairs:
        raise ValueError("tokenize_chat needs at least one (question, answer) pair, got none")
    end_of_turn = getattr(tokenizer, "eos_token", None) or ""
    out = []
    for question, answer in pairs:
        chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt + answer):
            raise ValueError("the chat template does not put the answer right after the generation prompt; "
                             "tokenize_chat cannot locate the assistant tokens")
        # Tokenize the prompt, the answer and its end-of-turn marker separately and concatenate, so the
        # boundary between prompt and answer is exact (no BPE merge across it).
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        body = tokenizer(answer + end_of_turn, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(head + body)[:max_length]
        labels = ids.clone()
        labels[: len(head)] = IGNORE_INDEX
        if (labels != IGNORE_INDEX).sum() == 0:
            raise ValueError(f"max_length={max_length} leaves no answer tokens after a {len(head)}-token prompt")
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask``, ``labels`` of shape (B, T)."""
    T = max(e["input_ids"].numel() for e in examples)
    batch = {"input_ids": torch.full((len(examples), T), pad_id),
             "attention_mask": torch.zeros(len(examples), T, dtype=torch.long),
             "labels": torch.full((len(examples), T), IGNORE_INDEX)}
    for i, e in enumerate(examples):
        n = e["input_ids"].numel()
        batch["input_ids"][i, :n], batch["labels"][i, :n] = e["input_ids"], e["labels"]
        batch["attention_mask"][i, :n] = 1
    return batch


@dataclass
class QLoraResult(TrainResult):
    """What :func:`qlora_finetune` reports: the training run's figures (losses per step, seconds per step, peak
    memory, parameter counts) and the loss on the answers and the bytes of the base and the adapters."""

    eval_loss_before: float = 0.0  # mean loss over all examples before training (eval mode)
    eval_loss_after: float = 0.0
    base_bytes: int = 0  # bytes of the quantized base (packed weights, scales, unquantized layers)
    base_bytes_before: int = 0  # the same model before quantization
    adapter_bytes: int = 0


def chat_batches(examples: list[dict[str, torch.Tensor]], batch_size: int, pad_id: int) -> Iterator[dict]:
    """Endless padded batches of ``examples`` in one random order (drawn at the first batch), wrapping around.

    >>> ex = [{"input_ids": torch.tensor([i, i]), "labels": torch.tensor([-100, i])} for i in range(3)]
    >>> batch = next(chat_batches(ex, 4, pad_id=0))
    >>> batch["input_ids"].shape  # 4 of the 3 examples: the order wraps around
    torch.Size([4, 2])
    """
    order = torch.randperm(len(examples)).tolist()
    for step in itertools.count():
        yield collate([examples[order[(step * batch_size + j) % len(order)]] for j in range(batch_size)], pad_id)


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[dict[str, torch.Tensor]], pad_id: int, batch_size: int = 8) -> float:
    """Average per-token loss on the labelled (assistant) tokens of ``examples``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()  # positions that are predicted
        total += model(**batch).loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def qlora_finetune(model: nn.Module, tokenizer, examples: list[tuple[str, str]] | None = None, steps: int = 10,
                   r: int = 8, lora_alpha: float = 16.0, lr: float = 1e-3, batch_size: int = 4,
                   max_length: int = 64, target_modules: list[str] | tuple[str, ...] = LLAMA_TARGETS,
                   quant_config: QuantConfig | None = None, seed: int = 0, progress: bool = True,
                   tokenized: list[dict[str, torch.Tensor]] | None = None) -> QLoraResult:
    """Quantize ``model`` to NF4 (unless it already holds 4-bit layers), add LoRA, train ``steps`` steps (in place).

    ``examples`` are (question, answer) pairs (default :data:`INSTRUCTIONS`), written with the
    tokenizer's chat template; only the answer tokens are in the loss. Pass ``tokenized`` (from
    :func:`tokenize_chat`, or any ``input_ids``/``labels`` pairs) to skip the tokenizer. The
    4-bit weights never change: AdamW only sees the LoRA parameters.

    Usage (``tests/experiments/test_qlora_recipe.py`` runs it on three layers of SmolLM2)::

        model, tok = load_causal_lm()
        res = qlora_finetune(model, tok, steps=10)
        assert res.eval_loss_after < res.eval_loss_before
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if tokenized is None:
        if tokenizer is None:
            raise ValueError("qlora_finetune needs a tokenizer, or already tokenized examples (tokenized=...)")
        tokenized = tokenize_chat(tokenizer, examples or INSTRUCTIONS, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    base_bytes_before = 0
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        base_bytes_before = model_nbytes(model)
        # The LM head is tied to the embeddings in SmolLM2 and stays in full precision (QLoRA does the same).
        quantize_model(model, quant_config or QuantConfig(compute_dtype=torch.float32), skip=("lm_head",))
    base_bytes = model_nbytes(model)
    apply_lora(model, LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules),
                                 task_type="CAUSAL_LM"))
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    eval_loss_before = mean_loss(model, tokenized, pad_id)
    # train() seeds, then the first batch draws the order: AdamW (no weight decay) on the LoRA parameters only.
    trained = train(model, chat_batches(tokenized, batch_size, pad_id), steps=steps, lr=lr, seed=seed,
                    desc="qlora", progress=progress)
    return QLoraResult(**asdict(trained), eval_loss_before=eval_loss_before,
                       eval_loss_after=mean_loss(model, tokenized, pad_id), base_bytes=base_bytes,
                       base_bytes_before=base_bytes_before, adapter_bytes=adapter_bytes)


@torch.no_grad()
def generate_answer(model: nn.Module, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    """The model's greedy reply to ``question`` in chat format (for before/after comparisons)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def keep_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep only the first ``num_layers`` decoder layers of a Llama-style model (in place).

    On a CPU a 4-bit layer is dequantized at every forward, so the full 30-layer SmolLM2 takes tens
    of seconds per QLoRA step; its first few layers show the same mechanics in seconds. The cut
    model is no longer a good language model: use it to watch training work, not to judge answers.

    >>> from types import SimpleNamespace as NS
    >>> m = NS(model=NS(layers=nn.ModuleList(nn.Linear(2, 2) for _ in range(3))), config=NS(num_hidden_layers=3))
    >>> len(keep_layers(m, 1).model.layers), m.config.num_hidden_layers
    (1, 1)
    """
    layers = model.model.layers
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def adapter_change(model: nn.Module) -> float:
    """Largest ``|B|`` over all LoRA layers: 0 before training (B starts at zero), > 0 once trained."""
    return max(layer.lora_B.abs().max().item() for _, layer in lora_layers(model))


# --- the figure: why NF4 fits normally distributed weights ------------------------------------------
def code_usage_entropy(scaled: torch.Tensor, code: torch.Tensor) -> float:
    """Entropy (bits) of how often each level of ``code`` is chosen: 4.0 when all 16 are used equally."""
    counts = torch.bincount(nearest_code(scaled, code), minlength=code.numel()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def plot_codebooks(weight: torch.Tensor, blocksize: int = 64, title: str = "weights", all_weights=None):
    """Histogram of ``weight / blockwise absmax`` with the NF4, FP4 and int4 levels drawn on it.

    One panel per 4-bit code: the histogram of the scaled weights (the same in every panel), the
    16 levels as vertical lines, and in the title the mean squared error of storing ``weight``
    (from :func:`peftlab.quant.compare_quantizers`, over ``all_weights`` when given) and how evenly
    the levels are used (entropy in bits; 4 is the most a 4-bit code can carry). A table below
    lists the errors, including the row-wise int8 baseline. Returns ``(figure, table)``.

    >>> fig, table = plot_codebooks(torch.randn(256, 256))
    >>> table["nf4"]["mse"] < table["int4"]["mse"] < table["fp4"]["mse"], len(fig.axes)
    (True, 4)
    """
    import matplotlib.pyplot as plt

    scaled = blockwise_absmax(weight.detach(), blocksize)[0]  # every value in [-1, 1]
    table = compare_quantizers(all_weights if all_weights is not None else weight, blocksize)
    names = {"nf4": "NF4 (normal quantiles)", "fp4": "FP4 (e2m1)", "int4": "int4 (uniform k/7)"}
    colors = {"nf4": "tab:blue", "fp4": "tab:red", "int4": "tab:green"}
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), gridspec_kw={"height_ratios": [3, 3, 3, 1.6]})
    bins = torch.linspace(-1, 1, 201)
    hist = torch.histc(scaled, bins=200, min=-1, max=1)
    density = (hist / hist.sum() / (bins[1] - bins[0])).numpy()
    centres = ((bins[:-1] + bins[1:]) / 2).numpy()
    for ax, name in zip(axes[:3], ("nf4", "fp4", "int4"), strict=True):
        code = CODEBOOKS[name]()
        table[name]["level_entropy_bits"] = code_usage_entropy(scaled, code)
        ax.fill_between(centres, density, step="mid", color="0.75")
        for level in code.unique().tolist():
            ax.axvline(level, color=colors[name], lw=1.2, alpha=0.9)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylabel("density")
        ax.set_title(f"{names[name]}: MSE {table[name]['mse']:.3g}, levels used with "
                     f"{table[name]['level_entropy_bits']:.2f} of 4 bits of entropy", fontsize=10, loc="left")
    axes[0].annotate(f"spikes at -1 and 1: each block's largest value\n(1 in {blocksize}) is its own absmax",
                     xy=(0.985, density[-1]), xytext=(0.42, 0.72 * density.max()), fontsize=8,
                     bbox=dict(boxstyle="round", fc="white", ec="0.6"), arrowprops=dict(arrowstyle="->", color="0.3"))
    axes[2].set_xlabel(f"weight / absmax of its block of {blocksize} (grey: histogram; lines: the 16 levels)")
    axes[3].axis("off")
    rows = [[key, f"{v['mse']:.3g}", f"{v['bits']:.3f}", f"{v['mse'] / table['nf4']['mse']:.2f}x"]
            for key, v in table.items()]
    cell = axes[3].table(cellText=rows, colLabels=["format", "MSE", "bits / weight", "MSE / NF4's"],
                         loc="center", cellLoc="center")
    cell.scale(1, 1.3)
    over = f"all {len(all_weights)} matrices given" if isinstance(all_weights, (list, tuple)) else "this matrix"
    axes[3].set_title(f"Mean squared error of storing {over} (4-bit formats: same blocksize, same bits)", fontsize=10)
    fig.suptitle(f"Why NF4 fits normal weights: its levels are dense where the weights are\n{title}", fontsize=11)
    fig.tight_layout()
    return fig, table
