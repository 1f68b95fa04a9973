"""``peftlab compare``: fine-tune MiniLM-L6 on tweet sentiment with several methods; write reports/."""

from __future__ import annotations

import argparse

FAST = dict(steps=10, limit=64, eval_limit=64)  # --fast: checks that every method runs (minutes on a CPU)


def add_arguments(p: argparse.ArgumentParser, methods: str = "full,lora", steps: int = 200,
                  name: str = "lora_vs_full") -> None:
    """The options of ``peftlab compare`` (benchmarks/compare_methods.py reuses them with its own defaults)."""
    p.add_argument("--methods", default=methods, help="comma-separated (e.g. full,lora) or 'all'")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--limit", type=int, default=2000, help="training examples (stratified subset)")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fast", action="store_true", help=f"a smoke test: {FAST}, report name ends in _fast")
    p.add_argument("--out", default="reports")
    p.add_argument("--name", default=None, help=f"report file stem (default {name}, or {name}_fast)")
    p.set_defaults(func=run, default_name=name)


def add_cli(sub: argparse._SubParsersAction) -> None:
    add_arguments(sub.add_parser("compare", help="full fine-tuning, LoRA, adapters, ... on tweet sentiment"))


def run(args: argparse.Namespace) -> int:
    from .comparison import METHODS, check_method, compare, summary_lines

    methods = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        check_method(method)
    sizes = FAST if args.fast else dict(steps=args.steps, limit=args.limit, eval_limit=args.eval_limit)
    name = args.name or args.default_name + ("_fast" if args.fast else "")
    rows = compare(methods, out_dir=args.out, name=name, batch_size=args.batch_size, **sizes)
    print("\n".join(summary_lines(rows)))
    print(f"wrote {args.out}/{name}.(json|csv|md|png)")
    return 0
