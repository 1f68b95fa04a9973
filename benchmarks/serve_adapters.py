"""Serving many LoRA adapters: throughput of three strategies as the number of adapters grows (1, 2, 4, 8).

A batch of requests arrives, each for one fine-tune (adapter); the rows are spread round-robin over the
adapters. Three ways to answer the whole batch with one forward pass per request:
    mixed   one unmerged model, one forward pass: ``peftlab.mixed_batch`` adds each row's own update.
    merge   one model; for each adapter: merge it into the base weights, run its rows, unmerge
            (the merge and unmerge are timed: they are the price of a merged forward).
    copies  one merged model copy per adapter; each copy runs its rows (fastest forward, n times the memory).
Throughput is sequences per second over the whole batch (median of interleaved rounds, after warm-up); memory is
the bytes of the parameters held: the base once plus the adapters (mixed, merge) or n full copies (copies).
The model is a small Llama built from its config with random weights (the arithmetic, hence the time, is that of
a trained one); LoRA r=8 on q, k, v, o projections, B random so the updates are not zero. Two workloads: a prefill
of ``--seq`` tokens and a single-token forward (where the per-call cost of merging dominates).

Run from the repository root (writes benchmarks/results/serve_adapters_<device>.json and .png):
    nice -n 19 python benchmarks/serve_adapters.py --threads 1  # ~1 minute on a busy 2-core CPU
    python benchmarks/serve_adapters.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import datetime
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
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from peftlab import LoraConfig, apply_lora, merge_lora, mixed_batch, set_adapter, unload_lora, unmerge_lora  # noqa: E402
from peftlab.models import build_from_config  # noqa: E402

STRATEGIES = ["mixed", "merge", "copies"]
LABELS = {"mixed": "(a) one unmerged mixed batch", "merge": "(b) merge / run rows / unmerge, per adapter",
          "copies": "(c) one merged model copy per adapter"}
# A small causal LM (~2M parameters): matrix products dominate on a CPU, and 4 x 3 x 2 settings fit in ~2 minutes.
MODEL = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512, tie_word_embeddings=True)
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)


def param_bytes(*models: nn.Module) -> int:
    """Bytes of the distinct parameter tensors of ``models`` (a tensor shared by two counts once)."""
    seen = {id(p): p for m in models for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


def build(n_adapters: int, device: str) -> tuple[nn.Module, list[nn.Module], list[str]]:
    """The model with ``n_adapters`` LoRA adapters, its merged copies (one plain model per adapter), their names."""
    base = build_from_config(MODEL)
    names = [f"task{i}" for i in range(n_adapters)]
    model = copy.deepcopy(base)
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)  # each adapter its own random A and B
        apply_lora(model, LoraConfig(**LORA), name)
    copies = []
    for name in names:
        one = copy.deepcopy(model)
        set_adapter(one, name)
        copies.append(unload_lora(one, merge=True).to(device).eval())  # a plain model with that update folded in
    return model.to(device).eval(), copies, names


def make_runners(model: nn.Module, copies: list[nn.Module], names: list[str], row_names: list[str]) -> dict:
    """One function per strategy: input ids (B, T) -> logits (B, T, vocab) in the batch's row order."""
    groups = {name: [i for i, r in enumerate(row_names) if r == name] for name in names}

    def scatter(ids: torch.Tensor, run_group) -> torch.Tensor:
        out = None
        for k, (name, rows) in enumerate(groups.items()):
            logits = run_group(k, name, ids[rows])  # (b, T, vocab) for this adapter's rows
            out = logits.new_empty(ids.shape[0], *logits.shape[1:]) if out is None else out
            out[rows] = logits
        return out

    def mixed(ids):
        with mixed_batch(model, row_names):
            return model(input_ids=ids).logits

    def merge(ids):
        def run(k, name, sub):
            set_adapter(model, name)
            merge_lora(model)  # W += scaling B A, in every LoRA layer
            try:
                return model(input_ids=sub).logits
            finally:
                unmerge_lora(model)  # W -= scaling B A: the base weights again (up to rounding)
        return scatter(ids, run)

    def copies_(ids):
        return scatter(ids, lambda k, name, sub: copies[k](input_ids=sub).logits)

    return {"mixed": mixed, "merge": merge, "copies": copies_}


