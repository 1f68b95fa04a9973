"""The observers of exercises 1 and 2 (``autograde/observe/ex1.py``, ``ex2.py``): one answer for every correct
implementation, another for every wrong one the checkers catch, the salt in the inputs, no peftlab, fast.

Each test runs the observers in-process on namespaces built as the sandboxed worker builds them (the solution cells
after ``observe.core.PRELUDE``, no setup cell), for every call of the check cells of ``solutions/``.
"""

import ast
import functools
import time
from pathlib import Path

import pytest
from course.test_course import MUTANTS, _lora_layer_shapes_swapped  # tests/ is on sys.path (conftest.py)

from autograde import cells, plan
from autograde.observe import core, run_call
from autograde.pipeline import PARTIAL

ROOT = Path(__file__).resolve().parents[2]
ASSIGNMENTS = ("ex1_motivation", "ex2_lora")
MODULES = [ROOT / "autograde" / "observe" / f"{m}.py" for m in ("ex1", "ex2")]
NO_RANDOM_INPUT = {"check_add_lora_no_match", "check_hf_lora"}  # their checkers draw nothing at random
SALT, OTHER_SALT = 20_260_613, 7


@functools.cache
def notebook(name: str):
    return cells.read_solution(name, ROOT)


@functools.cache
def cell_calls(name: str) -> dict[str, list[plan.Call]]:
    return {cell: calls for cell, (calls, _) in plan.notebook_plan(notebook(name)).items()}


CALLS = [(a, cell, i, c) for a in ASSIGNMENTS for cell, calls in cell_calls(a).items() for i, c in enumerate(calls)]


def ns_of(name: str, replace: dict[str, str] | None = None) -> dict:
    return cells.namespace(notebook(name), replace, prelude=core.PRELUDE)


def differs(check: str, expected, got) -> list[str]:
    return core.compare(expected, got, core.TOLERANCES[check])


@functools.cache
def solution_obs(name: str, salt: int = SALT) -> dict[tuple[str, int], object]:
    ns = ns_of(name)
    return {(cell, i): run_call(ns, c, salt) for cell, calls in cell_calls(name).items() for i, c in enumerate(calls)}


def cells_that_differ(name: str, replace: dict[str, str], only: tuple[str, ...] | None = None) -> set[str]:
    """The check cells (of ``only``, else all) where some call observes otherwise than on the solution, or raises
    (the call then fails)."""
    wanted = {c: calls for c, calls in cell_calls(name).items() if only is None or c in only}
    try:
        ns = ns_of(name, replace)
    except Exception:  # noqa: BLE001 - a submission whose cells do not run fails every check
        return set(wanted)
    out = set()
    for cell, calls in wanted.items():
        for i, c in enumerate(calls):
            try:
                if differs(c.check, solution_obs(name)[cell, i], run_call(ns, c, SALT)):
                    out.add(cell)
            except Exception:  # noqa: BLE001
                out.add(cell)
    return out


# 1. + 6.: two fresh namespaces of the solution, one salt: the same (plain) observation, quickly ------------------
@pytest.mark.parametrize("assignment, cell, i, call", CALLS, ids=lambda v: v.label() if isinstance(v, plan.Call)
                         else str(v))
def test_solution_observed_twice_is_the_same_and_fast(assignment, cell, i, call):
    first = solution_obs(assignment)[cell, i]  # also warms the imports (transformers' models, peft)
    start = time.perf_counter()
    again = run_call(ns_of(assignment), call, SALT)
    elapsed = time.perf_counter() - start
    assert differs(call.check, first, again) == []
    assert differs(call.check, first, core.decode(core.encode(again))) == []  # plain data: survives the wire
    assert elapsed < 1.5, f"{call.label()} took {elapsed:.2f} s"


# 2. the salt changes the inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("check", sorted({c.check for *_, c in CALLS} - NO_RANDOM_INPUT))
def test_another_salt_changes_some_observation(check):
    mine = [(a, cell, i, c) for a, cell, i, c in CALLS if c.check == check]
    assert any(differs(check, solution_obs(a)[cell, i], solution_obs(a, OTHER_SALT)[cell, i]) for a, cell, i, _ in mine)


