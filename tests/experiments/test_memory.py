"""experiments.memory: formulas against hand counts, saved tensors counted by autograd, a CPU measurement, the CLI."""

import pytest
import torch

from peftlab.experiments.cli import main
from peftlab.experiments.memory import (
    GB,
    MemoryConfig,
    activation_bytes,
    estimate,
    measure_cpu,
    parameter_breakdown,
    prepare_model,
)
from peftlab.models import build_from_config

# tiny-llama: d=64, ff=128, 4 heads of 16, 2 KV heads (kv width 32), 2 layers, vocab 256, untied head.
D, FF, KV, L, V = 64, 128, 32, 2, 256
BODY_LINEAR = L * (D * D + KV * D + KV * D + D * D + 3 * FF * D)  # q, k, v, o, gate/up/down: 73,728


@pytest.mark.parametrize("r", [1, 4, 8])
def test_lora_count_by_hand(r):
    # q: r (64 + 64), v: r (64 + 32), per layer
    assert parameter_breakdown(MemoryConfig(model="tiny-llama", method="lora", r=r))["trainable"] == L * r * (128 + 96)


def test_full_bf16_is_16_bytes_per_param_and_fp32_adam_is_16_too():
    for dtype in ("bf16", "fp32"):  # ZeRO: 2+2+4+4+4 (bf16) ; fp32: 4 weights + 4 grads + 8 moments
        e = estimate(MemoryConfig(model="tiny-llama", method="full", dtype=dtype))
        assert e.weights + e.grads + e.optimizer == 16 * e.params


def test_qlora_weights_by_hand():
    e = estimate(MemoryConfig(model="tiny-llama", method="qlora", r=4, dtype="bf16"))
    assert BODY_LINEAR == 73728
    nf4 = BODY_LINEAR * (0.5 + 1 / 64 + 4 / (64 * 256))  # codes + 8-bit absmax per 64 + fp32 per 256 absmax
    rest = 2 * (e.params - BODY_LINEAR + L * 4 * (128 + 96))  # embeddings, norms, head, LoRA in bf16
    assert e.weights == pytest.approx(nf4 + rest)


def test_paged_optimizer_moves_moments_to_managed_memory():
    plain = estimate(MemoryConfig(model="tiny-llama", method="lora", optimizer="adamw"))
    paged = estimate(MemoryConfig(model="tiny-llama", method="lora", optimizer="paged_adamw"))
    eight = estimate(MemoryConfig(model="tiny-llama", method="lora", optimizer="adamw8bit"))
    assert plain.optimizer - paged.optimizer == paged.managed == 8 * plain.trainable
    assert plain.optimizer - eight.optimizer == 6 * plain.trainable


def test_llama_layer_formula_by_hand_fp32_full():
    # Hand count, per token per layer, fp32: two RMSNorms (x, normed, output: 3 d + rsqrt), SDPA's q, k, v,
    # output (d + 32 + 32 + d) and fp32 log-sum-exp per head, SwiGLU gate, silu, up, down input (4 ff).
    hand = 4 * (2 * (3 * D + 1) + (2 * D + 2 * KV) + 4 + 4 * FF)
    act = activation_bytes(MemoryConfig(model="tiny-llama", method="full", dtype="fp32", batch=1, seq=1))
    assert act["per_token_layer"]["total"] == hand == 4376


