"""DoRA's overhead over plain LoRA: the time and the peak memory of one training step (peftlab, and HF peft beside it).

A MiniLM-L6-sized BERT classifier (random weights from its config: the arithmetic, hence time and memory, is that
of the real model, and no model package is needed) gets LoRA r=8 on every linear layer (query, key, value and the
three dense layers), plain or with ``use_dora=True``, from peftlab and from HF peft. Each variant trains with AdamW
on one fixed batch: warm-up steps first (the optimizer states exist from then on), then ``--rounds`` rounds in which
every variant runs one timed step, interleaved so that a slow patch on a shared machine hits all alike; the median
is reported with its ratio to the same library's LoRA. One more step per variant, after the timing, measures memory.

Memory is the peak of tensor memory during one step above what was allocated when it began (weights, optimizer
states): on the CPU from the allocation events of ``torch.profiler`` (``profile_memory=True``; tracemalloc sees no
tensor memory), on CUDA from ``torch.cuda.max_memory_allocated``. Beside it, the memory model's prediction of DoRA's
extra bytes (``peftlab.experiments.memory``, ``use_dora``): its activations term, and its whole step.

Run from the repository root:
    nice -n 19 python benchmarks/dora_overhead.py    # CPU, ~1 minute on 2 cores: results/dora_overhead_cpu.json
    python benchmarks/dora_overhead.py --device cuda --batch 32 --seq 128    # a GPU: results/dora_overhead_cuda.json
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
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from peftlab.experiments.memory import MemoryConfig, estimate  # noqa: E402
from peftlab.lora import LoraConfig, apply_lora  # noqa: E402
from peftlab.models import arch_config, build_from_config  # noqa: E402

MODEL = "minilm-l6"
TARGETS = ["query", "key", "value", "dense"]  # every linear of the encoder (and the pooler)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build(variant: str, base: torch.nn.Module, r: int) -> torch.nn.Module:
    """``variant`` is ``<library>_<method>``: peftlab or hf, lora or dora; a deep copy of ``base``."""
    library, method = variant.split("_")
    model = copy.deepcopy(base)
    if library == "peftlab":
        return apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                            use_dora=method == "dora"))
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                      use_dora=method == "dora"))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: time and measure whole steps only


def make_step(model: torch.nn.Module, batch: dict):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:  # no gradients are alive between steps: a step's peak holds its own
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def step_peak(step, device: str) -> int:
    """Peak tensor bytes during one ``step()`` above the bytes allocated when it began (weights, optimizer states).

    On the CPU the profiler records the step's allocations and their frees (frees of older blocks, which a step
    does not make here, would be missing: it warns of blocks allocated before it started).
    """
    sync(device)
    if device == "cuda":
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and "CPU" in str(e.device_type()))
    level = peak = 0
    for _, nbytes in events:  # allocations > 0, frees < 0, in time order
        level += nbytes
        peak = max(peak, level)
    return peak


def predicted_extra(args) -> dict:
    """The memory model's DoRA - LoRA bytes for this setup (fp32, AdamW; its classifier head trains in both)."""
    lora = MemoryConfig(model=MODEL, task="classification", method="lora", r=args.r, target_modules=TARGETS,
                        dtype="fp32", batch=args.batch, seq=args.seq)
    plain, dora = estimate(lora), estimate(replace(lora, use_dora=True))
    return dict(activations=dora.activations - plain.activations, total=dora.total - plain.total,
                trainable=dora.trainable - plain.trainable)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-hf", action="store_true", help="peftlab only (no HF peft)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/dora_overhead_<device>.json")
    args = parser.parse_args(argv)
    device = args.device
    torch.manual_seed(0)
    base = build_from_config(arch_config(MODEL), task="classification", device=device, num_labels=2).train()
    batch = dict(input_ids=torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device),
                 labels=torch.randint(0, 2, (args.batch,), device=device))
    variants = ["peftlab_lora", "peftlab_dora"] + ([] if args.no_hf else ["hf_lora", "hf_dora"])
    models = {v: build(v, base, args.r) for v in variants}
    steps = {v: make_step(m, batch) for v, m in models.items()}
    for v in variants:
        for _ in range(args.warmup):
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            sync(device)
            t = time.perf_counter()
            steps[v]()
            sync(device)
            times[v].append(time.perf_counter() - t)
    peaks = {v: step_peak(steps[v], device) for v in variants}  # after the timing: the profiler slows what follows
    rows = {}
    for v in variants:
        ref = v.split("_")[0] + "_lora"
        med, ref_med = statistics.median(times[v]), statistics.median(times[ref])
        rows[v] = dict(step_s=med, step_s_all=times[v], time_vs_lora=med / ref_med, step_peak_bytes=peaks[v],
                       extra_peak_bytes=peaks[v] - peaks[ref],
                       trainable=sum(p.numel() for p in models[v].parameters() if p.requires_grad))
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
        machine=(torch.cuda.get_device_name() if device == "cuda" else
                 f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"{torch.get_num_threads()} torch threads"),
        device=device, memory_source="torch.cuda.max_memory_allocated" if device == "cuda" else
        "torch.profiler allocation events (profile_memory=True)",
        setup=dict(model=f"{MODEL} (random weights)", targets=TARGETS, r=args.r, batch=args.batch, seq=args.seq,
                   dtype="fp32", optimizer="AdamW", warmup=args.warmup, rounds=args.rounds),
        variants=rows, memory_model_dora_extra_bytes=predicted_extra(args))
    out = args.out or os.path.join(RESULTS, f"dora_overhead_{device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    for v, row in rows.items():
        print(f"{v:14s} step {row['step_s'] * 1e3:8.1f} ms ({row['time_vs_lora']:.2f}x its LoRA)  "
              f"peak {row['step_peak_bytes'] / 2**20:8.2f} MiB ({row['extra_peak_bytes'] / 2**20:+.2f})  "
              f"trainable {row['trainable']:,}")
    print(f"memory model, DoRA - LoRA: {result['memory_model_dora_extra_bytes']}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
