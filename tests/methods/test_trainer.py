"""peftlab.hf: transformers.Trainer (and TRL's SFTTrainer) checkpoints hold only the adapter, in HF peft's format,
and resume_from_checkpoint restores it: every method with a save format, on tiny models."""

import contextlib
import io
import os

import pytest
import torch
from transformers import TrainingArguments

from peftlab import files
from peftlab.adapters import AdapterConfig, apply_adapters
from peftlab.bitfit import apply_bitfit
from peftlab.hf import ENCODER_WEIGHTS, AdapterTrainer, adapter_trainer, live_tensors
from peftlab.ia3 import DEFAULT_TARGETS, IA3Config, apply_ia3
from peftlab.lora import LoraConfig, apply_lora
from peftlab.models import build_from_config
from peftlab.prefix import PrefixConfig, apply_prefix
from peftlab.prompt import PromptTuningConfig, apply_prompt
from peftlab.ptuning import PTuningConfig, apply_ptuning

# name -> (tiny model, apply, peft_type, HF peft can load it)
CASES = {
    "lora": ("tiny-llama", lambda m: apply_lora(m, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), "LORA", True),
    "lora-seq-cls": ("tiny-bert", lambda m: apply_lora(m, LoraConfig(r=2, target_modules=["query", "value"],
                                                                      modules_to_save=["classifier"])), "LORA", True),
    "adapters": ("tiny-bert", lambda m: apply_adapters(m, AdapterConfig(placement="pfeiffer")), "BOTTLENECK_ADAPTER",
                 False),
    "prefix": ("tiny-llama", lambda m: apply_prefix(m, PrefixConfig(num_virtual_tokens=3)), "PREFIX_TUNING", True),
    "prefix-projection": ("tiny-llama", lambda m: apply_prefix(m, PrefixConfig(num_virtual_tokens=3,
                                                                               prefix_projection=True)),
                          "PREFIX_TUNING", True),
    "prompt": ("tiny-bert", lambda m: apply_prompt(m, PromptTuningConfig(num_virtual_tokens=3)), "PROMPT_TUNING", True),
    "ptuning": ("tiny-llama", lambda m: apply_ptuning(m, PTuningConfig(num_virtual_tokens=3)), "P_TUNING", True),
    "ia3": ("tiny-bert", lambda m: apply_ia3(m, IA3Config(*DEFAULT_TARGETS["bert"], modules_to_save=["classifier"])),
            "IA3", True),
    "bitfit": ("tiny-bert", lambda m: apply_bitfit(m, ["classifier"]), "BITFIT", False),
}
FULL_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def _base(name):
    torch.manual_seed(0)  # the same frozen base every time
    return build_from_config(name, task="classification" if name == "tiny-bert" else "causal_lm")


def _model(name, init_seed=1):
    arch, apply, _, _ = CASES[name]
    base = _base(arch)
    torch.manual_seed(init_seed)  # the adapter's own init
    return apply(base)


def _data(arch, n=16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 256, (8,), generator=g)
        if arch == "tiny-bert":
            rows.append(dict(input_ids=ids, labels=torch.tensor(i % 2)))
        else:
            rows.append(dict(input_ids=ids, labels=ids.clone()))
    return rows


def _args(out, **kw):
    kw = dict(max_steps=6, save_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
              report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0) | kw
    return TrainingArguments(str(out), **kw)