def saved_bytes(model, batch, seq, task="causal_lm"):
    """Bytes autograd keeps for backward (distinct storages, parameters excluded): an independent count."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, V, (batch, seq))
    labels = ids if task == "causal_lm" else torch.zeros(batch, dtype=torch.long)
    extra = dict(use_cache=False) if task == "causal_lm" else dict(attention_mask=torch.ones_like(ids))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels, **extra)
    return sum(seen.values())


@pytest.mark.parametrize("model_name,task", [("tiny-llama", "causal_lm"), ("tiny-bert", "classification")])
@pytest.mark.parametrize("method", ["full", "lora", "houlsby", "pfeiffer", "prefix", "prompt"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_saved_activations_match_autograd(model_name, task, method, dtype):
    # Two layers only: what layer 0 does not keep (nothing before the first trainable tensor) is half the
    # model here, so these cases test that rule hard. Prefix: repeated kv heads and the explicit mask.
    cfg = MemoryConfig(model=model_name, task=task, method=method, dtype=dtype, r=4, batch=2, seq=32)
    model = build_from_config(model_name, task=task, num_labels=2,
                              dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    model = prepare_model(model, cfg).train()
    predicted = activation_bytes(cfg)["saved"]
    # Small terms left out of the model (ids, labels, RoPE tables, the pooler and classifier inputs).
    assert predicted == pytest.approx(saved_bytes(model, 2, 32, task), rel=0.05)


def test_prefix_with_gradient_checkpointing_is_refused_clearly():
    from peftlab.prefix import PrefixConfig, PrefixTuningModel

    with pytest.raises(ValueError, match="prefix tuning cannot train with gradient checkpointing"):
        MemoryConfig(model="tiny-llama", method="prefix", grad_checkpointing=True)
    from peftlab.models import enable_checkpointing

    base = build_from_config("tiny-llama")
    enable_checkpointing(base)
    model = PrefixTuningModel(base, PrefixConfig(num_virtual_tokens=3)).train()
    with pytest.raises(ValueError, match="past_key_values, which transformers drops"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    model.eval()  # inference does not checkpoint: the prefix works
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, V)


def test_adapter_prefix_prompt_counts_by_hand():
    # The real module tree (parameter_breakdown) against the papers' closed forms; m = 64 // 16 = 4.
    def trainable(method, **kw):
        return parameter_breakdown(MemoryConfig(model="tiny-llama", method=method, **kw))["trainable"]

    assert trainable("houlsby") == L * 2 * (2 * D * 4 + D + 4)  # two adapters per layer (Houlsby et al.)
    assert trainable("pfeiffer") == L * (2 * D * 4 + D + 4)  # one, after the FFN (Pfeiffer et al.)
    assert trainable("pfeiffer", reduction_factor=8) == L * (2 * D * 8 + D + 8)
    assert trainable("prefix", num_virtual_tokens=5) == 2 * L * 5 * KV  # keys + values per layer, kv width
    assert trainable("prompt", num_virtual_tokens=5) == 5 * D  # input embeddings only (Lester et al.)
    # A classifier's new head trains too: MiniLM-style tiny-bert, 2 labels.
    head = D * 2 + 2
    assert parameter_breakdown(MemoryConfig(model="tiny-bert", task="classification", method="prompt",
                                     num_virtual_tokens=5))["trainable"] == 5 * D + head


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "prefix"])
def test_cpu_measurement_within_10_percent(method):
    # Each in its own subprocess (peak RSS never falls within one); QLoRA with peftlab's Linear4bit.
    cfg = MemoryConfig(model="smollm2-135m", method=method, dtype="fp32", batch=2, seq=128, quant_backend="peftlab")
    measured = measure_cpu(cfg)["peak_bytes"]
    assert estimate(cfg).total == pytest.approx(measured, rel=0.10), (estimate(cfg).total / GB, measured / GB)


@pytest.mark.slow
def test_quantizing_a_loaded_model_frees_its_fp32_memory():
    """QLoRA on the CPU must lower the RSS: the loaders own their weights (a mapped file would stay resident)."""
    import subprocess
    import sys

    code = """
