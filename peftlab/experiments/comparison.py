"""Fine-tuning runs on the tweet-sentiment task, one method at a time, each comparable with the others.

``finetune(method=...)`` loads MiniLM-L6 and the data, applies one of the eight methods in
:data:`METHODS` (full, LoRA, Houlsby and Pfeiffer adapters, prefix and prompt tuning, IA3, BitFit),
trains for a fixed number of AdamW steps on the same examples in the same order, and reports accuracy
(before and after), trainable parameters, time per step, peak memory and the size of the file a user
would have to store. ``compare(methods)`` runs each in its own subprocess (so peak memory is per run),
rewrites a table and a plot after every run (a run cut short keeps what it measured), and checks the
measured trainable share against the ranges the course notes claim.

References:
    - Hu et al., "LoRA", arXiv:2106.09685 (Section 5: LoRA on query/value matches full fine-tuning).
    - Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751.
    - Pfeiffer et al., "AdapterFusion", arXiv:2005.00247.
    - Li & Liang, "Prefix-Tuning", arXiv:2101.00190.
    - Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", arXiv:2104.08691.
    - Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (IA3),
      arXiv:2205.05638.
    - Ben Zaken et al., "BitFit", arXiv:2106.10199.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

SaveFn = Callable[[nn.Module, str], int]  # save(model, directory) -> bytes written
HEAD = "classifier"  # BERT's sequence-classification head: every PEFT method here trains it too, as HF peft does


# --- the methods: each applies itself in place and returns (model to train, save function) -------
# Imports are inside the functions so that importing this module stays cheap.
def save_full(model: nn.Module, path: str) -> int:
    """Full fine-tuning's file: the whole model (``save_pretrained``)."""
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in Path(path).iterdir())


