"""peftlab's prefix tuning, prompt tuning and P-tuning against HF peft (the independent reference).

The three prepend learned virtual tokens to a frozen model: prefix tuning as keys and values in
every layer (HF peft's ``PrefixTuningConfig``), prompt tuning as input embeddings
(``PromptTuningConfig``), P-tuning as input embeddings made by an encoder (``PromptEncoderConfig``).
What they share (logits, generation, files, training) is tested once, parametrised over the method.
"""

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from upstream import hf_peft_generate_ignores_cache, hf_peft_refuses_prefix_on_bert

from peftlab.inject import count_parameters
from peftlab.models import ARCH_CONFIGS, arch_config, build_from_config, cache_argument, cache_dir
from peftlab.prefix import (
    PrefixConfig,
    PrefixTuningModel,
    apply_prefix,
    disable_prefix,
    kv_dims,
    load_prefix,
    save_prefix,
)
from peftlab.prompt import (
    PromptTuningConfig,
    PromptTuningModel,
    apply_prompt,
    disable_prompt,
    load_prompt,
    save_prompt,
)
from peftlab.ptuning import PromptEncoder, PTuningConfig, apply_ptuning

TASKS = {"tiny-llama": ("causal_lm", "CAUSAL_LM"), "tiny-gpt2": ("causal_lm", "CAUSAL_LM"),
         "tiny-bert": ("classification", "SEQ_CLS")}
TEXT = "Classify the sentiment:"
SAVE, LOAD = {"prefix": save_prefix, "prompt": save_prompt}, {"prefix": load_prefix, "prompt": load_prompt}
METHODS = ["prefix", "prompt"]


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


def _pair(method: str, base: nn.Module, task_type: str, P: int = 4, seed: int = 1):
    """Our model and HF peft's on copies of ``base``, holding the same random prefix / virtual tokens."""
    if method == "prefix":
        ours = PrefixTuningModel(copy.deepcopy(base), PrefixConfig(num_virtual_tokens=P))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type=task_type,
                                                                                  num_virtual_tokens=P))
        w, scale = ours.prefix_encoder.embedding.weight, 0.5
    else:
        ours = PromptTuningModel(copy.deepcopy(base), PromptTuningConfig(num_virtual_tokens=P))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type=task_type,
                                                                                  num_virtual_tokens=P))
        w, scale = ours.prompt_encoder.embedding, 0.1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * scale)
        theirs.prompt_encoder["default"].embedding.weight.copy_(w)
    return ours.eval(), theirs.eval()


def _real(logits: torch.Tensor, T: int) -> torch.Tensor:
    """The logits at the T real tokens: prompt tuning's causal LM also returns the P virtual positions."""
    return logits[:, -T:] if logits.dim() == 3 else logits


# --- what the methods share, against HF peft -----------------------------------------------------
@pytest.mark.parametrize("method, name", [
    ("prefix", "tiny-llama"), ("prefix", "tiny-gpt2"),
    pytest.param("prefix", "tiny-bert", marks=hf_peft_refuses_prefix_on_bert),
    ("prompt", "tiny-llama"), ("prompt", "tiny-bert")])
