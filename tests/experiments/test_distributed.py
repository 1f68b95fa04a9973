"""peftlab.distributed under ``accelerate launch``: 2 CPU processes (gloo) against peftlab's one-process loop.

The references are independent of the code under test: :func:`peftlab.train.train` in this process, on the
*global* batch, and HF peft's loader for the saved adapter. One launch runs every job (a launch costs ~20 s
here); this file is also its worker script (``python test_distributed.py OUT``, under the launcher).

Launch: ``accelerate launch --multi_gpu --num_processes 2`` with ``ACCELERATE_USE_CPU=1`` (what ``--cpu``
sets): accelerate 1.15's ``accelerate launch --cpu --num_processes 2`` starts a single process (its multi-CPU
path goes through mpirun), while ``--multi_gpu`` starts 2 processes through torchrun, which
:func:`peftlab.distributed.make_accelerator` then runs on the CPU with gloo.
"""

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

DATA = dict(num_examples=16, seq_len=16, vocab_size=256, seed=1)  # fixed length: every rank sees as many tokens
LR = 1e-2
PROCESSES = 2
JOBS = {  # batch_size is per process and micro-batch
    "lora": dict(method="lora", batch_size=2, grad_accum=1, steps=4),
    "lora_accum": dict(method="lora", batch_size=2, grad_accum=2, steps=3, gradient_checkpointing=True),
    "houlsby": dict(method="houlsby", batch_size=2, grad_accum=1, steps=3),
    "fsdp_qlora": dict(method="qlora", batch_size=2, grad_accum=1, steps=3, sharding="fsdp"),  # last: forces state
}
CLI_ARGS = ["--model", "tiny-llama", "--method", "lora", "--r", "4", "--steps", "3", "--examples", "16", "--seq", "16",
            "--batch-size", "2", "--lr", str(LR)]
FSDP_ON_CPU = ("accelerate 1.15 switches to DistributedType.FSDP only for GPU-like devices (AcceleratorState: "
               "MULTI_GPU/NPU/XPU/...); a --cpu job stays MULTI_CPU and ignores the FSDP plugin. torch's FSDP itself "
               "runs on CPU with gloo, so the worker sets the state to FSDP (and its device to 'cpu', not accelerate's "
               "'cpu:0', which FSDP's device check rejects) by hand to exercise peftlab's plugin.")


def build(method: str):
    """The tiny Llama with its method, the same in every process and in the reference (seeded)."""
    from peftlab.experiments.methods import apply_method
    from peftlab.models import build_from_config

    model = build_from_config("tiny-llama", seed=0)
    torch.manual_seed(0)
    options = dict(reduction_factor=16) if method == "houlsby" else dict(r=4, lora_alpha=8.0)
    return apply_method(method, model, quant_backend="peftlab", **options)[0]  # qlora: peftlab's Linear4bit, fp32


def probe_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