def save_trainable(model: nn.Module, path: str) -> int:
    """The tensors that train (BitFit: the biases and the head) in one safetensors file."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "trainable.safetensors")
    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}, file)
    return os.path.getsize(file)


def _full(model: nn.Module, tokenizer=None) -> tuple[nn.Module, SaveFn]:
    return model, save_full


def _lora(model: nn.Module, tokenizer=None, r: int = 8, lora_alpha: float = 16.0,
          target_modules: list[str] | None = None) -> tuple[nn.Module, SaveFn]:
    from ..lora import LoraConfig, apply_lora, save_adapter

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules or ["query", "value"],
                        modules_to_save=[HEAD], task_type="SEQ_CLS")
    return apply_lora(model, config), save_adapter


def _adapters(placement: str) -> Callable[..., tuple[nn.Module, SaveFn]]:
    def apply(model: nn.Module, tokenizer=None, reduction_factor: int = 16) -> tuple[nn.Module, SaveFn]:
        from ..adapters import AdapterConfig, apply_adapters, save_adapter

        # num_labels: the adapter gets a head of its own, starting from the model's (same labels).
        config = AdapterConfig(placement=placement, reduction_factor=reduction_factor,
                               num_labels=model.config.num_labels)
        return apply_adapters(model, config), save_adapter
    return apply


def _prefix(model: nn.Module, tokenizer=None, num_virtual_tokens: int = 20,
            prefix_projection: bool = False) -> tuple[nn.Module, SaveFn]:
    from ..prefix import PrefixConfig, PrefixTuningModel, save_prefix

    config = PrefixConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection)
    return PrefixTuningModel(model, config), save_prefix


def _prompt(model: nn.Module, tokenizer=None, num_virtual_tokens: int = 20, prompt_tuning_init: str = "TEXT",
            prompt_tuning_init_text: str | None = "Classify the sentiment:") -> tuple[nn.Module, SaveFn]:
    from ..prompt import PromptTuningConfig, PromptTuningModel, save_prompt

    # Lester et al. (Section 3.2): initialising from real words' embeddings beats random at small scale.
    config = PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=prompt_tuning_init,
                                prompt_tuning_init_text=prompt_tuning_init_text)
    return PromptTuningModel(model, config, tokenizer), save_prompt


def _ia3(model: nn.Module, tokenizer=None) -> tuple[nn.Module, SaveFn]:
    from ..ia3 import DEFAULT_TARGETS, IA3Config, apply_ia3, save_ia3

    model_type = model.config.model_type
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"ia3 has default targets for {sorted(DEFAULT_TARGETS)}, not {model_type!r}")
    # Named explicitly (not left to apply_ia3's defaults) so the saved config records them.
    return apply_ia3(model, IA3Config(*DEFAULT_TARGETS[model_type], modules_to_save=[HEAD])), save_ia3


def _bitfit(model: nn.Module, tokenizer=None) -> tuple[nn.Module, SaveFn]:
    from ..bitfit import apply_bitfit

    return apply_bitfit(model, modules_to_save=[HEAD]), save_trainable


@dataclass(frozen=True)
class Method:
    """A registered method: ``apply(model, tokenizer, **kwargs) -> (model to train, save)``, its AdamW
    learning rate, and the trainable share (%, task head excluded) the course notes claim, if any."""

    apply: Callable[..., tuple[nn.Module, SaveFn]]
    lr: float
    claim: tuple[float, float] | None = None


# Learning rates: the usual order of magnitude for each method (its paper or HF peft's examples); the
# methods that train few numbers want larger steps (LoRA paper, App. D; Lester et al. use 0.3 for prompts).
# Claims: the course notes' tables (seeds 001 and 002), which disagree with each other for prefix
# tuning (0.1-0.5 % vs 1-2 %): the union is checked. None: the notes make no claim.
METHODS: dict[str, Method] = {
    "full": Method(_full, lr=5e-5),
    "lora": Method(_lora, lr=1e-3, claim=(0.1, 1.0)),
    "houlsby": Method(_adapters("houlsby"), lr=1e-3, claim=(1.0, 5.0)),
    "pfeiffer": Method(_adapters("pfeiffer"), lr=1e-3, claim=(1.0, 5.0)),
    "prefix": Method(_prefix, lr=1e-2, claim=(0.1, 2.0)),
    "prompt": Method(_prompt, lr=3e-2, claim=(0.0, 0.1)),
    "ia3": Method(_ia3, lr=3e-3),
    "bitfit": Method(_bitfit, lr=1e-3),
}
DEFAULT_LR = {name: m.lr for name, m in METHODS.items()}
CLAIMED = {name: m.claim for name, m in METHODS.items() if m.claim is not None}


def check_method(method: str, **method_kwargs) -> None:
    """A ``ValueError`` naming the problem if ``method`` is unknown or does not take ``method_kwargs``.

    >>> check_method("lora", r=4)
    >>> check_method("lora", rank=4)
    Traceback (most recent call last):
    ...
    ValueError: method 'lora' takes no option 'rank'; its options: ['r', 'lora_alpha', 'target_modules']
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    options = list(inspect.signature(METHODS[method].apply).parameters)[2:]  # after (model, tokenizer)
    for key in method_kwargs:
        if key not in options:
            raise ValueError(f"method {method!r} takes no option {key!r}; its options: {options}")


def apply_method(method: str, model: nn.Module, tokenizer=None, **method_kwargs) -> tuple[nn.Module, SaveFn]:
    """Apply ``method`` to a sequence classifier (in place); return ``(model to train, save)``.

    >>> from peftlab.models import build_from_config
    >>> from peftlab.inject import count_parameters
    >>> model, save = apply_method("lora", build_from_config("tiny-bert", task="classification", num_labels=3))
    >>> count_parameters(model)[0]  # r=8 on query and value (64 -> 64) of 2 layers, plus the head 64 x 3 + 3
    4291
    """
    check_method(method, **method_kwargs)
    return METHODS[method].apply(model, tokenizer, **method_kwargs)


