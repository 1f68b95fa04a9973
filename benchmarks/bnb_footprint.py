"""Memory footprint and LoRA training of a causal LM in fp32, bf16, int8, NF4 and NF4 + double quant (bitsandbytes).

Loads SmolLM2-135M-Instruct through ``transformers.BitsAndBytesConfig`` in five formats, measures the
model's bytes, then trains a few LoRA steps on chat-formatted Q/A pairs (loss on the answers only) with
HF peft's LoRA and with peftlab's LoRA over the same bitsandbytes layers, plus peftlab's own QLoRA path
(``quantize_model`` + ``apply_lora``). Writes ``bnb_footprint_<device>.json`` and ``.png`` into ``--out``.

    HF_HUB_OFFLINE=1 python benchmarks/bnb_footprint.py                      # CPU, real SmolLM2 weights
    PYTHONPATH=. python benchmarks/bnb_footprint.py --device cuda --out $OUT  # GPU

Where the offline model packages are missing (the GPU machine), the models are built from their
real configs with random weights and saved to a temporary folder, and a byte-level stand-in replaces
the tokenizer: footprints and step times only depend on shapes; the loss then shows memorisation.
peft is optional: without it the HF-peft rows say why they were skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
import warnings

import torch

warnings.filterwarnings("ignore")  # bitsandbytes' import and per-call int8 cast warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peftlab.experiments.qlora import INSTRUCTIONS, LLAMA_TARGETS, collate, tokenize_chat  # noqa: E402
from peftlab.lora import LoraConfig, apply_lora  # noqa: E402
from peftlab.models import build_from_config  # noqa: E402
from peftlab.quant import QuantConfig, quantize_model  # noqa: E402

FORMATS = ("fp32", "bf16", "int8", "nf4", "nf4-dq")
# TinyLlama-1.1B's public config.json: a bigger Llama for the GPU, where the embeddings weigh less.
EXTRA_CONFIGS = {
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           rope_theta=10000.0),
}
# Bits per weight of a quantized linear layer, counting its constants (blocksize 64; int8 one fp32 per row).
BITS = {"fp32": 32.0, "bf16": 16.0, "int8": 8.0, "nf4": 4 + 32 / 64, "nf4-dq": 4 + 8 / 64 + 32 / (64 * 256)}


def log(*a):
    print(*a, flush=True)


# --- models ----------------------------------------------------------------------------------------
def checkpoint(name: str, workdir: str) -> tuple[str, object, str]:
    """``(folder, tokenizer or None, weights)``: the cached real SmolLM2, else random weights saved to workdir."""
    if name == "smollm2-135m":
        try:
            from peftlab.models import cache_dir, load_causal_lm

            _, tok = load_causal_lm()  # converts and caches the GGUF once
            return str(cache_dir() / "SmolLM2-135M-Instruct"), tok, "real (SmolLM2-135M-Instruct, from Q4_1 GGUF)"
        except (ModuleNotFoundError, OSError) as e:
            log(f"[{name}] offline model package missing ({e.__class__.__name__}): random weights from its config")
    model = build_from_config(EXTRA_CONFIGS.get(name, name))
    model.config.initializer_range = 0.02
    folder = os.path.join(workdir, name)
    model.save_pretrained(folder)
    del model
    return folder, None, f"random (config of {name})"


def quant_kwargs(fmt: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """from_pretrained arguments for a format; ``dtype``: the non-quantized parts and the 4-bit compute dtype."""
    from transformers import BitsAndBytesConfig

    if fmt == "fp32":
        return {"dtype": torch.float32}
    if fmt == "bf16":
        return {"dtype": torch.bfloat16}
    if fmt == "int8":
        return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=fmt == "nf4-dq",
        bnb_4bit_compute_dtype=dtype)}


def load(folder: str, fmt: str, device: str, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(folder, device_map=device, **quant_kwargs(fmt, dtype))


def tensor_bytes(model) -> int:
    """Bytes of every distinct tensor the model holds, bitsandbytes' quantization states included.

    ``get_memory_footprint()`` counts parameters and buffers only; a bnb ``Linear4bit`` keeps its absmax
    (and the nested state) in ``weight.quant_state`` and a ``Linear8bitLt`` its row scales in ``weight.SCB``.
    """
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for x in (qs.absmax, qs.code, qs.offset):
                add(x)
            if qs.nested:
                add(qs.state2.absmax)
                add(qs.state2.code)
        add(getattr(t, "SCB", None))
    return total


# --- data -------------------------------------------------------------------------------------------
def byte_examples(pairs, vocab_size: int, max_length: int) -> list[dict]:
    """Stand-in for a tokenizer (random-weight models): UTF-8 bytes as ids, loss on the answer's bytes."""
    out = []
    for q, a in pairs:
        head = [3 + b for b in f"User: {q}\nAssistant: ".encode()]
        body = [3 + b for b in a.encode()] + [2]  # 2: end of sequence
        ids = torch.tensor(head + body)[:max_length] % vocab_size
        labels = ids.clone()
        labels[: len(head)] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


