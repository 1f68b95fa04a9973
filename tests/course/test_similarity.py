"""autograde.similarity: the sample solution scores ~1 against the solutions, a disguised copy too, independently
written correct code (the observer tests' alternatives) well below the threshold, copied library code against
peftlab; the normalisation ignores names, comments and layout; fast once the references are cached.
"""

import ast
import builtins
import functools
import importlib.util
import inspect
import time
from pathlib import Path

import nbformat
import pytest

from autograde import cells, similarity
from autograde.pipeline import assignments

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
ASSIGNMENTS = assignments(ROOT)


def example(kind: str, assignment: str) -> str:
    nb = nbformat.read(ROOT / "autograde" / "examples" / kind / assignment / f"{assignment}.ipynb", as_version=4)
    return similarity.submission_code(nb)


def _alternatives_of(path: Path) -> dict:
    """The ``ALTERNATIVE`` dict of another test module, read without running it (its keys may be module constants)."""
    tree = ast.parse(path.read_text())
    consts, found = {}, None
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "ALTERNATIVE":
            found = node.value
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if isinstance(target, ast.Name):
            pairs = [(target, value)]
        elif isinstance(target, ast.Tuple) and isinstance(value, tuple) and len(value) == len(target.elts):
            pairs = list(zip(target.elts, value, strict=True))  # EX3, EX4 = "ex3_adapters", "ex4_prefix_prompt"
        else:
            continue
        consts.update({n.id: v for n, v in pairs if isinstance(n, ast.Name) and isinstance(v, str)})
    return eval(compile(ast.Expression(found), str(path), "eval"), {"__builtins__": {}}, consts) if found else {}


@functools.cache
def independent() -> dict[str, str]:
    """``{assignment: a correct submission written independently of the solution}``, from the observer tests."""
    out = {}
    for name in ("test_observers_ex12.py", "test_observers_ex34.py"):
        if (HERE / name).exists():
            out.update({a: "\n\n".join(alt.values()) for a, alt in _alternatives_of(HERE / name).items()})
    spec = importlib.util.spec_from_file_location("test_observers_ex5", HERE / "test_observers_ex5.py")
    ex5 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex5)
    out["ex5_qlora"] = "\n\n".join([ex5.ALT_QUANT, ex5.ALT_CODEBOOK, ex5.ALT_BITS, ex5.ALT_LINEAR])
    return out


class _Rename(ast.NodeTransformer):
    """Every name the code binds (functions, classes, arguments, variables) gets another name."""

    def __init__(self, bound: set[str]):
        self.bound = bound

    def _new(self, name: str) -> str:
        return f"my_{name}_2" if name in self.bound else name

    def visit_Name(self, node):
        node.id = self._new(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self._new(node.arg)
        return node

    def visit_FunctionDef(self, node):
        node.name = self._new(node.name)
        return self.generic_visit(node)

    visit_ClassDef = visit_FunctionDef


def disguise(code: str) -> str:
    """The code with every bound name renamed, comments gone, reformatted (``ast.unparse``) and spaced out."""
    tree = ast.parse(code)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    bound |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    bound -= set(dir(builtins)) | {"self"}
    return "\n\n".join(ast.unparse(_Rename(bound).visit(tree)).split("\n"))


def test_normalisation_ignores_names_comments_layout_and_docstrings():
    a = '''
def scale(x, factor=2):
    """Docstring."""
    y = torch.zeros_like(x)  # a comment
    return (x * factor +
            y.sum(dim=-1, keepdim=True),)
'''
    b = "def f(v, k=2):\n    w = torch.zeros_like(v); return (v * k + w.sum(dim=-1, keepdim=True))\n"
    assert similarity.tokens(a) == similarity.tokens(b)
    assert similarity.tokens("x.sum()") != similarity.tokens("x.mean()")  # an API name is not a variable


def test_code_that_does_not_parse_still_scores():
    code = example("solution", "ex5_qlora")
    broken = "%timeit foo()\n!pip install x\ndef oops(:\n\n" + code + "\n\nprint('unclosed'"
    assert similarity.score(broken, "ex5_qlora", ROOT)["solutions"] > 0.9


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_sample_scores_one_and_stubs_zero(assignment):
    got = similarity.score(example("solution", assignment), assignment, ROOT)
    assert got["solutions"] >= 0.99 and got["max"] >= 0.99, got
    assert got["closest"] == f"solutions/{assignment}"
    assert similarity.score(example("partial", assignment), assignment, ROOT)["solutions"] > similarity.THRESHOLD
    untouched = similarity.score(example("untouched", assignment), assignment, ROOT)
    assert untouched["max"] == 0.0 and untouched["fingerprints"] == 0  # the template counts for nothing


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_disguised_copy_of_the_solution_scores_high(assignment):
    code = "\n\n".join(cells.student_source(s) for s in cells.solution_cells(cells.read_solution(assignment)).values())
    got = similarity.score(disguise(code), assignment, ROOT)
    assert got["solutions"] >= 0.9, got


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_independent_correct_code_scores_well_below_the_threshold(assignment):
    if assignment not in independent():
        pytest.skip(f"no independent implementation of {assignment} in the observer tests yet")
    got = similarity.score(independent()[assignment], assignment, ROOT)
    assert got["fingerprints"] >= 40  # enough code to judge
    assert got["max"] <= similarity.THRESHOLD / 2, got


def test_copied_library_code_scores_against_peftlab():
    from peftlab import lora, nf4

    code = inspect.getsource(lora.LoraLinear) + "\n\n" + inspect.getsource(nf4.nf4_codebook)
    got = similarity.score(code, "ex2_lora", ROOT)
    assert got["peftlab"] >= 0.95 and got["max"] == got["peftlab"]
    assert got["closest"] == "peftlab/lora.py"


def test_fast_once_the_references_are_cached():
    for assignment in ASSIGNMENTS:
        similarity.score("", assignment, ROOT)  # fills the cache
    for assignment in ASSIGNMENTS:
        code = example("solution", assignment)
        start = time.perf_counter()
        similarity.score(code, assignment, ROOT)
        assert time.perf_counter() - start < 0.2
