"""Own work, checked on the source: which graded objects reach a reference implementation, and who patches.

Run in the trusted grader on the student's cells as text (``ast`` only: nothing of theirs executes).

- :func:`check` follows each object of the notebook's ``assert_own_work`` declarations through every module-level
  name its code reads (helpers, closures, default arguments, class bases, decorators, aliases, and statements that
  change it later, ``LoRALinear.forward = f``) and answers, per object, ``None`` (own work) or one line naming the
  cell, line and construct: a name bound to a forbidden package (by the setup cell or an import), code the check
  cannot see through (``exec``, ``eval``, ``compile``, ``__import__``, ``globals``/``vars``/``locals``, ``open``;
  modules such as ``importlib``, ``inspect``, ``sys``, ``os``, ``gc``, ``types``, ``pickle``, even as
  ``torch.sys``), dunders such as ``__globals__`` or ``__subclasses__``, ``getattr`` on a module with a name it
  cannot read, a name only ``import *`` or ``exec`` could bind, a cell that does not parse.
- :func:`monkeypatches` lists every change of what the student did not define: an assignment, deletion or
  ``setattr`` on an attribute or item of a module, an imported object, ``sys.modules``, ``globals()`` or a
  ``type(...)``; a rebinding of ``peftlab`` or ``checks``; any ``exec``/``eval``/``compile``/``__import__``.
  Each fails every graded cell of the notebook. Settings (``torch.backends``, matplotlib, ``os.environ``) are not.

``setup`` is the source that binds names before the student's cells (the release's setup cell); ``cells`` are the
student's cells, ``(name, source)`` in notebook order. No static check is complete: the re-run in a sandbox
without peftlab and the similarity score are the other two lines.

>>> setup = "import peftlab\\nfrom peftlab import checks"
>>> cells = [("lora", "from peftlab.lora import LoraLinear\\nclass LoRALinear(LoraLinear):\\n    pass")]
>>> check(setup, cells, [OwnWork(("LoRALinear",))])["LoRALinear"]
'LoRALinear reaches peftlab through LoraLinear (cell lora, line 1: `from peftlab.lora import LoraLinear`)'
>>> monkeypatches(setup, [("x", "checks.check_lora_init = print")])
['cell x, line 1: `checks.check_lora_init = print` changes checks.check_lora_init']
"""

from __future__ import annotations

import ast
import builtins
import itertools
import re
from collections import defaultdict, deque

from autograde.plan import OwnWork

ESCAPES = {"exec", "eval", "compile", "__import__", "globals", "vars", "locals", "open", "chr", "__builtins__"}
OPAQUE = {"exec", "eval", "compile", "__import__", "__builtins__"}  # anywhere in the cells: a monkeypatch
HATCHES = {"importlib", "inspect", "gc", "ctypes", "types", "pickle", "marshal", "runpy", "pkgutil", "code", "codeop",
           "subprocess", "os", "pathlib", "shutil", "sys", "builtins", "imp", "zipimport", "linecache", "tokenize",
           "multiprocessing", "socket", "dill", "cloudpickle", "open", "attrgetter", "methodcaller", "__main__"}
# Honest uses of a hatch module: printing to stderr, reading the version or the environment, joining paths.
SAFE_PATHS = ("sys.stdout", "sys.stderr", "sys.version_info", "sys.float_info", "sys.maxsize", "sys.byteorder",
              "sys.platform", "os.environ", "os.path.join", "os.cpu_count", "os.sep", "os.linesep",
              "inspect.signature", "inspect.Parameter", "inspect.isclass", "inspect.isfunction")
