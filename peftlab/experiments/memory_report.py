"""Write reports/memory_comparison.{md,csv,png}: predicted memory per method and model size, with measurements.

Predictions come from :mod:`peftlab.experiments.memory`; measured markers from the committed GPU runs
(``benchmarks/results/gpu_memory.json``) and from CPU runs of the two offline models made here
(each in its own subprocess, cached in ``reports/memory_cpu.json``).

References:
    - Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314.
    - Rajbhandari et al., "ZeRO", arXiv:1910.02054.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .memory import GB, METHODS, MemoryConfig, estimate, measure_cpu
from .methods import MEASURED_BACKENDS, SAVED_WEIGHT_BACKEND
from .methods import METHODS as METHOD_TABLE

SIZES = ["smollm2-135m", "smollm2-360m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-13b", "llama-33b",
         "llama-65b", "llama-2-70b"]
BATCH, SEQ = 4, 512  # the GPU runs' setting
GPU_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu_memory.json"
# benchmarks/gpu_memory.py writes this key since Linear4bit dequantizes again in backward (MatMul4bit). Runs
# without it measured the old Linear4bit, which kept each dequantized weight for backward: their qlora-peftlab
# rows are predicted with that term (quant_backend=SAVED_WEIGHT_BACKEND) and labelled as such.
LINEAR4BIT_KEY = "linear4bit"
SAVED_WEIGHT_LABEL = "qlora-peftlab (old Linear4bit)"
# The methods once each, a quantized one once per 4-bit layer that exists as code (qlora-peftlab, qlora-bnb).
CPU_METHODS = [label for m in METHODS
               for label in ([f"{m}-{b}" for b in MEASURED_BACKENDS] if METHOD_TABLE[m].quantized else [m])]
CPU_RUNS = [  # (model, task, method, batch, seq): the offline models, pretrained weights, fp32
    *[("smollm2-135m", "causal_lm", m, 4, 128) for m in CPU_METHODS],
    *[("minilm-l6", "classification", m, 8, 128) for m in CPU_METHODS],
]
TERMS = ("weights", "grads", "optimizer", "activations")


def gpu_rows(path: Path = GPU_RESULTS) -> list[dict]:
    """Measured GPU rows (with device name) recomputed against the current analytic model."""
    if not path.exists():
        return []
    rows = []
    for run in json.loads(path.read_text())["runs"]:
        for r in run["rows"]:
            if "measured" not in r:
                continue
            method, backend = (r["method"].split("-") + ["bnb"])[:2]
            label = r["method"]
            if backend == "peftlab" and LINEAR4BIT_KEY not in run:  # measured before MatMul4bit
                backend, label = SAVED_WEIGHT_BACKEND, SAVED_WEIGHT_LABEL
            e = estimate(MemoryConfig(model=r["model"], method=method, dtype="bf16", batch=run["batch"],
                                      seq=run["seq"], grad_checkpointing=r["grad_checkpointing"],
                                      quant_backend=backend))
            rows.append(dict(model=r["model"], method=label, grad_checkpointing=r["grad_checkpointing"],
                             device=run["device"], predicted_gb=e.total / GB, measured_gb=r["measured"] / GB,
                             error_pct=100 * (e.total - r["measured"]) / r["measured"]))
    return rows


def cpu_rows(out_dir: Path, refresh: bool = False) -> list[dict]:
    """CPU measurements of :data:`CPU_RUNS`, each in its own subprocess; cached per run in ``memory_cpu.json``.

    Only runs missing from the cache are measured (all of them with ``refresh``); the predictions are
    recomputed every time, so the cache holds measurements and a changed formula shows at once.
    """
    cache = out_dir / "memory_cpu.json"
    cached = {} if refresh or not cache.exists() else {
        (r["model"], r["method"], r["batch"], r["seq"]): r for r in json.loads(cache.read_text())}
    from tqdm.auto import tqdm

    rows = []
    todo = [run for run in CPU_RUNS if (run[0], run[2], run[3], run[4]) not in cached]
    bar = tqdm(total=len(todo), desc="CPU memory runs", disable=not todo)
    for model, task, label, batch, seq in CPU_RUNS:
        method, backend = (label.split("-") + ["peftlab"])[:2]
        cfg = MemoryConfig(model=model, task=task, method=method, dtype="fp32", batch=batch, seq=seq,
                           quant_backend=backend)
        e = estimate(cfg)
        hit = cached.get((model, label, batch, seq))
        if hit is None:
            bar.set_postfix(model=model, method=label)
            measured = measure_cpu(cfg, source="pretrained")["peak_bytes"] / GB
            bar.update()
        else:
            measured = hit["measured_gb"]
        rows.append(dict(model=model, method=label, batch=batch, seq=seq, device="cpu (peak RSS - baseline)",
                         predicted_gb=e.total / GB, measured_gb=measured,
                         error_pct=100 * (e.total / GB - measured) / measured))
        done = {(r["model"], r["method"], r["batch"], r["seq"]) for r in rows}  # keep measurements as they come
        cache.write_text(json.dumps(rows + [r for k, r in cached.items() if k not in done], indent=1))
    bar.close()
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def claims() -> list[str]:
    """The QLoRA paper's figures and the course notes' claim, next to this model's."""
    full65 = estimate(MemoryConfig(model="llama-65b", method="full", batch=1, seq=512))
    q65 = estimate(MemoryConfig(model="llama-65b", method="qlora", batch=1, seq=512, grad_checkpointing=True))
    p = full65.params
    lines = [
        f"- QLoRA paper: 65B full fine-tuning needs **> 780 GB**. fp16 weights + fp16 grads + Adam's two fp32 moments "
        f"= 12 B/param x {p / 1e9:.1f} B = {12 * p / GB:.0f} GB; with fp32 master weights (ZeRO's 16 B/param) and "
        f"activations of one 512-token sequence this model predicts **{full65.total / GB:.0f} GB**.",
        f"- QLoRA paper: 65B QLoRA fits **< 48 GB**. Predicted here (batch 1, 512 tokens, gradient checkpointing, "
        f"LoRA r=8 on q,v, bitsandbytes NF4 + double quant): **{q65.total / GB:.1f} GB** "
        f"(weights {q65.weights / GB:.1f} GB).",
    ]
    guanaco = {"llama-65b": 41, "llama-33b": 21, "llama-13b": 10, "llama-7b": 5}
    for name, paper in guanaco.items():
        e = estimate(MemoryConfig(model=name, method="qlora", batch=1, seq=1))
        lines.append(f"- Guanaco {name.split('-')[1].upper()} as a 4-bit model (inference size, not a training peak): "
                     f"paper {paper} GB; NF4 weights + constants + bf16 embeddings here {e.weights / GB:.1f} GB.")
    nf4_only = q65.detail["counts"]["quantized"] * 0.5
    lines.append(
        f"- **Course notes: \"65B -> 16 GB, fits a 24 GB GPU\" is wrong.** The 4-bit codes alone take 0.5 B/param x "
        f"{q65.detail['counts']['quantized'] / 1e9:.1f} B quantized params = {nf4_only / GB:.1f} GB, already more "
        f"than 24 GB before constants, embeddings, LoRA states or a single activation; 16 GB would need "
        f"{16e9 * 8 / p:.1f} bits per parameter. The real QLoRA 65B training peak is ~{q65.total / GB:.0f} GB: a "
        f"48 GB card (the paper's claim), not a 24 GB one.")
    return lines