import ctypes, gc, torch
from peftlab.train import rss_kib
from peftlab.models import load_causal_lm
from peftlab.quant import QuantConfig, model_nbytes, quantize_model
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 64 * 1024)  # large frees go back to the OS at once
model = load_causal_lm()[0]
nbytes, rss = model_nbytes(model), rss_kib("VmRSS")
quantize_model(model, QuantConfig(compute_dtype=torch.float32), skip=("lm_head",))
gc.collect(); libc.malloc_trim(0)
print(nbytes - model_nbytes(model), (rss - rss_kib("VmRSS")) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    freed_tensors, freed_rss = map(int, out.split()[-2:])
    assert freed_tensors > 300e6  # 106 M linear weights: fp32 -> NF4
    assert freed_rss > 0.8 * freed_tensors, (freed_tensors, freed_rss)


def test_cli_bad_model_lists_choices(capsys):
    assert main(["memory", "--model", "llama-9000b"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'llama-9000b'" in err and "llama-65b" in err and "smollm2-135m" in err


def test_cli_bad_method_lists_choices(capsys):
    assert main(["memory", "--model", "tiny-llama", "--method", "dora"]) == 2
    err = capsys.readouterr().err
    assert "method must be one of" in err and "'qlora'" in err and "'dora'" in err


def test_cli_adapter_reduction_factor_reaches_the_estimate(tmp_path):
    import json

    out = tmp_path / "a.json"
    assert main(["memory", "--model", "tiny-llama", "--method", "pfeiffer", "--reduction-factor", "8",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["estimate"]["trainable"] == L * (2 * D * 8 + D + 8)  # m = 64 / 8


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    import json

    out = tmp_path / "m.json"
    assert main(["memory", "--model", "llama-65b", "--method", "qlora", "--batch", "1", "--seq", "512",
                 "--grad-checkpointing", "--dtype", "bf16", "--json", str(out)]) == 0
    assert "total (peak)" in capsys.readouterr().out
    total = json.loads(out.read_text())["estimate"]["total"]
    assert 24 * GB < total < 48 * GB  # the QLoRA paper's < 48 GB, and not the notes' 24 GB card


def test_peftlab_linear4bit_is_predicted_like_bitsandbytes_and_old_gpu_rows_keep_their_term(tmp_path):
    import json

    from peftlab.experiments.memory_report import LINEAR4BIT_KEY, SAVED_WEIGHT_LABEL, gpu_rows

    def est(backend, gc=False):
        return estimate(MemoryConfig(model="tiny-llama", method="qlora", r=4, dtype="bf16", quant_backend=backend,
                                     grad_checkpointing=gc))

    for gc in (False, True):  # Linear4bit now dequantizes again in backward, as bitsandbytes does
        assert est("peftlab", gc).total == est("bnb", gc).total
    # The old Linear4bit kept every body linear's dequantized bf16 weight (one layer's under checkpointing).
    assert est("peftlab-legacy").detail["dequant"] - est("bnb").detail["dequant"] == 2 * BODY_LINEAR
    assert est("peftlab-legacy", True).detail["dequant"] - est("bnb", True).detail["dequant"] == 2 * BODY_LINEAR / L
    with pytest.raises(ValueError, match="'peftlab' or 'bnb' to measure"):
        prepare_model(build_from_config("tiny-llama"), MemoryConfig(model="tiny-llama", method="qlora",
                                                                    quant_backend="peftlab-legacy"))
    # Runs written before the change (no LINEAR4BIT_KEY) are labelled and predicted with the old term.
    row = dict(model="tiny-llama", method="qlora-peftlab", grad_checkpointing=False, measured=10**6)
    run = dict(device="test", batch=8, seq=512, rows=[row])
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"runs": [run, dict(run, **{LINEAR4BIT_KEY: "MatMul4bit"})]}))
    old, new = gpu_rows(path)
    assert (old["method"], new["method"]) == (SAVED_WEIGHT_LABEL, "qlora-peftlab")
    assert (old["predicted_gb"] - new["predicted_gb"]) * GB == pytest.approx(2 * BODY_LINEAR)


def test_train_steps_run_peftlabs_training_loop_and_reset_after_the_first_step():
    from peftlab.experiments.memory import train_steps

    cfg = MemoryConfig(model="tiny-llama", method="lora", r=4, dtype="bf16", batch=2, seq=8)
    model = prepare_model(build_from_config("tiny-llama", dtype=torch.bfloat16), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    resets = []
    train_steps(model, cfg, steps=3, reset=lambda: resets.append(1))
    assert resets == [1]  # once, after the first step: the optimizer states exist from then on
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".lora_A" in n)
