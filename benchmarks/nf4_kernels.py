"""peftlab's Triton NF4 kernels against bitsandbytes' CUDA kernels and peftlab's pure-PyTorch reference (one JSON).

Run from the repository root on a CUDA machine with bitsandbytes installed:

    PYTHONPATH=. python benchmarks/nf4_kernels.py OUT_DIR           # writes OUT_DIR/nf4_kernels_<gpu>.json
    PYTHONPATH=. python benchmarks/nf4_kernels.py OUT_DIR --sweep   # tile sweep behind the kernels' defaults

Each figure is the median over interleaved rounds (every contender once per round, CUDA events around
REPS back-to-back calls, so host overhead counts as it does in a model), with the spread (min, max) of
the rounds; ratios are peftlab / bitsandbytes (< 1 is faster). Blocksize 64, bf16. The weights rotate
through a ring of copies larger than the L2 cache (60 MB on an H200), as the layers of a model do;
``linear_1_hot`` repeats one weight (L2-resident up to ~8k x 8k), the way earlier runs measured.
"""

# ruff: noqa: B023  (every lambda below is timed inside its loop iteration)
from __future__ import annotations

import copy
import datetime
import itertools
import json
import math
import statistics
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import torch
import triton
import triton.language as tl

from peftlab import kernels, nf4
from peftlab.kernels import nf4_triton

ROUNDS, REPS = 15, 10
RING_BYTES = 192 * 2 ** 20  # > 3 x the H200's L2
# (out, in) features: square 1k..16k, and Llama-3-8B's MLP (gate/up: 14336 x 4096, down: 4096 x 14336)
SHAPES = [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192), (16384, 16384), (14336, 4096), (4096, 14336)]
GOALS = {"dequantize": 1.0, "quantize": 1.5, "linear_4096": 1.1, "linear_1": 1.0}


def time_ms(fns: dict, rounds: int = ROUNDS, reps: int = REPS) -> dict:
    """Median ms per call of each fn, rounds interleaved; also the spread (min, max) of the rounds."""
    for fn in fns.values():  # warm-up and compile
        fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / reps)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def ring(make, nbytes: int) -> callable:
    """A function returning the next of ``ceil(RING_BYTES / nbytes)`` copies made by ``make`` (2 to 256)."""
    copies = [make() for _ in range(min(256, max(2, math.ceil(RING_BYTES / nbytes))))]
    it = itertools.cycle(copies)
    return lambda: next(it)


def weights(n: int, k: int, dq: bool):
    """Rings of (packed, state) for peftlab and bitsandbytes of one random (n, k) bf16 weight."""
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bq, bstate = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
    packed, state = kernels.quantize_nf4_triton(w, 64, dq)
    nbytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()

    def mine():
        s = copy.copy(state)
        s.absmax = state.absmax.clone()
        return packed.clone(), s

    def theirs():
        s = copy.copy(bstate)
        s.absmax = bstate.absmax.clone()
        return bq.clone(), s

    return w, ring(mine, nbytes), ring(theirs, nbytes), (packed, state), (bq, bstate)


def ratios(row: dict) -> None:
    for r in row.values():
        if isinstance(r, dict) and "bnb" in r:
            r["ratio_triton_to_bnb"] = r["triton"]["median_ms"] / r["bnb"]["median_ms"]
            if "torch" in r:
                r["ratio_torch_to_bnb"] = r["torch"]["median_ms"] / r["bnb"]["median_ms"]


