"""peftlab's NF4 against bitsandbytes on a GPU: bit-exactness, Linear4bit forward, throughput (one JSON).

Run from the repository root on a CUDA machine (falls back to CPU for a dry run):

    PYTHONPATH=. python benchmarks/gpu_quant.py OUT_DIR      # or set $OUT

Needs only torch, numpy, bitsandbytes and peftlab. Writes OUT_DIR/gpu_quant.json. QUICK=1 shrinks the
sizes for a dry run on a laptop.

What it records:
  - exactness: for each shape / dtype / blocksize / double quantization, how many packed bytes, absmax
    values and dequantized values differ between peftlab (on the GPU) and bitsandbytes' CUDA kernels,
    and between bitsandbytes' own CPU and CUDA results. peftlab follows bitsandbytes' CPU reference;
    the double-quantized 8-bit absmax codes of the CUDA kernel differ from it in a few places, so the
    mismatch rate is recorded for both of peftlab's 8-bit rules (CPU lookup grid, CUDA exact search).
  - linear: peftlab.quant.Linear4bit vs bnb.nn.Linear4bit on the same packed weights.
  - throughput: quantize + dequantize (GB/s of fp16 weights) and 4-bit linear forward, with ratios.
"""

# ruff: noqa: B023  (every lambda below is timed at once, inside its loop iteration)
from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402

from peftlab import quant as Q  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def peft_state(bs) -> Q.QuantState:
    """A bitsandbytes QuantState as peftlab's (same fields)."""
    state = Q.QuantState(bs.absmax, bs.shape, bs.dtype, bs.blocksize, bs.code.float(), bs.quant_type)
    if bs.nested:
        s2 = bs.state2
        state.offset = bs.offset
        state.state2 = Q.QuantState(s2.absmax, torch.Size([bs.absmax.numel()]), torch.float32, s2.blocksize,
                                    s2.code, "dynamic8")
    return state


