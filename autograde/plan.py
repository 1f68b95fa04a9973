"""What a check cell asks, read from its source: the checker calls and the own-work declarations.

A check cell of the course is a few statements, e.g.::

    checks.check_lora_forward(LoRALinear)
    ### BEGIN HIDDEN TESTS
    checks.check_lora_forward(LoRALinear, d=5, k=7, r=1, alpha=3.0, lead=(3,))
    checks.assert_own_work(LoRALinear)
    ### END HIDDEN TESTS

:func:`plan` turns it into data the trusted grader acts on without executing it: :class:`Call` s (checker name,
the student objects passed by name, literal arguments) and :class:`OwnWork` declarations (objects and forbidden
packages). Names bound earlier in the cell to a literal ``dict(...)`` expand in ``**name``. A statement of any
other form is an error for the instructor (the grader would not know how to re-run it), never a silent skip.

>>> src = 'checks.check_x(f, d=5, dtype=torch.float64)\\nchecks.assert_own_work(f, forbidden=("peftlab",))'
>>> calls, own = plan(src)
>>> calls[0].check, calls[0].objects, calls[0].kwargs
('check_x', ('f',), {'d': 5, 'dtype': 'torch.float64'})
>>> own[0]
OwnWork(objects=('f',), forbidden=('peftlab',))
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

DEFAULT_FORBIDDEN = ("peftlab", "peft")  # peftlab.checks.core.FORBIDDEN
DTYPE_NAMES = ("float64", "float32", "bfloat16", "float16", "int64", "int32", "int8", "uint8", "bool")


@dataclass(frozen=True)
class Call:
    check: str  # the checker's name, e.g. "check_lora_forward"
    objects: tuple[str, ...]  # the student's objects passed positionally, by name
    args: tuple = ()  # literal positional arguments after the objects (e.g. a model name)
    kwargs: dict = field(default_factory=dict)  # literal keyword arguments; dtypes as "torch.float64"
    hidden: bool = False  # after "### BEGIN HIDDEN TESTS": the student never saw this call

    def label(self) -> str:
        parts = [*self.objects, *map(repr, self.args), *(f"{k}={v}" if isinstance(v, str) and v.startswith("torch.")
                                                        else f"{k}={v!r}" for k, v in self.kwargs.items())]
        return f"{self.check}({', '.join(parts)})"


@dataclass(frozen=True)
class OwnWork:
    objects: tuple[str, ...]
    forbidden: tuple[str, ...] = DEFAULT_FORBIDDEN


def _literal(node: ast.AST, env: dict):
    """A literal, a ``torch.<dtype>`` (kept as its name), or a name bound to a literal earlier in the cell."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch" \
            and node.attr in DTYPE_NAMES:
        return f"torch.{node.attr}"
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value, env) for kw in node.keywords}
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_literal(e, env) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Add | ast.Sub | ast.Pow):  # 4097 * 11
        left, right = _literal(node.left, env), _literal(node.right, env)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError(f"only integer arithmetic in a check cell's arguments: {ast.unparse(node)!r}")
        op = type(node.op)
        return {ast.Mult: left * right, ast.Add: left + right, ast.Sub: left - right,
                ast.Pow: left ** right if right <= 64 else None}[op]
    return ast.literal_eval(node)


def plan(source: str) -> tuple[list[Call], list[OwnWork]]:
    """The checker calls and own-work declarations of one check cell's source (hidden tests included)."""
    calls, own, env = [], [], {}
    lines = source.split("\n")
    hidden_from = next((i + 1 for i, line in enumerate(lines) if line.strip() == "### BEGIN HIDDEN TESTS"),
                       len(lines) + 1)
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            env[stmt.targets[0].id] = _literal(stmt.value, env)
            continue
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Attribute)):
            raise ValueError(f"check cell statement not understood by the grader: {ast.unparse(stmt)!r}")
        node = stmt.value
        name = node.func.attr
        objects, args = [], []
        for a in node.args:
            if isinstance(a, ast.Name) and a.id not in env and not args:
                objects.append(a.id)
            else:
                args.append(_literal(a, env))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                kwargs.update(_literal(kw.value, env))
            else:
                kwargs[kw.arg] = _literal(kw.value, env)
        if name == "assert_own_work":
            own.append(OwnWork(tuple(objects), tuple(kwargs.get("forbidden", DEFAULT_FORBIDDEN))))
        elif name.startswith("check_"):
            calls.append(Call(name, tuple(objects), tuple(args), kwargs, stmt.lineno > hidden_from))
        else:
            raise ValueError(f"check cell calls {name!r}: the grader re-runs only check_* calls and assert_own_work")
    return calls, own


def notebook_plan(nb) -> dict[str, tuple[list[Call], list[OwnWork]]]:
    """``{grade cell: (calls, own work)}`` for the autograded cells of a source notebook, in notebook order."""
    out = {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade"):
            out[meta["grade_id"]] = plan(cell.source)
    return out


def dtype(name):
    """``"torch.float64"`` -> ``torch.float64`` (other values unchanged): for observers' keyword arguments."""
    import torch

    if isinstance(name, str) and name.startswith("torch.") and name[6:] in DTYPE_NAMES:
        return getattr(torch, name[6:])
    return name


if __name__ == "__main__":  # list every call the observers must answer, by checker
    import collections
    import sys

    from autograde.cells import read_solution
    from autograde.pipeline import assignments, repo_root

    by_check = collections.defaultdict(list)
    for a in assignments(repo_root()):
        for cell, (calls, own) in notebook_plan(read_solution(a)).items():
            for c in calls:
                by_check[c.check].append(f"{a}/{cell}: {c.label()}")
            for o in own:
                by_check["assert_own_work"].append(f"{a}/{cell}: {o}")
    for check, lines in sorted(by_check.items()):
        print(check)
        print("  " + "\n  ".join(lines))
    sys.exit(0)
