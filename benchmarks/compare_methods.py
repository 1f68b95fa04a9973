"""Eight ways to fine-tune MiniLM-L6 on tweet sentiment, the same number of steps each.

Full fine-tuning, LoRA, Houlsby and Pfeiffer adapters, prefix tuning, prompt tuning, IA3 and BitFit
each train for ``--steps`` AdamW steps on the same examples in the same order, every run in its own
subprocess (so peak memory is per method). The work is ``peftlab.experiments.compare()`` (the same as
``peftlab compare --methods all``); this script only sets the defaults of the full study. Reported:
trainable parameters (as HF peft counts them, task head included, and without the head), validation
accuracy before and after, seconds per step, peak memory and the size of the file a user must keep
for the task, and the trainable share against the ranges the course notes claim.

Run from the repository root:
    python benchmarks/compare_methods.py         # 300 steps, 2,000 examples: about an hour on 2 CPU cores
                                                 # -> reports/compare_methods.{json,csv,md,png}
    python benchmarks/compare_methods.py --fast  # 10 steps, 64 examples: a smoke test (~3 minutes)
                                                 # -> reports/compare_methods_fast.*
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peftlab.experiments.cli import add_compare_arguments, run_compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compare_arguments(parser, methods="all", steps=300, name="compare_methods")
    return run_compare(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