def finetune(method: str = "lora", steps: int = 200, limit: int | None = 2000, eval_limit: int = 500,
             batch_size: int = 16, lr: float | None = None, seed: int = 0, max_length: int = 64,
             progress: bool = True, **method_kwargs) -> dict:
    """Fine-tune MiniLM-L6 on tweet sentiment with ``method``; return a dict of figures.

    ``limit`` caps the training split (stratified), ``eval_limit`` the validation split; ``lr`` defaults
    to the method's (:data:`METHODS`); ``method_kwargs`` go to the method (e.g. ``r=`` for LoRA).
    """
    check_method(method, **method_kwargs)
    from ..data import load_tweets, tokenize
    from ..models import load_classifier
    from ..train import default_device, make_loader, train

    torch.manual_seed(seed)
    data = load_tweets(seed=0)
    n_train = min(limit or len(data["train"]), len(data["train"]))
    train_ds = data["train"].shuffle(seed=seed).select(range(n_train))
    eval_ds = data["validation"].select(range(min(eval_limit, len(data["validation"]))))
    base, tokenizer = load_classifier(num_labels=3)  # seeded above: the same head weights for every method
    base.to(default_device())
    model, save = apply_method(method, base, tokenizer, **method_kwargs)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and HEAD in n)
    train_loader = make_loader(tokenize(train_ds, tokenizer, max_length), tokenizer, batch_size,
                               shuffle=True, seed=seed)
    eval_loader = make_loader(tokenize(eval_ds, tokenizer, max_length), tokenizer, 64, shuffle=False)
    lr = lr or METHODS[method].lr
    result = train(model, train_loader, eval_loader, steps=steps, lr=lr, seed=seed, evaluate_before=True,
                   desc=method, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        saved_bytes = save(model, tmp)
    out = result.to_dict()
    out.update(method=method, lr=lr, steps=steps, batch_size=batch_size, train_examples=len(train_ds),
               eval_examples=len(eval_ds), saved_bytes=int(saved_bytes), head_params=head,
               device=str(default_device()), **method_kwargs)
    out["losses"] = [round(x, 4) for x in out["losses"]]
    return out


def compare(methods: list[str], out_dir: str | os.PathLike = "reports", name: str = "lora_vs_full",
            keep_going: bool = True, **kwargs) -> list[dict]:
    """Run ``finetune`` for each method in its own subprocess; write ``<name>.json/.csv/.md/.png``.

    The report is rewritten after every method, so a run cut short keeps what it measured. With
    ``keep_going`` a method that fails is reported (a warning) and left out instead of stopping the rest.
    """
    from ..train import run_isolated

    for method in methods:  # fail before the first (long) run, not after it
        check_method(method)
    rows = []
    for method in (bar := tqdm(methods, desc="methods")):
        bar.set_postfix(method=method)
        try:
            rows.append(run_isolated("peftlab.experiments.comparison:finetune", method=method, progress=False,
                                     **kwargs))
        except RuntimeError as e:
            if not keep_going:
                raise
            warnings.warn(f"{method} failed, left out of the report:\n{e}", stacklevel=2)
            continue
        write_report(rows, out_dir, name)
    if not rows:
        raise RuntimeError(f"none of {methods} ran")
    return rows


# --- the report ----------------------------------------------------------------------------------
def verdict(method: str, pct: float | None) -> str:
    """``pct`` (trainable %, head excluded) against the course notes' claim for ``method``.

    >>> verdict("lora", 0.32), verdict("houlsby", 0.99), verdict("full", 100.0)
    ("within the notes' 0.1-1.0 %", "OUTSIDE the notes' 1.0-5.0 %", 'no claim')
    """
    claim = CLAIMED.get(method)
    if claim is None:
        return "no claim"
    low, high = claim
    text = f"< {high} %" if low == 0 else f"{low}-{high} %"
    if pct is None:
        return f"notes claim {text}; head size not recorded"
    return f"{'within' if low <= pct <= high else 'OUTSIDE'} the notes' {text}"


COLUMNS = ["method", "trainable", "total", "trainable_pct", "trainable_pct_no_head", "notes_claim",
           "accuracy_before", "accuracy", "seconds_per_step", "peak_memory_mb", "saved_mb", "lr"]


def table_rows(rows: list[dict]) -> list[dict]:
    """One table row per run (``finetune``'s dicts): percentages, MiB, the notes' verdict.

    ``trainable_pct`` counts the task head as HF peft does; the notes' claims are checked against
    ``trainable_pct_no_head`` (None for rows written before the head size was recorded).
    """
    out = []
    for r in rows:
        no_head = None if "head_params" not in r else round(100 * (r["trainable"] - r["head_params"]) / r["total"], 4)
        out.append({"method": r["method"], "trainable": r["trainable"], "total": r["total"],
                    "trainable_pct": round(100 * r["trainable"] / r["total"], 4),
                    "trainable_pct_no_head": no_head, "notes_claim": verdict(r["method"], no_head),
                    "accuracy_before": round(r["accuracy_before"], 4), "accuracy": round(r["accuracy"], 4),
                    "seconds_per_step": round(r["seconds_per_step"], 4),
                    "peak_memory_mb": round(r["peak_memory_bytes"] / 2**20, 1),
                    "saved_mb": round(r["saved_bytes"] / 2**20, 4), "lr": r.get("lr")})
    return out


def summary_lines(rows: list[dict]) -> list[str]:
    """One printable line per run."""
    return [f"{r['method']:<9} {r['trainable_pct']:8.4f} %  acc {r['accuracy_before']:.3f} -> {r['accuracy']:.3f}"
            f"  {r['seconds_per_step']:.3f} s/step  {r['peak_memory_mb']:7.1f} MiB  {r['saved_mb']:8.4f} MiB"
            f"  {r['notes_claim']}" for r in table_rows(rows)]


def write_report(rows: list[dict], out_dir: str | os.PathLike, name: str) -> list[dict]:
    """Write the raw JSON, a CSV and a markdown table, and a 5-panel bar plot; return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    table = table_rows(rows)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS) + " |"
           for r in table]
    r0 = rows[0]
    md += ["", f"MiniLM-L6 on tweet sentiment: {r0.get('steps', '?')} steps of batch {r0.get('batch_size', '?')}, "
               f"{r0.get('train_examples', '?')} training and {r0.get('eval_examples', '?')} validation examples, "
               f"device {r0.get('device', 'cpu')}. trainable_pct counts the task head as HF peft does; the "
               f"course notes' claims are checked against trainable_pct_no_head."]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    panels = [("trainable_pct", "trainable parameters (%, log)", True), ("accuracy", "validation accuracy", False),
              ("seconds_per_step", "seconds per step", False), ("peak_memory_mb", "peak memory (MiB)", False),
              ("saved_mb", "saved file (MiB, log)", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    names = [r["method"] for r in table]
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        values = [r[key] for r in table]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
        if key == "accuracy":
            ax.scatter(names, [r["accuracy_before"] for r in table], marker="_", s=300, color="k", zorder=3,
                       label="before training")
            ax.legend(fontsize=7, loc="lower right")
        if key == "trainable_pct" and any(n in CLAIMED for n in names):  # claimed ranges behind the bars
            for i, n in enumerate(names):
                if n in CLAIMED:
                    low, high = CLAIMED[n]
                    ax.plot([i, i], [max(low, 1e-3), high], color="grey", lw=6, alpha=0.4, zorder=0)
            ax.plot([], [], color="grey", lw=6, alpha=0.4, label="notes' claim")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"MiniLM-L6 on tweet sentiment, {r0.get('steps', '?')} steps each "
                 f"({r0.get('train_examples', '?')} examples)")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    return table
