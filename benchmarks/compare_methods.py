"""Eight ways to fine-tune MiniLM-L6 on tweet sentiment, the same number of steps each.

Full fine-tuning, LoRA, Houlsby and Pfeiffer adapters, prefix tuning, prompt tuning, IA3 and BitFit
each train for ``--steps`` AdamW steps on the same examples in the same order, every run in its own
subprocess (so peak memory is per method). Reported: trainable parameters (as HF peft counts them,
task head included, and without the head), validation accuracy before and after, seconds per step,
peak memory and the size of the file a user must keep for the task. The measured trainable share is
checked against the ranges the course notes claim, and the verdict goes into the table.

Run from the repository root (writes reports/compare_methods.{json,csv,md,png}):
    python benchmarks/compare_methods.py           # 300 steps, 2,000 examples: about an hour on 2 CPU cores
    python benchmarks/compare_methods.py --fast    # 10 steps, 64 examples: a smoke test (~3 minutes)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ["full", "lora", "houlsby", "pfeiffer", "prefix", "prompt", "ia3", "bitfit"]
# AdamW learning rates: the usual order of magnitude for each method (its paper or HF peft's examples).
LR = {"full": 5e-5, "lora": 1e-3, "houlsby": 1e-3, "pfeiffer": 1e-3, "prefix": 1e-2, "prompt": 3e-2,
      "ia3": 3e-3, "bitfit": 1e-3}
# What the course notes claim, as (low, high) trainable % of the model; None: no claim.
CLAIMED = {"prompt": (0.0, 0.1), "prefix": (0.1, 2.0), "houlsby": (1.0, 5.0), "pfeiffer": (1.0, 5.0),
           "lora": (0.1, 1.0)}
NUM_VIRTUAL_TOKENS = 20


def _apply(method: str, model, tokenizer):
    """Apply ``method`` to ``model``; return ``(model to train, save(model, dir) -> bytes)``."""
    if method == "full":
        def save_full(m, path):
            m.save_pretrained(path)
            return sum(f.stat().st_size for f in Path(path).iterdir())
        return model, save_full
    if method == "lora":
        from peftlab.lora import LoraConfig, apply_lora, save_adapter
        return apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], task_type="SEQ_CLS")), save_adapter
    if method in ("houlsby", "pfeiffer"):
        from peftlab.adapters import AdapterConfig, apply_adapters, save_adapter
        return apply_adapters(model, AdapterConfig(placement=method, num_labels=3)), save_adapter
    if method == "prefix":
        from peftlab.prefix import PrefixConfig, PrefixTuningModel, save_prefix
        return PrefixTuningModel(model, PrefixConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS)), save_prefix
    if method == "prompt":
        from peftlab.prompt import PromptTuningConfig, PromptTuningModel, save_prompt
        config = PromptTuningConfig(num_virtual_tokens=NUM_VIRTUAL_TOKENS, prompt_tuning_init="TEXT",
                                    prompt_tuning_init_text="Classify the sentiment:")
        return PromptTuningModel(model, config, tokenizer), save_prompt
    if method == "ia3":
        from peftlab.ia3 import DEFAULT_TARGETS, IA3Config, apply_ia3, save_ia3
        return apply_ia3(model, IA3Config(*DEFAULT_TARGETS["bert"], modules_to_save=["classifier"])), save_ia3
    if method == "bitfit":
        from peftlab.bitfit import apply_bitfit
        return apply_bitfit(model, modules_to_save=["classifier"]), _save_trainable
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _save_trainable(model, path) -> int:
    """BitFit's file: the trained tensors (biases and head) alone."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "bitfit.safetensors")
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, file)
    return os.path.getsize(file)


