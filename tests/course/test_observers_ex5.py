"""The observers of exercise 5 (autograde/observe/ex5.py): the same answer for every correct implementation, a
different one for every wrong answer the peftlab checkers catch (test_ex5_notebook.py's MUTANTS, the partial sample's
bugs), fast, and without peftlab.
"""

import ast
import contextlib
import importlib.util
import io
import time
from pathlib import Path

import pytest
import torch

from autograde import cells, pipeline, plan
from autograde.observe import TOLERANCES, compare, core, run_call
from autograde.observe import ex5 as obs5

ROOT = Path(__file__).resolve().parents[2]
NB = cells.read_solution("ex5_qlora", ROOT)
CHECKS = ("check_blockwise_quant", "check_nf4_codebook", "check_double_quant_bits", "check_linear4bit")
CALLS = [(cell, c) for cell, (calls, _) in plan.notebook_plan(NB).items() for c in calls if c.check in CHECKS]
SALT = 20250613
RANDOM = ("check_blockwise_quant", "check_linear4bit")  # the checkers with random inputs


def namespace(replace=None):
    return cells.namespace(NB, replace, prelude=core.PRELUDE)


@pytest.fixture(scope="module")
def expected():
    ns = namespace()
    return {c.label(): run_call(ns, c, SALT) for _, c in CALLS}


def differs(ns, call, want) -> bool:
    """The student's observation differs from the solution's, or the call raised (the call fails)."""
    try:
        got = run_call(ns, call, SALT)
    except Exception:  # noqa: BLE001 - a raising call fails, as the checker's does
        return True
    return bool(compare(want, got, TOLERANCES[call.check]))


def test_every_checker_of_ex5_has_calls():
    assert {c.check for _, c in CALLS} == set(CHECKS)


# --- 1. the solution, twice, in fresh namespaces; 6. fast -----------------------------------------------------------
@pytest.mark.parametrize("call", [c for _, c in CALLS], ids=lambda c: c.label()[:90])
def test_solution_twice_gives_the_same_answer_fast(expected, call):
    ns = namespace()
    start = time.perf_counter()
    got = run_call(ns, call, SALT)
    assert time.perf_counter() - start < 1.5
    assert compare(expected[call.label()], got, TOLERANCES[call.check]) == []
    wire = core.decode(core.encode(got))  # what the worker sends survives the trip
    assert compare(got, wire, TOLERANCES[call.check]) == []


# --- 2. the salt changes the random inputs -------------------------------------------------------------------------
@pytest.mark.parametrize("call", [c for _, c in CALLS if c.check in RANDOM], ids=lambda c: c.label()[:90])
def test_another_salt_gives_other_inputs(expected, call):
    other = run_call(namespace(), call, SALT + 1)
    assert compare(expected[call.label()], other, TOLERANCES[call.check])


