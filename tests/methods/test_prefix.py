"""peftlab's prefix tuning against HF peft's PrefixTuningConfig (the independent reference)."""

import copy

import peft
import pytest
import torch
from torch import nn
from upstream import hf_peft_generate_ignores_cache, hf_peft_refuses_prefix_on_bert

from peftlab.inject import count_parameters
from peftlab.models import ARCH_CONFIGS, build_from_config, cache_argument, get_config
from peftlab.prefix import PrefixConfig, PrefixTuningModel, kv_dims, load_prefix, save_prefix
from peftlab.prompt import PromptTuningConfig, PromptTuningModel, save_prompt

TASKS = {"tiny-llama": ("causal_lm", "CAUSAL_LM"), "tiny-gpt2": ("causal_lm", "CAUSAL_LM"),
         "tiny-bert": ("classification", "SEQ_CLS")}


def _tiny(name: str = "tiny-llama", **config) -> nn.Module:
    model = build_from_config(dict(ARCH_CONFIGS[name], **config), task=TASKS[name][0])
    if TASKS[name][0] == "causal_lm":
        model.generation_config.pad_token_id = 0
    return model


def _batch(vocab: int = 256, seed: int = 0):
    """Two rows of 7 tokens; the first row is left-padded by 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return ids, mask


def _pair(base: nn.Module, task_type: str, P: int = 4, seed: int = 1):
    """Our PrefixTuningModel and HF peft's on copies of ``base``, holding the same random prefix."""
    ours = PrefixTuningModel(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=P))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task_type,
                                                                              num_virtual_tokens=P))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = ours.prefix_encoder.embedding.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)
        theirs.prompt_encoder["default"].embedding.weight.copy_(w)
    return ours.eval(), theirs.eval()


# --- config and shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_prefix_length_must_be_positive(bad):
    with pytest.raises(ValueError, match="prefix length P.*must be a positive integer"):
        PrefixConfig(num_virtual_tokens=bad)


def test_other_bad_config_values():
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        PrefixConfig(prefix_projection=True, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="task_type must be"):
        PrefixConfig(task_type="TOKEN_CLS")


def test_kv_width_is_not_hidden_size_for_grouped_query_attention():
    # SmolLM2's public config: 30 layers, 9 query heads, 3 key/value heads, hidden 576 -> head_dim 64.
    layers, kv_heads, head_dim = kv_dims(get_config("smollm2-135m"))
    assert (layers, kv_heads, head_dim) == (30, 3, 64)
    with torch.device("meta"):
        enc = PrefixTuningModel(build_from_config("smollm2-135m", device="meta"),
                                PrefixConfig(num_virtual_tokens=10, prefix_projection=True)).prefix_encoder
    assert enc.transform[-1].out_features == 2 * 30 * 3 * 64 == 11520  # not 2 * 30 * 576
    assert enc.embedding.weight.shape == (10, 192)


def test_only_the_prefix_trains_on_a_causal_lm():
    model = PrefixTuningModel(_tiny(), PrefixConfig(num_virtual_tokens=5))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["prefix_encoder.embedding.weight"]
    assert count_parameters(model)[0] == 2 * 2 * 5 * 2 * 16  # 2 * layers * P * kv_heads * head_dim


def test_projection_parameter_count_closed_form():
    model = PrefixTuningModel(_tiny(), PrefixConfig(num_virtual_tokens=5, prefix_projection=True,
                                                    encoder_hidden_size=24))
    t, h, out = 2 * 16, 24, 2 * 2 * 2 * 16  # token_dim = kv * hd, hidden, 2 * L * kv * hd
    assert count_parameters(model)[0] == 5 * t + (t * h + h) + (h * out + out)
    assert model.prefix_encoder().shape == (5, out)


def test_classifier_trains_prefix_and_head_as_hf_peft_does():
    base = _tiny("tiny-bert")
    ours, theirs = _pair(base, "SEQ_CLS")
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {"prefix_encoder.embedding.weight", "base.classifier.weight", "base.classifier.bias"}
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


