"""GPU ladder: measured peak memory (``max_memory_allocated``) of a training step vs peftlab.experiments.memory.

Models are built on the GPU from real configs with random bf16 weights (values do not matter for memory).
For each model, method (full, LoRA, QLoRA with peftlab's Linear4bit and with bitsandbytes, Houlsby and
Pfeiffer adapters, prefix and prompt tuning) and gradient checkpointing off/on, the second of two steps is
measured (optimizer states exist by then). Rows whose prediction exceeds the card are skipped and recorded
as such, and so is prefix tuning with checkpointing (transformers drops the prefix there: an error). The
run is appended to the ``runs`` of ``--out`` (JSON), rewritten after every row, so a run cut short keeps
what it measured and earlier runs stay.

Run (a GPU machine with this repo; bitsandbytes optional):
    python benchmarks/gpu_memory.py --out benchmarks/results/gpu_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from peftlab.experiments.memory import GB, MemoryConfig, estimate, measure_gpu  # noqa: E402

LADDER = ["smollm2-135m", "smollm2-360m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-13b"]
METHODS = [("full", None), ("lora", None), ("qlora", "peftlab"), ("qlora", "bnb"), ("houlsby", None),
           ("pfeiffer", None), ("prefix", None), ("prompt", None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_memory.json")
    ap.add_argument("--models", default=",".join(LADDER))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--methods", default=None, help="e.g. full,lora,qlora-bnb,houlsby,prefix (default: all)")
    ap.add_argument("--budget", type=float, default=480, help="seconds; no new row starts after this")
    args = ap.parse_args()
    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001  (measured without it, and said so)
        bnb_version = f"not available ({type(e).__name__})"
    import transformers

    capacity = torch.cuda.get_device_properties(0).total_memory
    result = dict(device=torch.cuda.get_device_name(), capacity_bytes=capacity, torch=torch.__version__,
                  transformers=transformers.__version__, bitsandbytes=bnb_version,
                  date=datetime.date.today().isoformat(), batch=args.batch, seq=args.seq, dtype="bf16",
                  # memory_report reads this key: runs without it measured the old Linear4bit (F.linear).
                  linear4bit="MatMul4bit: dequantizes again in backward",
                  optimizer="MasterAdamW (fp32 master + fp32 moments)", rows=[])
    previous = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    runs = previous.get("runs", [previous] if previous else [])  # an older file may hold one run
    note = previous.get("note")
    runs.append(result)
    start = time.time()
    for model in args.models.split(","):
        for method, backend in METHODS:
            if args.methods and (method if backend is None else f"qlora-{backend}") not in args.methods.split(","):
                continue
            for gc in (False, True):
                if time.time() - start > args.budget:
                    print("budget reached", flush=True)
                    break
                if backend == "bnb" and not bnb_version[0].isdigit():
                    continue
                if method == "prefix" and gc:
                    result["rows"].append(dict(model=model, method=method, grad_checkpointing=gc,
                                               skipped="prefix tuning cannot use gradient checkpointing"))
                    continue
                cfg = MemoryConfig(model=model, method=method, dtype="bf16", batch=args.batch, seq=args.seq,
                                   grad_checkpointing=gc, quant_backend=backend or "bnb")
                e = estimate(cfg)
                row = dict(model=model, method=method if backend is None else f"qlora-{backend}",
                           grad_checkpointing=gc, params=e.params, trainable=e.trainable,
                           predicted=dict(weights=e.weights, grads=e.grads, optimizer=e.optimizer,
                                          activations=e.activations, total=e.total))
                if e.total > 0.95 * capacity:
                    row["skipped"] = f"predicted {e.total / GB:.1f} GB > card {capacity / GB:.1f} GB"
                else:
                    t0 = time.time()
                    try:
                        m = measure_gpu(cfg, quant_backend=backend or "peftlab")
                        row.update(measured=m["peak_bytes"], loaded=m["loaded_bytes"],
                                   error_pct=100 * (e.total - m["peak_bytes"]) / m["peak_bytes"])
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as ex:  # noqa: BLE001  (recorded, the ladder goes on)
                        row["error"] = f"{type(ex).__name__}: {ex}"[:500]
                        torch.cuda.empty_cache()
                    row["seconds"] = round(time.time() - t0, 1)
                result["rows"].append(row)
                print(json.dumps({k: (round(v / GB, 3) if k in ("measured", "loaded") else v)
                                  for k, v in row.items() if k != "predicted"}), f"pred {e.total / GB:.3f}",
                      flush=True)
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump({"note": note, "runs": runs} if note else {"runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
