"""Fine-tuning runs on the tweet-sentiment task, one method at a time, each comparable with the others.

``finetune(method=...)`` loads MiniLM-L6 and the data, applies a method, trains for a fixed number
of steps and reports accuracy (before and after), trainable parameters, time per step, peak memory
and the size of the file a user would have to store. ``compare(methods)`` runs each in its own
subprocess (so peak memory is per run) and writes a table and a plot.

References:
    - Hu et al., "LoRA", arXiv:2106.09685 (Section 5: LoRA on query/value matches full fine-tuning).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .lora import LoraConfig, apply_lora, save_adapter


def _apply_full(model: nn.Module, **_) -> Callable[[nn.Module, str], int]:
    def save(m: nn.Module, path: str) -> int:
        m.save_pretrained(path)
        return sum(f.stat().st_size for f in Path(path).iterdir())
    return save


def _apply_lora(model: nn.Module, r: int = 8, lora_alpha: float = 16.0,
                target_modules: list[str] | None = None, **_) -> Callable[[nn.Module, str], int]:
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules or ["query", "value"],
                        modules_to_save=["classifier"], task_type="SEQ_CLS")
    apply_lora(model, config)
    return save_adapter


# name -> function that applies the method in place and returns a "save to dir -> bytes" function.
METHODS: dict[str, Callable] = {"full": _apply_full, "lora": _apply_lora}
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3}  # LoRA wants a larger step than full fine-tuning (LoRA paper, App. D)


def finetune(method: str = "lora", steps: int = 200, limit: int | None = 2000, eval_limit: int = 500,
             batch_size: int = 16, lr: float | None = None, seed: int = 0, max_length: int = 64,
             progress: bool = True, **method_kwargs) -> dict:
    """Fine-tune MiniLM-L6 on tweet sentiment with ``method``; return a dict of figures.

    ``limit`` caps the training split (stratified), ``eval_limit`` the validation split.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    from .data import load_tweets, tokenize
    from .models import load_classifier
    from .train import default_device, make_loader, train

    torch.manual_seed(seed)
    data = load_tweets(seed=0)
    n_train = min(limit or len(data["train"]), len(data["train"]))
    train_ds = data["train"].shuffle(seed=seed).select(range(n_train))
    eval_ds = data["validation"].select(range(min(eval_limit, len(data["validation"]))))
    model, tokenizer = load_classifier(num_labels=3)
    model.to(default_device())
    save = METHODS[method](model, **method_kwargs)
    train_loader = make_loader(tokenize(train_ds, tokenizer, max_length), tokenizer, batch_size,
                               shuffle=True, seed=seed)
    eval_loader = make_loader(tokenize(eval_ds, tokenizer, max_length), tokenizer, 64, shuffle=False)
    result = train(model, train_loader, eval_loader, steps=steps, lr=lr or DEFAULT_LR.get(method, 1e-3), seed=seed,
                   evaluate_before=True, desc=method, progress=progress)
    with tempfile.TemporaryDirectory() as tmp:
        saved_bytes = save(model, tmp)
    out = result.to_dict()
    out.update(method=method, steps=steps, train_examples=len(train_ds), eval_examples=len(eval_ds),
               saved_bytes=int(saved_bytes), device=str(default_device()), **method_kwargs)
    out["losses"] = [round(x, 4) for x in out["losses"]]
    return out


def compare(methods: list[str], out_dir: str | os.PathLike = "reports", name: str = "lora_vs_full",
            **kwargs) -> list[dict]:
    """Run ``finetune`` for each method in its own subprocess; write ``<name>.json/.csv/.md/.png``."""
    from .train import run_isolated

    rows = []
    for method in tqdm(methods, desc="methods"):
        rows.append(run_isolated("peftlab.experiments:finetune", method=method, progress=False, **kwargs))
    write_report(rows, out_dir, name)
    return rows


COLUMNS = ["method", "trainable", "total", "trainable_pct", "accuracy_before", "accuracy", "seconds_per_step",
           "peak_memory_mb", "saved_mb"]


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        out.append({"method": r["method"], "trainable": r["trainable"], "total": r["total"],
                    "trainable_pct": round(100 * r["trainable"] / r["total"], 4),
                    "accuracy_before": round(r["accuracy_before"], 4), "accuracy": round(r["accuracy"], 4),
                    "seconds_per_step": round(r["seconds_per_step"], 4),
                    "peak_memory_mb": round(r["peak_memory_bytes"] / 2**20, 1),
                    "saved_mb": round(r["saved_bytes"] / 2**20, 3)})
    return out


def write_report(rows: list[dict], out_dir: str | os.PathLike, name: str) -> None:
    """Write the raw JSON, a CSV and a markdown table, and a 4-panel bar plot."""
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
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    panels = [("trainable_pct", "trainable parameters (%)", True), ("accuracy", "validation accuracy", False),
              ("seconds_per_step", "seconds per step", False), ("peak_memory_mb", "peak memory (MiB)", False)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    names = [r["method"] for r in table]
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        values = [r[key] for r in table]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
        if key == "accuracy":
            ax.scatter(names, [r["accuracy_before"] for r in table], marker="_", s=400, color="k",
                       label="before training", zorder=3)
            ax.legend(fontsize=8)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"MiniLM-L6 on tweet sentiment, {rows[0]['steps']} steps, {rows[0]['train_examples']} examples")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