# --- training ---------------------------------------------------------------------------------------
def apply_hf_peft(model, r: int):
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


def apply_peftlab(model, r: int):
    return apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LLAMA_TARGETS)))


def train_steps(model, batch: dict, steps: int, device: str, lr: float = 2e-3) -> dict:
    """AdamW on the trainable parameters, the same batch every step: loss per step, seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    batch = {k: v.to(device) for k, v in batch.items()}
    model.train()
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        log(f"    step {len(losses)}: loss {losses[-1]:.4f}  {times[-1]:.2f} s")
    later = sorted(times[1:]) or times  # the first step includes one-time set-up
    return {"losses": losses, "step_seconds": times, "median_step_s": later[len(later) // 2],
            "trainable": sum(p.numel() for p in params),
            "loss_went_down": bool(losses[-1] < losses[0])}


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_one(folder: str, fmt: str, impl: str, device: str, batch: dict, steps: int, r: int,
            train_dtype: torch.dtype) -> dict:
    row = {"format": fmt, "lora": impl}
    free(device)
    try:
        if impl == "peftlab-own-nf4":  # peftlab's from-scratch QLoRA: fp32 load, quantize_model, apply_lora
            model = load(folder, "fp32", device)
            quantize_model(model, QuantConfig(double_quant=True, compute_dtype=train_dtype), skip=("lm_head",))
            row["compute_dtype"] = str(train_dtype)
        else:
            model = load(folder, fmt, device, train_dtype)
            row["compute_dtype"] = str(train_dtype) if fmt in ("int8", "nf4", "nf4-dq") else fmt
        row["model_bytes_after_load"] = tensor_bytes(model)
        if impl == "hf-peft":
            model = apply_hf_peft(model, r)
        else:
            model = apply_peftlab(model, r)
        row.update(train_steps(model, batch, steps, device))
        row["peak_gpu_bytes"] = peak_bytes(device)
        row["status"] = "ok"
    except Exception as e:  # record what does not work (e.g. a backend without a kernel) and go on
        row["status"] = "failed"
        row["error"] = f"{e.__class__.__name__}: {str(e)[:400]}"
        log(traceback.format_exc(limit=3))
    finally:
        model = None
        free(device)
    return row


def footprint(folder: str, fmt: str, device: str) -> dict:
    free(device)
    t = time.perf_counter()
    model = load(folder, fmt, device)
    row = {"format": fmt, "load_s": time.perf_counter() - t, "get_memory_footprint": model.get_memory_footprint(),
           "tensor_bytes": tensor_bytes(model)}
    if device == "cuda":
        row["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
    layers = [m for n, m in model.named_modules() if ".layers." in n and hasattr(m, "in_features")
              and not list(m.children())]
    n_lin = sum(m.in_features * m.out_features for m in layers)
    n_all = sum(p.numel() for p in model.parameters()) if fmt in ("fp32", "bf16") else None
    row["linear_layers"] = len(layers)
    row["linear_weights"] = n_lin
    row["layer_types"] = sorted({type(m).__name__ for m in layers})
    del model
    free(device)
    return row, n_all


def predict(rows: list[dict], n_all: int) -> None:
    """Expected bytes: quantized linear weights at BITS[fmt] / 8 bytes, everything else in bf16 (fp32 for fp32)."""
    for row in rows:
        n_lin = row["linear_weights"]
        other = 4 if row["format"] == "fp32" else 2
        row["bits_per_linear_weight"] = BITS[row["format"]]
        row["predicted_bytes"] = int(n_lin * BITS[row["format"]] / 8 + (n_all - n_lin) * other)
        row["tensor_bytes_over_predicted"] = row["tensor_bytes"] / row["predicted_bytes"]


def own_prediction(m: dict) -> int | None:
    """peftlab's quantize_model path keeps the non-linear parts in fp32 (it quantizes an fp32 model)."""
    rows = [r for r in m["footprint"] if r["format"] == "fp32"]
    if not rows or not m.get("parameters"):
        return None
    n_lin = rows[0]["linear_weights"]
    return int(n_lin * BITS["nf4-dq"] / 8 + (m["parameters"] - n_lin) * 4)


