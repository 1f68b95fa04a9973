"""One QLoRA training step: peftlab (Linear4bit + its LoRA) against bitsandbytes + HF peft, same run, same config.

Run from the repository root on a CUDA machine with bitsandbytes and peft installed:

    PYTHONPATH=. python benchmarks/qlora_step.py OUT_DIR [--model llama-3.1-8b] [--layers N]

Both models are built from the same config with the same random bf16 weights (values do not matter for
time or memory), every body linear in NF4 with double quantization (blocksize 64), LoRA r=16, alpha 32,
dropout 0.05 on all seven projections, gradient checkpointing (non-reentrant), torch AdamW on the
adapters, batch 4 x 512 random tokens, causal-LM loss. Two rounds, interleaved (peftlab, HF, peftlab, HF):
in each, 3 warm-up steps then 8 timed steps (CUDA-synchronised wall time). Peak memory is
``max_memory_allocated`` during a contender's timed steps minus what the other contender holds, i.e. its
weights + adapters + optimizer states + activations. A torch.profiler table of one step of each (top ops
by GPU time) is saved too. Writes OUT_DIR/qlora_step_<gpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch

from peftlab.experiments.methods import quantize_frozen_linears
from peftlab.lora import LoraConfig, apply_lora
from peftlab.models import arch_config, build_from_config, enable_checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, STEPS, ROUNDS = 3, 8, 2
GIB = 2 ** 30


def bnb_linear4bit(name: str, lin: torch.nn.Linear) -> torch.nn.Module:
    """bitsandbytes' Linear4bit of ``lin`` (NF4, double quant), quantized on the GPU from the bf16 weight."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=lin.weight.dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
    layer.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to(lin.weight.device)  # quantizes on .to
    return layer


def build(which: str, config) -> torch.nn.Module:
    model = build_from_config(config, device="cuda", dtype=torch.bfloat16)
    if which == "peftlab":
        apply_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
        quantize_frozen_linears(model, "peftlab")  # every frozen body linear, LoRA bases included
        base = model
    else:
        import peft

        from peftlab.inject import HEAD_NAMES, replace_modules

        replace_modules(model, r".*", bnb_linear4bit, exclude=list(HEAD_NAMES), what="layer to quantize")
        model.is_loaded_in_4bit = True  # what from_pretrained(load_in_4bit) sets: HF peft then wraps with lora.bnb
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                           target_modules=TARGETS, task_type="CAUSAL_LM"))
        base = model.get_base_model()
    enable_checkpointing(base)
    return model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", nargs="?", default=".")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (both alike)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    import bitsandbytes
    import peft
    import transformers

    config = arch_config(args.model)
    if args.layers:
        config.num_hidden_layers = args.layers
    models, optims, resident, lora_dtype = {}, {}, {}, {}
    for which in ("peftlab", "hf_peft_bnb"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        models[which] = build(which, config)
        params = [p for p in models[which].parameters() if p.requires_grad]
        lora_dtype[which] = str(params[0].dtype)
        optims[which] = torch.optim.AdamW(params, lr=1e-4)
        torch.cuda.synchronize()
        resident[which] = torch.cuda.memory_allocated() - before
        print(which, f"built: {resident[which] / GIB:.2f} GiB, {sum(p.numel() for p in params):,} trainable",
              flush=True)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")

    def step(which: str) -> None:
        loss = models[which](input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optims[which].step()
        optims[which].zero_grad(set_to_none=True)

    times = {w: [] for w in models}
    peaks = {w: [] for w in models}
    for r in range(ROUNDS):
        for which in models:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            for _ in range(WARMUP):
                step(which)
            torch.cuda.synchronize()
            resident[which] += torch.cuda.memory_allocated() - before  # optimizer states after the first step
            others = torch.cuda.memory_allocated() - resident[which]
            torch.cuda.reset_peak_memory_stats()
            for _ in range(STEPS):
                t = time.perf_counter()
                step(which)
                torch.cuda.synchronize()
                times[which].append(time.perf_counter() - t)
            peaks[which].append(torch.cuda.max_memory_allocated() - others)
            print(f"round {r} {which}: median {statistics.median(times[which][-STEPS:]):.3f} s, "
                  f"peak {peaks[which][-1] / GIB:.2f} GiB", flush=True)
    profiles = {}
    for which in models:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            step(which)
            torch.cuda.synchronize()
        profiles[which] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15,
                                                    max_name_column_width=60)
    res = {w: {"median_s": statistics.median(times[w]), "min_s": min(times[w]), "max_s": max(times[w]),
               "round_medians_s": [statistics.median(times[w][i * STEPS:(i + 1) * STEPS]) for i in range(ROUNDS)],
               "peak_gib": max(peaks[w]) / GIB, "resident_gib": resident[w] / GIB, "lora_dtype": lora_dtype[w]}
           for w in models}
    ratio_t = res["peftlab"]["median_s"] / res["hf_peft_bnb"]["median_s"]
    ratio_m = res["peftlab"]["peak_gib"] / res["hf_peft_bnb"]["peak_gib"]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
           "date": datetime.date.today().isoformat(), "model": args.model, "layers": config.num_hidden_layers,
           "batch": args.batch, "seq": args.seq,
           "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": TARGETS},
           "quant": "nf4, double quant, blocksize 64, bf16 compute", "checkpointing": "non-reentrant",
           "optimizer": "torch.optim.AdamW(lr=1e-4) on the adapters", "warmup": WARMUP, "steps": STEPS,
           "rounds": ROUNDS, "results": res, "ratio_time_peftlab_to_reference": ratio_t,
           "ratio_peak_memory_peftlab_to_reference": ratio_m, "goal": "time <= 1.0x, peak memory <= 1.0x",
           "goal_met": ratio_t <= 1.0 and ratio_m <= 1.0, "profile_one_step": profiles}
    print(json.dumps({k: v for k, v in out.items() if k != "profile_one_step"}, indent=1))
    for w, table in profiles.items():
        print("==", w, "\n", table)
    name = torch.cuda.get_device_name().split()[-1].lower()
    with open(f"{args.out_dir}/qlora_step_{name}.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
