"""peftlab's prompt tuning and P-tuning against HF peft's PromptTuningConfig / PromptEncoderConfig."""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from upstream import hf_peft_generate_ignores_cache

from peftlab.inject import count_parameters
from peftlab.models import ARCH_CONFIGS, build_from_config, cache_dir
from peftlab.prefix import PrefixConfig, PrefixTuningModel, save_prefix
from peftlab.prompt import PromptTuningConfig, PromptTuningModel, load_prompt, save_prompt
from peftlab.ptuning import PromptEncoder, PTuningConfig, apply_ptuning

TASKS = {"tiny-llama": ("causal_lm", "CAUSAL_LM"), "tiny-bert": ("classification", "SEQ_CLS")}
TEXT = "Classify the sentiment:"


def _tiny(name: str = "tiny-llama", **config) -> nn.Module:
    model = build_from_config(dict(ARCH_CONFIGS[name], **config), task=TASKS[name][0])
    if TASKS[name][0] == "causal_lm":
        model.generation_config.pad_token_id = 0
    return model


def _batch(seed: int = 0):
    """Two rows of 7 tokens; the first row is left-padded by 2."""
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


def _pair(base: nn.Module, task_type: str, P: int = 4, seed: int = 1):
    """Our PromptTuningModel and HF peft's on copies of ``base``, holding the same virtual tokens."""
    ours = PromptTuningModel(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=P))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=task_type,
                                                                              num_virtual_tokens=P))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = ours.prompt_encoder.embedding
        w.copy_(torch.randn(w.shape, generator=g) * 0.1)
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prompt_encoder.embedding)
    return ours.eval(), theirs.eval()


# --- config, init ---------------------------------------------------------------------------------
def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got 0"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        PromptTuningConfig(prompt_tuning_init="VOCAB")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="encoder_dropout"):
        PTuningConfig(encoder_dropout=1.0)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer, got -1"):
        PTuningConfig(num_virtual_tokens=-1)


def test_random_init_is_lesters_uniform_range():
    w = PromptTuningModel(_tiny(), PromptTuningConfig(num_virtual_tokens=50)).prompt_encoder.embedding
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.25  # U(-0.5, 0.5) has std 0.289


def test_sample_vocab_init_takes_rows_of_the_embedding_table():
    base = _tiny()
    w = PromptTuningModel(base, PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="SAMPLE_VOCAB"))
    table = base.get_input_embeddings().weight
    for row in w.prompt_encoder.embedding:
        assert (table - row).abs().amax(dim=1).min() == 0


def test_only_the_prompt_trains_and_counts_match_hf_peft():
    ours, theirs = _pair(_tiny(), "CAUSAL_LM", P=5)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding"]
    assert count_parameters(ours)[0] == 5 * 64 == theirs.get_nb_trainable_parameters()[0]
    cls, cls_theirs = _pair(_tiny("tiny-bert"), "SEQ_CLS", P=5)
    names = {n for n, p in cls.named_parameters() if p.requires_grad}
    assert names == {"prompt_encoder.embedding", "base.classifier.weight", "base.classifier.bias"}
    assert count_parameters(cls)[0] == 5 * 64 + 64 * 2 + 2 == cls_theirs.get_nb_trainable_parameters()[0]