def test_logits_match_hf_peft_on_tiny_models(method, name):
    ours, theirs = _pair(method, _tiny(name), TASKS[name][1])
    ids, mask = _batch()
    kwargs = dict(token_type_ids=torch.zeros_like(ids)) if name == "tiny-bert" else {}
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, **kwargs).logits
        b = theirs(input_ids=ids, attention_mask=mask, **kwargs).logits
        plain = ours.base(input_ids=ids, attention_mask=mask, **kwargs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (_real(a, ids.shape[1]) - plain).abs().max() > 1e-3  # the virtual tokens really change the output


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3, num_return_sequences=2)])
@pytest.mark.parametrize("method", METHODS)
@hf_peft_generate_ignores_cache
def test_generate_matches_hf_peft(method, kwargs, greedy):
    ours, theirs = _pair(method, _tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    if method == "prompt":
        mask[:] = 1  # HF peft numbers left-padded rows differently for prompt tuning (see PromptTuningModel.generate)
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    if not kwargs:  # greedy: the definition (full forward passes, no cache) first, then HF peft
        assert torch.equal(a[1:], greedy(ours, ids[1:], 6))
    b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
    assert a.shape == (2 * kwargs.get("num_return_sequences", 1), 7 + 6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
def test_left_padded_row_generates_what_it_generates_alone(method):
    ours, _ = _pair(method, _tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    batched = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = ours.generate(ids[:1, 2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 2:], alone[0])


@pytest.mark.parametrize("method", METHODS)
def test_generate_equals_greedy_decoding_with_full_forward_passes(method, greedy):
    ours, _ = _pair(method, _tiny(), "CAUSAL_LM")
    for ids in (torch.randint(3, 256, (1, 5)), _batch()[0]):
        assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False), greedy(ours, ids, 6))


@pytest.mark.parametrize("method", METHODS)
def test_disable_runs_the_base_alone_and_apply_equals_the_constructor(method):
    base = _tiny().eval()
    apply, disable, config = {
        "prefix": (apply_prefix, disable_prefix, PrefixConfig(num_virtual_tokens=3)),
        "prompt": (apply_prompt, disable_prompt, PromptTuningConfig(num_virtual_tokens=3)),
    }[method]
    model = apply(base, config).eval()
    assert isinstance(model, PrefixTuningModel if method == "prefix" else PromptTuningModel) and model.base is base
    ids = torch.randint(3, 256, (1, 5))
    with torch.no_grad():
        prompted = model(ids).logits
        with disable(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False),
                               base.generate(ids, max_new_tokens=3, do_sample=False))
        torch.testing.assert_close(model(ids).logits, prompted, atol=0, rtol=0)  # back on after the block
    with pytest.raises(ValueError, match=f"disable_{method} needs a"):
        with disable(base):
            pass


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["prefix", "prefix-projection", "prompt", "ptuning-mlp", "ptuning-lstm"])
def test_short_training_run_lowers_the_loss_and_touches_only_the_virtual_tokens(variant, lm_losses):
    base = _tiny(initializer_range=0.1)  # weights of std 0.02 leave a random model too flat to steer
    if variant.startswith("prefix"):
        model = PrefixTuningModel(base, PrefixConfig(num_virtual_tokens=4, prefix_projection=variant.endswith("n")))
    elif variant == "prompt":
        model = PromptTuningModel(base, PromptTuningConfig(num_virtual_tokens=4))
    else:
        kind = variant.split("-")[1].upper()
        model = apply_ptuning(base, PTuningConfig(num_virtual_tokens=4, encoder_reparameterization_type=kind))
    frozen = {k: v.clone() for k, v in model.base.state_dict().items()}
    ids = torch.arange(10, 22).repeat(4, 1)  # one fixed sequence: something the virtual tokens can steer towards
    losses = lm_losses(model, ids, steps=40, lr=0.05)
    assert losses[-1] < losses[0] - 2.0, losses
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in frozen.items())


# --- files: HF peft's format, both ways ------------------------------------------------------------
@pytest.mark.parametrize("method, name", [
    ("prefix", "tiny-llama"), pytest.param("prefix", "tiny-bert", marks=hf_peft_refuses_prefix_on_bert),
    ("prompt", "tiny-llama"), ("prompt", "tiny-bert")])
