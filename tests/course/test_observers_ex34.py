"""The observers of exercises 3 and 4 (autograde/observe/ex3.py, ex4.py) answer as the checkers judge.

For every checker call of the two solution notebooks' check cells (autograde.plan):
1. two fresh runs of the solution on the same salt give the same observation;
2. another salt changes the observation wherever the checker draws random inputs;
3. each plausible wrong answer of tests/course/test_ex3_notebook.py (MUTANTS), test_ex4_notebook.py (WRONG) and
   the partly wrong sample of autograde.pipeline.PARTIAL changes the observation of a call of each check cell it
   must fail (or makes it raise); the sample's other cells observe as the solution's;
4. an alternative correct implementation of every graded cell, written differently, observes as the solution;
5. the observer modules import no peftlab; 6. every call takes < 1.5 s.
"""

import ast
import functools
import importlib.util
import time
from pathlib import Path

import pytest

from autograde import cells, plan
from autograde.observe import core, run_call
from autograde.pipeline import PARTIAL

HERE = Path(__file__).parent
OBSERVE = Path(core.__file__).parent
EX3, EX4 = "ex3_adapters", "ex4_prefix_prompt"
SALT, OTHER_SALT = 20240613, 7
CHECKS = {EX3: {"check_adapter_layer", "check_adapter_forward", "check_add_adapters", "check_set_adapter"},
          EX4: {"check_prefix_kv", "check_gqa_shapes", "check_extend_mask", "check_prefix_forward",
                "check_soft_prompt_init", "check_soft_prompt_too_long", "check_soft_prompt_forward"}}
NO_RANDOM_INPUT = {"check_gqa_shapes", "check_soft_prompt_too_long"}  # a config, or an exception's name only


@functools.cache
def _nb(name: str):
    return cells.read_solution(name)


def _calls(name: str) -> dict[str, list[plan.Call]]:
    """``{check cell: its calls}`` of the checkers owned here."""
    out = {}
    for cell, (calls, _) in plan.notebook_plan(_nb(name)).items():
        mine = [c for c in calls if c.check in CHECKS[name]]
        if mine:
            out[cell] = mine
    return out


CALLS = [(name, cell, i) for name in CHECKS for cell, calls in _calls(name).items() for i in range(len(calls))]


def _call(name: str, cell: str, i: int) -> plan.Call:
    return _calls(name)[cell][i]


def _namespace(name: str, replace: dict[str, str] | None = None) -> dict:
    return cells.namespace(_nb(name), replace, prelude=core.PRELUDE)


@functools.cache
def _solution_ns(name: str) -> dict:
    return _namespace(name)


@functools.cache
def _solution_obs(name: str, cell: str, i: int, salt: int = SALT):
    return run_call(_solution_ns(name), _call(name, cell, i), salt)


def _differs(name: str, ns: dict | Exception, cell: str) -> bool:
    """Whether some call of check cell ``cell`` observes differently on ``ns`` (or raises) than on the solution."""
    if isinstance(ns, Exception):  # the cells themselves failed to run: every call fails
        return True
    for i, call in enumerate(_calls(name)[cell]):
        try:
            got = run_call(ns, call, SALT)
        except Exception:  # noqa: BLE001 - a call that raises fails, as a different answer does
            return True
        if core.compare(_solution_obs(name, cell, i), got, core.TOLERANCES[call.check]):
            return True
    return False


def _mutated(name: str, edits: dict[str, list[tuple[str | None, str]]], undone=()) -> dict | Exception:
    sources = cells.solution_cells(_nb(name))
    replace = {cell: cells.stub(sources[cell]) for cell in undone}
    for cell, changes in edits.items():
        src = sources[cell]
        for old, new in changes:
            src = cells.mutate(src, old, new, cell)
        replace[cell] = src
    try:
        return _namespace(name, replace)
    except Exception as e:  # noqa: BLE001 - a mutant may break its cell outright
        return e


def _load(path: Path, module: str):
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- 1, 2, 6: the solution observes the same twice, the salt matters, and it is quick -------------------
@pytest.mark.parametrize("name,cell,i", CALLS, ids=lambda x: str(x))
def test_solution_observes_the_same_twice_and_quickly(name, cell, i):
    call = _call(name, cell, i)
    first = run_call(_namespace(name), call, SALT)
    start = time.process_time()  # CPU time: the machine's other jobs do not count
    second = run_call(_namespace(name), call, SALT)
    took = time.process_time() - start
    assert core.compare(first, second, core.TOLERANCES[call.check]) == []
    assert core.compare(first, core.decode(core.encode(first))) == []  # plain data, as the worker sends it
    assert took < 1.5, f"{call.label()} took {took:.2f} s of CPU"