# --- parity with HF peft -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_logits_match_hf_peft_on_tiny_models(name):
    ours, theirs = _pair(_tiny(name), TASKS[name][1])
    ids, mask = _batch()
    kwargs = dict(token_type_ids=torch.zeros_like(ids)) if name == "tiny-bert" else {}
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, **kwargs).logits
        b = theirs(input_ids=ids, attention_mask=mask, **kwargs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_causal_lm_loss_ignores_the_virtual_positions():
    ours, theirs = _pair(_tiny(), "CAUSAL_LM")
    ids = torch.randint(3, 256, (2, 6))
    with torch.no_grad():
        out = ours(ids, labels=ids)
        # Positions P-1 .. P+T-2 predict the T real tokens: the last virtual token predicts the first
        # real one (HF peft's labels too), and nothing predicts a virtual token.
        logits = out.logits[:, 3:-1]  # (B, T, V)
        manual = F.cross_entropy(logits.reshape(-1, 256), ids.reshape(-1))
        torch.testing.assert_close(out.loss, manual)
        torch.testing.assert_close(out.loss, theirs(input_ids=ids, labels=ids).loss)


def test_generate_equals_greedy_decoding_with_full_forward_passes(greedy):
    ours, _ = _pair(_tiny(), "CAUSAL_LM")
    ids, _ = _batch()
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False), greedy(ours, ids, 6))


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3, num_return_sequences=2)])
@hf_peft_generate_ignores_cache
def test_generate_matches_hf_peft(kwargs):
    ours, theirs = _pair(_tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    mask[:] = 1  # HF peft numbers left-padded rows differently for prompt tuning (see generate())
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    assert a.shape == (2 * kwargs.get("num_return_sequences", 1), 7 + 6)
    assert torch.equal(a, b)


def test_left_padded_row_generates_what_it_generates_alone():
    ours, _ = _pair(_tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = ours.generate(ids[:1, 2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 2:], alone[0])


def test_virtual_tokens_come_before_cls_and_the_pooler_reads_the_first_one():
    model = PromptTuningModel(_tiny("tiny-bert"), PromptTuningConfig(num_virtual_tokens=3)).eval()
    cls_id = 2
    ids = torch.tensor([[cls_id, 40, 41, 42]])
    inputs = model.build_inputs(ids, attention_mask=torch.ones_like(ids))
    bert = model.base.bert
    torch.testing.assert_close(inputs["inputs_embeds"][0, 3], bert.embeddings.word_embeddings.weight[cls_id])
    torch.testing.assert_close(inputs["inputs_embeds"][0, 0], model.prompt_encoder.embedding[0])
    with torch.no_grad():
        out = bert(**inputs)
        h = out.last_hidden_state  # (1, P + T, d); [CLS] is at index P = 3
        pooled_first = bert.pooler.activation(bert.pooler.dense(h[:, 0]))
        pooled_cls = bert.pooler.activation(bert.pooler.dense(h[:, 3]))
        logits = model(ids).logits
    torch.testing.assert_close(out.pooler_output, pooled_first)
    torch.testing.assert_close(logits, model.base.classifier(pooled_first))
    assert (logits - model.base.classifier(pooled_cls)).abs().max() > 1e-4  # not [CLS]'s state


# --- P-tuning ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_ptuning_encoder_matches_hf_peft(kind):
    base = _tiny()
    cfg = dict(num_virtual_tokens=4, encoder_reparameterization_type=kind, encoder_hidden_size=16)
    ours = apply_ptuning(copy.deepcopy(base), PTuningConfig(**cfg)).eval()
    hf_config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", **cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), hf_config).eval()
    # Same parameter names and shapes as HF peft's PromptEncoder:
    theirs.prompt_encoder["default"].load_state_dict(ours.prompt_encoder.state_dict())
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    ids, mask = _batch()
    with torch.no_grad():
        assert ours.prompt_encoder().shape == (4, 64)
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits,
                                   theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_ptuning_mlp_parameter_count_closed_form():
    d, h, P = 64, 16, 4
    model = apply_ptuning(_tiny(), PTuningConfig(num_virtual_tokens=P, encoder_hidden_size=h))
    assert count_parameters(model)[0] == P * d + (d * h + h) + (h * h + h) + (h * d + d)
    assert all(n.startswith("prompt_encoder.") for n, p in model.named_parameters() if p.requires_grad)


def test_ptuning_lstm_lets_each_virtual_token_see_the_others():
    enc = PromptEncoder(PTuningConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM"), 8)
    mlp = PromptEncoder(PTuningConfig(num_virtual_tokens=4), 8)
    for e in (enc, mlp):
        before = e().detach().clone()
        with torch.no_grad():
            e.embedding.weight[3] += 1.0  # change only the last input row
        changed = (e() - before).abs().amax(dim=1) > 0
        assert changed[3]
        assert changed[0] == (e is enc)  # the LSTM mixes rows; the MLP maps each row alone


# --- training, files, errors ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning-mlp", "ptuning-lstm"])
def test_short_training_run_lowers_the_loss_and_touches_only_the_prompt(method, lm_losses):
    base = _tiny(initializer_range=0.1)  # weights of std 0.02 leave a random model too flat to steer
    if method == "prompt":
        model = PromptTuningModel(base, PromptTuningConfig(num_virtual_tokens=4))
    else:
        kind = method.split("-")[1].upper()
        model = apply_ptuning(base, PTuningConfig(num_virtual_tokens=4, encoder_reparameterization_type=kind))
    frozen = {k: v.clone() for k, v in model.base.state_dict().items()}
    ids = torch.arange(10, 22).repeat(4, 1)  # one fixed sequence to steer towards
    losses = lm_losses(model, ids, steps=40, lr=0.05)
    assert losses[-1] < losses[0] - 2.0, losses
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_save_load_round_trip_and_hf_peft_reads_our_file(name, tmp_path):
    base = _tiny(name)
    ours, _ = _pair(base, TASKS[name][1])
    if name == "tiny-bert":
        nn.init.normal_(ours.base.classifier.weight)  # a trained head differs from the fresh one
    assert save_prompt(ours, tmp_path) < 10_000
    loaded = load_prompt(copy.deepcopy(base), tmp_path).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
        hf = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(hf, expected, atol=1e-5, rtol=0)


def test_ptuning_round_trip_and_hf_peft_files(tmp_path):
    base = _tiny()
    model = apply_ptuning(copy.deepcopy(base), PTuningConfig(num_virtual_tokens=3)).eval()
    save_prompt(model, tmp_path / "ours")
    loaded = load_prompt(copy.deepcopy(base), tmp_path / "ours").eval()  # a plain soft prompt: f(E)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptEncoderConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=3)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    from_hf = load_prompt(copy.deepcopy(base), tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_hf(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_loading_a_file_made_for_another_model_fails(tmp_path):
    save_prompt(PromptTuningModel(_tiny(), PromptTuningConfig(num_virtual_tokens=3)), tmp_path / "llama")
    with pytest.raises(ValueError, match="made for another model: task_type='CAUSAL_LM'"):
        load_prompt(_tiny("tiny-bert"), tmp_path / "llama")
    wider = _tiny(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="made for another model: token_dim=64, this model has 32"):
        load_prompt(wider, tmp_path / "llama")
    save_prefix(PrefixTuningModel(_tiny(), PrefixConfig(num_virtual_tokens=3)), tmp_path / "prefix")
    with pytest.raises(ValueError, match="holds a PREFIX_TUNING adapter"):
        load_prompt(_tiny(), tmp_path / "prefix")


def test_clear_errors_for_misuse():
    model = PromptTuningModel(_tiny(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already has a soft prompt"):
        PromptTuningModel(model, PromptTuningConfig())
    with pytest.raises(ValueError, match="position_ids and a cache \\(past_key_values\\) are not supported"):
        model(torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="needs the tokenizer"):
        PromptTuningModel(_tiny(), PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                      prompt_tuning_init_text=TEXT))
    with pytest.raises(ValueError, match="generate\\(\\) needs a causal LM"):
        PromptTuningModel(_tiny("tiny-bert"), PromptTuningConfig()).generate(torch.tensor([[1, 2]]))


# --- the real offline models (transformers 5.23.0, peft 0.21.2) ----------------------------------
@pytest.mark.slow
def test_text_init_on_minilm_is_the_texts_embeddings_and_too_long_fails(minilm):
    model, tok = minilm
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == 4  # classify, the, sentiment, ":"  ([CLS]/[SEP] are not part of the prompt)
    cfg = PromptTuningConfig(num_virtual_tokens=6, prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT)
    w = PromptTuningModel(copy.deepcopy(model), cfg, tok).prompt_encoder.embedding
    table = model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(w, table[ids + ids[:2]])  # repeated to fill P = 6
    with pytest.raises(ValueError, match="is 4 tokens > num_virtual_tokens=3"):
        PromptTuningModel(model, PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                                    prompt_tuning_init_text=TEXT), tok)


@pytest.mark.slow
def test_text_init_on_smollm2_equals_hf_peft(smollm2):
    model, tok = smollm2  # SmolLM2's tokenizer adds no special tokens, so HF peft's init is the same
    cfg = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text=TEXT)
    ours = PromptTuningModel(model, cfg, tok).prompt_encoder.embedding
    hf = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                 prompt_tuning_init_text=TEXT,
                                 tokenizer_name_or_path=str(cache_dir() / "SmolLM2-135M-Instruct"))
    theirs = peft.get_peft_model(copy.deepcopy(model), hf).prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.slow
@hf_peft_generate_ignores_cache
def test_smollm2_logits_and_generation_match_hf_peft(smollm2, greedy):
    model, tok = smollm2
    ours, theirs = _pair(model, "CAUSAL_LM", P=8)
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-5, rtol=0)
    g_ours = ours.generate(**batch, max_new_tokens=5, do_sample=False)
    assert g_ours.shape == (2, batch["input_ids"].shape[1] + 5)
    # Unpadded, HF peft generates the same tokens; left-padded, our row equals the row alone.
    first = tok(["The capital of France is"], return_tensors="pt")
    assert torch.equal(g_ours[:1], greedy(ours, first["input_ids"], 5))  # by definition
    assert torch.equal(g_ours[:1], theirs.generate(**first, max_new_tokens=5, do_sample=False))
    alone = ours.generate(**tok(["Hi"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert torch.equal(g_ours[1, -alone.shape[1]:], alone[0])


@pytest.mark.slow
def test_minilm_classifier_logits_match_hf_peft_and_pool_the_first_virtual_token(minilm):
    model, tok = minilm
    ours, theirs = _pair(model, "SEQ_CLS", P=10)
    texts = ["I love this airline!", "worst delay ever, never again", "ok"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**batch).logits
        torch.testing.assert_close(a, theirs(**batch).logits, atol=1e-5, rtol=0)
        inputs = ours.build_inputs(batch["input_ids"], batch["attention_mask"],
                                   token_type_ids=batch["token_type_ids"])
        h = ours.base.bert(**inputs).last_hidden_state  # (B, P + T, 384)
    assert torch.equal(inputs["inputs_embeds"][:, 10], ours.base.bert.embeddings.word_embeddings.weight[
        [tok.cls_token_id] * 3])  # [CLS] sits right after the 10 virtual tokens
    pool = ours.base.bert.pooler
    torch.testing.assert_close(a, ours.base.classifier(pool.activation(pool.dense(h[:, 0]))))