def main(out_dir: str) -> None:
    rows = []
    cases = [(n, k, False) for n, k in SHAPES] + [(4096, 4096, True), (8192, 8192, True), (14336, 4096, True)]
    for n, k, dq in cases:
        w, mine, theirs, (packed, state), (bq, bstate) = weights(n, k, dq)
        small = n * k <= 8192 * 8192  # the pure-PyTorch reference only where it takes under ~1 ms
        row = {"shape": [n, k], "double_quant": dq}

        def deq_bnb():
            q, s = theirs()
            return BF.dequantize_4bit(q, s)

        def deq_triton():
            q, s = mine()
            return kernels.dequantize_nf4_triton(q, s)

        fns = {"bnb": deq_bnb, "triton": deq_triton}
        if small:
            fns["torch"] = lambda: nf4.dequantize_4bit(*mine())
        row["dequantize"] = time_ms(fns)
        fns = {"bnb": lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq),
               "triton": lambda: kernels.quantize_nf4_triton(w, 64, dq)}
        if small:
            fns["torch"] = lambda: nf4.quantize_nf4(w, 64, dq)
        row["quantize"] = time_ms(fns)
        for tokens in (1, 16, 4096):
            if tokens == 4096 and dq:
                continue
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)

            def lin_bnb():
                q, s = theirs()
                return bnb.matmul_4bit(x, q.t(), quant_state=s)

            def lin_triton():
                q, s = mine()
                return kernels.linear_4bit(x, q, s)  # fused GEMV at 1 token, else dequantize + matmul

            fns = {"bnb": lin_bnb, "triton": lin_triton}
            if small and tokens == 1:
                fns["torch"] = lambda: x @ nf4.dequantize_4bit(*mine()).T
            row[f"linear_{tokens}"] = time_ms(fns)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row["linear_1_hot"] = time_ms({"bnb": lambda: bnb.matmul_4bit(x1, bq.t(), quant_state=bstate),
                                       "triton": lambda: kernels.linear_4bit(x1, packed, state)})
        ratios(row)
        for op, r in row.items():
            if isinstance(r, dict):
                print(n, k, "dq" if dq else "", op, {c: round(v["median_ms"], 4) for c, v in r.items()
                                                      if isinstance(v, dict)},
                      f"triton/bnb {r['ratio_triton_to_bnb']:.2f}x", flush=True)
        rows.append(row)
        w = mine = theirs = None  # free the rings before the next shape
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "bitsandbytes": bnb.__version__, "date": datetime.date.today().isoformat(),
              "rounds": ROUNDS, "reps_per_round": REPS, "blocksize": 64, "dtype": "bfloat16",
              "ring_bytes": RING_BYTES, "goals_ratio_to_bnb": GOALS,
              "note": "linear 'triton' = kernels.linear_4bit: fused GEMV at 1 token, else Triton dequantize + cuBLAS; "
                      "bnb likewise (its GEMV at 1 token; 16 and 4096 tokens: dequantize + cuBLAS)",
              "rows": rows}
    name = torch.cuda.get_device_name().split()[-1].lower()
    with open(f"{out_dir}/nf4_kernels_{name}.json", "w") as f:
        json.dump(result, f, indent=1)


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    pass


def sweep(out_dir: str) -> None:
    """Time the kernels' tile choices per shape (cold weights): the table behind their defaults."""
    res = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat()}
    t = torch.empty(16, device="cuda")
    res["overhead_us"] = {k: 1000 * v["median_ms"] for k, v in time_ms({
        "empty_triton_launch": lambda: _empty_kernel[(1,)](t, 16, BLOCK=16),
        "torch_empty": lambda: torch.empty(1024, device="cuda", dtype=torch.bfloat16)}, 5, 100).items()}
    print(res["overhead_us"], flush=True)
    tiny = nf4.quantize_nf4(torch.randn(1, 64, device="cuda"), 64)  # the host cost of one dequantize call
    res["overhead_us"]["dequantize_64_values"] = 1000 * time_ms(
        {"t": lambda: kernels.dequantize_nf4_triton(*tiny)}, 5, 100)["t"]["median_ms"]
    print(res["overhead_us"], flush=True)
    gemv1 = [(4, 1024, 4, 3), (8, 1024, 4, 3), (4, 2048, 4, 3), (8, 2048, 8, 3), (16, 2048, 8, 3), (2, 4096, 4, 3),
             (4, 1024, 4, 1), (8, 1024, 4, 1), (4, 2048, 4, 1), (8, 512, 4, 3), (16, 1024, 8, 3)]
    gemv16 = [(16, 128, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (16, 256, 4, 1),
              (64, 256, 8, 3)]
    deq = [(1024, 4), (2048, 4), (4096, 4), (4096, 8)]
    res["rows"] = []
    for n, k in [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336), (16384, 16384)]:
        _, mine, theirs, _, _ = weights(n, k, False)
        row = {"shape": [n, k], "double_quant": False}
        for m, configs in ((1, gemv1), (16, gemv16), (4, gemv16[:3])):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fns = {"bnb": lambda: (lambda q, s: bnb.matmul_4bit(x, q.t(), quant_state=s))(*theirs())}
            if m > 1:
                fns["dequantize_matmul"] = lambda: (lambda q, s: x @ kernels.dequantize_nf4_triton(q, s).T)(*mine())
            for c in configs:
                fns[str(c)] = lambda c=c: nf4_triton.gemv_4bit(x, *mine(), config=c)
            row[f"gemv_{m}"] = {c: round(v["median_ms"] * 1000, 2) for c, v in time_ms(fns, 5, 10).items()}
        fns = {"bnb": lambda: BF.dequantize_4bit(*theirs())}
        for c in deq:
            fns[str(c)] = lambda c=c: kernels.dequantize_nf4_triton(*mine(), BYTES=c[0], num_warps=c[1])
        row["dequantize"] = {c: round(v["median_ms"] * 1000, 2) for c, v in time_ms(fns, 5, 10).items()}
        for op in ("gemv_1", "gemv_16", "gemv_4", "dequantize"):
            print(n, k, op, sorted(row[op].items(), key=lambda kv: kv[1])[:5], "bnb", row[op]["bnb"], flush=True)
        res["rows"].append(row)
        mine = theirs = None
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name().split()[-1].lower()
    with open(f"{out_dir}/nf4_kernels_sweep_{name}.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    (sweep if "--sweep" in sys.argv else main)(next((a for a in sys.argv[1:] if not a.startswith("--")), "."))
