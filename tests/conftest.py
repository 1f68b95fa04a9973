"""Test set-up: no network (an accidental hub download fails loudly), fixed seeds, shared model loads."""

import copy
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the test modules share tests/upstream.py (known reference faults)

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"tests must not reach the network (tried to connect to {address!r})")


def pytest_configure(config):
    socket.socket.connect = _guarded_connect


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def _minilm_once():
    from peftlab.models import load_classifier

    torch.manual_seed(0)
    return load_classifier(num_labels=3)


@pytest.fixture
def minilm(_minilm_once):
    """A fresh copy of MiniLM-L6 with a 3-way head (the same head weights every time) and its tokenizer."""
    model, tokenizer = _minilm_once
    return copy.deepcopy(model).eval(), tokenizer


@pytest.fixture(scope="session")
def _smollm2_once():
    from peftlab.models import load_causal_lm

    return load_causal_lm()


@pytest.fixture
def smollm2(_smollm2_once):
    model, tokenizer = _smollm2_once
    return copy.deepcopy(model).eval(), tokenizer


def _lm_losses(model, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Train ``model``'s trainable parameters with AdamW on ``ids`` as its own labels; the loss of every step.

    peftlab's one training loop, on one batch; AdamW's default weight decay (0.01); the test's seed left as it is.
    """
    from itertools import repeat

    from peftlab.train import train

    batches = repeat(dict(input_ids=ids, labels=ids))
    return train(model, batches, steps=steps, lr=lr, weight_decay=0.01, seed=None, progress=False).losses


@pytest.fixture
def lm_losses():
    """``lm_losses(model, ids, steps, lr)``: a short language-model training run (see ``_lm_losses``)."""
    return _lm_losses


def _greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by definition: no cache, the whole sequence (all ones mask) again at every step."""
    x = ids
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(x, attention_mask=torch.ones_like(x)).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.fixture
def greedy():
    """``greedy(model, ids, steps)``: the reference for ``generate(do_sample=False)`` (see ``_greedy``)."""
    return _greedy
