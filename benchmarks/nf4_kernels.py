"""peftlab's Triton NF4 kernels against bitsandbytes' CUDA kernels and peftlab's pure-PyTorch reference (one JSON).

Run from the repository root on a CUDA machine with bitsandbytes installed:

    PYTHONPATH=. python benchmarks/nf4_kernels.py OUT_DIR      # writes OUT_DIR/nf4_kernels_<gpu>.json

Each figure is the median over interleaved rounds (every contender once per round, CUDA events), so clock
drift hits all alike; ratios are peftlab / bitsandbytes (< 1 is faster). Blocksize 64, bf16, no double quant.
"""

# ruff: noqa: B023  (every lambda below is timed inside its loop iteration)
from __future__ import annotations

import datetime
import json
import statistics
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import torch
import triton

from peftlab import kernels, nf4

ROUNDS, REPS = 15, 10


def time_ms(fns: dict) -> dict:
    """Median ms per call of each fn, rounds interleaved; also the spread (min, max) of the rounds."""
    for fn in fns.values():  # warm-up and compile
        fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPS):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / REPS)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def main(out_dir: str) -> None:
    rows = []
    for n in (4096, 8192):
        torch.manual_seed(0)
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        bq, bstate = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        packed, state = nf4.quantize_nf4(w, 64)
        row = {"shape": [n, n]}
        row["dequantize"] = time_ms({
            "bnb": lambda: BF.dequantize_4bit(bq, bstate),
            "triton": lambda: kernels.dequantize_nf4_triton(packed, state),
            "torch": lambda: nf4.dequantize_4bit(packed, state)})
        row["quantize"] = time_ms({
            "bnb": lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False),
            "triton": lambda: kernels.quantize_nf4_triton(w, 64),
            "torch": lambda: nf4.quantize_nf4(w, 64)})
        for tokens in (1, 4096):
            x = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
            row[f"linear_{tokens}"] = time_ms({
                "bnb": lambda: bnb.matmul_4bit(x, bq.t(), quant_state=bstate),
                "triton": lambda: x @ kernels.dequantize_nf4_triton(packed, state).T,
                "torch": lambda: x @ nf4.dequantize_4bit(packed, state).T})
        for op in ("dequantize", "quantize", "linear_1", "linear_4096"):
            r = row[op]
            r["ratio_triton_to_bnb"] = r["triton"]["median_ms"] / r["bnb"]["median_ms"]
            r["ratio_torch_to_bnb"] = r["torch"]["median_ms"] / r["bnb"]["median_ms"]
            print(n, op, {k: round(v["median_ms"], 4) for k, v in r.items() if isinstance(v, dict)},
                  f"triton/bnb {r['ratio_triton_to_bnb']:.2f}x  torch/bnb {r['ratio_torch_to_bnb']:.2f}x", flush=True)
        rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "bitsandbytes": bnb.__version__, "date": datetime.date.today().isoformat(),
              "rounds": ROUNDS, "reps_per_round": REPS, "blocksize": 64, "dtype": "bfloat16",
              "note": "linear 'triton' = Triton dequantize + cuBLAS matmul (the fused GEMV is not written yet)",
              "rows": rows}
    name = torch.cuda.get_device_name().split()[-1].lower()
    with open(f"{out_dir}/nf4_kernels_{name}.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
