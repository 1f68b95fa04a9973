"""Exercise 3 (adapters): the notebook's solutions behave like peftlab.adapters, plausible wrong answers lose points,
and nbgrader grades the solution, the untouched release and a partly wrong submission as expected (this assignment
alone)."""

import copy

import pytest
import torch
from torch import nn

from autograde import cells
from autograde.pipeline import PARTIAL, partial_submission
from peftlab import adapters as ref
from peftlab.checks import ex3 as checks_ex3
from peftlab.inject import count_parameters
from peftlab.models import build_from_config

NAME = "ex3_adapters"
# The partly wrong sample submission: set_adapter leaves every adapter trainable.
PARTIAL_EX3 = PARTIAL[NAME]


@pytest.fixture(autouse=True)
def _grading_env(monkeypatch):
    monkeypatch.setenv("PEFTLAB_GRADING", "1")


@pytest.fixture(scope="module")
def ns():
    return cells.namespace(cells.read_solution(NAME))


def _bert(dtype=torch.float32, **overrides):
    return checks_ex3.bert_model("tiny-bert", dtype, **overrides)


# --- no drift: the solution cells behave as peftlab.adapters ----------------------------------------
@pytest.mark.parametrize("d,rf,act,ln,dtype", [(384, 16, "relu", False, torch.float32), (7, 16, "swish", True,
                                                torch.float32), (21, 4, "gelu", True, torch.float64)])
