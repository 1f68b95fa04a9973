"""peftlab.doctor: each silent failure is built for real and must be reported; a healthy run reports nothing."""

import warnings

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from peftlab import LoraConfig, apply_lora, save_adapter
from peftlab.doctor import doctor
from peftlab.models import build_from_config


def _batch(vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _lora_llama():
    return apply_lora(build_from_config("tiny-llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


def _train(model, optimizer, steps=3):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**_batch()).loss.backward()
        optimizer.step()


def _kinds(findings):
    return sorted({f.kind for f in findings})


def test_a_healthy_run_has_no_findings(tmp_path, capsys):
    model = _lora_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train(model, opt)
    save_adapter(model, tmp_path / "adapter")
    assert doctor(model, opt, _batch(), adapter_dir=tmp_path / "adapter") == []
    assert "no problems found" in capsys.readouterr().out


def test_optimizer_built_before_the_adapter_misses_it_and_b_stays_zero():
    base = build_from_config("tiny-llama")
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2)  # built first: holds only the (now frozen) base weights
    model = apply_lora(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _train(model, opt)
    found = doctor(model, opt, verbose=False)
    assert _kinds(found) == ["not in the optimizer"]
    assert "8 trainable parameters" in found[0].message  # A and B of q and v in 2 layers
    # the optimizer kept no state for the adapter, so the B check needs to be told the model was trained
    assert _kinds(doctor(model, opt, trained=True, verbose=False)) == ["B still zero", "not in the optimizer"]


def test_b_still_zero_after_steps_that_only_moved_a():
    model = _lora_llama()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n], lr=1e-2)
    _train(model, opt)
    found = doctor(model, opt, verbose=False)
    assert _kinds(found) == ["B still zero", "not in the optimizer"]
    assert "after 3 optimizer steps" in next(f.message for f in found if f.kind == "B still zero")


class _Checkpointed(nn.Module):
    """A frozen embedding, then a block run under reentrant checkpointing (transformers' old default)."""

    def __init__(self, input_grads: bool):
        super().__init__()
        self.emb, self.block, self.input_grads = nn.Embedding(16, 8), nn.Sequential(nn.Linear(8, 8)), input_grads

    def forward(self, input_ids):
        h = self.emb(input_ids)
        if self.input_grads:  # what enable_input_require_grads() does, through a hook on the embedding
            h.requires_grad_(True)
        return checkpoint(self.block, h, use_reentrant=True)


def test_reentrant_checkpointing_without_input_grads_leaves_the_adapter_without_gradient():
    batch = {"input_ids": torch.tensor([[1, 2, 3]])}
    for input_grads, expected in [(False, ["no gradient"]), (True, [])]:
        model = apply_lora(_Checkpointed(input_grads), LoraConfig(r=2, target_modules=["block.0"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that no input requires grad: the fault itself
            assert _kinds(doctor(model, batch=batch, verbose=False)) == expected


def test_the_trial_backward_changes_nothing():
    model = _lora_llama().eval()
    grads = {n: torch.full_like(p, 3.0) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
    doctor(model, batch=_batch(), verbose=False)
    assert not model.training
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads)


def test_training_in_eval_mode_is_reported():
    model = _lora_llama()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.eval()
    assert _kinds(doctor(model, opt, verbose=False)) == ["eval mode"]


def test_a_target_that_matches_several_kinds_of_layer_is_reported():
    model = apply_lora(build_from_config("tiny-bert", task="classification"), LoraConfig(r=2, target_modules=["dense"]))
    found = doctor(model, verbose=False)
    assert _kinds(found) == ["target kinds"]
    # BERT's "dense": attention output, intermediate, output (and the pooler): more than one kind, each named
    assert "attention.output.dense" in found[0].message and "intermediate.dense" in found[0].message
    ok = apply_lora(build_from_config("tiny-bert", task="classification"), LoraConfig(r=2, target_modules=["query"]))
    assert doctor(ok, verbose=False) == []


def test_adapter_files_saved_untrained_or_empty_are_reported(tmp_path):
    model = _lora_llama()
    save_adapter(model, tmp_path / "untrained")  # B = 0: the file is the base model
    assert "every lora_B" in doctor(model, adapter_dir=tmp_path / "untrained", verbose=False)[0].message
    (tmp_path / "empty").mkdir()
    save_file({}, str(tmp_path / "empty" / "adapter_model.safetensors"))
    found = doctor(model, adapter_dir=tmp_path / "empty", verbose=False)
    assert _kinds(found) == ["empty adapter file"] and "holds no tensors" in found[0].message