def finetune_method(method: str, steps: int, limit: int, eval_limit: int, batch_size: int, seed: int = 0,
                    max_length: int = 64) -> dict:
    """One run (called in a fresh subprocess): apply ``method``, train, evaluate, save; return figures."""
    import torch

    from peftlab.data import load_tweets, tokenize
    from peftlab.models import load_classifier
    from peftlab.train import make_loader, train

    torch.manual_seed(seed)
    data = load_tweets(seed=0)
    train_ds = data["train"].shuffle(seed=seed).select(range(min(limit, len(data["train"]))))
    eval_ds = data["validation"].select(range(min(eval_limit, len(data["validation"]))))
    base, tokenizer = load_classifier(num_labels=3)  # the same head weights for every method (seeded)
    model, save = _apply(method, base, tokenizer)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    loaders = [make_loader(tokenize(ds, tokenizer, max_length), tokenizer, bs, shuffle=shuffle, seed=seed)
               for ds, bs, shuffle in ((train_ds, batch_size, True), (eval_ds, 64, False))]
    result = train(model, *loaders, steps=steps, lr=LR[method], seed=seed, evaluate_before=True, desc=method,
                   progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        saved = save(model, tmp)
    out = result.to_dict()
    out.update(method=method, lr=LR[method], steps=steps, train_examples=len(train_ds),
               eval_examples=len(eval_ds), saved_bytes=int(saved), head_params=head,
               first_loss=out["losses"][0], last_loss=sum(out["losses"][-10:]) / len(out["losses"][-10:]))
    del out["losses"]
    return out


def verdict(method: str, pct: float) -> str:
    if method not in CLAIMED:
        return "no claim"
    low, high = CLAIMED[method]
    claim = f"< {high} %" if low == 0 else f"{low}-{high} %"
    return f"{'within' if low <= pct <= high else 'OUTSIDE'} the notes' {claim}"


COLUMNS = ["method", "trainable", "trainable_pct", "trainable_pct_no_head", "notes_claim", "accuracy_before",
           "accuracy", "seconds_per_step", "peak_memory_mb", "saved_mb", "lr"]


def table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        no_head = 100 * (r["trainable"] - r["head_params"]) / r["total"]
        out.append({"method": r["method"], "trainable": r["trainable"],
                    "trainable_pct": round(100 * r["trainable"] / r["total"], 4),
                    "trainable_pct_no_head": round(no_head, 4), "notes_claim": verdict(r["method"], no_head),
                    "accuracy_before": round(r["accuracy_before"], 4), "accuracy": round(r["accuracy"], 4),
                    "seconds_per_step": round(r["seconds_per_step"], 4),
                    "peak_memory_mb": round(r["peak_memory_bytes"] / 2**20, 1),
                    "saved_mb": round(r["saved_bytes"] / 2**20, 4), "lr": r["lr"]})
    return out


def write_report(rows: list[dict], out_dir: Path, name: str = "compare_methods") -> list[dict]:
    """JSON (raw), CSV and markdown tables, and a 4-panel bar plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    t = table(rows)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(t)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in COLUMNS) + " |" for r in t]
    r0 = rows[0]
    md += ["", f"MiniLM-L6 (22.7 M parameters) on tweet sentiment: {r0['steps']} steps of batch "
               f"{r0.get('batch_size', '?')}, {r0['train_examples']} training and {r0['eval_examples']} validation "
               f"examples, device {r0.get('device', 'cpu')}. trainable_pct counts the task head as HF peft does; "
               f"the notes' claims are checked against trainable_pct_no_head."]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    panels = [("trainable_pct", "trainable parameters (%, log)", True), ("accuracy", "validation accuracy", False),
              ("seconds_per_step", "seconds per step", False), ("peak_memory_mb", "peak memory (MiB)", False),
              ("saved_mb", "saved file (MiB, log)", True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    names = [r["method"] for r in t]
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        values = [r[key] for r in t]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
        if key == "accuracy":
            ax.scatter(names, [r["accuracy_before"] for r in t], marker="_", s=300, color="k", zorder=3,
                       label="before training")
            ax.legend(fontsize=7, loc="lower right")
        if key == "trainable_pct":  # the notes' claimed ranges as grey spans behind each bar
            for i, r in enumerate(t):
                if r["method"] in CLAIMED:
                    low, high = CLAIMED[r["method"]]
                    ax.plot([i, i], [max(low, 1e-3), high], color="grey", lw=6, alpha=0.4, zorder=0)
            ax.plot([], [], color="grey", lw=6, alpha=0.4, label="notes' claim")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.suptitle(f"MiniLM-L6 on tweet sentiment, {r0['steps']} steps each ({r0['train_examples']} examples)")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    return t


def _available(method: str) -> bool:
    """prefix.py and prompt.py come from another part of the course: skip them, saying so, if absent."""
    import importlib.util

    module = {"prefix": "peftlab.prefix", "prompt": "peftlab.prompt"}.get(method)
    if module and importlib.util.find_spec(module) is None:
        print(f"skipping {method}: {module} is not there yet")
        return False
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    from tqdm.auto import tqdm

    from peftlab.train import run_isolated

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--limit", type=int, default=2000, help="training examples (stratified subset)")
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fast", action="store_true", help="10 steps, 64 examples: checks that it runs")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    if args.fast:
        args.steps, args.limit, args.eval_limit = 10, 64, 64
    methods = [m for m in args.methods.split(",") if _available(m)]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    # The subprocess imports this file as the module "compare_methods".
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, os.path.join(HERE, ".."), os.environ.get("PYTHONPATH", "")])
    rows = []
    for method in (bar := tqdm(methods, desc="methods")):
        bar.set_postfix(method=method)
        try:
            row = run_isolated("compare_methods:finetune_method", method=method, steps=args.steps, limit=args.limit,
                               eval_limit=args.eval_limit, batch_size=args.batch_size)
        except RuntimeError as e:  # one broken method should not lose the others' results
            print(f"{method} failed, left out of the table:\n{e}")
            continue
        rows.append(dict(row, batch_size=args.batch_size, fast=args.fast))
        t = write_report(rows, Path(args.out))  # after every run: a run cut short keeps what it measured
    if not rows:
        raise SystemExit("no method ran")
    for r in t:
        print(f"{r['method']:<9} {r['trainable_pct']:8.4f} %  acc {r['accuracy_before']:.3f} -> {r['accuracy']:.3f}"
              f"  {r['seconds_per_step']:.3f} s/step  {r['peak_memory_mb']:7.1f} MiB  {r['saved_mb']:8.4f} MiB"
              f"  {r['notes_claim']}")
    return rows


if __name__ == "__main__":
    main()
