"""The ``peftlab`` command: ``peftlab compare`` (fine-tuning runs, reports/) and ``peftlab memory`` (peak memory).

Each sub-command is a pair here, ``add_<name>_arguments(parser)`` and ``run_<name>(args)``; the work itself is
in :mod:`.comparison` and :mod:`.memory`. ``peftlab train`` runs :func:`peftlab.distributed.train_distributed`,
in one process or under ``accelerate launch --num_processes N -m peftlab.experiments train ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..models import ARCH_CONFIGS, arch_config
from .memory import (
    METHODS,
    OPTIMIZERS,
    QUANT_BACKENDS,
    SHARDINGS,
    MemoryConfig,
    estimate,
    format_sharded,
    format_table,
    measure_cpu,
    measure_gpu,
    sharded_estimate,
)
from .methods import COMPARED

FAST = dict(steps=10, limit=64, eval_limit=64)  # compare --fast: checks that every method runs (minutes on a CPU)


# --- peftlab compare ----------------------------------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser, methods: str = "full,lora", steps: int = 200,
                          name: str = "lora_vs_full") -> None:
    """The options of ``peftlab compare`` (benchmarks/compare_methods.py reuses them with its own defaults)."""
    p.add_argument("--methods", default=methods, help=f"comma-separated (e.g. full,lora) or 'all': {COMPARED}")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--limit", type=int, default=2000, help="training examples (stratified subset)")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fast", action="store_true", help=f"a smoke test: {FAST}, report name ends in _fast")
    p.add_argument("--out", default="reports")
    p.add_argument("--name", default=None, help=f"report file stem (default {name}, or {name}_fast)")
    p.set_defaults(func=run_compare, default_name=name)


def run_compare(args: argparse.Namespace) -> int:
    from .comparison import check_method, compare, runs_dir, summary_lines

    methods = list(COMPARED) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        check_method(method)
    sizes = FAST if args.fast else dict(steps=args.steps, limit=args.limit, eval_limit=args.eval_limit)
    name = args.name or args.default_name + ("_fast" if args.fast else "")
    rows = compare(methods, out_dir=args.out, name=name, batch_size=args.batch_size, **sizes)
    print("\n".join(summary_lines(rows)))
    print(f"wrote {args.out}/{name}.(json|csv|md|png)")
    print(f"TensorBoard: tensorboard --logdir {runs_dir(args.out, name)}")
    return 0


# --- peftlab memory -----------------------------------------------------------------------------------------------
def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``peftlab memory``: one :class:`.memory.MemoryConfig`, and whether to measure it."""
    p.add_argument("--model", default="smollm2-135m", help=f"one of {sorted(ARCH_CONFIGS)} or a config.json path")
    p.add_argument("--method", default="lora", help=f"one of {METHODS}")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default=None, help="comma-separated LoRA target modules")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--optimizer", default="adamw", help=f"one of {OPTIMIZERS}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prefix and prompt tuning")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapters: bottleneck m = d / reduction factor")
    p.add_argument("--quant-backend", default="bnb", help=f"QLoRA's 4-bit layer: one of {QUANT_BACKENDS}")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs: print the per-GPU memory too")
    p.add_argument("--sharding", default="ddp", choices=SHARDINGS, help="with --gpus: replicated (ddp) or fsdp")
    p.add_argument("--measure", action="store_true", help="run two real training steps and compare")
    p.add_argument("--json", default=None, help="write the estimate (and measurement) to this file")
    p.set_defaults(func=run_memory)


def run_memory(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    model = args.model
    if model not in ARCH_CONFIGS and not os.path.exists(model):  # a clear error before anything else
        raise ValueError(f"unknown model {model!r}: choose one of {sorted(ARCH_CONFIGS)} or give a config.json path")
    task = "classification" if arch_config(model).model_type == "bert" else "causal_lm"
    cfg = MemoryConfig(model=model, method=args.method, r=args.r, dtype=args.dtype or ("bf16" if cuda else "fp32"),
                       target_modules=args.targets.split(",") if args.targets else None, optimizer=args.optimizer,
                       batch=args.batch, seq=args.seq, grad_checkpointing=args.grad_checkpointing,
                       num_virtual_tokens=args.num_virtual_tokens, reduction_factor=args.reduction_factor, task=task,
                       quant_backend=args.quant_backend)
    e = estimate(cfg)
    if args.gpus < 1 or args.measure and args.gpus > 1:
        raise ValueError(f"--gpus must be >= 1 (and 1 with --measure, which runs on one device), got {args.gpus}")
    sharded = sharded_estimate(cfg, args.gpus, args.sharding) if args.gpus > 1 else None
    measured = None
    if args.measure:
        measured = measure_gpu(cfg) if cuda else measure_cpu(cfg)
        measured["device"] = torch.cuda.get_device_name() if cuda else "cpu (peak RSS above the baseline)"
    print(format_table(e, measured))
    if sharded is not None:
        print(format_sharded(sharded))
    out = dict(estimate=e.to_dict(), measured=measured, per_gpu=sharded.to_dict() if sharded else None)
    path = args.json or f"memory_{model.replace('/', '_')}_{args.method}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {path}")
    return 0


