"""One small, readable training loop (AdamW on whatever requires grad), with time and peak-memory figures.

:func:`train` serves every run in peftlab: sequence classification from a DataLoader, causal-LM batches
(instruction tuning, the memory measurements, the tests' short runs); the loss is the model's own
(``model(**batch).loss``, HF's cross-entropy over ``labels``).

With ``log_dir`` the run's figures also go to TensorBoard event files there (``train/loss`` per step, then
``eval/accuracy``, ``train/seconds_per_step``, ``memory/peak_mb``): ``tensorboard --logdir <log_dir>``.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak resident
set size (``ru_maxrss``: weights, activations, optimizer states, the Python interpreter and its
libraries). Peak RSS only ever rises within a process, so runs to be compared each go in their own
subprocess: :func:`run_isolated`.

References:
    - Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), arXiv:1711.05101.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .inject import count_parameters


@dataclass
class TrainResult:
    """What a run reports: losses per step, final accuracy, speed, memory and parameter counts."""

    losses: list[float] = field(default_factory=list)
    accuracy: float | None = None  # on the evaluation set after training
    accuracy_before: float | None = None  # the same model before training
    seconds_per_step: float = 0.0
    peak_memory_bytes: int = 0  # during the training steps: GPU allocated, or the process's RSS on the CPU
    trainable: int = 0
    total: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    """Start a new peak: loading a model can peak higher than training it (copies, a mapped checkpoint)."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
            f.write("5")
    except OSError:  # elsewhere ru_maxrss cannot be reset: the peak then includes loading
        pass


def rss_kib(field_name: str) -> int:
    """A memory figure of this process from Linux's /proc/self/status, in KiB (``VmRSS``, ``VmHWM``: its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name))


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak allocated GPU memory on CUDA, else this process's peak RSS since :func:`reset_peak_memory`."""
    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return rss_kib("VmHWM") * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, never reset


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader of padded batches from a tokenized dataset (``input_ids``, ``label``, ...)."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def _to_inputs(batch: dict, device: torch.device) -> dict:
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}  # use_cache=False
    if "label" in batch:
        batch["labels"] = batch.pop("label")
    return batch


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | None = None) -> float:
    """Accuracy of ``model`` over ``loader``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = seen = 0
    for batch in loader:
        inputs = _to_inputs(batch, device)
        labels = inputs.pop("labels")
        pred = model(**inputs).logits.argmax(-1)
        correct += (pred == labels).sum().item()
        seen += labels.numel()
    model.train(was_training)
    return correct / max(seen, 1)


def train(model: nn.Module, train_loader: Iterable[dict], eval_loader: DataLoader | None = None, steps: int = 100,
          lr: float = 5e-4, weight_decay: float = 0.0, seed: int | None = 0, evaluate_before: bool = False,
          desc: str = "train", progress: bool = True,
          optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
          after_step: Callable[[int], None] | None = None, log_dir: str | os.PathLike | None = None) -> TrainResult:
    """Train the parameters that require grad for ``steps`` steps of ``model(**batch).loss``; a :class:`TrainResult`.

    ``train_loader`` is any iterable of batches (dicts of model inputs with ``labels`` or ``label``): a DataLoader
    is cycled, a generator may be endless. ``optimizer(params)`` builds the optimizer (default AdamW with ``lr``
    and ``weight_decay``); ``seed`` seeds torch first (None: leave the generator as it is); ``after_step(step)``
    runs after every optimizer step. ``accuracy`` is measured on ``eval_loader`` after training. ``log_dir``:
    write the figures as TensorBoard events there too (:func:`tensorboard_writer`).

    >>> from peftlab.models import build_from_config
    >>> model = build_from_config("tiny-llama")
    >>> ids = torch.randint(0, 256, (2, 8))
    >>> result = train(model, [dict(input_ids=ids, labels=ids)], steps=3, lr=1e-2, progress=False)
    >>> len(result.losses), result.losses[-1] < result.losses[0], result.trainable == result.total
    (3, True, True)
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: apply a PEFT method (or unfreeze) before training")
    trainable, total, _ = count_parameters(model)
    result = TrainResult(trainable=trainable, total=total)
    if evaluate_before and eval_loader is not None:
        result.accuracy_before = evaluate(model, eval_loader, device)
    writer = tensorboard_writer(log_dir) if log_dir is not None else None
    opt = optimizer(params) if optimizer else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    batches = iter(train_loader)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    reset_peak_memory(device)
    start = time.perf_counter()
    for step in bar:
        try:
            batch = next(batches)
        except StopIteration:  # another epoch
            batches = iter(train_loader)
            batch = next(batches)
        loss = model(**_to_inputs(batch, device)).loss
        loss.backward()
        value = loss.item()
        del loss  # the graph's last references go before the step (the peak of the memory study)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
        if writer is not None:
            writer.add_scalar("train/loss", value, step + 1)
        if after_step is not None:
            after_step(step)
    result.seconds_per_step = (time.perf_counter() - start) / max(steps, 1)
    result.peak_memory_bytes = peak_memory_bytes(device)
    if eval_loader is not None:
        result.accuracy = evaluate(model, eval_loader, device)
    if writer is not None:
        log_result(writer, result, steps)
        writer.close()
    model.eval()
    return result


def tensorboard_writer(log_dir: str | os.PathLike):
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir`` (needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch imports tensorboard lazily: say which package is missing
        raise ImportError(f"TensorBoard logs need the tensorboard package (pip install 'peftlab[train]'): {e}") \
            from None
    return SummaryWriter(log_dir=str(log_dir))


def log_result(writer, result: TrainResult, step: int) -> None:
    """The figures of a finished run, at its last ``step``: accuracy (before, after), time per step, peak memory."""
    if result.accuracy_before is not None:
        writer.add_scalar("eval/accuracy", result.accuracy_before, 0)
    if result.accuracy is not None:
        writer.add_scalar("eval/accuracy", result.accuracy, step)
    writer.add_scalar("train/seconds_per_step", result.seconds_per_step, step)
    writer.add_scalar("memory/peak_mb", result.peak_memory_bytes / 2**20, step)


def run_isolated(target: str, timeout: float | None = None, **kwargs) -> dict:
    """Run ``"package.module:function"(**kwargs)`` in a fresh Python process and return its dict.

    The function must return something JSON can hold. A fresh process is the only honest way to
    compare CPU peak memory between runs (peak RSS never goes down within a process).

    >>> run_isolated("json:dumps", obj=[1, 2])
    '[1, 2]'
    """
    module, _, function = target.partition(":")
    code = ("import importlib, json, sys; kw = json.loads(sys.stdin.read()); "
            f"r = getattr(importlib.import_module({module!r}), {function!r})(**kw); "
            "print('\\n@@RESULT@@' + json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(kwargs), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        raise RuntimeError(f"{target} failed in its subprocess (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])