# 3. every plausible wrong answer of test_course.py, and PARTIAL's bugs, change the observation of their cell ------
def mutant_source(assignment: str, cell_id: str, old, new) -> str:
    source = next(c.source for c in notebook(assignment).cells if c.id == cell_id)
    return _lora_layer_shapes_swapped(source) if old == "swap" else cells.mutate(source, old, new, cell_id)


MORE_MUTANTS = [  # wrong answers that the checkers catch and test_course.py does not list
    ("ex2_lora", "lora_layer", "out = self.base(x)", "out = x @ self.base.weight.T", "check_lora_forward"),
    ("ex2_lora", "lora_layer", "return (self.lora_B @ self.lora_A) * self.scaling", "return self.lora_B @ self.lora_A",
     "check_lora_forward"),
    ("ex2_lora", "lora_layer", "torch.empty(r, k, **like)", "torch.empty(r, k)", "check_lora_init"),  # always fp32
    ("ex2_lora", "lora_layer", "self.base = base", "self.base = nn.Linear(base.in_features, base.out_features)",
     "check_lora_init"),
    ("ex2_lora", "make_hf_lora", "task_type=TaskType.SEQ_CLS, ", "", "check_hf_lora"),
    ("ex2_lora", "lora_counts", "total += lora_param_count", "total += 2 * lora_param_count", "check_lora_counts"),
    ("ex1_motivation", "full_finetune_bytes", "master = 4 if weight_bytes < 4 else 0",
     "master = 4 if weight_bytes == 2 else 0\n    n_params = min(n_params, 10**9)", "check_full_finetune_bytes"),
]
OUR_MUTANTS = [m for m in MUTANTS + [("ex2_lora", "lora_layer", "swap", "shapes", "check_lora_init")] + MORE_MUTANTS
               if m[0] in ASSIGNMENTS and m[2] is not None]  # whole-cell cheats (old None): the own-work check's job


@pytest.mark.parametrize("mutant", OUR_MUTANTS, ids=lambda m: f"{m[1]}:{m[2][:30]}")
def test_plausible_wrong_answer_changes_the_observation(mutant):
    assignment, cell_id, old, new, must_fail = mutant
    replace = {cell_id: mutant_source(assignment, cell_id, old, new)}
    assert cells_that_differ(assignment, replace, only=(must_fail,)) == {must_fail}


def partial_replace(spec: dict, nb) -> dict[str, str]:
    """pipeline.partial_submission's edits on the solution: its bugs, and its undone cells as released stubs."""
    out = {}
    for c in nb.cells:
        if c.id in spec["undone"]:
            out[c.id] = cells.stub(c.source)
        for old, new in spec["edits"].get(c.id, []):
            out[c.id] = cells.student_source(out.get(c.id, c.source)).replace(old, new)
    return out


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_partial_submission_differs_exactly_where_it_should_fail(assignment):
    spec = PARTIAL[assignment]
    assert cells_that_differ(assignment, partial_replace(spec, notebook(assignment))) == set(spec["failing"])


@pytest.mark.slow  # runs the in-kernel checkers of the whole notebook per mutant
@pytest.mark.parametrize("mutant", OUR_MUTANTS, ids=lambda m: f"{m[1]}:{m[2][:30]}")
def test_observers_fail_the_same_cells_as_the_checkers(mutant, monkeypatch):
    monkeypatch.setenv("PEFTLAB_GRADING", "1")
    assignment, cell_id, old, new, _ = mutant
    replace = {cell_id: mutant_source(assignment, cell_id, old, new)}
    verdicts = cells.run_graded(notebook(assignment), replace=replace)
    assert cells_that_differ(assignment, replace) == {c for c, ok in verdicts.items() if not ok}


