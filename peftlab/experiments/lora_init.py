"""LoRA initialisations compared on MiniLM: the LoftQ error per iteration, and the first training steps.

Two questions, on the course's small real model and task (MiniLM-L6, tweet sentiment, as in
:mod:`.comparison`), with LoRA on every linear layer of the encoder (QLoRA's placement):

1. How much of the NF4 error does LoftQ take into the adapter? For every LoRA layer,
   ``||W - (Q + s B A)||_F`` after each LoftQ iteration, against plain QLoRA's ``||W - NF4(W)||_F``
   (iteration 0: ``B = 0``).
2. Does it show in training? The loss of the first steps (the same batches in the same order, the same
   fresh head) from four starts: plain LoRA on the fp32 base (``B = 0``), plain QLoRA (NF4 base,
   ``B = 0``), LoftQ (NF4 base) and PiSSA (fp32 residual base). Also how far each start is from the
   fp32 model before any step (the last hidden state, relative).

``nice -n 19 python -m peftlab.experiments.lora_init`` writes ``reports/lora_init.json`` and ``.png``
(about 3 minutes on two CPU cores). SmolLM2 (:mod:`.qlora`) was the other candidate: its 49k-token
output layer makes a step several times dearer on a CPU, and its 3-layer cut is no language model.

References:
    - Li et al., "LoftQ", arXiv:2310.08659; Meng et al., "PiSSA", arXiv:2404.02948.
    - Dettmers et al., "QLoRA", arXiv:2305.14314.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..init import loftq_init, pissa_init
from ..lora import LoraConfig, apply_lora, lora_layers
from ..quant import Linear4bit, QuantConfig, quantize_model
from ..train import train

INITS = ("lora (fp32 base)", "qlora", "loftq", "pissa")
COLORS = {"lora (fp32 base)": "0.35", "qlora": "tab:red", "loftq": "tab:blue", "pissa": "tab:green"}
TARGETS = ["query", "key", "value", "dense"]  # every linear layer of the encoder (and the pooler); not the head


def prepare(model: nn.Module, init: str, config: LoraConfig, quant: QuantConfig, num_iters: int) -> dict:
    """Apply LoRA to ``model`` (in place) started the way ``init`` says; return LoftQ's errors, if any."""
    torch.manual_seed(0)  # the same A for the B = 0 starts
    if init == "qlora":  # quantize first, then LoRA over the 4-bit layers: A random, B = 0
        apply_lora(quantize_model(model, quant, target=list(config.target_modules)), config)
        return {}
    apply_lora(model, config)
    if init == "loftq":  # LoRA on the fp32 model, then LoftQ quantizes each wrapped layer's base
        return loftq_init(model, num_iters=num_iters, quant_config=quant)
    if init == "pissa":
        pissa_init(model)
    return {}


@torch.no_grad()
def qlora_errors(model: nn.Module, targets: list[str], quant: QuantConfig) -> dict[str, float]:
    """``||W - NF4(W)||_F`` per linear layer: plain QLoRA's error (its adapter adds nothing at step 0)."""
    quantized = dict(quantize_model(copy.deepcopy(model), quant, target=targets).named_modules())
    return {n: (m.weight - quantized[n].dequantize().float()).norm().item()
            for n, m in model.named_modules() if isinstance(quantized.get(n), Linear4bit)}


def kind(name: str) -> str:
    """The layer's role, without its index: ``bert.encoder.layer.3.attention.self.query`` -> ``query``.

    >>> kind("bert.encoder.layer.3.attention.output.dense"), kind("bert.pooler.dense")
    ('attention.output.dense', 'pooler.dense')
    """
    return re.sub(r"^bert\.(encoder\.layer\.\d+\.)?|attention\.self\.", "", name)


@torch.no_grad()
def hidden_gap(model: nn.Module, reference: torch.Tensor, batch: dict) -> float:
    """``||h - h_fp32|| / ||h_fp32||`` of the last hidden state on ``batch``: how far a start is from the model."""
    model.eval()
    h = model(**batch, output_hidden_states=True).hidden_states[-1]
    return ((h - reference).norm() / reference.norm()).item()