# --- parity with HF peft -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2",
                                  pytest.param("tiny-bert", marks=hf_peft_refuses_prefix_on_bert)])
def test_logits_match_hf_peft_on_tiny_models(name):
    ours, theirs = _pair(_tiny(name), TASKS[name][1])
    ids, mask = _batch()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
        plain = ours.base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-3  # the prefix really changes the output


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_the_prefix_reaches_every_model(name):
    """Whatever transformers calls the cache argument, the prefix changes the logits (never silently dropped)."""
    ours, _ = _pair(_tiny(name), TASKS[name][1])
    ids, mask = _batch()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        plain = ours.base(input_ids=ids, attention_mask=mask).logits
        zero = copy.deepcopy(ours)
        zero.prefix_encoder.embedding.weight.zero_()  # keys 0: uniform attention over the prefix; values 0
        b = zero(input_ids=ids, attention_mask=mask).logits
    assert (a - plain).abs().max() > 1e-5  # float noise here is ~1e-7; a tiny BERT's logits are ~0.03
    assert (a - b).abs().max() > 1e-5


def test_explicit_position_ids_are_shifted_by_the_prefix_length():
    ours, _ = _pair(_tiny(), "CAUSAL_LM", P=3)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        implicit = ours(ids).logits  # the model numbers from the cache length: P, P+1, ...
        explicit = ours(ids, position_ids=torch.arange(6)[None]).logits
        cache = ours.past_key_values(1)
        unshifted = ours.base(ids, **{cache_argument(ours.base): cache}, position_ids=torch.arange(6)[None]).logits
    torch.testing.assert_close(implicit, explicit)
    assert (implicit - unshifted).abs().max() > 1e-4  # so the shift is real, and applied


def test_padded_positions_stay_masked():
    ours, _ = _pair(_tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    other = ids.clone()
    other[0, :2] = 99  # change only the padded tokens
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits[0, 2:]
        b = ours(other, attention_mask=mask).logits[0, 2:]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3, num_return_sequences=2)])
@hf_peft_generate_ignores_cache
def test_generate_matches_hf_peft(kwargs, greedy):
    ours, theirs = _pair(_tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    if not kwargs:  # greedy: the definition (full forward passes, no cache) first, then HF peft
        assert torch.equal(a[1:], greedy(ours, ids[1:], 6))
    b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    assert a.shape == (2 * kwargs.get("num_return_sequences", 1), 7 + 6)
    assert torch.equal(a, b)


def test_left_padded_row_generates_what_it_generates_alone():
    ours, _ = _pair(_tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = ours.generate(ids[:1, 2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 2:], alone[0])


def test_generate_equals_greedy_decoding_with_full_forward_passes(greedy):
    ours, _ = _pair(_tiny(), "CAUSAL_LM")
    ids = torch.randint(3, 256, (1, 5))
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False), greedy(ours, ids, 6))


# --- training, files, errors ---------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
def test_short_training_run_lowers_the_loss_and_touches_only_the_prefix(projection, lm_losses):
    base = _tiny(initializer_range=0.1)  # weights of std 0.02 leave a random model too flat to steer
    model = PrefixTuningModel(base, PrefixConfig(num_virtual_tokens=4, prefix_projection=projection))
    frozen = {k: v.clone() for k, v in model.base.state_dict().items()}
    ids = torch.arange(10, 22).repeat(4, 1)  # one fixed sequence: something a prefix can steer towards
    losses = lm_losses(model, ids, steps=40, lr=0.05)
    assert losses[-1] < losses[0] - 2.0, losses
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("tiny-bert", marks=hf_peft_refuses_prefix_on_bert)])
def test_save_load_round_trip_and_hf_peft_reads_our_file(name, tmp_path):
    base = _tiny(name)
    ours, _ = _pair(base, TASKS[name][1])
    if name == "tiny-bert":
        nn.init.normal_(ours.base.classifier.weight)  # a trained head differs from the fresh one
    size = save_prefix(ours, tmp_path)
    assert size < 10_000
    loaded = load_prefix(copy.deepcopy(base), tmp_path).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
        hf = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(hf, expected, atol=1e-5, rtol=0)