# --- figure -----------------------------------------------------------------------------------------
def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for (ax, ax2), name in zip(axes, models, strict=True):
        m = result["models"][name]
        rows = m["footprint"]
        if m.get("peftlab_own_nf4_bytes"):
            rows = rows + [{"format": "peftlab nf4-dq\n(fp32 embeddings)", "tensor_bytes": m["peftlab_own_nf4_bytes"],
                            "get_memory_footprint": None, "predicted_bytes": own_prediction(m)}]
        x = range(len(rows))
        mb = [r["tensor_bytes"] / 1e6 for r in rows]
        ax.bar(x, mb, color=["0.6", "0.45", "tab:orange", "tab:blue", "tab:cyan", "tab:purple"][: len(rows)],
               label="bytes of all tensors (incl. quantization states)")
        for i, r in enumerate(rows):
            ax.text(i, mb[i], f"{mb[i]:.0f} MB", ha="center", va="bottom", fontsize=9)
            ax.hlines(r["predicted_bytes"] / 1e6, i - 0.4, i + 0.4, colors="k", linestyles="--",
                      label="predicted: bits/weight x linear weights + the rest at its dtype" if i == 0 else None)
            if r.get("get_memory_footprint"):
                ax.plot(i, r["get_memory_footprint"] / 1e6, "kv", ms=6,
                        label="get_memory_footprint() (params + buffers)" if i == 0 else None)
        ax.set_xticks(list(x), [r["format"] for r in rows])
        ax.set_ylabel("MB")
        ax.set_title(f"{name}, {m['weights'].split(' (')[0]} weights: bytes of the model\n"
                     f"4-bit = 0.5 B/weight + constants (dashed: predicted)", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        ax.set_ylim(0, max(mb) * 1.2)
        runs = [r for r in m["training"] if r["status"] == "ok"]
        labels = [f"{r['format']}\n{r['lora']}" for r in runs]
        ax2.barh(range(len(runs)), [r["median_step_s"] for r in runs], color="tab:gray")
        ax2.set_yticks(range(len(runs)), labels, fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("seconds per LoRA training step (median)")
        ax2.set_xlim(0, max(r["median_step_s"] for r in runs) * 1.4 if runs else 1)
        for i, r in enumerate(runs):
            ax2.text(r["median_step_s"], i, f" loss {r['losses'][0]:.2f}->{r['losses'][-1]:.2f}", va="center",
                     fontsize=7)
        ax2.set_title(f"LoRA r={result['r']}, batch {result['batch_shape']}, {result['steps']} steps, "
                      f"{result['device']}\nint8/nf4 compute: {result.get('train_dtype')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log("wrote", path)


def save(result: dict, out: str, device: str) -> str:
    result["cpu_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["what_does_not_work"] = [f"{r['format']} + {r['lora']}: {r['error']}" for m in result["models"].values()
                                    for r in m["training"] if r["status"] != "ok"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"bnb_footprint_{device}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


# --- main -------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--models", default=None, help="comma list; default smollm2-135m (+ tinyllama-1.1b on cuda)")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 3 on cpu, 10 on cuda)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--train-formats", default=None,
                   help="formats to train (default: all on cuda; fp32,int8,nf4,nf4-dq on cpu, see --train-dtype)")
    p.add_argument("--train-dtype", default=None, choices=["float32", "bfloat16"],
                   help="non-quantized parts and 4-bit compute dtype when training int8/nf4 (default: bfloat16 "
                        "on cuda, float32 on cpu: CPUs without avx512_bf16/AMX emulate bf16 matmuls, ~10x slower)")
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    steps = args.steps or (10 if args.device == "cuda" else 3)
    models = (args.models or ("smollm2-135m,tinyllama-1.1b" if args.device == "cuda" else "smollm2-135m")).split(",")
    formats = args.formats.split(",")
    cpu = args.device == "cpu"
    train_formats = (args.train_formats or ("fp32,int8,nf4,nf4-dq" if cpu else ",".join(formats))).split(",")
    train_dtype = getattr(torch, args.train_dtype or ("float32" if cpu else "bfloat16"))
    import bitsandbytes
    import transformers

    try:
        import peft

        peft_version, impls = peft.__version__, ["hf-peft", "peftlab"]
    except Exception as e:  # not installed, or a version that does not import with this transformers
        peft_version, impls = None, ["peftlab"]
        log(f"HF peft rows skipped: peft cannot be imported ({e.__class__.__name__}: {e})")
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu"),
        "cpu_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        "peft": peft_version, "steps": steps, "r": args.r, "train_formats": train_formats,
        "train_dtype": str(train_dtype), "models": {},
        "notes": [
            "tensor_bytes counts bitsandbytes' quantization states (absmax, nested absmax, codes, int8 row scales) "
            "that get_memory_footprint() leaves out; non-quantized parts (embeddings, norms, lm_head) are bf16 in the "
            "int8/nf4 rows, as in QLoRA.",
            "Every training run reloads the model and trains the same batch for `steps` steps (loss on the answer "
            "tokens only); median_step_s leaves out the first step.",
        ],
    }
    if cpu and "bf16" not in train_formats:
        result["notes"].append(
            "bf16 is not trained on the CPU by default: this CPU has no avx512_bf16/AMX, bf16 matmuls are emulated "
            "and a SmolLM2 LoRA step did not finish within minutes; int8/nf4 rows train with fp32 compute and fp32 "
            "embeddings/norms (--train-dtype), their footprint rows above are with bf16 as in QLoRA.")
    if peft_version is None:
        result["notes"].append("peft cannot be imported here: HF peft rows skipped")
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            log(f"== {name}")
            folder, tok, weights = checkpoint(name, workdir)
            m = {"weights": weights, "checkpoint": folder if tok is not None else "(temporary)"}
            rows, n_all = [], None
            for fmt in formats:
                try:
                    row, n = footprint(folder, fmt, args.device)
                except Exception as e:
                    log(f"  {fmt}: load failed: {e!r}")
                    rows.append({"format": fmt, "status": "failed", "error": repr(e)[:400]})
                    continue
                n_all = n_all or n
                rows.append(row)
                log(f"  {fmt}: {row['tensor_bytes'] / 1e6:.1f} MB of tensors, get_memory_footprint "
                    f"{row['get_memory_footprint'] / 1e6:.1f} MB ({row['load_s']:.1f} s load)")
            m["footprint"] = [r for r in rows if "tensor_bytes" in r]
            m["footprint_failed"] = [r for r in rows if "tensor_bytes" not in r]
            m["parameters"] = n_all
            if n_all:
                predict(m["footprint"], n_all)
            if tok is not None:
                examples = tokenize_chat(tok, INSTRUCTIONS[: args.batch], args.max_length)
                pad = tok.pad_token_id or 0
            else:
                vocab = EXTRA_CONFIGS.get(name, {}).get("vocab_size") or 49152
                examples, pad = byte_examples(INSTRUCTIONS[: args.batch], vocab, args.max_length), 0
            batch = collate(examples, pad)
            result["batch_shape"] = list(batch["input_ids"].shape)
            m["answer_tokens_in_loss"] = int((batch["labels"] != -100).sum())
            m["training"] = []
            if not args.no_train:
                runs = [(fmt, impl) for fmt in train_formats for impl in impls] + [("nf4-dq", "peftlab-own-nf4")]
                for fmt, impl in runs:
                    log(f"  train {fmt} + {impl}")
                    row = run_one(folder, fmt, impl, args.device, batch, steps, args.r, train_dtype)
                    if impl == "peftlab-own-nf4":
                        m["peftlab_own_nf4_bytes"] = row.get("model_bytes_after_load")
                        m["peftlab_own_nf4_predicted_bytes"] = own_prediction(m)
                    m["training"].append(row)
            result["models"][name] = m
            save(result, args.out, args.device)  # after every model: a run stopped later keeps what it has
    path = save(result, args.out, args.device)
    log("wrote", path)
    plot(result, os.path.join(args.out, f"bnb_footprint_{args.device}.png"))
    return result


if __name__ == "__main__":
    main()