def ne(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of differing entries (NaN equal to NaN); -1 when the shapes differ."""
    a, b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
    if a.shape != b.shape:
        return -1
    if a.is_floating_point():
        return int((~((a == b) | (a.isnan() & b.isnan()))).sum())
    return int((a != b).sum())


def exactness_case(w: torch.Tensor, blocksize: int, dq: bool) -> dict:
    p, s = Q.quantize_nf4(w, blocksize, dq)
    bp, bs = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    # bitsandbytes' own CPU result, for CPU-vs-CUDA (skipped for the largest matrix: CPU time)
    cp, cs = BF.quantize_4bit(w.cpu(), blocksize=blocksize, compress_statistics=dq, quant_type="nf4") \
        if w.numel() <= 4096 * 4096 else (torch.empty(0), None)
    d = Q.dequantize_nf4(p, s)
    bd = BF.dequantize_4bit(bp, bs)
    row = {
        "numel": w.numel(), "blocks": s.absmax.numel(),
        "packed_bytes_differ_vs_bnb_cuda": ne(p, bp),
        "packed_bytes_differ_bnb_cpu_vs_cuda": ne(cp, bp),
        "packed_bytes_differ_vs_bnb_cpu": ne(p, cp),
        # dequantization alone: peftlab's dequantize of bitsandbytes' own packed weights and state
        "dequant_of_bnb_state_differ": ne(Q.dequantize_nf4(bp, peft_state(bs)), bd),
        "dequant_differ_vs_bnb_cuda": ne(d, bd),
    }
    if not dq:
        row["absmax_differ_vs_bnb_cuda"] = ne(s.absmax, bs.absmax)
        return row
    fp32_absmax = Q.blockwise_absmax(w, blocksize)[1]
    normalized = (fp32_absmax - s.offset).float()
    q_cuda_rule, _ = Q.quantize_blockwise(normalized, blocksize=256, snap_to_grid=False)
    # Cause of each code bitsandbytes' CUDA kernel picks differently: is the normalized value within half a
    # grid step (1/65535) of a code midpoint, or inside the grid step around 0 where the map is finer?
    v = normalized / s.state2.absmax.repeat_interleave(256)[: normalized.numel()]
    code = s.state2.code
    mids = 0.5 * (code[:-1] + code[1:])
    near_mid = (v[:, None] - mids[None, :]).abs().min(dim=1).values <= 1.0 / 65535
    differs = s.absmax.reshape(-1) != bs.absmax.reshape(-1)
    row.update({
        "fp32_absmax_differ_vs_bnb_cuda": ne(fp32_absmax, BF.quantize_4bit(w, blocksize=blocksize,
                                                                          quant_type="nf4")[1].absmax),
        "code_mismatches_near_midpoint": int((differs & near_mid).sum()),
        "code_mismatches_near_zero": int((differs & ~near_mid & (v.abs() < 2.0 / 65535)).sum()),
        "code_mismatches_unexplained": int((differs & ~near_mid & (v.abs() >= 2.0 / 65535)).sum()),
        "offset_equal": bool(torch.equal(s.offset, bs.offset)),
        "absmax2_differ_vs_bnb_cuda": ne(s.state2.absmax, bs.state2.absmax),
        "absmax_codes_differ_vs_bnb_cuda": ne(s.absmax, bs.absmax),
        "absmax_codes_differ_bnb_cpu_vs_cuda": ne(cs.absmax, bs.absmax) if cs is not None else -1,
        "absmax_codes_differ_vs_bnb_cpu": ne(s.absmax, cs.absmax) if cs is not None else -1,
        "absmax_codes_differ_cuda_rule_vs_bnb_cuda": ne(q_cuda_rule, bs.absmax),
    })
    return row


def exactness() -> dict:
    torch.manual_seed(0)
    shapes = [(4096, 4096), (1000, 333), (33, 17), (1, 5), (7,), (2049, 3), (11008, 4096)]
    if os.environ.get("QUICK"):
        shapes = [(300, 257), (33, 17), (7,)]
    rows = []
    for shape in shapes:
        for dname, dtype in DTYPES.items():
            w = torch.randn(shape, device=DEV, dtype=dtype) * 0.02
            for blocksize in Q.BLOCKSIZES:
                for dq in (False, True):
                    rows.append({"shape": list(shape), "dtype": dname, "blocksize": blocksize, "double_quant": dq,
                                 **exactness_case(w, blocksize, dq)})
    # Summaries: totals over all cases.
    summary = {}
    for key in rows[0].keys() | rows[-1].keys():
        vals = [r[key] for r in rows if key in r and isinstance(r[key], int) and not isinstance(r[key], bool)]
        if key.endswith("differ") or "_differ_" in key:
            summary[key] = int(sum(v for v in vals if v > 0))
    dq_rows = [r for r in rows if r["double_quant"]]
    n_codes = sum(r["blocks"] for r in dq_rows)
    summary["double_quant_codes_total"] = n_codes
    summary["double_quant_code_mismatch_rate_vs_bnb_cuda"] = summary["absmax_codes_differ_vs_bnb_cuda"] / n_codes
    summary["double_quant_code_mismatch_rate_bnb_cpu_vs_cuda"] = (
        summary["absmax_codes_differ_bnb_cpu_vs_cuda"] / n_codes)
    summary["cases"] = len(rows)
    return {"summary": summary, "cases": rows}


def linear_compare() -> list[dict]:
    out = []
    torch.manual_seed(0)
    sizes = [((512, 256), torch.bfloat16)] if os.environ.get("QUICK") else [((4096, 4096), torch.bfloat16)]
    for (k, n), compute_dtype in sizes + [((1024, 768), torch.float32)]:
        lin = torch.nn.Linear(k, n, bias=True)
        ref = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=compute_dtype, compress_statistics=True,
                                quant_type="nf4")
        ref.load_state_dict(lin.state_dict())
        ref = ref.to(DEV)  # quantizes on the device
        qs = ref.weight.quant_state
        mine = Q.Linear4bit(ref.weight.data.view(torch.uint8), peft_state(qs), lin.bias.to(DEV), compute_dtype)
        mine_own = Q.Linear4bit.from_linear(lin.to(DEV), Q.QuantConfig(compute_dtype=compute_dtype))
        x = torch.randn(8, 64, k, device=DEV, dtype=compute_dtype)
        with torch.no_grad():
            y_ref, y, y_own = ref(x).float(), mine(x).float(), mine_own(x).float()
        scale = y_ref.abs().max().item()
        out.append({
            "shape": [n, k], "compute_dtype": str(compute_dtype),
            "max_abs_diff_same_packed": (y - y_ref).abs().max().item(),
            "max_abs_diff_own_quantization": (y_own - y_ref).abs().max().item(),
            "max_abs_output": scale,
            "rel_diff_same_packed": (y - y_ref).abs().max().item() / scale,
            "packed_equal": bool(torch.equal(mine_own.weight, ref.weight.data.view(torch.uint8).reshape(-1, 1))),
        })
    return out


def throughput() -> dict:
    res = {}
    torch.manual_seed(0)
    quick = bool(os.environ.get("QUICK"))
    for (n, k) in [(512, 512)] if quick else [(4096, 4096), (8192, 8192)]:
        w = torch.randn(n, k, device=DEV, dtype=torch.float16) * 0.02
        gb = w.numel() * w.element_size() / 1e9
        for dq in (False, True):
            tag = f"{n}x{k}_{'dq' if dq else 'nodq'}"
            p, s = Q.quantize_nf4(w, 64, dq)
            bp, bs = BF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            t = {
                "peftlab_quantize_s": bench(lambda: Q.quantize_nf4(w, 64, dq)),
                "bnb_quantize_s": bench(lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=dq,
                                                                 quant_type="nf4")),
                "peftlab_dequantize_s": bench(lambda: Q.dequantize_nf4(p, s)),
                "bnb_dequantize_s": bench(lambda: BF.dequantize_4bit(bp, bs)),
            }
            try:  # what we tried to close the gap: compiling the pure-PyTorch dequantize
                dq_compiled = torch.compile(Q.dequantize_nf4, dynamic=False)
                t["peftlab_dequantize_compiled_s"] = bench(lambda: dq_compiled(p, s))
            except Exception as e:
                t["compile_error"] = repr(e)[:300]
            t["quantize_ratio_peftlab_over_bnb"] = t["peftlab_quantize_s"] / t["bnb_quantize_s"]
            t["dequantize_ratio_peftlab_over_bnb"] = t["peftlab_dequantize_s"] / t["bnb_dequantize_s"]
            if "peftlab_dequantize_compiled_s" in t:
                t["dequantize_compiled_ratio"] = t["peftlab_dequantize_compiled_s"] / t["bnb_dequantize_s"]
            t["bnb_dequantize_GBps_fp16_out"] = gb / t["bnb_dequantize_s"]
            t["peftlab_dequantize_GBps_fp16_out"] = gb / t["peftlab_dequantize_s"]
            res[tag] = t
    # 4-bit linear forward
    for tokens in (1, 16, 2048):
        k = n = 512 if quick else 4096
        lin = torch.nn.Linear(k, n, bias=False)
        ref = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                quant_type="nf4")
        ref.load_state_dict(lin.state_dict())
        ref = ref.to(DEV)
        mine = Q.Linear4bit.from_linear(lin.to(DEV), Q.QuantConfig(compute_dtype=torch.bfloat16))
        dense = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            t = {"peftlab_s": bench(lambda: mine(x), reps=50), "bnb_s": bench(lambda: ref(x), reps=50),
                 "dense_bf16_s": bench(lambda: dense(x), reps=50)}
            try:
                mine_c = torch.compile(mine, dynamic=False)
                t["peftlab_compiled_s"] = bench(lambda: mine_c(x), reps=50)
                t["compiled_ratio"] = t["peftlab_compiled_s"] / t["bnb_s"]
            except Exception as e:
                t["compile_error"] = repr(e)[:300]
        t["ratio_peftlab_over_bnb"] = t["peftlab_s"] / t["bnb_s"]
        res[f"linear4bit_forward_{n}x{k}_tokens{tokens}"] = t
    return res


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bnb.__version__,
        "python": platform.python_version(),
        "double_quant_mismatch_cause": (
            "bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, quantize_cpu_impl) snaps each normalized absmax "
            "value to a 65,536-point grid on [-1, 1] and takes that grid point's nearest code from a lookup "
            "table; the CUDA kernel (kQuantizeBlockwise, dQuantize) binary-searches the code and compares "
            "the value itself with the midpoint. Values within half a grid step (1.5e-5) of a midpoint, and "
            "values near 0 where the dynamic map is finer than the grid, get a neighbouring code. peftlab "
            "reproduces the CPU rule (snap_to_grid=True); with snap_to_grid=False it reproduces CUDA's."),
    }
    result["exactness"] = exactness()
    print(json.dumps(result["exactness"]["summary"], indent=1), flush=True)
    result["linear4bit_vs_bnb"] = linear_compare()
    print(json.dumps(result["linear4bit_vs_bnb"], indent=1), flush=True)
    result["throughput"] = throughput()
    print(json.dumps(result["throughput"], indent=1), flush=True)
    result["wall_s"] = time.time() - t0
    with open(os.path.join(out_dir, "gpu_quant.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", os.path.join(out_dir, "gpu_quant.json"))


if __name__ == "__main__":
    main()