HATCH_PATHS = ("torch.hub", "torch.load", "torch.package", "torch.utils.cpp_extension", "io.FileIO")
DUNDERS = {"__subclasses__", "__globals__", "__code__", "__closure__", "__defaults__", "__kwdefaults__", "__dict__",
           "__mro__", "__bases__", "__base__", "__self__", "__func__", "__wrapped__", "__loader__", "__spec__",
           "__builtins__", "__import__", "__getattribute__", "__reduce__", "__reduce_ex__", "__traceback__",
           "tb_frame", "f_globals", "f_locals", "f_back", "f_builtins", "f_code", "gi_frame", "cr_frame", "co_consts"}
SPELLED = re.compile("|".join(rf"(?<![A-Za-z0-9]){re.escape(d)}(?![A-Za-z0-9])" for d in sorted(DUNDERS)))
ATTR_FUNCS = {"getattr", "setattr", "delattr", "hasattr"}
FOREIGN_CALLS = {"globals", "vars", "locals", "type", "__import__", "import_module", "reload", "get_referrers",
                 "get_referents", "get_objects", "getmodule", "currentframe", "_getframe"}  # return others' things
MUTATORS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__", "__setattr__",
            "__delattr__"}
SETTERS = {"setattr", "delattr", "__setattr__", "__delattr__"}
SETTINGS = ("torch.backends", "matplotlib", "os.environ")
FUNCS, COMPS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda), (ast.GeneratorExp, ast.ListComp, ast.SetComp,
                                                                      ast.DictComp)
SCOPES = (*FUNCS, *COMPS, ast.ClassDef)


def check(setup: str, cells: list[tuple[str, str]], declarations: list[OwnWork]) -> dict[str, str | None]:
    """``{graded object: None, or why it is not own work}`` for every object of ``declarations``."""
    program, out = _Program(setup, cells), {}
    for decl in declarations:
        for obj in decl.objects:
            out[obj] = out.get(obj) or program.reason(obj, tuple(decl.forbidden))
    return out


def monkeypatches(setup: str, cells: list[tuple[str, str]]) -> list[str]:
    """Every place in the student's cells that changes what they did not define: ``"<cell, line, code> <what>"``."""
    return _Program(setup, cells).patches()