def _train(trainer, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train(**kw)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _logits(model, arch):
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits[:, -ids.shape[1]:] if logits.dim() == 3 else logits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_checkpoints_hold_the_adapter_and_resume_restores_it(name, tmp_path):
    arch, _, peft_type, hf_loads = CASES[name]
    model = _model(name)
    trainer = AdapterTrainer(model, _args(tmp_path / "full"), train_dataset=_data(arch))
    losses = _train(trainer)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in (3, 6):
        ckpt = tmp_path / "full" / f"checkpoint-{step}"
        held = set(os.listdir(ckpt))
        assert not held & FULL_MODEL_FILES, held
        assert {files.ADAPTER_CONFIG, files.ADAPTER_WEIGHTS, "optimizer.pt", "trainer_state.json"} <= held, held
        assert files.read_config(ckpt)["peft_type"] == peft_type
        assert (ENCODER_WEIGHTS in held) == (name in ("prefix-projection", "ptuning"))
    # The last checkpoint is the trained adapter: loaded into a fresh base it gives the trained model's logits,
    # in HF peft (the reference) where it can load the method, else in peftlab.
    ckpt = tmp_path / "full" / "checkpoint-6"
    if hf_loads:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(_base(arch), str(ckpt))
    else:
        import peftlab

        loaded = peftlab.load_adapter(_base(arch), str(ckpt))
    torch.testing.assert_close(_logits(loaded, arch), _logits(model, arch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(_base(arch), arch), _logits(model, arch), atol=1e-4)  # training moved it

    # Resume from step 3 on a model whose adapter has another init: it must continue as the full run did.
    resumed_model = _model(name, init_seed=7)
    resumed = AdapterTrainer(resumed_model, _args(tmp_path / "resumed"), train_dataset=_data(arch))
    after = _train(resumed, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert sorted(after) == [1, 2, 3, 4, 5, 6]  # 1-3 from the checkpoint's trainer_state.json, 4-6 trained now
    assert sorted(os.listdir(tmp_path / "resumed")) == ["checkpoint-6"]
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(losses[step], rel=1e-4, abs=1e-5), (step, after, losses)
    torch.testing.assert_close(_logits(resumed_model, arch), _logits(model, arch), atol=1e-5, rtol=1e-4)


def test_save_model_writes_the_adapter(tmp_path):
    model = _model("lora")
    trainer = AdapterTrainer(model, _args(tmp_path / "run", max_steps=1), train_dataset=_data("tiny-llama", 4))
    trainer.save_model(str(tmp_path / "final"))
    held = set(os.listdir(tmp_path / "final"))
    assert files.ADAPTER_WEIGHTS in held and not held & FULL_MODEL_FILES


def test_resume_from_another_methods_checkpoint_names_the_file(tmp_path):
    model = _model("ia3")
    AdapterTrainer(model, _args(tmp_path / "a", max_steps=1)).save_model(str(tmp_path / "ia3"))
    other = AdapterTrainer(_model("bitfit"), _args(tmp_path / "b"), train_dataset=_data("tiny-bert"))
    with pytest.raises(files.AdapterFileError, match=r"ia3/adapter_config.json holds a IA3 adapter; expected BITFIT"):
        other._load_from_checkpoint(str(tmp_path / "ia3"))


def test_a_model_without_a_method_is_refused(tmp_path):
    trainer = AdapterTrainer(_base("tiny-llama"), _args(tmp_path / "a", max_steps=1))
    with pytest.raises(ValueError, match="no PEFT method is applied"):
        trainer.save_model(str(tmp_path / "x"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "ia3-lm", "prefix", "ptuning"])
def test_trl_sft_trainer_checkpoints_hold_the_adapter(name, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    applies = {"lora": CASES["lora"][1], "ia3-lm": lambda m: apply_ia3(m), "prefix": CASES["prefix"][1],
               "ptuning": CASES["ptuning"][1]}
    base = _base("tiny-llama")
    torch.manual_seed(1)
    model = applies[name](base)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [dict(input_ids=r["input_ids"].tolist()) for r in _data("tiny-llama")]
    args = trl.SFTConfig(str(tmp_path / "sft"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                         dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                         gradient_checkpointing=name != "prefix")  # a prefix refuses checkpointing, and says why
    from tokenizers import Tokenizer, models
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)},
                                                                               unk_token="t0")),
                                  pad_token="t0", eos_token="t1", unk_token="t0")
    trainer = adapter_trainer(trl.SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                              processing_class=tok,
                                              data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    losses = _train(trainer)
    assert len(losses) == 4
    # the adapter itself trained (a prefix or prompt that the loss bypassed would keep its initial values)
    assert all(not torch.equal(p.detach(), initial[n]) for n, p in model.named_parameters() if n in initial)
    ckpt = tmp_path / "sft" / "checkpoint-4"
    held = set(os.listdir(ckpt))
    assert files.ADAPTER_WEIGHTS in held and not held & FULL_MODEL_FILES, held
    # The checkpoint is the trained adapter, exactly (SFTTrainer leaves hooks on the live model, so its logits are
    # compared through a copy of its state), and HF peft reads it as peftlab does.
    from peft import PeftModel

    import peftlab

    trained = {k: v.detach() for k, v in live_tensors(model).items()}
    saved = files.read_tensors(ckpt)
    if name == "ptuning":  # the file holds the encoder's output; the encoder itself is beside it
        assert ENCODER_WEIGHTS in held
    else:
        assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    copy = applies[name](_base("tiny-llama"))
    copy.load_state_dict(model.state_dict())
    hf = PeftModel.from_pretrained(_base("tiny-llama"), str(ckpt))
    ours = peftlab.load_adapter(_base("tiny-llama"), str(ckpt))
    torch.testing.assert_close(_logits(hf, "tiny-llama"), _logits(copy, "tiny-llama"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(ours, "tiny-llama"), _logits(copy, "tiny-llama"), atol=1e-6, rtol=0)
    assert not torch.allclose(_logits(_base("tiny-llama"), "tiny-llama"), _logits(copy, "tiny-llama"), atol=1e-4)
