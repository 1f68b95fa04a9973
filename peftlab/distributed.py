"""Training on several GPUs with HF accelerate: DDP copies the model to every GPU, FSDP shards it across them.

:func:`train_distributed` is :func:`peftlab.train.train` plus what several processes need, and nothing more:

- ``accelerator.prepare`` wraps the model (DDP, or FSDP with one unit per decoder layer) and gives each
  process its own slice of the data: a step of N processes sees ``N x batch_size`` examples.
- ``accelerator.accumulate``: gradient accumulation; gradients are all-reduced on the last micro-batch only.
- ``accelerator.backward``: divides the loss by the accumulation steps (and scales it under fp16).
- the logged loss is all-reduced: the mean of the ranks' losses, i.e. the loss of the global batch.
- only the adapter is saved, once, by the main process, in HF peft's format (FSDP gathers it first).

The same code runs on 1 or N processes; the global batch is ``batch_size x processes x grad_accum``. Each
rank's loss is a mean over its own tokens and DDP / FSDP average the gradients over ranks, so N processes
follow one process with the global batch exactly when every rank sees as many labelled tokens (fixed-length
sequences: ``tests/experiments/test_distributed.py`` checks it to 1e-5). With padding the two differ slightly.

Commands (``peftlab train`` is ``python -m peftlab.experiments train``)::

    peftlab train --model tiny-llama --method lora --steps 20 --out runs/lora        # one process
    accelerate launch --num_processes 2 -m peftlab.experiments train --model smollm2-135m --pretrained \\
        --data instructions --method lora --steps 50 --out runs/ddp                  # 2 GPUs, DDP
    accelerate launch --num_processes 2 -m peftlab.experiments train --model smollm2-135m --pretrained \\
        --data instructions --method qlora --sharding fsdp --steps 50 --out runs/fsdp   # 2 GPUs, FSDP
    accelerate launch --multi_gpu --num_processes 2 -m peftlab.experiments train --out runs/cpu  # 2 CPU processes

On a machine without CUDA the last runs 2 CPU processes (gloo): ``--multi_gpu`` only makes accelerate start
them through torchrun (``torchrun --nproc_per_node 2 -m peftlab.experiments train`` does the same), and
:func:`make_accelerator` puts them on the CPU (``ACCELERATE_USE_CPU=1`` does that on a GPU machine).
``accelerate launch --cpu --num_processes 2`` starts *one* process in accelerate 1.15 (several CPU processes
go through mpirun there).

**FSDP** (:func:`fsdp_plugin`): FULL_SHARD, one FSDP unit per decoder layer (``transformer_based_wrap`` on
the class HF lists in ``_no_split_modules``, e.g. ``LlamaDecoderLayer``); ``use_orig_params=True``, so the
frozen base and the trainable adapter can share a unit (FSDP flattens each unit's parameters into one tensor,
which otherwise must be all trainable or all frozen). :class:`peftlab.quant.Linear4bit` layers are
``ignored_modules``: their packed 4-bit weights and fp32 scales are buffers that stay whole on every GPU and
are never cast by mixed precision (QLoRA recipes keep them out of sharding the same way; bitsandbytes' other
route, ``bnb_4bit_quant_storage=bfloat16``, shards them instead). On a GPU, bf16 mixed precision: parameters
are gathered and computed in bf16, gradients reduced in fp32, the fp32 shards stay the master copy.
accelerate 1.15 runs FSDP only on accelerators: on CPU processes it keeps DDP (``DistributedType.MULTI_CPU``)
and ignores the plugin, so :func:`train_distributed` refuses ``sharding="fsdp"`` there (torch's FSDP itself
does run on the CPU with gloo: the tests force accelerate's state to check this module's plugin).

References:
    - Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (DDP), arXiv:2006.15704.
    - Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", arXiv:2304.11277.
    - Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", arXiv:1910.02054.
    - HF accelerate, https://huggingface.co/docs/accelerate (``Accelerator``, ``FullyShardedDataParallelPlugin``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .files import save_adapter
from .inject import count_parameters
from .quant import Linear4bit
from .train import TrainResult, _to_inputs, peak_memory_bytes, reset_peak_memory
from .validate import one_of, positive_int

SHARDINGS = ("ddp", "fsdp")
MIXED_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class DistributedConfig:
    """How :func:`train_distributed` trains; ``batch_size`` is per process and micro-batch.

    >>> DistributedConfig(batch_size=4, grad_accum=2).global_batch(num_processes=2)
    16
    >>> DistributedConfig(sharding="zero3")
    Traceback (most recent call last):
    ...
    ValueError: sharding must be one of ['ddp', 'fsdp'], got 'zero3'
    """

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # examples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    weight_decay: float = 0.0  # AdamW, as peftlab.train.train
    sharding: str = "ddp"  # "ddp": the model replicated; "fsdp": sharded per decoder layer
    mixed_precision: str | None = None  # None: "bf16" on a GPU, "no" on the CPU
    gradient_checkpointing: bool = False
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            positive_int(name, getattr(self, name))
        one_of("sharding", self.sharding, list(SHARDINGS))
        if self.mixed_precision is not None:
            one_of("mixed_precision", self.mixed_precision, list(MIXED_PRECISIONS))

    def global_batch(self, num_processes: int) -> int:
        """Examples per optimizer step over all processes."""
        return self.batch_size * num_processes * self.grad_accum


def random_tokens(num_examples: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Fixed-length random sequences as a causal-LM dataset (``labels`` = ``input_ids``): data for smoke runs.

    >>> data = random_tokens(4, 8, vocab_size=256)
    >>> len(data), data[0]["input_ids"].shape, torch.equal(data[0]["input_ids"], data[0]["labels"])
    (4, torch.Size([8]), True)
    """
    ids = torch.randint(0, vocab_size, (num_examples, seq_len), generator=torch.Generator().manual_seed(seed))
    return [dict(input_ids=row, labels=row) for row in ids]