# --- peftlab train ------------------------------------------------------------------------------------------------
TRAIN_METHODS = ("lora", "qlora", "houlsby", "pfeiffer")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``peftlab train``: one causal-LM run of :func:`peftlab.distributed.train_distributed`."""
    from ..distributed import MIXED_PRECISIONS, SHARDINGS

    p.add_argument("--model", default="tiny-llama", help=f"a causal-LM config, one of {sorted(ARCH_CONFIGS)}")
    p.add_argument("--pretrained", action="store_true", help="with smollm2-135m: SmolLM2-135M-Instruct's weights")
    p.add_argument("--data", default="random", choices=["random", "instructions"],
                   help="random tokens, or the QLoRA recipe's chat examples (needs smollm2-135m's tokenizer)")
    p.add_argument("--method", default="lora", choices=TRAIN_METHODS)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--targets", default=None, help="comma-separated LoRA target modules")
    p.add_argument("--reduction-factor", type=int, default=16, help="adapters: bottleneck m = d / reduction factor")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="examples per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq", type=int, default=64, help="tokens per example (random data; chat examples are cut)")
    p.add_argument("--examples", type=int, default=256, help="random data: number of examples")
    p.add_argument("--sharding", default="ddp", choices=SHARDINGS, help="fsdp needs GPUs (accelerate 1.15)")
    p.add_argument("--mixed-precision", default=None, choices=MIXED_PRECISIONS, help="default: bf16 on GPUs")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="the adapter (HF peft's format) and train.json go here")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import functools

    import torch

    from ..distributed import DistributedConfig, make_accelerator, random_tokens, train_distributed
    from ..models import build_from_config, load_causal_lm, load_causal_lm_tokenizer
    from .methods import apply_method

    causal = sorted(name for name, c in ARCH_CONFIGS.items() if c["model_type"] != "bert")
    if args.model not in causal:
        raise ValueError(f"--model must be a causal LM, one of {causal}; got {args.model!r}")
    if args.pretrained and args.model != "smollm2-135m":
        raise ValueError(f"--pretrained weights ship for smollm2-135m only, not {args.model!r}")
    cfg = DistributedConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                            sharding=args.sharding, mixed_precision=args.mixed_precision,
                            gradient_checkpointing=args.grad_checkpointing, seed=args.seed)
    model = load_causal_lm()[0] if args.pretrained else build_from_config(args.model, seed=args.seed)
    options = dict(reduction_factor=args.reduction_factor) if args.method in ("houlsby", "pfeiffer") else \
        dict(r=args.r, lora_alpha=args.lora_alpha, target_modules=args.targets.split(",") if args.targets else None)
    torch.manual_seed(args.seed)  # every process draws the same adapter initialisation
    model, _ = apply_method(args.method, model, **options)
    collate = None
    if args.data == "instructions":
        from .qlora import INSTRUCTIONS, tokenize_chat
        from .qlora import collate as chat_collate

        tokenizer = load_causal_lm_tokenizer()
        data = tokenize_chat(tokenizer, INSTRUCTIONS, max_length=args.seq)
        collate = functools.partial(chat_collate, pad_id=tokenizer.pad_token_id or 0)
    else:
        data = random_tokens(args.examples, args.seq, model.config.vocab_size, seed=args.seed)
    accelerator = make_accelerator(model, cfg)
    result = train_distributed(model, data, cfg, collate_fn=collate, save_dir=args.out, accelerator=accelerator,
                               progress=True)
    if accelerator.is_main_process:
        n = accelerator.num_processes
        print(f"{n} process(es), {accelerator.distributed_type.value}, global batch {cfg.global_batch(n)}: "
              f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.seconds_per_step:.3f} s/step")
        with open(os.path.join(args.out, "train.json"), "w") as f:
            json.dump(dict(result.to_dict(), processes=n, distributed_type=accelerator.distributed_type.value,
                           global_batch=cfg.global_batch(n), args=vars(args)), f, indent=1, default=str)
        print(f"wrote the adapter and train.json to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_compare_arguments(sub.add_parser("compare", help="full fine-tuning, LoRA, adapters, ... on tweet sentiment"))
    add_memory_arguments(sub.add_parser("memory", help="predict (and measure) the peak memory of one training step"))
    add_train_arguments(sub.add_parser("train", help="train an adapter in 1 process or under accelerate launch"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