def test_save_load_round_trip_and_hf_peft_reads_our_file(method, name, tmp_path):
    base = _tiny(name)
    ours, _ = _pair(method, base, TASKS[name][1])
    if name == "tiny-bert":
        nn.init.normal_(ours.base.classifier.weight)  # a trained head differs from the fresh one
    assert SAVE[method](ours, tmp_path) < 10_000
    loaded = LOAD[method](copy.deepcopy(base), tmp_path).eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, expected, atol=1e-6, rtol=0)
        hf = theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(hf, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_we_read_hf_peft_files(method, tmp_path):
    base = _tiny()
    _, theirs = _pair(method, base, "CAUSAL_LM")
    theirs.save_pretrained(tmp_path)
    ours = LOAD[method](copy.deepcopy(base), tmp_path).eval()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


# --- prefix tuning only ---------------------------------------------------------------------------
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
    layers, kv_heads, head_dim = kv_dims(arch_config("smollm2-135m"))
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
    ours, theirs = _pair("prefix", base, "SEQ_CLS")
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {"prefix_encoder.embedding.weight", "base.classifier.weight", "base.classifier.bias"}
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_the_prefix_reaches_every_model(name):
    """Whatever transformers calls the cache argument, the prefix changes the logits (never silently dropped)."""
    ours, _ = _pair("prefix", _tiny(name), TASKS[name][1])
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
    ours, _ = _pair("prefix", _tiny(), "CAUSAL_LM", P=3)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        implicit = ours(ids).logits  # the model numbers from the cache length: P, P+1, ...
        explicit = ours(ids, position_ids=torch.arange(6)[None]).logits
        cache = ours.past_key_values(1)
        unshifted = ours.base(ids, **{cache_argument(ours.base): cache}, position_ids=torch.arange(6)[None]).logits
    torch.testing.assert_close(implicit, explicit)
    assert (implicit - unshifted).abs().max() > 1e-4  # so the shift is real, and applied


def test_padded_positions_stay_masked():
    ours, _ = _pair("prefix", _tiny(), "CAUSAL_LM")
    ids, mask = _batch()
    other = ids.clone()
    other[0, :2] = 99  # change only the padded tokens
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits[0, 2:]
        b = ours(other, attention_mask=mask).logits[0, 2:]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_projection_is_saved_as_the_prefix_it_produces(tmp_path):
    base = _tiny()
    config = PrefixConfig(num_virtual_tokens=3, prefix_projection=True)
    model = PrefixTuningModel(copy.deepcopy(base), config).eval()
    save_prefix(model, tmp_path)
    loaded = load_prefix(copy.deepcopy(base), tmp_path).eval()
    assert not loaded.peft_config.prefix_projection
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_prefix_loading_a_file_made_for_another_model_fails(tmp_path):
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


def test_prefix_clear_errors_for_misuse():
    config = PrefixConfig(num_virtual_tokens=2)
    model = PrefixTuningModel(_tiny(), config)
    assert config.task_type is None and model.peft_config.task_type == "CAUSAL_LM"  # the caller's config is kept
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


# --- prompt tuning and P-tuning only ---------------------------------------------------------------
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
    ours, theirs = _pair("prompt", _tiny(), "CAUSAL_LM", P=5)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding"]
    assert count_parameters(ours)[0] == 5 * 64 == theirs.get_nb_trainable_parameters()[0]
    cls, cls_theirs = _pair("prompt", _tiny("tiny-bert"), "SEQ_CLS", P=5)
    names = {n for n, p in cls.named_parameters() if p.requires_grad}
    assert names == {"prompt_encoder.embedding", "base.classifier.weight", "base.classifier.bias"}
    assert count_parameters(cls)[0] == 5 * 64 + 64 * 2 + 2 == cls_theirs.get_nb_trainable_parameters()[0]


def test_causal_lm_loss_ignores_the_virtual_positions():
    ours, theirs = _pair("prompt", _tiny(), "CAUSAL_LM")
    ids = torch.randint(3, 256, (2, 6))
    with torch.no_grad():
        out = ours(ids, labels=ids)
        # Positions P-1 .. P+T-2 predict the T real tokens: the last virtual token predicts the first
        # real one (HF peft's labels too), and nothing predicts a virtual token.
        logits = out.logits[:, 3:-1]  # (B, T, V)
        manual = F.cross_entropy(logits.reshape(-1, 256), ids.reshape(-1))
        torch.testing.assert_close(out.loss, manual)
        torch.testing.assert_close(out.loss, theirs(input_ids=ids, labels=ids).loss)


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


def test_prompt_loading_a_file_made_for_another_model_fails(tmp_path):
    save_prompt(PromptTuningModel(_tiny(), PromptTuningConfig(num_virtual_tokens=3)), tmp_path / "llama")
    with pytest.raises(ValueError, match="made for another model: task_type='CAUSAL_LM'"):
        load_prompt(_tiny("tiny-bert"), tmp_path / "llama")
    wider = _tiny(hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="made for another model: token_dim=64, this model has 32"):
        load_prompt(wider, tmp_path / "llama")
    save_prefix(PrefixTuningModel(_tiny(), PrefixConfig(num_virtual_tokens=3)), tmp_path / "prefix")
    with pytest.raises(ValueError, match="holds a PREFIX_TUNING adapter"):
        load_prompt(_tiny(), tmp_path / "prefix")


def test_prompt_clear_errors_for_misuse():
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
@hf_peft_generate_ignores_cache
def test_prefix_smollm2_logits_and_generation_match_hf_peft(smollm2, greedy):
    model, tok = smollm2
    ours, theirs = _pair("prefix", model, "CAUSAL_LM", P=8)
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
def test_prefix_minilm_classifier_logits_match_hf_peft(minilm):
    model, tok = minilm
    ours, theirs = _pair("prefix", model, "SEQ_CLS", P=10)
    texts = ["I love this airline!", "worst delay ever, never again", "ok"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = ours(**batch).logits
        b = theirs(**batch).logits
        plain = ours.base(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-3


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
def test_prompt_smollm2_logits_and_generation_match_hf_peft(smollm2, greedy):
    model, tok = smollm2
    ours, theirs = _pair("prompt", model, "CAUSAL_LM", P=8)
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
def test_prompt_minilm_classifier_logits_match_hf_peft_and_pool_the_first_virtual_token(minilm):
    model, tok = minilm
    ours, theirs = _pair("prompt", model, "SEQ_CLS", P=10)
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
