"""``peftlab compare``: fine-tune MiniLM-L6 on tweet sentiment with several methods; write reports/."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="full fine-tuning vs LoRA (and more) on tweet sentiment")
    p.add_argument("--methods", default="full,lora", help="comma-separated, e.g. full,lora")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--limit", type=int, default=2000, help="training examples (stratified subset)")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="reports")
    p.add_argument("--name", default="lora_vs_full")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .experiments import METHODS, compare, table_rows

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    rows = compare(methods, out_dir=args.out, name=args.name, steps=args.steps, limit=args.limit,
                   eval_limit=args.eval_limit, batch_size=args.batch_size)
    for r in table_rows(rows):
        print(r)
    print(f"wrote {args.out}/{args.name}.(json|csv|md|png)")
    return 0