@pytest.mark.parametrize("check", sorted(set().union(*CHECKS.values()) - NO_RANDOM_INPUT))
def test_another_salt_changes_the_observation(check):
    found = [(name, cell, i) for name, cell, i in CALLS if _call(name, cell, i).check == check]
    assert found, f"no call of {check} in the notebooks"
    changed = [k for k in found if core.compare(_solution_obs(*k), _solution_obs(*k, salt=OTHER_SALT))]
    assert changed, f"{check}: the salt changes no observation"


# --- 3: the wrong answers the checkers catch change the observation ---------------------------------------
EX3_MUTANTS = _load(HERE / "test_ex3_notebook.py", "_ex3_notebook_mutants").MUTANTS
EX4_WRONG = _load(HERE / "test_ex4_notebook.py", "_ex4_notebook_wrong").WRONG
# Whole-cell replacements (old None) import peftlab: the own-work check's job, not the observers'.
MUTANTS = [(EX3, cell, [(old, new)], [must_fail]) for cell, old, new, must_fail in EX3_MUTANTS if old is not None]
MUTANTS += [(EX4, cell, [change], failing) for cell, change, failing in EX4_WRONG.values()]


@pytest.mark.slow  # re-runs a mutated notebook's cells and observers per wrong answer: make test, not make quick
@pytest.mark.parametrize("name,cell,changes,failing", MUTANTS, ids=lambda x: str(x)[:40])
def test_wrong_answer_changes_the_observation(name, cell, changes, failing):
    ns = _mutated(name, {cell: changes})
    assert [c for c in failing if not _differs(name, ns, c)] == []


@pytest.mark.parametrize("name", [EX3, EX4])
def test_partial_sample_changes_exactly_its_failing_cells(name):
    spec = PARTIAL[name]
    ns = _mutated(name, spec["edits"], spec["undone"])
    differing = sorted(c for c in _calls(name) if _differs(name, ns, c))
    assert differing == sorted(c for c in spec["failing"] if c in _calls(name))