# --- the worker: runs in each launched process ------------------------------------------------------------------
def run_job(name: str, job: dict, out: Path) -> dict:
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from peftlab.distributed import DistributedConfig, fsdp_plugin, make_accelerator, random_tokens, train_distributed
    from peftlab.quant import Linear4bit

    model = build(job["method"])
    cfg = DistributedConfig(steps=job["steps"], batch_size=job["batch_size"], grad_accum=job["grad_accum"], lr=LR,
                            sharding=job.get("sharding", "ddp"),
                            gradient_checkpointing=job.get("gradient_checkpointing", False))
    accelerator = make_accelerator(model, cfg)
    record = dict(distributed_type=accelerator.distributed_type.value, processes=accelerator.num_processes)
    if cfg.sharding == "fsdp":  # see FSDP_ON_CPU; AcceleratorState() re-reads PartialState's fields: set both
        for state in (PartialState(), accelerator.state):
            state.distributed_type = DistributedType.FSDP
            state.device = torch.device("cpu")  # not "cpu:0": FSDP compares device_id with "cpu"
        accelerator.state.fsdp_plugin = fsdp_plugin(model)  # what make_accelerator passed, and accelerate dropped
    result = train_distributed(model, random_tokens(**DATA), cfg, save_dir=out / name, accelerator=accelerator)
    record["losses"] = result.losses
    # DDP trains `model` in place (a full replica per rank); under FSDP these are this rank's shards.
    record["trainable"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if cfg.sharding == "fsdp":
        record["units"] = [type(m.module).__name__ for m in FSDP.fsdp_modules(model)]
        record["four_bit"] = [(m.weight.dtype, m.weight.numel(), m.in_features * m.out_features // 2)
                              for m in model.modules() if isinstance(m, Linear4bit)]
    elif accelerator.is_main_process:
        with torch.no_grad():
            record["logits"] = model(probe_ids()).logits
    return record


def worker(out: Path) -> None:
    from peftlab.experiments.cli import main

    rank = int(os.environ["RANK"])
    jobs = [(name, lambda name=name, job=job: run_job(name, job, out)) for name, job in JOBS.items()]
    jobs.insert(3, ("cli", lambda: dict(rc=main(["train", *CLI_ARGS, "--out", str(out / "cli")]))))
    for name, run in jobs:
        try:
            record = run()
        except Exception as e:  # recorded for the test to report; the other jobs still run
            record = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        torch.save(record, out / f"{name}.rank{rank}.pt")


# --- the tests ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), __file__, str(out)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"accelerate launch failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return out


def records(out: Path, name: str) -> list[dict]:
    found = [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(PROCESSES)]
    for r, rec in enumerate(found):
        assert "error" not in rec, f"job {name} failed on rank {r}: {rec.get('traceback', rec['error'])}"
    return found


def reference(method: str, global_batch: int, steps: int):
    """One process, peftlab's own loop, the global batch: the same examples in the same order (seed 0)."""
    from torch.utils.data import DataLoader

    from peftlab.distributed import random_tokens
    from peftlab.train import train

    model = build(method)
    loader = DataLoader(random_tokens(**DATA), batch_size=global_batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    return model, train(model, loader, steps=steps, lr=LR, progress=False).losses


@pytest.mark.parametrize("name", ["lora", "lora_accum", "houlsby"])
def test_two_processes_follow_one_process_with_the_global_batch(launched, name):
    """(1) losses = one process on the global batch; (4) 2 processes x accumulation 2 = one process x 4 (with
    gradient checkpointing on, off in the reference); bottleneck adapters via DDP too."""
    job = JOBS[name]
    recs = records(launched, name)
    assert [r["distributed_type"] for r in recs] == ["MULTI_CPU"] * PROCESSES
    assert [r["processes"] for r in recs] == [PROCESSES] * PROCESSES
    _, ref_losses = reference(job["method"], job["batch_size"] * PROCESSES * job["grad_accum"], job["steps"])
    for rec in recs:  # every rank logs the all-reduced loss
        assert rec["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # it trained: the comparison is not between two unchanged models


@pytest.mark.parametrize("name", ["lora", "lora_accum", "houlsby"])
def test_every_rank_holds_the_same_adapter(launched, name):
    """(2) DDP replicas agree bit for bit, and they moved away from their initialisation."""
    first, *others = records(launched, name)
    untrained = {n: p for n, p in build(JOBS[name]["method"]).named_parameters() if p.requires_grad}
    assert sorted(first["trainable"]) == sorted(untrained)
    for rec in others:
        for n, p in first["trainable"].items():
            assert torch.equal(rec["trainable"][n], p), n
    assert any(not torch.equal(first["trainable"][n], untrained[n]) for n in untrained)


def test_saved_adapter_loads_in_hf_peft_with_the_trained_models_logits(launched):
    """(3) the main process's file, read by HF peft, gives the logits of the model trained under DDP."""
    from peft import PeftModel

    from peftlab.models import build_from_config

    rec = records(launched, "lora")[0]
    peft_model = PeftModel.from_pretrained(build_from_config("tiny-llama", seed=0), str(launched / "lora")).eval()
    with torch.no_grad():
        logits = peft_model(probe_ids()).logits
    torch.testing.assert_close(logits, rec["logits"], atol=1e-5, rtol=0)


def test_cli_train_under_accelerate_matches_one_process_and_saves_a_peft_adapter(launched):
    """``peftlab train`` in 2 processes (what ``accelerate launch -m peftlab.experiments train`` runs)."""
    from peft import PeftModel
    from torch.utils.data import DataLoader

    from peftlab.distributed import random_tokens
    from peftlab.experiments.methods import apply_method
    from peftlab.models import build_from_config
    from peftlab.train import train

    assert [r["rc"] for r in records(launched, "cli")] == [0] * PROCESSES
    saved = json.loads((launched / "cli" / "train.json").read_text())
    assert (saved["processes"], saved["global_batch"]) == (PROCESSES, 4)
    # The same run by hand in one process: the CLI's model (seed 0), its data, the global batch of 4.
    model = build_from_config("tiny-llama", seed=0)
    torch.manual_seed(0)
    model = apply_method("lora", model, r=4, lora_alpha=16.0)[0]
    data = random_tokens(16, 16, vocab_size=256, seed=0)
    loader = DataLoader(data, batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    losses = train(model, loader, steps=3, lr=LR, progress=False).losses
    assert saved["losses"] == pytest.approx(losses, abs=1e-5)
    peft_model = PeftModel.from_pretrained(build_from_config("tiny-llama", seed=0), str(launched / "cli")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(probe_ids()).logits, model.eval()(probe_ids()).logits, atol=1e-5,
                                   rtol=0)


def test_fsdp_on_cpu_shards_per_decoder_layer_and_keeps_4bit_weights_whole(launched):
    """FSDP (QLoRA): the same losses as one process, adapter shards split over ranks, 4-bit buffers whole, and
    the gathered file equal to the one-process adapter. accelerate will not run FSDP on the CPU itself
    (FSDP_ON_CPU): the worker forces its state, so this tests peftlab's plugin with torch's FSDP on gloo."""
    print(FSDP_ON_CPU)
    recs = records(launched, "fsdp_qlora")  # torch 2.13 + accelerate 1.15: it runs, so an error is a failure
    job = JOBS["fsdp_qlora"]
    model, ref_losses = reference("qlora", job["batch_size"] * PROCESSES, job["steps"])
    full = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for rec in recs:
        assert rec["losses"] == pytest.approx(ref_losses, abs=1e-5)
        assert rec["units"] == ["LlamaDecoderLayer"] * 2  # one FSDP unit per decoder layer (and the root)
        assert rec["four_bit"] and all(dtype == torch.uint8 and n == whole for dtype, n, whole in rec["four_bit"])
    # Each rank holds a shard of the adapter: the shards add up to it and none holds it all.
    local = [sum(p.numel() for p in rec["trainable"].values()) for rec in recs]
    total = sum(p.numel() for p in full.values())
    assert sum(local) == total and max(local) < total
    from peftlab.files import read_tensors
    from peftlab.lora import lora_tensors

    saved = read_tensors(launched / "fsdp_qlora")
    expected = lora_tensors(model)
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value.detach(), atol=1e-5, rtol=0)


# --- the memory model: per-GPU terms under DDP and FSDP, against hand counts of Llama-3.1-8B ---------------------
# Llama-3.1-8B by hand: embeddings and untied head 128256 x 4096 each, final norm 4096; per layer q, o 4096^2,
# k, v 1024 x 4096, MLP 3 x 4096 x 14336, two norms 4096. LoRA r=8 on q, v: 8 (4096 + 4096) + 8 (4096 + 1024).
EMBED, LAYERS = 128256 * 4096, 32
LINEARS = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336  # per layer
LAYER = LINEARS + 2 * 4096
PARAMS = 2 * EMBED + 4096 + LAYERS * LAYER
LORA = 8 * (4096 + 4096) + 8 * (4096 + 1024)  # per layer
NF4 = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8  # bytes per 4-bit weight: 4 bits + double-quantized absmax (QLoRA)


def test_hand_counts_are_the_published_ones():
    assert (PARAMS, LAYERS * LORA) == (8_030_261_248, 3_407_872)  # the model card's 8.03B


@pytest.mark.parametrize("gpus", [2, 8])
def test_lora_8b_fsdp_shards_weights_grads_and_optimizer_by_n_ddp_replicates_them(gpus):
    from peftlab.experiments.memory import MemoryConfig, sharded_estimate

    cfg = MemoryConfig(model="llama-3.1-8b", method="lora", dtype="bf16", batch=1, seq=512)
    T = LAYERS * LORA
    fsdp, ddp = sharded_estimate(cfg, gpus, "fsdp"), sharded_estimate(cfg, gpus, "ddp")
    # FSDP: bf16 weights (frozen + LoRA), bf16 grads, fp32 master + two fp32 moments (12 B) of LoRA, all / N
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == pytest.approx((2 * (PARAMS + T) / gpus, 2 * T / gpus,
                                                                        12 * T / gpus))
    # gathered whole: the root unit (embeddings, head, norm) and two decoder layers with their LoRA, in bf16
    assert fsdp.comm == 2 * (2 * EMBED + 4096 + 2 * (LAYER + LORA))
    # DDP: every GPU holds it all, plus the reducer's bucket copy of the gradients
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.comm) == pytest.approx((2 * (PARAMS + T), 2 * T, 12 * T, 2 * T))
    assert fsdp.activations == ddp.activations  # each GPU runs its own micro-batch either way
    assert fsdp.total < ddp.total


def test_qlora_8b_fsdp_keeps_4bit_weights_whole_and_shards_the_rest():
    from peftlab.experiments.memory import MemoryConfig, sharded_estimate

    cfg = MemoryConfig(model="llama-3.1-8b", method="qlora", dtype="bf16", batch=1, seq=512)
    T, quantized = LAYERS * LORA, LAYERS * LINEARS
    s = sharded_estimate(cfg, 4, "fsdp")
    assert s.weights == pytest.approx(quantized * NF4 + 2 * (PARAMS - quantized + T) / 4)
    assert s.comm == 2 * (2 * EMBED + 4096 + 2 * (2 * 4096 + LORA))  # the layers' 4-bit weights are not gathered


def test_full_finetuning_fsdp_is_zero3_16_bytes_per_param_over_n():
    from peftlab.experiments.memory import MemoryConfig, sharded_estimate

    s = sharded_estimate(MemoryConfig(model="llama-3.1-8b", method="full", dtype="bf16", batch=1, seq=512), 8, "fsdp")
    assert s.weights + s.grads + s.optimizer == pytest.approx(16 * PARAMS / 8)  # ZeRO paper, stage 3: 16 psi / N


def test_memory_cli_prints_per_gpu_terms(tmp_path, capsys):
    from peftlab.experiments.cli import main

    out = tmp_path / "m.json"
    assert main(["memory", "--model", "llama-3.1-8b", "--dtype", "bf16", "--gpus", "8", "--sharding", "fsdp",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per GPU, 8 GPUs, FSDP" in text
    weights = 2 * (PARAMS + LAYERS * LORA) / 8
    assert f"{weights / 1e9:>10.3f}" in text.split("per GPU")[1]
    assert json.loads(out.read_text())["per_gpu"]["weights"] == pytest.approx(weights)
    assert main(["memory", "--model", "llama-3.1-8b", "--gpus", "0", "--json", str(out)]) == 2
    assert "--gpus must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown --sharding itself
        main(["memory", "--model", "tiny-llama", "--gpus", "2", "--sharding", "zero"])


if __name__ == "__main__":  # the worker, in each process of the launch
    worker(Path(sys.argv[1]))