@torch.no_grad()
def measure(runners: dict, ids: torch.Tensor, repeats: int, warmup: int, desc: str) -> dict[str, list[float]]:
    """Seconds per batch of every strategy, ``repeats`` interleaved rounds after ``warmup`` rounds."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in tqdm(range(warmup + repeats), desc=desc, leave=False):
        for name, run in runners.items():
            sync()  # GPU kernels run asynchronously: time whole batches only
            start = time.perf_counter()
            run(ids)
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="1,2,4,8", help="numbers of adapters")
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch (rows spread round-robin)")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence in the prefill workload")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 15 prefill, 41 one-token)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (1: steadier when busy)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    workloads = {f"prefill, {args.seq} tokens": args.seq, "one token": 1}
    rows = []
    counts = [int(n) for n in args.adapters.split(",")]
    for n in tqdm(counts, desc="adapters"):
        model, copies, names = build(n, args.device)
        row_names = [names[i % n] for i in range(args.batch)]
        runners = make_runners(model, copies, names, row_names)
        memory = {"mixed": param_bytes(model), "merge": param_bytes(model), "copies": param_bytes(*copies)}
        for workload, seq in workloads.items():
            ids = torch.randint(0, MODEL["vocab_size"], (args.batch, seq), device=args.device)
            with torch.no_grad():  # the three strategies answer the same thing (merging rounds a little)
                outs = {name: run(ids) for name, run in runners.items()}
            repeats = args.repeats or (15 if seq > 1 else 41)
            times = measure(runners, ids, repeats, args.warmup, f"{n} adapters, {workload}")
            for name in STRATEGIES:
                median = statistics.median(times[name])
                rows.append({"strategy": name, "adapters": n, "workload": workload, "seq_len": seq,
                             "seqs_per_s": round(args.batch / median, 2), "median_ms": round(1000 * median, 3),
                             "min_ms": round(1000 * min(times[name]), 3), "max_ms": round(1000 * max(times[name]), 3),
                             "repeats": repeats, "param_mib": round(memory[name] / 2**20, 2),
                             "max_abs_diff_to_mixed": float((outs[name] - outs["mixed"]).abs().max())})
        del model, copies
    base_params = sum(p.numel() for p in build_from_config(MODEL).parameters())
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": {"device": torch.cuda.get_device_name(args.device) if device_kind == "cuda" else "cpu",
                    "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "settings": {"model": MODEL, "base_params": base_params, "lora": LORA, "batch": args.batch,
                     "workloads": workloads, "warmup": args.warmup, "dtype": "float32",
                     "rows": "round-robin over the adapters", "timing": "median seconds per whole batch"},
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_adapters_{device_kind}"
    path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, path.with_suffix(".png"))
    for r in rows:
        print(f"{r['workload']:<20} n={r['adapters']}  {r['strategy']:<7} {r['seqs_per_s']:9.1f} seq/s  "
              f"{r['param_mib']:7.1f} MiB  diff {r['max_abs_diff_to_mixed']:.1e}")
    return result


def plot(result: dict, path: Path) -> None:
    """Throughput vs number of adapters, one panel per workload, and the parameter memory of each strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, workloads = result["rows"], list(result["settings"]["workloads"])
    counts = sorted({r["adapters"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(5.2 * (len(workloads) + 1), 4.6))
    markers = {"mixed": "o", "merge": "s", "copies": "^"}
    for ax, workload in zip(axes, workloads, strict=False):
        for k, name in enumerate(STRATEGIES):
            ys = [next(r["seqs_per_s"] for r in rows if r["strategy"] == name and r["adapters"] == n
                       and r["workload"] == workload) for n in counts]
            ax.plot(counts, ys, marker=markers[name], color=f"C{k}", label=LABELS[name])
        ax.set_title(f"{workload}, batch {result['settings']['batch']}")
        ax.set_ylabel("throughput (sequences / s)")
        ax.set_ylim(bottom=0)
    mem = axes[-1]
    for k, name in enumerate(["mixed", "copies"]):
        ys = [next(r["param_mib"] for r in rows if r["strategy"] == name and r["adapters"] == n) for n in counts]
        label = "(a), (b): base once + adapters" if name == "mixed" else LABELS["copies"]
        mem.plot(counts, ys, marker=markers[name], color=f"C{2 * k}", label=label)
    mem.set_title("parameter memory")
    mem.set_ylabel("parameters (MiB, float32)")
    mem.set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel("number of adapters in the batch")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    machine = result["machine"]
    threads = machine["torch_threads"]
    where = f"CPU, {threads} thread{'s' * (threads > 1)}" if machine["device"] == "cpu" else machine["device"]
    fig.suptitle(f"Serving LoRA adapters: small Llama ({result['settings']['base_params'] / 1e6:.1f}M params, "
                 f"random weights), LoRA r={LORA['r']} on q/k/v/o; {where}, torch {result['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