# --- 4: other correct implementations observe as the solution ------------------------------------------
ALTERNATIVE = {EX3: {
    "adapter_module": '''
ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "swish": F.silu}
def bottleneck_size(d, reduction_factor=16):
    return d // reduction_factor if d >= reduction_factor else 1
def adapter_param_count(d, m, layer_norm=False):
    n = (d + 1) * m + (m + 1) * d
    return n + 2 * d if layer_norm else n
class BottleneckAdapter(nn.Module):
    def __init__(self, d, m, non_linearity="relu", layer_norm=False):
        super().__init__()
        self.layer_norm = nn.LayerNorm(d) if layer_norm else None
        self.down = nn.Linear(d, m)
        nn.init.kaiming_normal_(self.down.weight)  # another random init
        self.act = ACTIVATIONS[non_linearity]  # a function, not a module
        self.up = nn.Linear(m, d)
        with torch.no_grad():
            self.up.weight.mul_(0.0)
            self.up.bias.fill_(0.0)
    def forward(self, h):
        z = h if self.layer_norm is None else self.layer_norm(h)
        z = self.act(torch.einsum("...d,md->...m", z, self.down.weight) + self.down.bias)
        return torch.einsum("...m,dm->...d", z, self.up.weight) + self.up.bias + h
''',
    "insertion": '''
import re
class AdapterLayer(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.adapters, self.active = base, nn.ModuleDict(), None
    def forward(self, x):
        h = self.base(x)
        if self.active is None or self.active not in self.adapters:
            return h
        return self.adapters[self.active](h)
def add_adapters(model, placement="houlsby", adapter_name="default", reduction_factor=16, non_linearity=None,
                 layer_norm=False):
    wanted = {"houlsby": ("attention.output.dense", "output.dense"), "pfeiffer": ("output.dense",)}
    if placement not in wanted:
        raise ValueError(placement)
    act = non_linearity if non_linearity is not None else ("swish" if placement == "houlsby" else "relu")
    model.requires_grad_(False)
    sites = []
    for name, module in list(model.named_modules()):
        found = re.fullmatch(r"bert\\.encoder\\.layer\\.(\\d+)\\.(.+)", name)
        if not found or found.group(2) not in wanted[placement]:
            continue
        if not isinstance(module, AdapterLayer):
            parent, child = name.rsplit(".", 1)
            module = AdapterLayer(module)
            model.get_submodule(parent).add_module(child, module)
        d = module.base.weight.shape[0]
        module.adapters[adapter_name] = BottleneckAdapter(d, bottleneck_size(d, reduction_factor), act,
                                                          layer_norm).to(module.base.weight)
        sites.append(name)
    model.apply(lambda m: setattr(m, "active", adapter_name) if isinstance(m, AdapterLayer) else None)
    return sites
''',
    "switch": '''
def set_adapter(model, name):
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    names = {key for layer in layers for key in layer.adapters.keys()}
    if name is not None and name not in names:
        raise ValueError(f"no adapter {name!r}: {sorted(names)}")
    for layer in layers:
        layer.active = name
        for key in layer.adapters:
            for p in layer.adapters[key].parameters():
                p.requires_grad = key == name
''',
}, EX4: {
    "prefix_kv": '''
class PrefixKV(nn.Module):
    def __init__(self, config, num_virtual_tokens):
        super().__init__()
        heads = config.num_attention_heads
        kv = config.num_key_value_heads if getattr(config, "num_key_value_heads", None) is not None else heads
        hd = config.head_dim if getattr(config, "head_dim", None) else config.hidden_size // heads
        shape = (config.num_hidden_layers, 2, kv, num_virtual_tokens, hd)
        self.prefix = nn.Parameter(torch.empty(shape).normal_(0.0, 0.02))
    def forward(self, batch_size):
        return tuple((self.prefix[i, 0].unsqueeze(0).repeat(batch_size, 1, 1, 1),
                      self.prefix[i, 1].unsqueeze(0).repeat(batch_size, 1, 1, 1)) for i in range(len(self.prefix)))
''',
    "extend_mask": '''
def extend_attention_mask(attention_mask, num_virtual_tokens):
    B, T = attention_mask.shape
    out = torch.ones(B, num_virtual_tokens + T, dtype=attention_mask.dtype, device=attention_mask.device)
    out[:, num_virtual_tokens:] = attention_mask
    return out
''',
    "prefix_forward": '''
import inspect
def prefix_forward(base, prefix, input_ids, attention_mask):
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix(input_ids.shape[0])):
        cache.update(k, v, i)
    backbone = getattr(base, "base_model", base)
    key = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    out = base(input_ids=input_ids, attention_mask=extend_attention_mask(attention_mask, prefix.prefix.size(3)),
               **{key: cache})
    return out["logits"]
''',
    "soft_prompt": '''
class SoftPrompt(nn.Module):
    def __init__(self, embedding, num_virtual_tokens, init_ids=None):
        super().__init__()
        for p in embedding.parameters():
            p.requires_grad = False
        self.embedding = embedding
        w = embedding.weight
        if init_ids is None:
            prompt = torch.rand(num_virtual_tokens, w.shape[1], dtype=w.dtype, device=w.device) - 0.5
        else:
            if len(init_ids) > num_virtual_tokens:
                raise ValueError("init text longer than the prompt")
            idx = torch.tensor(list(init_ids))[torch.arange(num_virtual_tokens) % len(init_ids)]
            prompt = F.embedding(idx, w).clone()
        self.prompt = nn.Parameter(prompt)
    def forward(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        P = self.prompt.shape[0]
        embeds = torch.cat([self.prompt.expand(B, P, -1), F.embedding(input_ids, self.embedding.weight)], 1)
        if attention_mask is None:
            attention_mask = input_ids.new_ones(B, T)
        return embeds, F.pad(attention_mask, (P, 0), value=1)
''',
}}


@pytest.mark.parametrize("name", [EX3, EX4])
def test_alternative_implementations_observe_as_the_solution(name):
    assert set(ALTERNATIVE[name]) == set(cells.solution_cells(_nb(name)))  # every graded cell has one
    ns = _namespace(name, ALTERNATIVE[name])
    for cell, calls in _calls(name).items():
        for i, call in enumerate(calls):
            got = run_call(ns, call, SALT)
            assert core.compare(_solution_obs(name, cell, i), got, core.TOLERANCES[call.check]) == [], call.label()


# --- 5: the observers can run where peftlab is not -------------------------------------------------------
@pytest.mark.parametrize("module", ["ex3.py", "ex4.py"])
def test_observers_import_only_torch_transformers_and_the_standard_library(module):
    allowed = {"__future__", "collections", "torch", "transformers"}
    for node in ast.walk(ast.parse((OBSERVE / module).read_text())):
        if isinstance(node, ast.Import):
            assert {a.name.split(".")[0] for a in node.names} <= allowed
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module.split(".")[0] in allowed, node.module