# --- 3. every wrong answer the checkers catch changes the observation -------------------------------------------------
def _load_tests(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "course" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MUTANTS = _load_tests("test_ex5_notebook").MUTANTS


def _calls_of(check_cell: str):
    return [c for cell, c in CALLS if cell == check_cell]


@pytest.mark.parametrize("mutant", [m for m in MUTANTS if m[1] is not None],  # old None: a whole-cell cheat that
                         ids=lambda m: f"{m[0]}:{m[1][:40]}")  # imports peftlab: the own-work checker's job
def test_mutant_changes_the_observation(expected, mutant):
    cell_id, old, new, must_fail = mutant
    source = cells.mutate(cells.solution_cells(NB)[cell_id], old, new, cell_id)
    ns = namespace({cell_id: source})
    if must_fail is None:  # a harmless variant: the same answer everywhere
        for _, c in CALLS:
            assert not differs(ns, c, expected[c.label()]), c.label()
        return
    assert any(differs(ns, c, expected[c.label()]) for c in _calls_of(must_fail)), f"{must_fail} still passes"


def test_partial_sample_bugs_change_the_observation(expected):
    spec = pipeline.PARTIAL["ex5_qlora"]
    replace = {}
    for cell_id, source in cells.solution_cells(NB).items():
        if cell_id in spec["undone"]:
            replace[cell_id] = cells.stub(source)
        else:
            replace[cell_id] = cells.student_source(source)
            for old, new in spec["edits"].get(cell_id, []):
                replace[cell_id] = cells.mutate(replace[cell_id], old, new, cell_id)
    ns = namespace(replace)
    for check_cell in {cell for cell, _ in CALLS}:
        failed = any(differs(ns, c, expected[c.label()]) for c in _calls_of(check_cell))
        assert failed == (check_cell in spec["failing"]), check_cell


# --- 4. other correct implementations give the solution's answer ----------------------------------------------------
ALT_QUANT = '''
def quantize_4bit(w, code, blocksize=64):
    flat = w.detach().flatten().to(torch.float64)
    n = flat.numel()
    idx, scales = [], []
    for start in range(0, n, blocksize):  # one block at a time, nearest code by argmin
        block = flat[start:start + blocksize]
        m = block.abs().max()
        scales.append(m)
        s = block / m if m > 0 else torch.zeros_like(block)
        idx.append((s[:, None] - code.double()[None, :]).abs().argmin(dim=1))
    q = torch.cat(idx)
    if n % 2:
        q = torch.cat([q, (code == 0).nonzero().reshape(-1)[:1]])
    q = q.to(torch.uint8)
    return (q[0::2] * 16 + q[1::2]).to(torch.uint8), torch.stack(scales).float()


def dequantize_4bit(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    p = packed.flatten().long()
    q = torch.empty(2 * p.numel(), dtype=torch.long)
    q[0::2], q[1::2] = p // 16, p % 16
    n = torch.Size(shape).numel()
    blocks = -(-n // blocksize)
    vals = F.pad(code.float()[q[:n]], (0, blocks * blocksize - n)).view(blocks, blocksize)
    return (vals * absmax.float().view(-1, 1)).flatten()[:n].view(*shape).to(dtype)
'''
ALT_DEQUANT_IN_DTYPE = '''
def dequantize_4bit(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    p = packed.reshape(-1).to(torch.int64)
    q = torch.stack([p.div(16, rounding_mode="floor"), p.remainder(16)], dim=-1).flatten()[:math.prod(shape)]
    scale = absmax.to(dtype).repeat_interleave(blocksize)[:q.numel()]
    return (code.to(dtype)[q] * scale).reshape(shape)  # computed in dtype: within the checker's 2 eps
'''
ALT_CODEBOOK = '''
def nf4_codebook():
    from statistics import NormalDist

    def lin(a, b, k):
        return [a + (b - a) * i / (k - 1) for i in range(k)]
    offset = 0.9677083
    pos = [NormalDist().inv_cdf(p) for p in lin(offset, 0.5, 9)[:-1]]
    neg = [-NormalDist().inv_cdf(p) for p in lin(offset, 0.5, 8)[:-1]]
    values = sorted(neg + [0.0] + pos)
    return torch.tensor([v / values[-1] for v in values], dtype=torch.float32)
'''
ALT_CODEBOOK_TABLE = f'''
def nf4_codebook():  # bitsandbytes' table typed in: up to one NF4_TOL from the solution's derivation
    return torch.tensor({obs5.NF4_CODE.tolist()})
'''
ALT_BITS = '''
def constant_bits(n_params, blocksize=64, double_quant=False, blocksize2=256):
    blocks = -(-n_params // blocksize)
    bits = 8 * blocks + 32 * -(-blocks // blocksize2) + 32 if double_quant else 32 * blocks
    return bits / n_params
'''
ALT_LINEAR = '''
class NF4Linear(nn.Module):
    def __init__(self, linear, code, blocksize=64, compute_dtype=torch.bfloat16):
        super().__init__()
        packed, absmax = quantize_4bit(linear.weight.data, code, blocksize)
        self.register_buffer("weight", packed.clone())
        self.register_buffer("scales", absmax)
        self.register_buffer("codebook", code.clone().float())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.data.clone())
        self.out_features, self.in_features = linear.weight.shape
        self.blocksize, self.compute_dtype = blocksize, compute_dtype

    def forward(self, x):
        shape = (self.out_features, self.in_features)
        w = dequantize_4bit(self.weight, self.scales, self.codebook, shape, self.blocksize).to(self.compute_dtype)
        y = x.to(self.compute_dtype) @ w.t()
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(x.dtype)
'''
ALTERNATIVES = {  # name -> {cell: source}
    "quantize-loop-argmin": {"quantize_4bit": ALT_QUANT},
    "dequantize-in-dtype": {"quantize_4bit": cells.student_source(cells.solution_cells(NB)["quantize_4bit"])
                            .split("\n\ndef dequantize_4bit")[0] + "\n" + ALT_DEQUANT_IN_DTYPE},
    "codebook-statistics": {"nf4_codebook": ALT_CODEBOOK},
    "codebook-bnb-table": {"nf4_codebook": ALT_CODEBOOK_TABLE},
    "bits-integer": {"constant_bits": ALT_BITS},
    "linear-matmul-buffers": {"nf4_linear": ALT_LINEAR},
    "linear-on-loop-quantizer": {"nf4_linear": ALT_LINEAR, "quantize_4bit": ALT_QUANT},
}


@pytest.mark.parametrize("name", ALTERNATIVES)
def test_alternative_gives_the_solution_answer(expected, name):
    ns = namespace(ALTERNATIVES[name])
    for _, c in CALLS:
        got = run_call(ns, c, SALT)
        assert compare(expected[c.label()], got, TOLERANCES[c.check]) == [], c.label()


@pytest.mark.parametrize("name", ALTERNATIVES)
def test_alternative_passes_the_peftlab_checkers(monkeypatch, name):
    """The alternatives are correct by the checkers' own standard (bitsandbytes' answers, via peftlab.quant)."""
    from peftlab.checks import ex5 as checks_ex5

    monkeypatch.setenv("PEFTLAB_GRADING", "1")
    ns = cells.namespace(NB, ALTERNATIVES[name])
    with contextlib.redirect_stdout(io.StringIO()):
        for _, c in CALLS:
            getattr(checks_ex5, c.check)(*(ns[o] for o in c.objects), *c.args,
                                          **{k: plan.dtype(v) for k, v in c.kwargs.items()})


def test_ties_may_go_either_way():
    """Values exactly halfway between two codes: the lower or the upper index gives the same observation."""
    code = obs5.NF4_CODE
    mid = (code[1:] + code[:-1]) / 2  # float32, as a student computes them
    w = torch.cat([torch.ones(1), mid, mid.flip(0), torch.zeros(3)])  # absmax 1: scaled values are the midpoints
    ns = namespace()
    lower, _ = ns["quantize_4bit"](w, code, 64)
    upper_ns = namespace({"quantize_4bit": cells.solution_cells(NB)["quantize_4bit"].replace(
        "torch.bucketize(scaled, midpoints)", "torch.bucketize(scaled, midpoints, right=True)")})
    upper, _ = upper_ns["quantize_4bit"](w, code, 64)
    assert not torch.equal(lower, upper)
    assert compare(obs5.indices(lower, w, 64), obs5.indices(upper, w, 64)) == []
    q = obs5.unpack(lower, w.numel())
    q[1:16] = (q[1:16] + 2).clamp(max=15)  # two codes away from a tie is wrong
    wrong = ((q[0::2] << 4) | q[1::2]).to(torch.uint8)
    assert compare(obs5.indices(lower, w, 64), obs5.indices(wrong, w, 64))


def test_inputs_are_the_checkers_kind():
    from peftlab import quant
    from peftlab.checks import ex5 as checks_ex5

    assert torch.equal(obs5.NF4_CODE, quant.NF4_CODE)
    assert obs5.NF4_TOL == checks_ex5.NF4_TOL
    for shape, dtype, seed, zero_block, blocksize in [((8, 48), torch.float32, 0, None, 64),
                                                      ((101,), torch.float16, 5, 3, 32)]:
        mine = obs5.case_tensor(shape, dtype, torch.Generator().manual_seed(seed), zero_block, blocksize)
        assert torch.equal(mine, checks_ex5._case_tensor(shape, dtype, seed, zero_block, blocksize))


# --- 5. no peftlab in the worker ------------------------------------------------------------------------------------
def test_observer_module_imports_no_peftlab():
    tree = ast.parse((ROOT / "autograde" / "observe" / "ex5.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {"." * node.level + (node.module or "") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "collections.abc", "torch", ".core"}, imported