def run(out_dir: str = "reports", steps: int = 30, r: int = 8, lora_alpha: float = 16.0, lr: float = 1e-3,
        num_iters: int = 5, batch_size: int = 8, max_length: int = 48, progress: bool = True) -> dict:
    """Both studies on MiniLM-L6 and tweet sentiment; writes ``lora_init.json`` and ``lora_init.png``."""
    from ..data import load_tweets, tokenize
    from ..models import load_classifier
    from ..train import make_loader

    start = time.perf_counter()
    torch.manual_seed(0)
    base, tok = load_classifier(num_labels=3)  # one fresh head, copied into every run
    data = load_tweets(seed=0)
    train_ds = tokenize(data["train"].shuffle(seed=0).select(range(steps * batch_size)), tok, max_length)
    loader = make_loader(train_ds, tok, batch_size, shuffle=True, seed=0)  # the same batches for every init
    probe = tok(data["validation"]["text"][:32], return_tensors="pt", padding=True, truncation=True,
                max_length=max_length)
    with torch.no_grad():
        reference = base(**probe, output_hidden_states=True).hidden_states[-1]
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=TARGETS, modules_to_save=["classifier"])
    quant = QuantConfig(compute_dtype=torch.float32)  # NF4, blocksize 64, double quantization (QLoRA's)
    result = {"model": "MiniLM-L6 (tweet sentiment)", "r": r, "lora_alpha": lora_alpha, "scaling": config.scaling,
              "lr": lr, "steps": steps, "batch_size": batch_size, "num_iters": num_iters, "targets": TARGETS,
              "quant": "nf4, blocksize 64, double quant", "runs": {}}
    errors_qlora = qlora_errors(base, TARGETS, quant)
    for init in (bar := tqdm(INITS, desc="inits", disable=not progress)):
        bar.set_postfix(init=init)
        model = copy.deepcopy(base)
        errors = prepare(model, init, config, quant, num_iters)
        if errors:
            result["errors"] = {n: {"qlora": errors_qlora[n], "loftq": e} for n, e in errors.items()}
        gap = hidden_gap(model, reference, probe)
        trained = train(model, loader, steps=steps, lr=lr, seed=0, desc=init, progress=progress)
        result["runs"][init] = {"hidden_gap_at_step_0": gap, "losses": [round(x, 4) for x in trained.losses],
                                "seconds_per_step": trained.seconds_per_step, "lora_layers": len(lora_layers(model))}
    result["total_error"] = total_errors(result["errors"])
    result["seconds"] = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_init.json").write_text(json.dumps(result, indent=2))
    plot(result).savefig(out / "lora_init.png", dpi=120)
    return result


def total_errors(errors: dict[str, dict]) -> list[float]:
    """``sqrt(sum over layers of ||W - (Q + s B A)||^2)`` at iteration 0 (plain QLoRA), 1, 2, ..."""
    per_iter = zip(*([e["qlora"]] + e["loftq"] for e in errors.values()), strict=True)
    return [math.sqrt(sum(x * x for x in it)) for it in per_iter]


def plot(result: dict):
    """Two panels: LoftQ's error per iteration relative to plain QLoRA's; the training loss per step per init."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    errors, iters = result["errors"], list(range(result["num_iters"] + 1))
    for k in sorted({kind(n) for n in errors}):  # one line per kind of layer, errors summed over the layers
        total = total_errors({n: e for n, e in errors.items() if kind(n) == k})
        ax1.plot(iters, [x / total[0] for x in total], marker=".", lw=1, alpha=0.8, label=k)
    total = result["total_error"]
    ax1.plot(iters, [x / total[0] for x in total], "k-o", lw=2.5,
             label=f"all {len(errors)} layers ({total[0]:.1f} -> {min(total):.1f})")
    ax1.set_xticks(iters)
    ax1.set_xlabel("LoftQ iteration (0 = plain QLoRA init: Q = NF4(W), B = 0)")
    ax1.set_ylabel("||W - (Q + s B A)||_F  relative to plain QLoRA's ||W - NF4(W)||_F")
    ax1.set_title(f"Quantization error left in the model at step 0 (r = {result['r']}, NF4)", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    window = 5
    for init, run in result["runs"].items():
        color = COLORS.get(init, "tab:purple")
        losses = torch.tensor(run["losses"])
        steps = torch.arange(1, len(losses) + 1)
        smooth = losses.unfold(0, window, 1).mean(1)  # running mean over `window` steps
        ax2.plot(steps, losses, color=color, lw=0.8, alpha=0.35)
        ax2.plot(steps[window - 1:], smooth, color=color, lw=2,
                 label=f"{init}: hidden-state gap to fp32 at step 0 {100 * run['hidden_gap_at_step_0']:.2f} %")
    ax2.set_xlabel("training step (the same batches and head for every init)")
    ax2.set_ylabel(f"training loss (thin: per step; bold: mean of {window})")
    ax2.set_title(f"First {result['steps']} steps, AdamW lr {result['lr']:g}, batch {result['batch_size']}, "
                  f"r = {result['r']}, alpha = {result['lora_alpha']:g}", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"LoRA initialisations on {result['model']}: LoftQ, PiSSA, plain (Q)LoRA", fontsize=11)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--iters", type=int, default=5, help="LoftQ iterations")
    args = p.parse_args(argv)
    res = run(args.out, steps=args.steps, num_iters=args.iters)
    print("total error per LoftQ iteration (0 = QLoRA):", [round(x, 3) for x in res["total_error"]])
    for init, r in res["runs"].items():
        losses = r["losses"]
        print(f"{init:<17} gap at step 0 {100 * r['hidden_gap_at_step_0']:.2f} %, loss mean of first/last 5 steps "
              f"{sum(losses[:5]) / 5:.3f} / {sum(losses[-5:]) / 5:.3f}, {r['seconds_per_step']:.2f} s/step")
    print(f"wrote {args.out}/lora_init.json and lora_init.png in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