def test_adapter_module_matches_peftlab(ns, d, rf, act, ln, dtype):
    m = ns["bottleneck_size"](d, rf)
    assert m == ref.AdapterConfig(reduction_factor=rf).size(d)
    assert ns["adapter_param_count"](d, m, layer_norm=ln) == ref.adapter_num_parameters(d, m, layer_norm=ln)
    torch.manual_seed(3)
    mine = ns["BottleneckAdapter"](d, m, act, layer_norm=ln).to(dtype)
    torch.manual_seed(3)
    theirs = ref.BottleneckAdapter(d, m, act, ln).to(dtype)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():  # same construction order: same random draws
        assert torch.equal(mine.state_dict()[key], value), key
    checks_ex3.randomize(theirs, seed=4)
    mine.load_state_dict(theirs.state_dict())
    h = torch.randn(3, 5, d, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(mine(h), theirs(h), rtol=0, atol=0)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("overrides", [{}, dict(hidden_size=21, num_attention_heads=3, intermediate_size=10)])
def test_add_adapters_matches_peftlab(ns, placement, overrides):
    mine, theirs = _bert(**overrides), _bert(**overrides)
    torch.manual_seed(5)
    names = ns["add_adapters"](mine, placement, adapter_name="task", reduction_factor=8, layer_norm=True)
    torch.manual_seed(5)
    ref.apply_adapters(theirs, ref.AdapterConfig(placement=placement, reduction_factor=8, layer_norm=True), "task")
    assert names == [n for n, _ in ref.adapter_layers(theirs)]
    assert count_parameters(mine)[:2] == count_parameters(theirs)[:2]
    for n in names:  # same sites in the same order: the same random draws, then the same trained-looking weights
        assert torch.equal(mine.get_submodule(n).adapters["task"].down.weight,
                           theirs.get_submodule(n).adapters["task"].down.weight)
        checks_ex3.randomize(theirs.get_submodule(n).adapters["task"], seed=6)
        mine.get_submodule(n).adapters["task"].load_state_dict(theirs.get_submodule(n).adapters["task"].state_dict())
    x = checks_ex3.token_ids(mine)
    with torch.no_grad():
        torch.testing.assert_close(mine(**x).logits, theirs(**x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement,sites", [("houlsby", 12), ("pfeiffer", 6)])
def test_add_adapters_on_the_real_minilm_tree(ns, placement, sites):
    mine = build_from_config("minilm-l6", task="classification", num_labels=3, device="meta")
    theirs = build_from_config("minilm-l6", task="classification", num_labels=3, device="meta")
    names = ns["add_adapters"](mine, placement)
    ref.apply_adapters(theirs, ref.AdapterConfig(placement=placement))
    assert names == [n for n, _ in ref.adapter_layers(theirs)] and len(names) == sites
    assert count_parameters(mine)[0] == count_parameters(theirs)[0] == sites * (2 * 384 * 24 + 384 + 24)


def test_set_adapter_matches_peftlab(ns):
    mine, theirs = _bert(), _bert()
    for name, placement in (("sentiment", "houlsby"), ("topic", "pfeiffer")):
        ns["add_adapters"](mine, placement, adapter_name=name)
        ref.apply_adapters(theirs, ref.AdapterConfig(placement=placement), name)
    for n, layer in ref.adapter_layers(theirs):
        for name, adapter in layer.adapters.items():
            checks_ex3.randomize(adapter, seed=7)
            mine.get_submodule(n).adapters[name].load_state_dict(adapter.state_dict())
    x = checks_ex3.token_ids(mine)
    for name in ("sentiment", "topic", "sentiment"):
        ns["set_adapter"](mine, name)
        ref.set_adapter(theirs, name)
        with torch.no_grad():
            torch.testing.assert_close(mine(**x).logits, theirs(**x).logits, rtol=0, atol=1e-6)
        assert {n for n, p in mine.named_parameters() if p.requires_grad} == \
            {n for n, p in theirs.named_parameters() if p.requires_grad}
    ns["set_adapter"](mine, None)
    with torch.no_grad(), ref.disable_adapters(theirs):
        torch.testing.assert_close(mine(**x).logits, theirs(**x).logits, rtol=0, atol=1e-6)


# --- plausible wrong answers lose points ---------------------------------------------------------------
CHEAT_MODULE = '''
from peftlab.adapters import BottleneckAdapter, adapter_num_parameters as adapter_param_count
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
def bottleneck_size(d, reduction_factor=16):
    return max(1, d // reduction_factor)
'''
CHEAT_INSERT = '''
import peftlab.adapters as _ref
AdapterLayer = _ref.AdapterLayer
def add_adapters(model, placement="houlsby", adapter_name="default", reduction_factor=16, non_linearity=None,
                 layer_norm=False):
    _ref.apply_adapters(model, _ref.AdapterConfig(placement=placement, reduction_factor=reduction_factor,
                        non_linearity=non_linearity, layer_norm=layer_norm), adapter_name)
    return [n for n, _ in _ref.adapter_layers(model)]
'''
MUTANTS = [  # (cell, old, new or None for a whole-cell replacement, the check that must fail)
    ("adapter_module", "return h + self.up(", "return self.up(", "check_adapter_layer"),  # no residual
    ("adapter_module", "        nn.init.zeros_(self.up.weight)", "        pass", "check_adapter_layer"),
    ("adapter_module", "self.down = nn.Linear(d, m)", "self.down = nn.Linear(d, m); nn.init.zeros_(self.down.weight)",
     "check_adapter_layer"),
    ("adapter_module", "return 2 * d * m + d + m + (2 * d if layer_norm else 0)", "return 2 * d * m + d + m",
     "check_adapter_layer"),
    ("adapter_module", "return max(1, d // reduction_factor)", "return d // reduction_factor", "check_adapter_layer"),
    ("adapter_module", "self.down(self.layer_norm(h))", "self.down(h)", "check_adapter_forward"),
    ("adapter_module", "self.act = ACTIVATIONS[non_linearity]()", "self.act = nn.ReLU()", "check_adapter_forward"),
    ("adapter_module", None, CHEAT_MODULE, "check_adapter_layer"),
    ("insertion", "    for p in model.parameters():\n        p.requires_grad_(False)\n", "", "check_houlsby_pfeiffer"),
    ("insertion", 'if placement == "houlsby" else ["output.dense"]', "", "check_houlsby_pfeiffer"),  # both sites
    ("insertion", '["attention.output.dense", "output.dense"] if', '["attention.output.dense"] if',
     "check_houlsby_pfeiffer"),
    ("insertion", '{"houlsby": "swish", "pfeiffer": "relu"}', '{"houlsby": "relu", "pfeiffer": "relu"}',
     "check_houlsby_pfeiffer"),
    ("insertion", "adapter.to(device=w.device, dtype=w.dtype)", "adapter.to(device=w.device)",
     "check_houlsby_pfeiffer"),
    ("insertion", "            module.active = adapter_name", "            pass", "check_houlsby_pfeiffer"),
    ("insertion", "if self.active in self.adapters else h", "if self.active is not None else h",
     "check_multitask_switch"),  # a site without the active task must run its base alone
    ("insertion", None, CHEAT_INSERT, "check_houlsby_pfeiffer"),
    ("switch", "adapter.requires_grad_(key == name)", "adapter.requires_grad_(True)", "check_multitask_switch"),
    ("switch", "raise ValueError(", "print(", "check_multitask_switch"),
    ("switch", "layer.active = name", "layer.active = name or layer.active", "check_multitask_switch"),
]


@pytest.mark.slow  # runs the graded cells of a notebook (seconds per run): make test, not make quick
@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: f"{m[0]}:{(m[1] or 'cheat').strip()[:30]}")
def test_plausible_wrong_answer_loses_points(mutant):
    cell_id, old, new, must_fail = mutant
    nb = cells.read_solution(NAME)
    source = cells.mutate(cells.solution_cells(nb)[cell_id], old, new, cell_id)
    results = cells.run_graded(nb, replace={cell_id: source})
    points = cells.graded_cells(nb)
    assert not results[must_fail], f"{must_fail} still passes"
    assert sum(points[c] for c, ok in results.items() if ok) < sum(points.values())


@pytest.mark.slow
def test_solution_gets_every_point_and_the_stubs_none():
    nb = cells.read_solution(NAME)
    results = cells.run_graded(nb)
    assert results and all(results.values()), results
    stubs = {c: cells.CODE_STUB for c in cells.solution_cells(nb)}
    assert not any(cells.run_graded(nb, replace=stubs).values())


@pytest.mark.slow
def test_partial_submission_fails_exactly_the_expected_checks():
    """The sample built by autograde.pipeline.partial_submission (as `python -m autograde release` builds it)."""
    nb = cells.read_solution(NAME)
    release = copy.deepcopy(nb)  # the solution cells are all replaced below, as in the real release
    example = partial_submission(nb, release, PARTIAL_EX3)
    student = {c.id: c.source for c in example.cells if c.metadata.get("nbgrader", {}).get("solution")}
    assert all("### BEGIN SOLUTION" not in student[c] for c in ("adapter_module", "insertion", "switch"))
    assert student["answer_3_1"] == PARTIAL_EX3["answers"]["answer_3_1"]
    results = cells.run_graded(nb, replace=cells.submission(nb, example))
    assert sorted(c for c, ok in results.items() if not ok) == PARTIAL_EX3["failing"]


# The nbgrader round trip of this assignment (solution, untouched, partial) is tests/course/test_course.py's,
# which grades every assignment listed in autograde.pipeline.PARTIAL.


def test_checkers_reject_a_module_without_the_spec_names():
    """A student module with other attribute names gets a clear failure, not a crash inside the checker."""

    class Renamed(nn.Module):
        def __init__(self, d, m, non_linearity="relu", layer_norm=False):
            super().__init__()
            self.a, self.b = nn.Linear(d, m), nn.Linear(m, d)

        def forward(self, h):
            return h + self.b(torch.relu(self.a(h)))

    with pytest.raises(AssertionError, match="check"):
        checks_ex3.check_adapter_layer(Renamed, lambda d, rf: max(1, d // rf), lambda d, m, layer_norm=False: 0)
    with pytest.raises(AssertionError, match="state_dict keys"):
        checks_ex3.check_adapter_forward(Renamed)