def test_we_read_hf_peft_files(tmp_path):
    base = _tiny()
    _, theirs = _pair(base, "CAUSAL_LM")
    theirs.save_pretrained(tmp_path)
    ours = load_prefix(copy.deepcopy(base), tmp_path).eval()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_projection_is_saved_as_the_prefix_it_produces(tmp_path):
    base = _tiny()
    config = PrefixConfig(num_virtual_tokens=3, prefix_projection=True)
    model = PrefixTuningModel(copy.deepcopy(base), config).eval()
    save_prefix(model, tmp_path)
    loaded = load_prefix(copy.deepcopy(base), tmp_path).eval()
    assert not loaded.config.prefix_projection
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_loading_a_file_made_for_another_model_fails(tmp_path):
    save_prefix(PrefixTuningModel(_tiny(), PrefixConfig(num_virtual_tokens=3)), tmp_path / "llama")
    deeper = _tiny(num_hidden_layers=3)
    with pytest.raises(ValueError, match="made for another model: num_layers=2"):
        load_prefix(deeper, tmp_path / "llama")
    with pytest.raises(ValueError, match="made for another model: task_type='CAUSAL_LM'"):
        load_prefix(_tiny("tiny-bert"), tmp_path / "llama")
    save_prompt(PromptTuningModel(_tiny(), PromptTuningConfig(num_virtual_tokens=3)), tmp_path / "prompt")
    with pytest.raises(ValueError, match="holds a PROMPT_TUNING adapter"):
        load_prefix(_tiny(), tmp_path / "prompt")
    with pytest.raises(FileNotFoundError, match="adapter directory"):
        load_prefix(_tiny(), tmp_path / "nothing")


def test_clear_errors_for_misuse():
    config = PrefixConfig(num_virtual_tokens=2)
    model = PrefixTuningModel(_tiny(), config)
    assert config.task_type is None and model.config.task_type == "CAUSAL_LM"  # the caller's config is kept
    with pytest.raises(ValueError, match="config.task_type='SEQ_CLS' but the model is a CAUSAL_LM model"):
        PrefixTuningModel(_tiny(), PrefixConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="already has a prefix"):
        PrefixTuningModel(model, PrefixConfig())
    with pytest.raises(ValueError, match="builds the cache itself"):
        model(torch.tensor([[1, 2]]), past_key_values=model.past_key_values(1))
    with pytest.raises(ValueError, match="generate\\(\\) needs a causal LM"):
        PrefixTuningModel(_tiny("tiny-bert"), PrefixConfig()).generate(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="neither a \\*ForSequenceClassification nor a causal LM"):
        PrefixTuningModel(_tiny("tiny-llama").model, PrefixConfig())


# --- the real offline models (transformers 5.23.0, peft 0.21.2) ----------------------------------
@pytest.mark.slow
@hf_peft_generate_ignores_cache
def test_smollm2_logits_and_generation_match_hf_peft(smollm2, greedy):
    model, tok = smollm2
    ours, theirs = _pair(model, "CAUSAL_LM", P=8)
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**batch).logits
        b = theirs(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    g_ours = ours.generate(**batch, max_new_tokens=5, do_sample=False)
    assert g_ours.shape == (2, batch["input_ids"].shape[1] + 5)
    first = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    assert torch.equal(g_ours[:1], greedy(ours, first, 5))  # the unpadded row, by definition
    g_theirs = theirs.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(g_ours, g_theirs)


@pytest.mark.slow
@hf_peft_refuses_prefix_on_bert
def test_minilm_classifier_logits_match_hf_peft(minilm):
    model, tok = minilm
    ours, theirs = _pair(model, "SEQ_CLS", P=10)
    texts = ["I love this airline!", "worst delay ever, never again", "ok"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**batch).logits
        b = theirs(**batch).logits
        plain = ours.base(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-3
