"""Offline data and models: splits are disjoint and stratified, models load without a network."""

import collections

import pytest
import torch

from peftlab.data import BBC_LABELS, TWEET_LABELS, load_bbc_news, load_tweets, tokenize
from peftlab.models import ARCH_CONFIGS, arch_config, build_from_config


@pytest.fixture(scope="module")
def tweets():
    return load_tweets()


def test_tweets_splits_are_disjoint_deduplicated_and_stratified(tweets):
    texts = {s: [t.lower() for t in tweets[s]["text"]] for s in tweets}
    assert set(texts["train"]).isdisjoint(texts["test"]) and set(texts["train"]).isdisjoint(texts["validation"])
    assert len(set(texts["train"])) == len(texts["train"])
    assert tweets["train"].features["label"].names == TWEET_LABELS
    shares = {s: collections.Counter(tweets[s]["label"]) for s in tweets}
    for label in range(3):
        train_share = shares["train"][label] / len(tweets["train"])
        test_share = shares["test"][label] / len(tweets["test"])
        assert abs(train_share - test_share) < 0.01
    n = sum(len(tweets[s]) for s in tweets)
    assert 20_000 < n < 38_158  # filtered by confidence and de-duplicated, from the 38,158 rows shipped
    assert abs(len(tweets["test"]) / n - 0.1) < 0.005


def test_confidence_filter_and_limit():
    loose, strict = load_tweets(min_confidence=0.0, limit=None), load_tweets(min_confidence=0.9)
    assert len(strict["train"]) < len(loose["train"])
    small = load_tweets(limit=60)
    assert [len(small[s]) for s in ("train", "validation", "test")] == [60, 60, 60]
    assert set(small["train"]["label"]) == {0, 1, 2}
    with pytest.raises(ValueError, match="min_confidence"):
        load_tweets(min_confidence=1.5)


def test_bbc_news_has_2225_articles_in_five_topics():
    bbc = load_bbc_news()
    assert sum(len(bbc[s]) for s in bbc) == 2225  # Greene & Cunningham 2006
    assert bbc["train"].features["label"].names == BBC_LABELS
    first = bbc["train"][0]["text"]
    assert len(first) > 200


def test_tokenize_keeps_labels(minilm):
    _, tok = minilm
    ds = tokenize(load_tweets(limit=8)["train"], tok, max_length=16)
    row = ds[0]
    assert row["input_ids"].shape[0] <= 16 and row["input_ids"][0].item() == tok.cls_token_id
    assert "label" in ds.column_names


@pytest.mark.slow
def test_minilm_is_the_real_pretrained_encoder(minilm):
    """Pretrained weights, not random: paraphrases embed closer than unrelated sentences."""
    model, tok = minilm
    enc = tok(["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model.bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_the_tokenizer_alone_is_the_models_tokenizer(smollm2):
    from peftlab.models import load_causal_lm_tokenizer

    text = "<|im_start|>user\nWhat is LoRA? Ünïcode, digits 12345.<|im_end|>"
    alone, with_model = load_causal_lm_tokenizer(), smollm2[1]
    assert alone(text)["input_ids"] == with_model(text)["input_ids"]
    assert alone.eos_token == with_model.eos_token and len(alone) == len(with_model)


def test_build_from_config_meta_counts_match_published_sizes():
    """Counts from the real module tree on the meta device (no memory), against published sizes."""
    smol = build_from_config("smollm2-135m", device="meta")
    assert sum(p.numel() for p in smol.parameters()) == 134_515_008  # = the loaded GGUF model
    bert = build_from_config("minilm-l6", task="classification", device="meta", num_labels=3)
    assert sum(p.numel() for p in bert.parameters()) == 22_713_216 + 384 * 3 + 3
    assert all(p.device.type == "meta" for p in smol.parameters())


def test_unknown_config_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model config 'llama-9000'.*tiny-llama"):
        arch_config("llama-9000")
    with pytest.raises(ValueError, match="task must be"):
        build_from_config("tiny-llama", task="translation")
    assert "smollm2-135m" in ARCH_CONFIGS