# --- FSDP ----------------------------------------------------------------------------------------------------------
def decoder_layer_class(model: nn.Module) -> str:
    """The name of the block FSDP wraps as one unit: HF's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``).

    >>> from peftlab.models import build_from_config
    >>> decoder_layer_class(build_from_config("tiny-llama", device="meta"))
    'LlamaDecoderLayer'
    """
    hf_model = getattr(model, "base", model)  # prefix / prompt tuning wrap the HF model
    names = list(getattr(hf_model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in hf_model.modules()}
    found = [n for n in names if n in present]
    if not found:
        raise ValueError(f"{type(hf_model).__name__} names no decoder layer class in _no_split_modules ({names}): "
                         f"FSDP needs one to wrap per layer")
    return found[0]


def four_bit_layers(model: nn.Module) -> list[Linear4bit]:
    """The :class:`peftlab.quant.Linear4bit` layers: FSDP ignores them, their 4-bit buffers stay whole."""
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def fsdp_plugin(model: nn.Module, mixed_precision: str = "no"):
    """accelerate's ``FullyShardedDataParallelPlugin`` for a PEFT model (FSDP1; see the module docstring)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecision

    policy = None
    if mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        # buffer_dtype=None: buffers keep their dtype (RoPE's fp32 inv_freq); few adapter gradients: reduce in fp32
        policy = MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=None)
    return FullyShardedDataParallelPlugin(
        fsdp_version=1,
        sharding_strategy="FULL_SHARD",  # parameters, gradients and optimizer state all sharded (ZeRO-3)
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[decoder_layer_class(model)],
        use_orig_params=True,  # frozen and trainable parameters in one unit; the optimizer sees the real ones
        ignored_modules=four_bit_layers(model) or None,
        mixed_precision_policy=policy,
        state_dict_type="FULL_STATE_DICT",
    )


def _check_fsdp_dtypes(model: nn.Module) -> None:
    ignored = {id(p) for m in four_bit_layers(model) for p in m.parameters()}
    dtypes = sorted({str(p.dtype) for p in model.parameters() if id(p) not in ignored})
    if len(dtypes) > 1:
        raise ValueError(f"FSDP flattens each layer's parameters into one tensor of one dtype, but this model has "
                         f"{dtypes}: build it in float32 (mixed precision then computes in bf16)")


@contextmanager
def _without_fsdp_wrappers(model: nn.Module):
    """The module tree without FSDP's wrappers, whose names would add ``_fsdp_wrapped_module.`` to every key."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, FSDP)]
    for parent, name, child in swaps:
        setattr(parent, name, child.module)
    try:
        yield model
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


# --- the accelerator, the loop, the file ---------------------------------------------------------------------------
def make_accelerator(model: nn.Module, config: DistributedConfig):
    """An ``accelerate.Accelerator`` for ``config``: mixed precision, accumulation steps, FSDP plugin if asked."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, parse_flag_from_env

    # CUDA GPUs (nccl), else CPU processes (gloo): accelerate would run a CPU-only launch as N separate
    # single-process jobs unless told cpu=True (what `accelerate launch --cpu` sets: ACCELERATE_USE_CPU).
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    mixed = config.mixed_precision or ("no" if cpu else "bf16")
    plugin = fsdp_plugin(model, mixed) if config.sharding == "fsdp" else None
    # sync_with_dataloader=False: accumulation counts micro-batches only, also across epochs of a short dataset.
    accumulation = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed, fsdp_plugin=plugin, gradient_accumulation_plugin=accumulation)


def _cycle(loader) -> Iterator[dict]:
    while True:  # another epoch whenever the loader ends
        yield from loader


def train_distributed(model: nn.Module, dataset: Dataset, config: DistributedConfig | None = None,
                      collate_fn: Callable | None = None, save_dir: str | os.PathLike | None = None,
                      accelerator=None, progress: bool = False) -> TrainResult:
    """Train ``model``'s trainable parameters on ``dataset`` in every process of a launch; a :class:`TrainResult`.

    ``dataset`` holds examples (dicts of tensors with ``labels``); each process reads ``config.batch_size`` of
    them per micro-batch. ``losses`` are the global batch's (the mean over ranks). ``save_dir``: write the
    adapter there (HF peft's format, :func:`peftlab.files.save_adapter`), once, from the main process.
    ``accelerator``: one made by :func:`make_accelerator` (default: made here). Call it in every process,
    with the same model (same seed). DDP trains ``model`` in place; FSDP leaves it sharded: use the saved file.

    >>> from peftlab import LoraConfig, apply_lora
    >>> from peftlab.models import build_from_config
    >>> model = apply_lora(build_from_config("tiny-llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    >>> cfg = DistributedConfig(steps=3, batch_size=2, lr=1e-2, mixed_precision="no")  # fp32 also on a GPU
    >>> result = train_distributed(model, random_tokens(4, 8, vocab_size=256), cfg)  # 1 process here
    >>> len(result.losses), result.losses[-1] < result.losses[0]
    (3, True)
    """
    from accelerate.utils import DistributedType

    config = config or DistributedConfig()
    accelerator = accelerator or make_accelerator(model, config)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if config.sharding == "fsdp" and not fsdp:
        raise ValueError(f"sharding='fsdp' but accelerate runs this job as {accelerator.distributed_type.value}: "
                         f"it enables FSDP only for 2 or more GPU processes (`accelerate launch --num_processes N`, "
                         f"N >= 2), never for one process or on the CPU; use sharding='ddp' there")
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
                         f"config.grad_accum is {config.grad_accum}: make it with make_accelerator(model, config)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter requires grad: apply a PEFT method (or unfreeze) before training")
    trainable, total, _ = count_parameters(model)
    if config.gradient_checkpointing:
        from .models import enable_checkpointing

        enable_checkpointing(getattr(model, "base", model))  # non-reentrant: works under DDP and FSDP
    if fsdp:
        _check_fsdp_dtypes(model)
        for layer in four_bit_layers(model):  # FSDP moves what it shards; the ignored 4-bit layers go by hand
            layer.to(accelerator.device)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)  # the same order in every process
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=config.shuffle, collate_fn=collate_fn,
                        generator=generator, drop_last=True)
    model = accelerator.prepare(model)  # DDP or FSDP wrapper; FSDP shards the parameters here
    # Built after wrapping: under FSDP, model.parameters() are this rank's shards (use_orig_params=True).
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=config.weight_decay)
    opt, loader = accelerator.prepare(opt, loader)  # each process now reads its own batches

    result = TrainResult(trainable=trainable, total=total)
    model.train()
    batches = _cycle(loader)
    bar = tqdm(range(config.steps), desc=f"train ({accelerator.num_processes} processes)",
               disable=not (progress and accelerator.is_main_process), leave=False)
    reset_peak_memory(accelerator.device)
    start = time.perf_counter()
    for _ in bar:
        loss_sum = torch.zeros((), device=accelerator.device)
        for _ in range(config.grad_accum):
            with accelerator.accumulate(model):  # no all-reduce (no_sync) before the last micro-batch
                loss = model(**_to_inputs(next(batches), accelerator.device)).loss
                accelerator.backward(loss)  # loss / grad_accum: the micro-batches' gradients add up to their mean
                opt.step()  # accelerate's wrapper steps (and zeroes) only once the gradients are synced
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float()
        # The global batch's loss: this rank's mean over its micro-batches, then the mean over ranks.
        value = accelerator.reduce(loss_sum / config.grad_accum, reduction="mean").item()
        result.losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
    result.seconds_per_step = (time.perf_counter() - start) / config.steps
    result.peak_memory_bytes = peak_memory_bytes(accelerator.device)
    if save_dir is not None:
        save_trained_adapter(accelerator, model, save_dir)
    model.eval()
    return result


def save_trained_adapter(accelerator, model: nn.Module, path: str | os.PathLike) -> int:
    """Write the adapter of a prepared ``model`` to ``path`` once, from the main process; bytes written (0 elsewhere).

    Every process must call it: under FSDP the full parameters are gathered (a collective) onto rank 0's CPU.
    """
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    inner = accelerator.unwrap_model(model)  # the PEFT model inside DDP / the FSDP root
    written = 0
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = accelerator.device.type != "cpu"
        with FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=offload):
            if accelerator.is_main_process:  # rank 0 now holds every parameter whole
                with _without_fsdp_wrappers(inner):
                    written = save_adapter(inner, path)
    elif accelerator.is_main_process:
        written = save_adapter(inner, path)
    accelerator.wait_for_everyone()
    return written
