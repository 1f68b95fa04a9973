"""Adapter files: HF peft's adapter directory, written, read and checked once for every method.

An adapter directory holds two files, as HF peft's ``save_pretrained`` writes them:

- ``adapter_config.json``: the method's config, with ``peft_type`` naming the method
  (``"LORA"``, ``"PREFIX_TUNING"``, ``"IA3"``...), sorted keys, indent 2;
- ``adapter_model.safetensors``: only the trained tensors, no base weights. Methods that inject
  layers key them by the module path under the wrapped model, ``base_model.model.<name>...``
  (:data:`PREFIX`); prefix and prompt tuning store ``prompt_embeddings``.

A method module keeps only its key names and its config: it builds ``live`` (file key -> the
model's parameter) and calls :func:`write_adapter` to save, :func:`read_config`,
:func:`read_tensors` and :func:`copy_into` to load. Everything that can go wrong with a directory
(missing, malformed JSON, another method's file, corrupt weights, a tensor that does not fit)
raises :class:`AdapterFileError` with the file's path and what is wrong.

Each method registers its ``save_*`` / ``load_*`` here (:func:`register`), so that one
:func:`save_adapter` finds the method applied to a model and one :func:`load_adapter` dispatches
on the file's ``peft_type``.

References:
    - HF peft ``PeftModel.save_pretrained`` / ``PeftModel.from_pretrained`` and
      ``utils/save_and_load.py`` (file names, ``base_model.model.`` key prefix, ``peft_type``).
    - safetensors, https://huggingface.co/docs/safetensors (the weights format).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # HF peft: PeftModel.base_model (the tuner) .model (the transformers model)


class AdapterFileError(ValueError):
    """An adapter directory that cannot be read into this model; the message names the file and the problem."""


class AdapterFileNotFoundError(AdapterFileError, FileNotFoundError):
    """A missing adapter directory or file (also a ``FileNotFoundError``, as ``open`` would raise)."""


# --- write ---------------------------------------------------------------------------------------
def write_adapter(path, config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Write ``config`` to ``adapter_config.json`` and ``tensors`` to ``adapter_model.safetensors``.

    Makes the directory; tensors are saved detached, contiguous and on the CPU. Returns the bytes
    of both files.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_adapter(d, {"peft_type": "DEMO"}, {"w": torch.ones(2)}) > 0
    True
    >>> read_config(d, "DEMO"), read_tensors(d)
    ({'peft_type': 'DEMO'}, {'w': tensor([1., 1.])})
    """
    from safetensors.torch import save_file

    if "peft_type" not in config:
        raise ValueError(f"an adapter config needs a peft_type (the method's name), got keys {sorted(config)}")
    os.makedirs(path, exist_ok=True)
    weights, cfg = os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, ADAPTER_CONFIG)
    # clone(): safetensors refuses tensors that share memory (a tied head, a view of a parameter).
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    with open(cfg, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return os.path.getsize(weights) + os.path.getsize(cfg)


# --- read ----------------------------------------------------------------------------------------
def read_config(path, peft_type: str | tuple[str, ...] | None = None) -> dict:
    """The parsed ``adapter_config.json`` of the directory ``path``.

    With ``peft_type`` (one name or a tuple of names), the file's ``peft_type`` must be one of them.

    >>> read_config("/no/such/dir")
    Traceback (most recent call last):
    ...
    peftlab.files.AdapterFileNotFoundError: /no/such/dir does not exist: is '/no/such/dir' an adapter directory?
    """
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isdir(path):
        raise AdapterFileNotFoundError(f"{path} does not exist: is {str(path)!r} an adapter directory?")
    if not os.path.isfile(file):
        raise AdapterFileNotFoundError(f"{file} does not exist: is {str(path)!r} an adapter directory? "
                                       f"It holds {sorted(os.listdir(path))}")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{file} is not text (JSON): {e}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{file} must hold a JSON object (the adapter's config), got a "
                               f"{type(raw).__name__}")
    if peft_type is not None:
        allowed = (peft_type,) if isinstance(peft_type, str) else tuple(peft_type)
        if "peft_type" not in raw:
            raise AdapterFileError(f"{file} has no peft_type; expected {' or '.join(allowed)}")
        if raw["peft_type"] not in allowed:
            raise AdapterFileError(f"{file} holds a {raw['peft_type']} adapter; expected {' or '.join(allowed)}")
    return raw


def read_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` in the directory ``path`` (on the CPU)."""
    from safetensors.torch import load_file

    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        hint = " (HF peft wrote a pickle: save with safe_serialization=True)" \
            if os.path.isfile(os.path.join(path, "adapter_model.bin")) else ""
        raise AdapterFileNotFoundError(f"{file} does not exist{hint}")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError / ValueError
        raise AdapterFileError(f"{file} is not a readable safetensors file: {e}") from None


def check_fields(path, raw: dict, expected: dict) -> None:
    """Raise :class:`AdapterFileError` when a config value the model fixes (a width, a layer count) differs.

    >>> check_fields("a", {"token_dim": 64}, {"token_dim": 32})
    Traceback (most recent call last):
    ...
    peftlab.files.AdapterFileError: adapter at a was made for another model: token_dim=64, this model has 32 \
(a/adapter_config.json)
    """
    for key, value in expected.items():
        if raw.get(key) != value:
            raise AdapterFileError(f"adapter at {path} was made for another model: {key}={raw.get(key)!r}, "
                                   f"this model has {value!r} ({os.path.join(path, ADAPTER_CONFIG)})")


def copy_into(path, live: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
              required: set[str] | None = None) -> None:
    """Copy the file's ``tensors`` into the model's ``live`` tensors (file key -> parameter or buffer).

    Every key of ``tensors`` must be in ``live``, every key of ``required`` (default: all of
    ``live``) in ``tensors``, and shapes must agree; all is checked before anything is copied.

    >>> w = torch.zeros(2)
    >>> copy_into("d", {"w": w}, {"w": torch.ones(2)}); w
    tensor([1., 1.])
    >>> copy_into("d", {"w": w}, {"w": torch.ones(3)})
    Traceback (most recent call last):
    ...
    peftlab.files.AdapterFileError: adapter at d was made for another model: d/adapter_model.safetensors: w has \
shape (3,), this model needs (2,)
    """
    file = os.path.join(path, ADAPTER_WEIGHTS)
    required = set(live) if required is None else set(required)
    unexpected, missing = sorted(set(tensors) - set(live)), sorted(required - set(tensors))
    if unexpected or missing:
        raise AdapterFileError(f"adapter at {path} was made for another model: {file} has "
                               f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), "
                               f"{len(missing)} missing (e.g. {missing[:2]})")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(live[key].shape):
            raise AdapterFileError(f"adapter at {path} was made for another model: {file}: {key} has shape "
                                   f"{tuple(value.shape)}, this model needs {tuple(live[key].shape)}")
    with torch.no_grad():
        for key, value in tensors.items():
            live[key].copy_(value)


# --- small helpers for the configs ---------------------------------------------------------------
def base_model_name(model: nn.Module) -> str | None:
    """``model.config._name_or_path`` (HF peft's ``base_model_name_or_path``), or None."""
    return getattr(getattr(model, "config", None), "_name_or_path", None)


def dataclass_fields(cls, raw: dict) -> dict:
    """The entries of ``raw`` that are fields of the dataclass ``cls`` (a file holds more: peft_type...).

    >>> @dataclass
    ... class C:
    ...     r: int = 8
    >>> dataclass_fields(C, {"r": 4, "peft_type": "LORA"})
    {'r': 4}
    """
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}


def make_config(path, cls, raw: dict, **overrides):
    """The config dataclass ``cls`` from a file's fields (and ``overrides``); a bad value names the file.

    >>> @dataclass
    ... class C:
    ...     r: int = 8
    ...     def __post_init__(self):
    ...         if self.r <= 0:
    ...             raise ValueError(f"r must be a positive integer, got {self.r}")
    >>> make_config("d", C, {"r": 0})
    Traceback (most recent call last):
    ...
    peftlab.files.AdapterFileError: d/adapter_config.json: r must be a positive integer, got 0
    """
    try:
        return cls(**(dataclass_fields(cls, raw) | overrides))
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{os.path.join(path, ADAPTER_CONFIG)}: {e}") from None


# --- one save / load for every method ------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A registered method: its ``save_*`` / ``load_*`` and a predicate "is it applied to this model"."""

    peft_type: str
    save: Callable
    load: Callable
    applied: Callable[[nn.Module], bool]


METHODS: dict[str, Method] = {}


def register(peft_type: str, *, save: Callable, load: Callable, applied: Callable[[nn.Module], bool]) -> None:
    """Make :func:`save_adapter` / :func:`load_adapter` serve a method; each method calls it at import.

    ``save(model, path[, adapter_name])`` returns the bytes written; ``load(model, path[, adapter_name])``
    returns the model to use (a wrapper for prefix and prompt tuning); ``applied(model)`` is True when
    the method is on ``model``.
    """
    METHODS[peft_type] = Method(peft_type, save, load, applied)


def _call(method: Method, fn: Callable, model, path, adapter_name: str | None):
    """``fn(model, path, adapter_name=...)`` for methods with named adapters (LoRA, bottleneck adapters)."""
    if "adapter_name" in inspect.signature(fn).parameters:
        return fn(model, path, adapter_name=adapter_name)
    if adapter_name not in (None, "default"):
        raise ValueError(f"a {method.peft_type} model holds one adapter: adapter_name={adapter_name!r} "
                         f"is for methods with named adapters (LoRA, bottleneck adapters); leave it 'default'")
    return fn(model, path)


def applied_methods(model: nn.Module) -> list[str]:
    """The ``peft_type`` of every registered method applied to ``model``."""
    return [t for t, m in METHODS.items() if m.applied(model)]


def save_adapter(model: nn.Module, path, adapter_name: str | None = None) -> int:
    """Save the PEFT method applied to ``model`` (LoRA, adapters, prefix, prompt, IA3, BitFit); return bytes.

    ``adapter_name`` (LoRA, bottleneck adapters): None saves the only adapter, else the active one.

    >>> import tempfile
    >>> import peftlab
    >>> from peftlab.models import build_from_config
    >>> model = peftlab.apply_ia3(build_from_config("tiny-llama"))
    >>> d = tempfile.mkdtemp()
    >>> peftlab.save_adapter(model, d) > 0, read_config(d)["peft_type"]
    (True, 'IA3')
    """
    found = applied_methods(model)
    if not found:
        raise ValueError(f"no PEFT method is applied to this {type(model).__name__}: apply one first "
                         f"(methods that can be saved: {sorted(METHODS)})")
    if len(found) > 1:
        raise ValueError(f"this model has several PEFT methods applied ({found}): save each with its "
                         f"own save_* function")
    method = METHODS[found[0]]
    return _call(method, method.save, model, path, adapter_name)


def load_adapter(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Load the adapter at ``path`` into ``model`` with the method its ``peft_type`` names; use the returned model.

    Prefix and prompt tuning wrap ``model``, so the result is a new module; the other methods
    change ``model`` in place and return it.

    >>> import tempfile
    >>> import peftlab
    >>> from peftlab.models import build_from_config
    >>> d = tempfile.mkdtemp()
    >>> _ = peftlab.save_adapter(peftlab.apply_ia3(build_from_config("tiny-llama")), d)
    >>> type(peftlab.load_adapter(build_from_config("tiny-llama"), d)).__name__
    'LlamaForCausalLM'
    """
    raw = read_config(path)
    file = os.path.join(path, ADAPTER_CONFIG)
    if "peft_type" not in raw:
        raise AdapterFileError(f"{file} has no peft_type; known: {sorted(METHODS)}")
    method = METHODS.get(raw["peft_type"])
    if method is None:
        raise AdapterFileError(f"{file} holds a {raw['peft_type']!r} adapter, which peftlab cannot load; "
                               f"known: {sorted(METHODS)}")
    return _call(method, method.load, model, path, adapter_name)
