"""QLoRA instruction tuning of SmolLM2 on the CPU: assistant-only labels, adapters learn, the 4-bit base stays."""

import pytest
import torch

from peftlab.experiments.qlora import INSTRUCTIONS, collate, keep_layers, qlora_finetune, tokenize_chat
from peftlab.lora import lora_layers
from peftlab.quant import Linear4bit, QuantConfig, quantize_model


@pytest.mark.slow
def test_tokenize_chat_labels_exactly_the_answer(smollm2):
    _, tok = smollm2
    pairs = INSTRUCTIONS[:3]
    examples = tokenize_chat(tok, pairs, max_length=128)
    for (question, answer), ex in zip(pairs, examples, strict=True):
        # Reference 1: the text. The labelled tokens decode to the answer and the end-of-turn marker.
        assert tok.decode(ex["input_ids"][ex["labels"] != -100]) == answer + "<|im_end|>"
        # Reference 2: the chat template tokenized in one piece gives the same ids (no split at the boundary).
        full = tok.apply_chat_template([{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], tokenize=False)
        assert tok(full, add_special_tokens=False)["input_ids"][: len(ex["input_ids"])] == ex["input_ids"].tolist()
        assert (ex["labels"][: -len(tok(answer + "<|im_end|>")["input_ids"])] == -100).all()
    batch = collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == -100)).all()  # padding is never a target


@pytest.mark.slow
def test_qlora_finetune_smollm2_learns_in_lora_only(smollm2):
    model, tok = smollm2
    keep_layers(model, 3)  # the first 3 of 30 layers: the same mechanics in seconds on a CPU
    n_linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in n)
    n_other = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n or "norm" in n)
    quantize_model(model, QuantConfig(compute_dtype=torch.float32, double_quant=True), skip=("lm_head",))
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    res = qlora_finetune(model, tok, INSTRUCTIONS[:4], steps=6, r=8, lr=3e-3, batch_size=4, max_length=48,
                         progress=False)
    # Loss on the answers, measured over the whole set in eval mode, goes down clearly.
    assert res.eval_loss_after < res.eval_loss_before - 0.5, (res.eval_loss_before, res.eval_loss_after)
    # LoRA weights changed: B started at zero in every wrapped layer.
    layers = lora_layers(model)
    assert len(layers) == 3 * 7 and all(isinstance(layer.base, Linear4bit) for _, layer in layers)
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in layers)
    # The 4-bit base never changed, and only the adapters trained: r (in + out) per wrapped layer.
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    assert res.trainable == sum(8 * (layer.in_features + layer.out_features) for _, layer in layers)
    # Bytes of the base: fp32 embeddings and norms + 4.127 bits per linear weight (NF4 + double quant), +-1 %.
    expected = 4 * n_other + n_linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8
    assert abs(res.base_bytes - expected) / expected < 0.01, (res.base_bytes, expected)
