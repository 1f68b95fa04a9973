"""Inference latency of MiniLM-L6: base, LoRA (unmerged and merged), Houlsby and Pfeiffer adapters.

The syllabus question "LoRA can be merged, adapters add sequential computation", measured. Each
variant runs a forward pass (no gradient, eval mode) on a fixed batch of 64-token inputs at batch
size 1 and 32; after warm-up runs, the median of repeated runs is reported with its ratio to the base
model. Variants are interleaved round by round, so a slow patch on a shared machine hits all alike.
LoRA's adapters are given random (non-zero) B so the merged model really carries the update.

Run from the repository root (writes reports/latency.json and reports/latency.png):
    python benchmarks/latency.py            # ~3 minutes on 2 CPU cores
    python benchmarks/latency.py --fast     # a few repeats, a smoke test
    python benchmarks/latency.py --device cuda --random-weights --name latency_gpu   # a GPU, no data packages
(``--random-weights`` builds MiniLM from its config with random weights and random token ids: the
arithmetic, hence the time, is the same.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from peftlab.adapters import AdapterConfig, apply_adapters  # noqa: E402
from peftlab.lora import LoraConfig, apply_lora, merge_lora  # noqa: E402
from peftlab.models import load_classifier  # noqa: E402

VARIANTS = ["base", "lora_unmerged", "lora_merged", "houlsby", "pfeiffer"]


def build_variants(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The five models, each its own deep copy of the same base (LoRA r=8 on query/value, adapters m=24)."""
    lora = apply_lora(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      init_lora_weights=False))
    merged = merge_lora(copy.deepcopy(lora))
    return {"base": base, "lora_unmerged": lora, "lora_merged": merged,
            "houlsby": apply_adapters(copy.deepcopy(base), AdapterConfig(placement="houlsby")),
            "pfeiffer": apply_adapters(copy.deepcopy(base), AdapterConfig(placement="pfeiffer"))}


@torch.inference_mode()
def measure(models: dict[str, torch.nn.Module], inputs: dict, repeats: int, warmup: int, desc: str) -> dict:
    """Seconds per forward pass of every model: ``repeats`` interleaved rounds after ``warmup`` rounds."""
    cuda = inputs["input_ids"].is_cuda
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in tqdm(range(warmup + repeats), desc=desc, leave=False):
        for name, model in models.items():
            if cuda:
                torch.cuda.synchronize()  # GPU kernels run asynchronously: time whole passes only
            start = time.perf_counter()
            model(**inputs)
            if cuda:
                torch.cuda.synchronize()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--seq", type=int, default=64, help="tokens per input (padded to exactly this)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 50 / 10 at bs 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--fast", action="store_true", help="3 repeats: checks that it runs, not a measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-weights", action="store_true", help="MiniLM's config, random weights and token ids")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--name", default="latency", help="file names: <out>/<name>.json and .png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random_weights:
        from peftlab.models import build_from_config

        base, tokenizer = build_from_config("minilm-l6", task="classification", num_labels=3), None
    else:
        base, tokenizer = load_classifier(num_labels=3)
    models = {name: m.to(args.device).eval() for name, m in build_variants(base.eval()).items()}
    text = "the flight was delayed for three hours and nobody told us anything " * 8
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        if tokenizer is None:
            ids = torch.randint(1000, 30000, (batch_size, args.seq))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            inputs = dict(tokenizer([text] * batch_size, truncation=True, max_length=args.seq,
                                    padding="max_length", return_tensors="pt"))
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        default_repeats = 200 if args.device != "cpu" else (50 if batch_size == 1 else 10)
        repeats = 3 if args.fast else args.repeats or default_repeats
        times = measure(models, inputs, repeats, 1 if args.fast else args.warmup, f"batch {batch_size}")
        base_median = statistics.median(times["base"])
        for name in VARIANTS:
            median = statistics.median(times[name])
            rows.append({"variant": name, "batch_size": batch_size, "median_ms": round(1000 * median, 3),
                         "ratio_to_base": round(median / base_median, 3), "repeats": repeats,
                         "min_ms": round(1000 * min(times[name]), 3), "max_ms": round(1000 * max(times[name]), 3)})
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"model": "all-MiniLM-L6-v2 (22.7M)" + (", random weights" if args.random_weights else ""),
              "seq_len": args.seq, "threads": args.threads, "device": device,
              "processor": platform.processor() or platform.machine(),
              "torch": torch.__version__, "fast": args.fast, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{args.name}.png")
    for r in rows:
        print(f"bs {r['batch_size']:>2}  {r['variant']:<14} {r['median_ms']:9.2f} ms  x{r['ratio_to_base']:.3f}")
    return result


def plot(result: dict, path: Path) -> None:
    """Median latency per variant, one panel per batch size, with the ratio to base over each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["batch_size"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False)
    for ax, bs in zip(axes[0], sizes, strict=True):
        rows = [r for r in result["rows"] if r["batch_size"] == bs]
        bars = ax.bar([r["variant"] for r in rows], [r["median_ms"] for r in rows],
                      color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[f"x{r['ratio_to_base']:.2f}" for r in rows], fontsize=9)
        ax.set_title(f"batch size {bs}, {result['seq_len']} tokens")
        ax.set_ylabel("median forward time (ms)")
        ax.tick_params(axis="x", rotation=25)
        ax.margins(y=0.15)
    where = f"CPU, {result['threads']} threads" if result["device"] == "cpu" else result["device"]
    fig.suptitle(f"MiniLM-L6 inference ({where}): ratio to base above each bar")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
