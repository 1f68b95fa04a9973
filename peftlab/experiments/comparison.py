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
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .methods import COMPARED, Method, SaveFn, classifier_head
from .methods import METHODS as ALL_METHODS
from .methods import apply_method as _apply

METHODS: dict[str, Method] = {name: ALL_METHODS[name] for name in COMPARED}  # the table's compared methods
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
    options = METHODS[method].options
    for key in method_kwargs:
        if key not in options:
            raise ValueError(f"method {method!r} takes no option {key!r}; its options: {options}")


def apply_method(method: str, model: nn.Module, tokenizer=None, **method_kwargs) -> tuple[nn.Module, SaveFn]:
    """Apply ``method`` to a sequence classifier (in place), its head trained too; return ``(model to train, save)``.

    >>> from peftlab.models import build_from_config
    >>> from peftlab.inject import count_parameters
    >>> model, save = apply_method("lora", build_from_config("tiny-bert", task="classification", num_labels=3))
    >>> count_parameters(model)[0]  # r=8 on query and value (64 -> 64) of 2 layers, plus the head 64 x 3 + 3
    4291
    """
    check_method(method, **method_kwargs)
    # Every method here trains the classifier's head too (BERT's "classifier"), as HF peft does.
    return _apply(method, model, tokenizer, head=classifier_head(model), **method_kwargs)


def finetune(method: str = "lora", steps: int = 200, limit: int | None = 2000, eval_limit: int = 500,
             batch_size: int = 16, lr: float | None = None, seed: int = 0, max_length: int = 64,
             progress: bool = True, log_dir: str | None = None, **method_kwargs) -> dict:
    """Fine-tune MiniLM-L6 on tweet sentiment with ``method``; return a dict of figures.

    ``limit`` caps the training split (stratified), ``eval_limit`` the validation split; ``lr`` defaults
    to the method's (:data:`METHODS`); ``method_kwargs`` go to the method (e.g. ``r=`` for LoRA). ``log_dir``:
    TensorBoard event files of the run there too.
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
    head_name = classifier_head(base)
    model, save = apply_method(method, base, tokenizer, **method_kwargs)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and head_name in n)
    train_loader = make_loader(tokenize(train_ds, tokenizer, max_length), tokenizer, batch_size,
                               shuffle=True, seed=seed)
    eval_loader = make_loader(tokenize(eval_ds, tokenizer, max_length), tokenizer, 64, shuffle=False)
    lr = lr or METHODS[method].lr
    result = train(model, train_loader, eval_loader, steps=steps, lr=lr, seed=seed, evaluate_before=True,
                   desc=method, progress=progress, log_dir=log_dir)
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

    Each run also writes TensorBoard event files to :func:`runs_dir` ``/<method>/`` (``tensorboard --logdir``
    on :func:`runs_dir` shows the methods side by side).

    The report is rewritten after every method, so a run cut short keeps what it measured. With
    ``keep_going`` a method that fails is reported (a warning) and left out instead of stopping the rest.
    """
    from ..train import run_isolated

    for method in methods:  # fail before the first (long) run, not after it
        check_method(method)
    rows = []
    for method in (bar := tqdm(methods, desc="methods")):
        bar.set_postfix(method=method)
        shutil.rmtree(runs_dir(out_dir, name) / method, ignore_errors=True)  # a rerun replaces, not appends
        try:
            rows.append(run_isolated("peftlab.experiments.comparison:finetune", method=method, progress=False,
                                     log_dir=str(runs_dir(out_dir, name) / method), **kwargs))
        except RuntimeError as e:
            if not keep_going:
                raise
            warnings.warn(f"{method} failed, left out of the report:\n{e}", stacklevel=2)
            continue
        write_report(rows, out_dir, name)
    if not rows:
        raise RuntimeError(f"none of {methods} ran")
    return rows


def runs_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """Where ``compare`` writes the TensorBoard runs of the report ``name``: ``<out_dir>/runs/<name>``.

    >>> str(runs_dir("reports", "lora_vs_full"))
    'reports/runs/lora_vs_full'
    """
    return Path(out_dir) / "runs" / name


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