# 4. other correct implementations, written differently: the same observations ---------------------------------
ALTERNATIVE = {
    "ex1_motivation": {
        "bert_param_count": '''
def bert_param_count(config):
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out
    norm = lambda n: 2 * n
    h, i = config.hidden_size, config.intermediate_size
    total = sum(n * h for n in (config.vocab_size, config.max_position_embeddings, config.type_vocab_size)) + norm(h)
    for _ in range(config.num_hidden_layers):
        total += sum(linear(h, h) for _ in "qkvo") + norm(h) + linear(h, i) + linear(i, h) + norm(h)
    return total + linear(h, h)
''',
        "full_finetune_bytes": '''
def full_finetune_bytes(n_params, weight_bytes=4):
    per_param = 2.0 * weight_bytes + 2 * 4.0 + (4.0 if weight_bytes != 4 else 0.0)
    return n_params * per_param  # a float, as == sees it: the same answer
''',
        "storage_bytes": '''
def storage_bytes(n_params, n_tasks, adapter_params, bytes_per_param=2):
    per_task = [n_params * bytes_per_param] * n_tasks
    return [sum(per_task), n_params * bytes_per_param + n_tasks * adapter_params * bytes_per_param]
''',
    },
    "ex2_lora": {
        "lora_layer": '''
class LoRALinear(nn.Module):
    def __init__(self, base, r, lora_alpha, lora_dropout=0.0):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.r, self.scaling = base, r, float(lora_alpha) / r
        w = base.weight
        bound = 1.0 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(w.new_empty(r, base.in_features).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(w.new_zeros(base.out_features, r))
        self.dropout = nn.Dropout(p=lora_dropout)
        self.merged = False

    def delta_weight(self):
        return torch.einsum("dr,rk->dk", self.lora_B, self.lora_A).mul(self.scaling)

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.base.weight, self.base.bias)
        if self.training and self.dropout.p > 0:
            low = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
            return F.linear(x, self.base.weight, self.base.bias) + self.scaling * low
        return F.linear(x, self.base.weight + self.delta_weight(), self.base.bias)  # one matmul
''',
        "lora_counts": '''
def lora_param_count(d, k, r):
    return d * r + r * k


def count_lora_params(model, target_modules, r):
    shapes = [m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and any(n.split(".")[-len(t.split(".")):] == t.split(".") for t in target_modules)]
    return sum(lora_param_count(d, k, r) for d, k in shapes)
''',
        "add_lora": '''
def add_lora(model, target_modules, r=8, lora_alpha=16.0):
    model.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in target_modules)]
    if not found:
        raise ValueError(f"nothing matches {target_modules}")
    for name, layer in found:
        *path, leaf = name.split(".")
        parent = model
        for step in path:
            parent = getattr(parent, step)
        setattr(parent, leaf, LoRALinear(layer, r, lora_alpha))
    return [n for n, _ in found]
''',
        "merge": '''
def merge_lora(model):
    for layer in [m for m in model.modules() if isinstance(m, LoRALinear)]:
        if not layer.merged:
            layer.base.weight.data.add_(layer.delta_weight().detach())
            layer.merged = True
    return model


def unmerge_lora(model):
    for layer in [m for m in model.modules() if isinstance(m, LoRALinear)]:
        if layer.merged:
            layer.base.weight.data = layer.base.weight.data - layer.delta_weight().detach()
            layer.merged = False
    return model
''',
        "make_hf_lora": '''
def make_hf_lora(model):
    import peft
    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16.0,
                                                      target_modules={"value", "query"}))
''',
        "lora_state": '''
def lora_state_dict(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()
            if n.split(".")[-1] in ("lora_A", "lora_B")}


def load_lora_state_dict(model, state):
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise ValueError(f"unknown keys {unknown[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
    return model
''',
    },
}


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_other_correct_implementations_observe_the_same(assignment):
    graded = {c.id for c in notebook(assignment).cells if c.metadata.get("nbgrader", {}).get("solution")
              and c.cell_type == "code"}
    assert set(ALTERNATIVE[assignment]) == graded  # one alternative for every cell a student writes
    assert cells_that_differ(assignment, ALTERNATIVE[assignment]) == set()


# 5. observers import no peftlab (the worker has none) ---------------------------------------------------------
@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_observer_module_imports_only_torch_transformers_stdlib_and_core(path):
    allowed = {"__future__", "math", "numbers", "collections", "torch", "transformers"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            assert {a.name.split(".")[0] for a in node.names} <= allowed, ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert (node.level == 1 and node.module in ("core", "ex1")) or \
                (node.level == 0 and node.module.split(".")[0] in allowed), ast.unparse(node)
        elif isinstance(node, ast.Name):
            assert node.id not in ("__import__", "importlib", "exec", "eval"), node.id