def _same_scope(node):
    """``node``'s descendants in its own scope: nested functions, classes and comprehensions are not entered."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, SCOPES):
            yield from _same_scope(child)


def _imports(node) -> list[tuple[str, str, str]]:
    """``(bound name, path it binds, path imported)`` of an import statement (relative ones: none)."""
    if isinstance(node, ast.Import):
        return [(a.asname or a.name.split(".")[0], a.name if a.asname else a.name.split(".")[0], a.name)
                for a in node.names]
    return [] if node.level or not node.module else [(a.asname or a.name, *[f"{node.module}.{a.name}"] * 2)
                                                      for a in node.names]


def _binds(node) -> set[str]:
    if isinstance(node, ast.Name | ast.arg | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.ExceptHandler
                  | ast.MatchAs | ast.MatchStar | ast.MatchMapping):
        name = getattr(node, "id", None) or getattr(node, "arg", None) or getattr(node, "rest", None) \
            or getattr(node, "name", None)
        return {name} if name and not isinstance(getattr(node, "ctx", None), ast.Load) else set()
    return {b for b, _, _ in _imports(node) if b != "*"} if isinstance(node, ast.Import | ast.ImportFrom) else set()


def _resolve(tree) -> tuple[dict, dict]:
    """``({Name: function whose local it is, None for the module}, {node: innermost function})``.
    Class bodies read like the enclosing scope (a safe over-read)."""
    where, owner = {}, {}

    def visit(node, env, fn, skip=None):
        if node is skip:
            return
        owner[node] = fn
        if isinstance(node, ast.Name):
            where[node] = env.get(node.id)
        if not isinstance(node, FUNCS + COMPS):
            for child in ast.iter_child_nodes(node):
                visit(child, env, fn, skip)
            return
        inner = {**env, **{name: node for n in _same_scope(node) for name in _binds(n)}}
        for g in (g for n in _same_scope(node) if isinstance(n, ast.Global) for g in n.names):
            inner.pop(g, None)
        if isinstance(node, COMPS):  # the first iterable is evaluated outside
            visit(first := node.generators[0].iter, env, fn)
            for child in ast.iter_child_nodes(node):
                visit(child, inner, node, first)
            return
        a = node.args
        for n in (*getattr(node, "decorator_list", ()), *a.defaults, *a.kw_defaults, getattr(node, "returns", None),
                  *(x.annotation for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x)):
            if n is not None:
                visit(n, env, fn)
        for n in node.body if isinstance(node.body, list) else [node.body]:
            visit(n, inner, node)

    visit(tree, {}, None)
    return where, owner


def _verdict(path: str, forbidden: tuple[str, ...]) -> str | None:
    """What reaching ``path`` (``"peftlab.lora.LoraLinear"``, ``"torch.sys.modules"``) means, if anything."""
    parts = path.split(".")
    if hit := next((p for p in parts if p in forbidden), None):
        return f"reaches {hit}" + (f" ({path})" if hit != parts[0] else "")
    if any(path == s or path.startswith(s + ".") for s in SAFE_PATHS):
        return None
    if any(p in HATCHES for p in parts) or any(path == h or path.startswith(h + ".") for h in HATCH_PATHS):
        return f"uses {path}"
    return None


def _label(cell: str) -> str:
    return cell if cell.startswith(("cell ", "added cell")) else f"cell {cell}"


class _Cell:
    def __init__(self, name: str, source: str, tree: ast.Module):
        self.name, self.lines, self.tree = name, source.split("\n"), tree
        self.where, self.owner = _resolve(tree)

    def at(self, node) -> str:
        line = self.lines[node.lineno - 1].strip()
        return f"{_label(self.name)}, line {node.lineno}: `{line if len(line) <= 90 else line[:87] + '...'}`"


class _Program:
    """The setup's imports and the student's cells, parsed once: what binds, changes and reads each name."""

    def __init__(self, setup: str, cells: list[tuple[str, str]]):
        self.cells, self.broken = [], []  # _Cell; (name, source, SyntaxError)
        for name, source in cells:
            try:
                self.cells.append(_Cell(name, source, ast.parse(source)))
            except SyntaxError as e:
                self.broken.append((name, source, e))
        self.where = {n: w for cell in self.cells for n, w in cell.where.items()}
        self.imports = {}  # (scope, name) -> dotted path: the setup's imports and aliases of them, the student's
        for node in _same_scope(ast.parse(setup)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                self.imports.update({(None, bound): path for bound, path, _ in _imports(node)})
            elif isinstance(node, ast.Assign) and (path := self._dotted(node.value)):
                self.imports.update({(None, t.id): path for t in node.targets if isinstance(t, ast.Name)})
        self.setup = {name: path for (_, name), path in self.imports.items()}
        self.defs = defaultdict(list)  # module-level name -> [(cell, top-level statement)] that bind or change it
        self.assigned = defaultdict(list)  # name -> values assigned to it anywhere (None: bound some other way)
        self.hidden = []  # (cell, node, module or None): ``from x import *``, exec(...), globals(): may bind anything
        for cell in self.cells:
            for stmt in cell.tree.body:
                for node in [stmt] if isinstance(stmt, SCOPES) else [stmt, *_same_scope(stmt)]:
                    for name in _binds(node):
                        self._define(name, cell, stmt)
                for node in ast.walk(stmt):
                    self._index(node, cell, stmt)

    def _define(self, name, cell, stmt):
        if (cell, stmt) not in self.defs[name]:
            self.defs[name].append((cell, stmt))

    def _index(self, node, cell, stmt):
        for bound, path, full in _imports(node) if isinstance(node, ast.Import | ast.ImportFrom) else ():
            if bound == "*":
                self.hidden.append((cell, node, full.rsplit(".", 1)[0]))
            else:
                self.imports[cell.owner[node], bound] = path
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load) and cell.where[node] is None:
            self._define(node.id, cell, stmt)  # a ``global`` name's assignment, a class attribute
        changed = node.value if isinstance(node, ast.Attribute | ast.Subscript) and \
            not isinstance(node.ctx, ast.Load) else node.args[0] if isinstance(node, ast.Call) and node.args and \
            getattr(node.func, "id", None) in ATTR_FUNCS else None
        while isinstance(changed, ast.Attribute | ast.Subscript):
            changed = changed.value
        if isinstance(changed, ast.Name) and cell.where.get(changed) is None:
            self._define(changed.id, cell, stmt)  # LoRALinear.forward = ...: part of LoRALinear
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ESCAPES - {"open", "chr"}:
            self.hidden.append((cell, node, None))
        for target, value in self._sites(node):
            for n in ast.walk(target):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    self.assigned[n.id].append(value if target is n else None)
        for name in _binds(node) if not isinstance(node, ast.Name) else ():
            self.assigned[name].append(None)

    @staticmethod
    def _sites(node) -> list:
        """``(target, value)`` pairs of the bindings a node makes (a for loop: the iterable, element by element)."""
        if isinstance(node, ast.Assign):
            return [(t, node.value) for t in node.targets]
        if isinstance(node, ast.AnnAssign | ast.NamedExpr | ast.AugAssign):
            return [(node.target, None if isinstance(node, ast.AugAssign) else node.value)]
        if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
            return [(node.target, node.iter)]
        if isinstance(node, ast.withitem) and node.optional_vars:
            return [(node.optional_vars, node.context_expr)]
        return []

    def _dotted(self, e) -> str | None:
        """``torch.hub.load`` -> ``"torch.hub.load"`` when the chain starts at a name bound to an import."""
        if isinstance(e, ast.Name):
            return self.imports.get((self.where.get(e), e.id))
        base = self._dotted(e.value) if isinstance(e, ast.Attribute | ast.Subscript) else None
        return base and (f"{base}.{e.attr}" if isinstance(e, ast.Attribute) else base)

    def _fold(self, e, depth=0) -> set[str] | None:
        """The strings ``e`` can be when it is built from constants (``'pef' + 'tlab'``, a constant's name), or None."""
        if depth > 6:
            return None
        fold = lambda x: self._fold(x, depth + 1)  # noqa: E731
        if isinstance(e, ast.Constant):
            return {e.value} if isinstance(e.value, str) else None
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            parts = [fold(e.left), fold(e.right)]
        elif isinstance(e, ast.JoinedStr):
            parts = [fold(v.value if isinstance(v, ast.FormattedValue) else v) for v in e.values]
        else:
            parts = self.assigned.get(e.id) or [None] if isinstance(e, ast.Name) else e.values if isinstance(
                e, ast.Dict) else [e.body, e.orelse] if isinstance(e, ast.IfExp) else [e.value] if isinstance(
                e, ast.Subscript | ast.Starred) else getattr(e, "elts", [None])
            parts = [p and fold(p) for p in parts]  # any of these values
            return None if not parts or None in parts else set().union(*parts)
        if None in parts or len(found := {"".join(p) for p in itertools.product(*parts)}) > 256:
            return None
        return found

    # --- own work ------------------------------------------------------------------------------------------------
    def reason(self, obj: str, forbidden: tuple[str, ...]) -> str | None:
        """Why ``obj`` is not own work (the first finding, nearest first), or None."""
        queue, seen = deque([(obj, ())]), set()
        while queue:
            name, via = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            through, before = (f" through {' -> '.join(v)}" if v else "" for v in (via, via[:-1]))
            for cell, source, e in self.broken:
                if re.search(rf"(?<![\w.]){re.escape(name)}\b", source):
                    return f"{obj}{through}: {_label(cell)} does not parse (line {e.lineno}: {e.msg}): unchecked"
            for cell, stmt in self.defs.get(name, ()):
                what, node, reads = self._scan(cell, stmt, forbidden)
                if what:
                    return f"{obj} {what}{through} ({cell.at(node)})"
                queue.extend((r, (*via, r)) for r in reads)
            if name not in self.defs and name not in self.setup and not hasattr(builtins, name) and self.hidden:
                cell, node, module = self.hidden[0]
                what = module and _verdict(module, forbidden) or f"reads {name}, which only this can bind"
                return f"{obj} {what}{before} ({cell.at(node)})"
        return None

    def _scan(self, cell, stmt, forbidden):
        """``(finding, node, module-level names read)`` of one top-level statement: its first finding, if any."""
        reads, funcs = [], {id(n.func) for n in ast.walk(stmt) if isinstance(n, ast.Call)}
        docs = {id(n.body[0].value) for n in ast.walk(stmt) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef
                | ast.ClassDef) and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        safe = set()  # the module names of `sys.stderr`-like reads: SAFE_PATHS, not followed to their import
        for node in ast.walk(stmt):
            if isinstance(node, ast.Attribute) and any(
                    (d := self._dotted(node) or "") == p or d.startswith(p + ".") for p in SAFE_PATHS):
                root = node
                while isinstance(root, ast.Attribute):
                    root = root.value
                safe.add(id(root))
        for node in sorted(ast.walk(stmt), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
            what = None
            if isinstance(node, ast.Name) and id(node) in safe:
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and cell.where[node] is None:
                if node.id in ESCAPES:
                    what = f"uses {node.id}"
                elif node.id in ATTR_FUNCS and id(node) not in funcs:
                    what = f"uses {node.id} as a value"
                else:
                    what = _verdict(self.setup.get(node.id, ""), forbidden)
                reads.append(node.id)
            elif isinstance(node, ast.Attribute):
                what = f"uses .{node.attr}" if node.attr in DUNDERS else _verdict(self._dotted(node) or "", forbidden)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                what = next(filter(None, (_verdict(full, forbidden) for _, _, full in _imports(node))), None)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ATTR_FUNCS and node.args:
                what = self._attr_call(node, forbidden)
            elif isinstance(node, ast.Constant | ast.BinOp | ast.JoinedStr) and id(node) not in docs:
                spelled = [m.group() for s in self._fold(node) or () for m in SPELLED.finditer(s)]
                what = spelled and f"spells {spelled[0]!r}"
            elif isinstance(node, ast.MatchClass):
                what = next((f"matches .{k}" for k in node.kwd_attrs if k in DUNDERS), None)
            if what:
                return what, node, reads
        return None, None, reads

    def _attr_call(self, node, forbidden) -> str | None:
        """``getattr(obj, name)``: a dunder name, or a module with a name that is not a constant."""
        fn, names = node.func.id, self._fold(node.args[1]) if len(node.args) > 1 else None
        if spelled := sorted(m.group() for s in names or () for m in SPELLED.finditer(s)):
            return f"calls {fn} with {spelled[0]!r}"
        if not (module := self._dotted(node.args[0])):
            return None
        if names is None:
            return f"calls {fn} on {module} with a name the check cannot read"
        return next(filter(None, (_verdict(f"{module}.{s}", forbidden) for s in sorted(names))), None)

    # --- monkeypatches ---------------------------------------------------------------------------------------
    def patches(self) -> list[str]:
        checkers = {n for n, p in self.setup.items() if p == "peftlab" or p.startswith("peftlab.checks")}
        self.foreign = {*self.imports, (None, "__builtins__")}  # (scope, name) of what the student did not define
        sites = [(keys, value) for cell in self.cells for node in ast.walk(cell.tree)
                 for keys, value in self._bindings(node)]
        while new := {k for keys, value in sites if self._foreign(value) for k in keys} - self.foreign:
            self.foreign |= new
        return [f"{cell.at(node)} {what}" for cell in self.cells for node in ast.walk(cell.tree)
                if (what := self._patch(node, cell, checkers))]

    def _bindings(self, node):
        """``(keys, value)``: the ``(scope, name)`` keys a node binds to ``value`` (parameters: to their defaults)."""
        for target, value in self._sites(node):
            if value is not None:
                yield [(self.where[n], n.id) for n in ast.walk(target) if isinstance(n, ast.Name)
                       and isinstance(n.ctx, ast.Store)], value
        if isinstance(node, FUNCS):
            a = node.args
            pos = [*a.posonlyargs, *a.args][len(a.posonlyargs) + len(a.args) - len(a.defaults):]
            for x, d in [*zip(pos, a.defaults, strict=True), *zip(a.kwonlyargs, a.kw_defaults, strict=True)]:
                if d is not None:
                    yield [(node, x.arg)], d

    def _foreign(self, e) -> bool:
        """Is ``e`` (part of) what the student did not define: a module, an imported object, a namespace?"""
        if isinstance(e, ast.Name):
            return (self.where.get(e), e.id) in self.foreign
        if isinstance(e, ast.Attribute):
            return e.attr in DUNDERS or e.attr == "__class__" or self._foreign(e.value)
        if isinstance(e, ast.Subscript | ast.Starred | ast.NamedExpr):
            return self._foreign(e.value)
        if isinstance(e, ast.Call):
            name = getattr(e.func, "id", None) or getattr(e.func, "attr", None)
            return name in FOREIGN_CALLS or name == "getattr" and len(e.args) > 1 and (
                self._foreign(e.args[0]) or any(SPELLED.search(s) for s in self._fold(e.args[1]) or ()))
        parts = e.values if isinstance(e, ast.Dict | ast.BoolOp) else [e.body, e.orelse] \
            if isinstance(e, ast.IfExp) else getattr(e, "elts", [])
        return any(p is not None and self._foreign(p) for p in parts)

    def _changes(self, target) -> bool:
        """Does changing (an attribute or item of) ``target`` change something foreign that is not a setting?"""
        dotted = self._dotted(target) or ""
        return self._foreign(target) and not any(dotted.startswith(s) for s in SETTINGS)

    def _patch(self, node, cell, checkers) -> str | None:
        if isinstance(node, ast.Attribute | ast.Subscript) and not isinstance(node.ctx, ast.Load) \
                and self._changes(node.value):
            return f"{'deletes' if isinstance(node.ctx, ast.Del) else 'changes'} {ast.unparse(node)[:80]}"
        if isinstance(node, ast.Name) and node.id in OPAQUE and self.where.get(node) is None:
            return f"runs code the grader cannot read ({node.id})"
        if rebound := self._rebinds(node, cell) & checkers:
            return f"rebinds {sorted(rebound)[0]}"
        if isinstance(node, ast.Import | ast.ImportFrom) and "ctypes" in {f.split(".")[0] for *_, f in _imports(node)}:
            return "imports ctypes"
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            changed = [node.args[0]] if name in SETTERS and node.args else []
            changed += [node.func.value] if name in MUTATORS and isinstance(node.func, ast.Attribute) else []
            if any(self._changes(c) for c in changed):
                return f"calls {ast.unparse(node)[:80]}"
        return None

    def _rebinds(self, node, cell) -> set[str]:
        """The module-level names ``node`` binds to something new (importing the setup's module again is not)."""
        if isinstance(node, ast.Global):
            return set(node.names)
        if isinstance(node, ast.Name):
            return {node.id} if not isinstance(node.ctx, ast.Load) and self.where.get(node) is None else set()
        if cell.owner.get(node) is not None:
            return set()
        if isinstance(node, ast.Import | ast.ImportFrom):
            return {bound for bound, path, _ in _imports(node) if self.setup.get(bound) != path}
        return _binds(node) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else set()