def write_report(out_dir: str | Path = "reports", refresh_cpu: bool = False) -> Path:
    """Write memory_comparison.md/.csv/.png under ``out_dir`` and return the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for size in SIZES:
        for method in METHODS:
            e = estimate(MemoryConfig(model=size, method=method, dtype="bf16", batch=BATCH, seq=SEQ))
            table.append(dict(model=size, params_b=round(e.params / 1e9, 3), method=method,
                              trainable=e.trainable, **{f"{t}_gb": round(getattr(e, t) / GB, 3) for t in TERMS},
                              total_gb=round(e.total / GB, 3)))
    measured = gpu_rows()
    cpu = cpu_rows(out, refresh_cpu)
    gpu_nogc = {(r["model"], r["method"]): r for r in measured if not r["grad_checkpointing"]}
    for row in table:
        hit = gpu_nogc.get((row["model"], row["method"] if row["method"] != "qlora" else "qlora-bnb"))
        row["measured_gpu_gb"] = round(hit["measured_gb"], 3) if hit else ""
    with open(out / "memory_comparison.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)

    md = ["# Memory of one training step: predicted vs measured", "",
          f"bf16 weights and activations, fp32 master weights + AdamW moments, batch {BATCH}, {SEQ} tokens, no "
          "gradient checkpointing, LoRA/QLoRA r=8 on q,v, adapters reduction 16, 20 virtual tokens. GB = 1e9 bytes. "
          "`total` is the peak, not the column sum (activations are freed as gradients appear).", "",
          "| model | params (B) | method | weights | grads | optimizer | activations | total | measured (GPU) |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        md.append(f"| {r['model']} | {r['params_b']} | {r['method']} | {r['weights_gb']:.2f} | "
                  f"{r['grads_gb']:.2f} | "
                  f"{r['optimizer_gb']:.2f} | {r['activations_gb']:.2f} | {r['total_gb']:.2f} | "
                  f"{r['measured_gpu_gb'] if r['measured_gpu_gb'] != '' else ''} |")
    md += ["", "## Validation: every measured row", "",
           "| model | method | grad ckpt | device | predicted GB | measured GB | error |",
           "|---|---|---|---|---:|---:|---:|"]
    for r in measured + cpu:
        md.append(f"| {r['model']} | {r['method']} | {r.get('grad_checkpointing', False)} | {r['device']} | "
                  f"{r['predicted_gb']:.3f} | {r['measured_gb']:.3f} | {r['error_pct']:+.1f} % |")
    worst = max((abs(r["error_pct"]) for r in measured + cpu), default=float("nan"))
    md += ["", f"Largest error over all measured rows: {worst:.1f} %.", "",
           "- GPU: `torch.cuda.max_memory_allocated` of the second step (optimizer states exist). It excludes the "
           "CUDA context (~0.5 GB), allocator slack (`memory_reserved - memory_allocated`) and managed memory "
           "(paged optimizers), so `nvidia-smi` shows more.",
           "- CPU: peak RSS (VmHWM, reset after loading) minus the RSS of the same process after importing the "
           "libraries and training a tiny model of the same family: weights, grads, states, activations, malloc slack. "
           "The pretrained weights are first copied out of the memory-mapped safetensors file: otherwise the file's "
           "pages stay resident after QLoRA frees the fp32 weights (found by measurement: +0.4 GB on SmolLM2).",
           f"- Found by measurement: peftlab's old `Linear4bit` kept each dequantized bf16 weight for backward "
           f"(autograd saves `F.linear`'s weight argument), +2 B per quantized parameter without checkpointing. "
           f"The rows `{SAVED_WEIGHT_LABEL}` were measured with it and are predicted with that term "
           f"(`quant_backend={SAVED_WEIGHT_BACKEND!r}`). `Linear4bit` now dequantizes again in backward "
           f"(`MatMul4bit`), as bitsandbytes' `MatMul4Bit` does, and is predicted like bitsandbytes (rows "
           f"`qlora-peftlab`, measured after the change).",
           "- Found by measurement (autograd's saved tensors, `tests/experiments/test_memory.py`): layer 0 keeps "
           "nothing before the first trainable tensor, since the frozen embeddings need no gradient (Pfeiffer "
           "adapters: only the adapter; Houlsby: nothing of the attention). A prefix reaches attention as a cache, "
           "so transformers passes SDPA an explicit mask and repeats the kv heads: keys and values are kept P + T long "
           "at the full width. BERT's attention on the CPU runs SDPA's math path, which keeps q, k, v and the "
           "probabilities in fp32 even for bf16 inputs.",
           "- Prefix tuning has no gradient-checkpointing rows: transformers drops `past_key_values` (the prefix) in "
           "checkpointed layers, and `PrefixTuningModel` refuses the combination, as HF peft does.",
           "", "## Claims", ""] + claims()
    (out / "memory_comparison.md").write_text("\n".join(md) + "\n")

    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    colors = dict(weights="#4c72b0", grads="#dd8452", optimizer="#55a868", activations="#c44e52")
    for ax, size in zip(axes.flat, SIZES, strict=True):
        rows = [r for r in table if r["model"] == size]
        bottom = [0.0] * len(rows)
        for t in TERMS:
            vals = [r[f"{t}_gb"] for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, color=colors[t], label=t)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.scatter(range(len(rows)), [r["total_gb"] for r in rows], marker="_", s=300, color="k",
                   label="predicted peak")
        hits = [(i, r["measured_gpu_gb"]) for i, r in enumerate(rows) if r["measured_gpu_gb"] != ""]
        if hits:
            ax.scatter(*zip(*hits, strict=True), marker="o", color="gold", edgecolor="k", zorder=3,
                       label="measured (GPU)")
        for y, name in ((24, "24 GB"), (80, "80 GB")):
            if y < 1.3 * max(bottom):
                ax.axhline(y, ls="--", lw=0.8, color="gray")
                ax.text(len(rows) - 0.5, y, name, fontsize=7, va="bottom", ha="right")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=45, fontsize=8)
        ax.set_title(f"{size} ({rows[0]['params_b']:.2f} B params)", fontsize=10)
        ax.set_ylabel("GB")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Peak memory of one training step (bf16, batch {BATCH} x {SEQ} tokens): stacked = the four "
                 "terms, bar = predicted peak, dot = measured", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "memory_comparison.png", dpi=110)
    plt.close(fig)
    return out / "memory_comparison.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write reports/memory_comparison.{md,csv,png}")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--refresh-cpu", action="store_true", help="re-run the CPU measurements")
    args = ap.parse_args(argv)
    print(f"wrote {write_report(args.out, args.refresh_cpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
