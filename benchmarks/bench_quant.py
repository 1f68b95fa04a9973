"""CPU benchmark: peftlab's NF4 vs bitsandbytes (quantize + dequantize, 4-bit linear forward), ratios in one run.

    OMP_NUM_THREADS=2 python benchmarks/bench_quant.py        # writes benchmarks/results/bench_quant_cpu.json

Also records the bytes of MiniLM quantized by peftlab.quant.quantize_model (fp32 / NF4 / NF4 + double
quantization) against the closed form 0.5 byte per weight + constants. The GPU counterpart is
benchmarks/gpu_quant.py.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402

from peftlab import quant as Q  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_quant_cpu.json"


def bench(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def quant_throughput(n: int, k: int, dtype: torch.dtype, dq: bool) -> dict:
    w = torch.randn(n, k, dtype=dtype) * 0.02
    p, s = Q.quantize_nf4(w, 64, dq)
    bp, bs = BF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
    r = {
        "peftlab_quantize_s": bench(lambda: Q.quantize_nf4(w, 64, dq)),
        "bnb_quantize_s": bench(lambda: BF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")),
        "peftlab_dequantize_s": bench(lambda: Q.dequantize_nf4(p, s)),
        "bnb_dequantize_s": bench(lambda: BF.dequantize_4bit(bp, bs)),
        "bytes_equal": bool(torch.equal(p, bp)),
    }
    r["quantize_ratio_peftlab_over_bnb"] = r["peftlab_quantize_s"] / r["bnb_quantize_s"]
    r["dequantize_ratio_peftlab_over_bnb"] = r["peftlab_dequantize_s"] / r["bnb_dequantize_s"]
    r["peftlab_quant_dequant_Mparams_per_s"] = w.numel() / 1e6 / (r["peftlab_quantize_s"] + r["peftlab_dequantize_s"])
    r["bnb_quant_dequant_Mparams_per_s"] = w.numel() / 1e6 / (r["bnb_quantize_s"] + r["bnb_dequantize_s"])
    return r


def linear_forward(n: int, k: int, tokens: int, compute_dtype: torch.dtype) -> dict:
    lin = nn.Linear(k, n, bias=False)
    ref = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                            quant_type="nf4")
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")
    mine = Q.Linear4bit.from_linear(lin, Q.QuantConfig(compute_dtype=compute_dtype))
    dense = nn.Linear(k, n, bias=False).to(compute_dtype)
    x = torch.randn(tokens, k, dtype=compute_dtype)
    with torch.no_grad():
        r = {"peftlab_s": bench(lambda: mine(x)), "bnb_s": bench(lambda: ref(x)), "dense_s": bench(lambda: dense(x)),
             "max_abs_diff": (mine(x).float() - ref(x).float()).abs().max().item()}
    r["ratio_peftlab_over_bnb"] = r["peftlab_s"] / r["bnb_s"]
    return r


def minilm_bytes() -> dict:
    from peftlab.models import load_classifier

    out = {}
    for name, cfg in [("fp32", None), ("nf4", Q.QuantConfig(double_quant=False)), ("nf4_dq", Q.QuantConfig())]:
        model, _ = load_classifier(num_labels=3)
        linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)
                     and not n.startswith("classifier"))
        if cfg is not None:
            Q.quantize_model(model, cfg)
        out[name] = {"model_bytes": Q.model_nbytes(model), "quantized_linear_params": linear}
    fp32 = out["fp32"]["model_bytes"]
    linear = out["fp32"]["quantized_linear_params"]
    # closed form: each quantized weight 4 bytes -> 0.5 byte + constants (per 64 weights: 4 bytes, or 1 byte + 4/256)
    out["nf4"]["closed_form_bytes"] = fp32 - 4 * linear + linear / 2 + 4 * linear / 64
    out["nf4_dq"]["closed_form_bytes"] = fp32 - 4 * linear + linear / 2 + linear / 64 + 4 * linear / 64 / 256
    return out


def main() -> None:
    torch.manual_seed(0)
    result = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    jobs = [("quant", (2048, 2048, torch.float32, False)), ("quant", (2048, 2048, torch.bfloat16, True)),
            ("quant", (4096, 4096, torch.float16, True)),
            ("linear", (2048, 2048, 1, torch.bfloat16)), ("linear", (2048, 2048, 64, torch.bfloat16)),
            ("linear", (2048, 2048, 512, torch.float32))]
    for kind, args in tqdm(jobs, desc="bench_quant"):
        n, k = args[0], args[1]
        if kind == "quant":
            key = f"quant_dequant_{n}x{k}_{str(args[2]).split('.')[-1]}_{'dq' if args[3] else 'nodq'}"
            result[key] = quant_throughput(*args)
        else:
            key = f"linear4bit_forward_{n}x{k}_tokens{args[2]}_{str(args[3]).split('.')[-1]}"
            result[key] = linear_forward(*args)
    result["minilm_bytes"] = minilm_bytes()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
