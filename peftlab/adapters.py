"""Bottleneck adapters: a small residual MLP ``h + W_up f(W_down h)`` inserted into every frozen layer.

Each adapter maps the d-wide hidden state down to m numbers, applies a non-linearity and maps back
up; ``W_up`` starts at zero, so an untrained adapter is the identity and the model is unchanged at
step 0. It has ``2 d m + d + m`` parameters (two weights and two biases), ``+ 2 d`` with the
optional LayerNorm on its input. ``m = d // reduction_factor`` unless given.

**Where the adapters sit.** Houlsby et al. (2019), Figure 2 (left): twice per layer, "after the
projection following multi-headed attention and after the two feed-forward layers", each *before*
the sublayer's skip connection (and, in post-LN BERT, before its Add & LayerNorm). peftlab gets
exactly that by wrapping the sublayer's last linear layer, so the adapter sees its output:

- BERT (MiniLM): ``attention.output.dense`` (inside ``BertSelfOutput``) and ``output.dense`` (inside
  ``BertOutput``); both then go through dropout, ``+ residual`` and LayerNorm as before.
- Llama (SmolLM2): ``self_attn.o_proj`` and ``mlp.down_proj``; the decoder layer adds the residual after.
- GPT-2: ``attn.c_proj`` and ``mlp.c_proj``.

Pfeiffer et al. (2021, AdapterFusion) keep one adapter per layer, after the feed-forward block, with
ReLU (the architecture their search preferred; AdapterHub's ``pfeiffer`` / ``SeqBnConfig``): here it
sits at the second Houlsby site. AdapterHub's config also feeds the adapter through the sublayer's own
Add & LayerNorm first (``original_ln_before=True``); peftlab does not, so both placements share one
site definition. Both are the identity at initialisation; trained, they are not interchangeable.
Houlsby et al. also train the layers' LayerNorms; here only adapters (and task heads) train.

**Several tasks, one frozen model.** Every wrapped site keeps its adapters in one small container
(:class:`AdapterLayer`) and runs the active one. ``set_adapter`` switches task, ``disable_adapters``
runs the bare model, and ``save_adapters`` writes one task's adapter (and head) alone: a few hundred
KB next to a 90 MB base model (:func:`peftlab.experiments.multitask.multitask_demo` measures it).

References:
    - Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751.
    - Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
      arXiv:2005.00247.
    - Pfeiffer et al., "AdapterHub: A Framework for Adapting Transformers", arXiv:2007.07779.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import files
from .inject import (
    CLASSIFIER_HEADS,
    NamedAdapters,
    Targets,
    disable_adapters,  # noqa: F401 - the one walk, under this module's name (exercise 3 uses it)
    freeze,
    get_parent,
    pick_adapter,
    replace_modules,
    set_adapter,
    targets_for,
    unchanged_on_error,
)
from .validate import one_of, positive_int

# (attention-output site, feed-forward-output site) per model_type, as regexes over module names.
SITES: dict[str, tuple[str, str]] = {
    "bert": (r".*\.layer\.\d+\.attention\.output\.dense", r".*\.layer\.\d+\.output\.dense"),
    "llama": (r".*\.layers\.\d+\.self_attn\.o_proj", r".*\.layers\.\d+\.mlp\.down_proj"),
    "gpt2": (r".*\.h\.\d+\.attn\.c_proj", r".*\.h\.\d+\.mlp\.c_proj"),
}
PLACEMENTS = {"houlsby": (0, 1), "pfeiffer": (1,)}  # which of the two sites each placement uses
DEFAULT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu"}  # AdapterHub's defaults
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}
PEFT_TYPE = "BOTTLENECK_ADAPTER"


@dataclass
class AdapterConfig:
    """Bottleneck-adapter hyper-parameters (AdapterHub's names where they exist).

    >>> AdapterConfig(placement="pfeiffer").non_linearity
    'relu'
    >>> AdapterConfig(placement="parallel")
    Traceback (most recent call last):
    ...
    ValueError: placement must be one of ['houlsby', 'pfeiffer'], got 'parallel'
    """

    placement: str = "houlsby"  # "houlsby": 2 adapters per layer; "pfeiffer": 1
    reduction_factor: int = 16  # m = d // reduction_factor ...
    bottleneck_size: int | None = None  # ... unless m is given here
    non_linearity: str | None = None  # None: "swish" for Houlsby, "relu" for Pfeiffer
    layer_norm: bool = False  # a LayerNorm on the adapter's input (adds 2 d parameters)
    num_labels: int | None = None  # a task head of its own (sequence classifiers); None: keep the model's
    target_modules: Targets | None = None  # override the sites (names or a regex); None: from the placement

    def __post_init__(self):
        one_of("placement", self.placement, sorted(PLACEMENTS))
        for name in ("reduction_factor", "bottleneck_size", "num_labels"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        self.non_linearity = self.non_linearity or DEFAULT_NON_LINEARITY[self.placement]
        one_of("non_linearity", self.non_linearity, sorted(ACTIVATIONS))

    def size(self, d: int) -> int:
        """The bottleneck width m for hidden size d."""
        return self.bottleneck_size or max(1, d // self.reduction_factor)


def adapter_num_parameters(d: int, m: int, layer_norm: bool = False) -> int:
    """Closed form for one adapter: ``W_down`` (m x d) + ``b_down`` (m) + ``W_up`` (d x m) + ``b_up`` (d).

    >>> adapter_num_parameters(384, 24)  # MiniLM, reduction factor 16
    18840
    """
    return 2 * d * m + d + m + (2 * d if layer_norm else 0)


class BottleneckAdapter(nn.Module):
    """``h + up(f(down(LN(h))))`` with ``up`` zero: the identity until it trains.

    >>> adapter = BottleneckAdapter(16, 4)
    >>> h = torch.randn(2, 3, 16)
    >>> torch.equal(adapter(h), h)
    True
    """

    def __init__(self, d: int, m: int, non_linearity: str = "relu", layer_norm: bool = False):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, m)  # default (Kaiming-uniform) init: the gradient reaches up at once
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(m, d)
        nn.init.zeros_(self.up.weight)  # up starts at zero, so the model is unchanged at step 0
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(self.layer_norm(h))))  # (B, T, d) -> (B, T, m) -> (B, T, d)


class AdapterLayer(nn.Module):
    """A frozen sublayer's last linear layer, followed by the active one of its named adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = NamedAdapters()  # task name -> BottleneckAdapter, and which one runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, name = self.base(x), self.adapters.active
        return h if name is None else self.adapters[name](h)


class TaskHeads(nn.Module):
    """A classifier head per adapter (tasks differ in their labels); the original head stays frozen."""

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.original = original
        self.heads = NamedAdapters()  # task name -> its head

    @property
    def running(self) -> nn.Linear:
        return self.original if self.heads.active is None else self.heads[self.heads.active]

    @property
    def num_labels(self) -> int:
        """The width of the head that runs now: :func:`peftlab.inject.set_adapter` gives it to the HF loss."""
        return self.running.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.running(x)


# --- model-level functions -------------------------------------------------------------------
def _sites(model: nn.Module, config: AdapterConfig) -> Targets:
    if config.target_modules is not None:
        return config.target_modules
    sites = targets_for(model, SITES, what="adapter sites",
                        hint="pass target_modules=[...] naming each sublayer's last linear layer")
    return "|".join(f"(?:{sites[i]})" for i in PLACEMENTS[config.placement])


def _out_features(module: nn.Module) -> int:
    base = module.base if isinstance(module, AdapterLayer) else module
    return base.nf if isinstance(base, Conv1D) else base.out_features


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def is_adapter_model(model: nn.Module) -> bool:
    """Whether ``model`` has bottleneck adapters."""
    return any(isinstance(m, AdapterLayer) for m in model.modules())


def apply_adapters(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and add a bottleneck adapter named ``adapter_name`` at every site (in place).

    Call again with another name to add a second task's adapters; the newest becomes active.

    >>> from peftlab.models import build_from_config
    >>> m = apply_adapters(build_from_config("tiny-llama"), AdapterConfig(reduction_factor=16))
    >>> from peftlab.inject import count_parameters
    >>> count_parameters(m)[0] == 2 * 2 * adapter_num_parameters(64, 4)  # 2 layers x 2 sites
    True
    """
    registry = model.__dict__.setdefault("adapters_config", {})
    if adapter_name in registry:
        raise ValueError(f"adapter {adapter_name!r} is already on this model; pick another name")
    if not registry:
        freeze(model)

    def add(name: str, module: nn.Module) -> nn.Module:
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        d, w = _out_features(module), next(layer.base.parameters())
        adapter = BottleneckAdapter(d, config.size(d), config.non_linearity, config.layer_norm)
        layer.adapters.add(adapter_name, adapter.to(device=w.device, dtype=w.dtype))
        return layer

    # ".base" is excluded so a regex cannot reach the linear layer inside an existing wrapper.
    replace_modules(model, _sites(model, config), add, types=(nn.Linear, Conv1D, AdapterLayer), exclude=["base"],
                    what="layer (adapters wrap a sublayer's last nn.Linear or Conv1D)")
    if config.num_labels is not None:
        _add_head(model, adapter_name, config.num_labels)
    registry[adapter_name] = config
    set_adapter(model, adapter_name)
    return model


def _classifier_head(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    return next(((n, m) for n, m in model.named_children() if n in CLASSIFIER_HEADS), (None, None))


def _add_head(model: nn.Module, adapter_name: str, num_labels: int) -> None:
    name, head = _classifier_head(model)
    if not isinstance(head, (nn.Linear, TaskHeads)):
        raise ValueError(f"num_labels needs a sequence classifier with a Linear head named one of "
                         f"{CLASSIFIER_HEADS}; {type(model).__name__} has none")
    if isinstance(head, nn.Linear):
        head = TaskHeads(head)
        setattr(model, name, head)
    original = head.original
    new = nn.Linear(original.in_features, num_labels, bias=original.bias is not None)
    new = new.to(device=original.weight.device, dtype=original.weight.dtype)
    if num_labels == original.out_features:  # same labels: start from the model's head (identity at step 0)
        new.load_state_dict(original.state_dict())
    else:  # a fresh head, initialised as transformers initialises BERT's
        nn.init.normal_(new.weight, std=getattr(model.config, "initializer_range", 0.02))
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    head.heads.add(adapter_name, new)


def unload_adapters(model: nn.Module) -> nn.Module:
    """Take every adapter and task head out: the bare frozen model again (a non-linear adapter cannot be merged)."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, (AdapterLayer, TaskHeads))]:
        parent, child = get_parent(model, name)
        setattr(parent, child, m.base if isinstance(m, AdapterLayer) else m.original)
        if isinstance(m, TaskHeads) and hasattr(model, "num_labels"):
            model.num_labels = model.config.num_labels = m.original.out_features
    model.__dict__.pop("adapters_config", None)
    return model


# --- files: one adapter alone (peftlab.files writes and reads the directory) -----------------------
def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor for one adapter: its bottlenecks at every site (``<site>.down.weight``...) and
    its head (``classifier.weight``...), if it has one."""
    out = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            out.update({f"{name}.{n}": p for n, p in layer.adapters[adapter_name].named_parameters()})
    name, head = _classifier_head(model)
    if isinstance(head, TaskHeads) and adapter_name in head.heads:
        out.update({f"{name}.{n}": p for n, p in head.heads[adapter_name].named_parameters()})
    return out


def _signature(model: nn.Module) -> dict:
    """What a saved adapter must agree with: the architecture it was trained on."""
    c = model.config
    return {"model_type": c.model_type, "hidden_size": getattr(c, "hidden_size", None) or getattr(c, "n_embd", None),
            "num_hidden_layers": getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)}


def save_adapters(model: nn.Module, path, adapter_name: str | None = None) -> int:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for one adapter (None: the only or the
    active one); return bytes written."""
    registry = getattr(model, "adapters_config", {})
    adapter_name = pick_adapter(model, registry, adapter_name)
    config = {"peft_type": PEFT_TYPE, **asdict(registry[adapter_name]), "base_model": _signature(model)}
    return files.write_adapter(path, config, adapter_tensors(model, adapter_name))


def load_adapters(model: nn.Module, path, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved at ``path`` to ``model`` under ``adapter_name`` (and make it active).

    Raises :class:`peftlab.files.AdapterFileError` (a ``ValueError``) when the file was made for
    another architecture or lacks tensors.
    """
    if adapter_name in getattr(model, "adapters_config", {}):
        raise ValueError(f"this model already has an adapter named {adapter_name!r}: load under another "
                         f"adapter_name")
    raw = files.read_config(path, PEFT_TYPE)
    files.check_fields(path, raw, {"base_model": _signature(model)})
    tensors = files.read_tensors(path)
    config = files.make_config(path, AdapterConfig, raw)
    with unchanged_on_error(model):  # a file that does not fit leaves the model as it was
        apply_adapters(model, config, adapter_name)
        files.copy_into(path, adapter_tensors(model, adapter_name), tensors)
    return model


files.register(PEFT_TYPE, save=save_adapters, load=load_adapters, applied=is_adapter_model)
save_adapter, load_adapter = save_adapters, load_adapters  # the names of earlier releases (exercise 3 uses them)
