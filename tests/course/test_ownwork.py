"""autograde.ownwork: honest code of the course passes; every way of reaching a reference, or patching, is named."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from autograde import ownwork
from autograde.cells import read_solution, solution_cells
from autograde.plan import OwnWork, notebook_plan

ROOT = Path(__file__).resolve().parents[2]
ASSIGNMENTS = sorted(p.parent.name for p in (ROOT / "solutions").glob("*/*.ipynb") if p.stem == p.parent.name)


def release(a):
    return nbformat.read(ROOT / "notebooks" / a / f"{a}.ipynb", as_version=4)


def setup_of(a) -> str:
    code = [c for c in release(a).cells if c.cell_type == "code"]
    return next((c.source for c in code if c.get("id") == "setup"), code[0].source)


def declarations(a) -> list[OwnWork]:
    return [o for _, own in notebook_plan(read_solution(a)).values() for o in own]


def findings(a, cells) -> dict:
    return {k: v for k, v in ownwork.check(setup_of(a), cells, declarations(a)).items() if v}


@pytest.mark.parametrize("a", ASSIGNMENTS)
def test_reference_solutions_and_their_experiments_pass(a):
    nb = read_solution(a)
    cells = list(solution_cells(nb).items())
    experiments = [(f"added cell {c.id}", c.source) for c in nb.cells
                   if c.cell_type == "code" and not c.metadata.get("nbgrader")]  # honest code, if a student's
    assert findings(a, cells + experiments) == {}
    assert ownwork.monkeypatches(setup_of(a), cells + experiments) == []


@pytest.mark.parametrize("kind", ["solution", "partial", "untouched"])
@pytest.mark.parametrize("a", ASSIGNMENTS)
def test_sample_submissions_pass(kind, a):
    path = ROOT / "autograde" / "examples" / kind / a / f"{a}.ipynb"
    if not path.exists():
        pytest.skip(f"no {kind} sample of {a}")
    released = {c.id for c in release(a).cells}
    nb = nbformat.read(path, as_version=4)
    cells = [(c.metadata.get("nbgrader", {}).get("grade_id", c.id), c.source) for c in nb.cells if c.cell_type == "code"
             and (c.metadata.get("nbgrader", {}).get("solution") or c.id not in released)]
    assert findings(a, cells) == {}
    assert ownwork.monkeypatches(setup_of(a), cells) == []


HONEST = [  # alternative implementations: other ways of writing own work
    ("ex2_lora", """
class LoRALinear(nn.Module):
    def __init__(self, base, r, lora_alpha, lora_dropout=0.0):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(base.weight.new_empty(r, 4))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = copy.deepcopy(False)

    def forward(self, x):
        with torch.no_grad():
            pass
        return self.base(x) + torch.einsum("...k,rk->...r", x, self.lora_A)
"""),
    ("ex2_lora", """
import functools, itertools, collections, typing, re, dataclasses, numpy as np, transformers

def add_lora(model, target_modules, r=8, lora_alpha=16.0):
    names = [name for name, m in model.named_modules() if re.search("x", name)]
    for name in names:
        *path, child = name.split(".")
        parent = model
        for part in path:
            parent = getattr(parent, part)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, lora_alpha))
    return names

class LoRALinear(nn.Module):
    pass
"""),
    ("ex2_lora", """
def make_hf_lora(model):
    import peft  # allowed here: the exercise is to call HF peft
    return peft.get_peft_model(model, peft.LoraConfig())
"""),
    ("ex3_adapters", """
ACT = {"relu": "ReLU", "gelu": "GELU", "swish": "SiLU"}

class BottleneckAdapter(nn.Module):
    def __init__(self, d, m, non_linearity="relu", layer_norm=False):
        super().__init__()
        self.act = getattr(nn, ACT[non_linearity])()
"""),
    ("ex4_prefix_prompt", """
class PrefixKV(nn.Module):
    def __init__(self, config, num_virtual_tokens):
        super().__init__()
        for name in ("num_key_value_heads", "head_dim"):
            print(getattr(config, name, None))
"""),
    ("ex5_qlora", """
def quantize_4bit(w, code, blocksize=64):
    quant = torch.bucketize(w, code)  # a local, not the setup's peftlab.quant
    quant[0] = 0
    return quant.to(torch.uint8), [q for quant in [quant] for q in quant]
"""),
]


@pytest.mark.parametrize("a, source", HONEST)
def test_alternative_own_work_passes(a, source):
    assert findings(a, [("cell", source)]) == {}
    assert ownwork.monkeypatches(setup_of(a), [("cell", source)]) == []


LORA_CLASS = "class LoRALinear(nn.Module):\n    def forward(self, x):\n        return {}\n"
ATTACKS = [  # (assignment, cells, graded object, what the reason must say)
    ("ex2_lora", "from peftlab.lora import LoraLinear as LoRALinear", "LoRALinear",
     "reaches peftlab (cell c, line 1: `from peftlab.lora import LoraLinear as LoRALinear`)"),
    ("ex2_lora", "class LoRALinear(peftlab.lora.LoraLinear):\n    pass", "LoRALinear", "reaches peftlab"),
    ("ex2_lora", "def _make():\n    ref = peftlab.lora.LoraLinear\n    class L(nn.Module):\n"
     "        def forward(self, x):\n            return ref.forward(self, x)\n    return L\nLoRALinear = _make()",
     "LoRALinear", "reaches peftlab through _make (cell c, line 2"),
    ("ex2_lora", "class LoRALinear(nn.Module):\n"
     "    def __init__(self, base, r, a, d=0.0, _ref=peftlab.lora.LoraLinear):\n        pass",
     "LoRALinear", "reaches peftlab (cell c, line 2"),
    ("ex2_lora", "import inspect\nexec(inspect.getsource(peftlab.lora))\nclass LoRALinear(LoraLinear):\n    pass",
     "LoRALinear", "reads LoraLinear, which only this can bind (cell c, line 2"),
    ("ex2_lora", LORA_CLASS.format("__import__('pef' + 'tlab').lora.LoraLinear.forward(self, x)"), "LoRALinear",
     "uses __import__"),
    ("ex2_lora", [("lora_layer", LORA_CLASS.format("_fwd(self, x)")),
                  ("added cell 1f2e", "from peftlab.lora import LoraLinear\n_fwd = LoraLinear.forward")],
     "LoRALinear", "reaches peftlab through _fwd (added cell 1f2e, line 2: `_fwd = LoraLinear.forward`)"),
    ("ex2_lora", "A = peftlab.lora.LoraLinear\nB = A\nLoRALinear = B", "LoRALinear", "reaches peftlab through B -> A"),
    ("ex2_lora", LORA_CLASS.format("().__class__.__base__.__subclasses__()"), "LoRALinear", "uses .__"),
    ("ex2_lora", "import sys\ndef add_lora(model, targets, r=8, lora_alpha=16.0):\n"
     "    return getattr(sys.modules['peftlab.lora'], 'apply_lora')(model)", "add_lora", "uses sys"),
    ("ex2_lora", LORA_CLASS.format("globals()['peftlab'].lora.LoraLinear.forward(self, x)"), "LoRALinear",
     "uses globals"),
    ("ex2_lora", LORA_CLASS.format("vars(torch)"), "LoRALinear", "uses vars"),
    ("ex2_lora", LORA_CLASS.format("eval('peftlab.lora.LoraLinear.forward')(self, x)"), "LoRALinear", "uses eval"),
    ("ex2_lora", LORA_CLASS.format("compile('1', 'x', 'eval')"), "LoRALinear", "uses compile"),
    ("ex3_adapters", "def set_adapter(model, name):\n    return importlib.import_module('peftlab.adapters')",
     "set_adapter", "uses importlib"),
    ("ex2_lora", "def h():\n    pass\n" + LORA_CLASS.format("h.__globals__['peftlab']"), "LoRALinear",
     "uses .__globals__"),
    ("ex2_lora", "def h():\n    pass\n" + LORA_CLASS.format("getattr(h, '__glo' + 'bals__')"), "LoRALinear",
     "calls getattr with '__globals__'"),
    ("ex2_lora", LORA_CLASS.format("getattr(torch, ''.join(reversed('buh')))"), "LoRALinear",
     "calls getattr on torch with a name the check cannot read"),
    ("ex2_lora", LORA_CLASS.format("torch.sys.modules['peftlab.lora']"), "LoRALinear", "uses torch.sys"),
    ("ex2_lora", LORA_CLASS.format("open('solutions/ex2_lora/ex2_lora.ipynb').read()"), "LoRALinear", "uses open"),
    ("ex2_lora", LORA_CLASS.format("Path('solutions').read_text()"), "LoRALinear", "uses pathlib.Path"),
    ("ex2_lora", "import pickle\n" + LORA_CLASS.format("pickle.loads(b'')"), "LoRALinear", "uses pickle"),
    ("ex2_lora", LORA_CLASS.format("__import__('gc').get_objects()"), "LoRALinear", "uses __import__"),
    ("ex2_lora", "import gc\n" + LORA_CLASS.format("gc.get_referrers(x)"), "LoRALinear", "uses gc"),
    ("ex2_lora", "from types import FunctionType\n" + LORA_CLASS.format("FunctionType"), "LoRALinear",
     "uses types.FunctionType"),
    ("ex2_lora", LORA_CLASS.format("__import__('ctypes')"), "LoRALinear", "uses __import__"),
    ("ex2_lora", "def f():\n    import ctypes\n" + LORA_CLASS.format("f()"), "LoRALinear", "uses ctypes through f"),
    ("ex2_lora", "def f(x):\n    import subprocess, os\n    return os.getcwd()\n" + LORA_CLASS.format("f(x)"),
     "LoRALinear", "uses subprocess"),
    ("ex1_motivation", "def bert_param_count(config):\n    from transformers import BertModel\n"
     "    return sum(p.numel() for p in BertModel(config).parameters())", "bert_param_count", "reaches transformers"),
    ("ex2_lora", "def add_lora(model, target_modules, r=8, lora_alpha=16.0):\n    from peft import get_peft_model\n",
     "add_lora", "reaches peft (cell c, line 2"),
    ("ex2_lora", "def deco(cls):\n    return peftlab.lora.LoraLinear\n@deco\nclass LoRALinear(nn.Module):\n    pass",
     "LoRALinear", "reaches peftlab through deco"),
    ("ex2_lora", [("lora_layer", LORA_CLASS.format("x")),
                  ("added cell 9", "LoRALinear.forward = peftlab.lora.LoraLinear.forward")], "LoRALinear",
     "reaches peftlab (added cell 9, line 1"),
    ("ex2_lora", [("lora_layer", LORA_CLASS.format("x")),
                  ("added cell 9", "setattr(LoRALinear, 'forward', peftlab.lora.LoraLinear.forward)")], "LoRALinear",
     "reaches peftlab"),
    ("ex2_lora", "def _install():\n    global LoRALinear\n    LoRALinear = peftlab.lora.LoraLinear\n_install()\n"
     "class LoRALinear(nn.Module):\n    pass", "LoRALinear", "reaches peftlab"),
    ("ex5_qlora", "def quantize_4bit(w, code, blocksize=64):\n    return quant.quantize_nf4(w, blocksize)",
     "quantize_4bit", "reaches peftlab (cell c, line 2: `return quant.quantize_nf4(w, blocksize)`)"),
    ("ex5_qlora", "class NF4Linear(nn.Module):\n    quant = None\n    def forward(self, x):\n"
     "        return quant.dequantize_nf4(x)", "NF4Linear", "reaches peftlab (cell c, line 4"),
    ("ex5_qlora", "def nf4_codebook():\n    import bitsandbytes.functional as bf\n    return bf.get_4bit_type('nf4')",
     "nf4_codebook", "reaches bitsandbytes"),
    ("ex3_adapters", "class BottleneckAdapter(ref_adapters.BottleneckAdapter):\n    pass", "BottleneckAdapter",
     "reaches peftlab"),
    ("ex2_lora", "from peftlab.lora import *\nclass LoRALinear(LoraLinear):\n    pass", "LoRALinear",
     "reaches peftlab (cell c, line 1: `from peftlab.lora import *`)"),
    ("ex2_lora", "class LoRALinear(nn.Module):\n    def forward(self, x)\n        return x", "LoRALinear",
     "LoRALinear: cell c does not parse (line 2"),
    ("ex2_lora", LORA_CLASS.format("x\n        try:\n            1 / 0\n        except Exception as e:\n"
                                   "            e.__traceback__.tb_frame.f_globals['peftlab']"), "LoRALinear",
     "uses .f_globals"),
    ("ex2_lora", "from types import FunctionType\n" + LORA_CLASS.format("x\n        match self.forward:\n"
     "            case FunctionType(__globals__=g):\n                return g"), "LoRALinear", "matches .__globals__"),
    ("ex2_lora", LORA_CLASS.format("[f for f in (1,)][0].__self__"), "LoRALinear", "uses .__self__"),
    ("ex2_lora", LORA_CLASS.format("torch.hub.load('x', 'y')"), "LoRALinear", "uses torch.hub"),
    ("ex2_lora", "g = getattr\n" + LORA_CLASS.format("g(self, 'x')"), "LoRALinear", "uses getattr as a value"),
    ("ex2_lora", "def merge_lora(model):\n    return checks.core.FORBIDDEN", "merge_lora", "reaches peftlab"),
]


@pytest.mark.parametrize("a, cells, obj, why", ATTACKS, ids=[f"{i}-{a[2]}" for i, a in enumerate(ATTACKS)])
def test_attack_is_named(a, cells, obj, why):
    cells = [("c", cells)] if isinstance(cells, str) else cells
    got = ownwork.check(setup_of(a), cells, declarations(a))
    assert got[obj] is not None and why in got[obj], got[obj]
    assert got[obj].startswith(obj)


def test_an_object_of_two_declarations_keeps_its_finding_and_others_stay_clean():
    cells = [("c", "from peftlab.lora import LoraLinear as LoRALinear\ndef lora_param_count(d, k, r):\n"
                   "    return r * (d + k)")]
    got = ownwork.check(setup_of("ex2_lora"), cells, declarations("ex2_lora"))
    assert got["LoRALinear"] and got["lora_param_count"] is None
    assert got["add_lora"] is None  # not defined: the re-run reports it, not the own-work check


PATCHES = [  # (cells of ex2, what the finding must say)
    ("checks.check_lora_init = lambda *a, **k: None", "changes checks.check_lora_init"),
    ("torch.allclose = lambda *a, **k: True", "changes torch.allclose"),
    ("nn.Linear.forward = lambda self, x: x", "changes nn.Linear.forward"),
    ("checks.Report.__exit__ = lambda *a: True", "changes checks.Report.__exit__"),
    ("import sys\nsys.modules['peftlab.checks'] = object()", "changes sys.modules['peftlab.checks']"),
    ("import builtins\nbuiltins.print = len", "changes builtins.print"),
    ("globals()['checks'] = None", "changes globals()['checks']"),
    ("checks = None", "rebinds checks"),
    ("def f():\n    global checks\n    checks = 1", "rebinds checks"),
    ("from unittest import mock as checks", "rebinds checks"),
    ("class peftlab:\n    pass", "rebinds peftlab"),
    ("setattr(checks, 'check_lora_init', print)", "calls setattr(checks, 'check_lora_init', print)"),
    ("del checks.check_lora_init", "deletes checks.check_lora_init"),
    ("import sys\nm = sys.modules['peftlab.checks']\nm.check_lora_init = print", "changes m.check_lora_init"),
    ("exec('checks.check_lora_init = print')", "runs code the grader cannot read (exec)"),
    ("for c in [checks]:\n    c.check_lora_init = print", "changes c.check_lora_init"),
    ("def f():\n    checks.check_lora_init = print", "changes checks.check_lora_init"),
    ("vars(checks).update(check_lora_init=print)", "calls vars(checks).update"),
    ("type(model).forward = print", "changes type(model).forward"),
    ("checks.__dict__['check_lora_init'] = print", "changes checks.__dict__['check_lora_init']"),
    ("object.__setattr__(checks, 'check_lora_init', print)", "calls object.__setattr__(checks"),
    ("torch.Tensor.__eq__ = lambda a, b: True", "changes torch.Tensor.__eq__"),
    ("checks.Report.__exit__ += 1", "changes checks.Report.__exit__"),
    ("def g(c=checks):\n    c.check_lora_init = print\ng()", "changes c.check_lora_init"),
    ("import ctypes", "imports ctypes"),
    ("import importlib\nimportlib.import_module('peftlab.checks').check_lora_init = print",
     "changes importlib.import_module('peftlab.checks').check_lora_init"),
    ("x = ().__class__.__base__.__subclasses__()[0]\nx.__init__.__globals__['sys'].modules.clear()",
     "calls x.__init__.__globals__['sys'].modules.clear()"),
    ("import math\nmath.pi = 3", "changes math.pi"),
    ("checks.__setattr__('check_lora_init', print)", "calls checks.__setattr__"),
    ("import sys\nsys.modules.update({'peftlab.checks': None})", "calls sys.modules.update"),
]


@pytest.mark.parametrize("source, why", PATCHES, ids=[f"{i}" for i in range(len(PATCHES))])
def test_monkeypatch_is_listed(source, why):
    found = ownwork.monkeypatches(setup_of("ex2_lora"), [("added cell 7", source)])
    assert any(why in f and f.startswith("added cell 7, line ") for f in found), found


def test_settings_and_own_objects_are_not_patches():
    source = ("torch.backends.cudnn.deterministic = True\nplt.rcParams['figure.figsize'] = (4, 3)\n"
              "import os\nos.environ['TOKENIZERS_PARALLELISM'] = 'false'\nmodel.classifier = nn.Linear(384, 3)\n"
              "layer = nn.Linear(3, 3)\nlayer.bias = None\nfor p in model.parameters():\n    p.requires_grad = False\n"
              "import torch\nfrom peftlab import checks\nclass A:\n    pass\nA.x = 1\nsetattr(A, 'y', 2)\n"
              "d = {}\nd['k'] = 1\nd.update(k=2)\nmodel.config.update({'a': 1})\n")
    assert ownwork.monkeypatches(setup_of("ex2_lora"), [("added cell 1", source)]) == []


def test_a_cell_that_does_not_parse_is_no_crash():
    cells = [("lora_layer", "class LoRALinear(nn.Module)\n    pass"), ("other", "def add_lora(m, t):\n    return []")]
    got = ownwork.check(setup_of("ex2_lora"), cells, declarations("ex2_lora"))
    assert "does not parse" in got["LoRALinear"] and got["add_lora"] is None
    assert ownwork.monkeypatches(setup_of("ex2_lora"), cells) == []


def test_printing_to_stderr_is_own_work_and_reaching_sys_modules_is_not():
    """An honest student logs to ``sys.stderr`` (the round trip's "warner"); ``sys.modules`` is still found."""
    setup = "import peftlab\nfrom peftlab import checks"
    cells = [("c", "import sys\ndef f(x):\n    print('debug: called', file=sys.stderr)\n    return x\n"),
             ("d", "import sys\ndef g(x):\n    return sys.modules['peftlab'].lora\n"),
             ("e", "import sys\ndef h(x):\n    alias = sys\n    return alias.modules\n")]
    found = ownwork.check(setup, cells, [OwnWork(("f", "g", "h"))])
    assert found["f"] is None
    assert "sys.modules" in found["g"] and found["h"] is not None


def test_reading_a_signature_is_own_work_and_reading_source_is_not():
    """``inspect.signature`` (which cache keyword a model takes) is honest; ``inspect.getsource`` is not."""
    setup = "import peftlab"
    cells = [("c", "import inspect\ndef f(m):\n    return 'cache' in inspect.signature(m.forward).parameters\n"),
             ("d", "import inspect\ndef g(m):\n    return inspect.getsource(m)\n")]
    found = ownwork.check(setup, cells, [OwnWork(("f", "g"))])
    assert found["f"] is None and "inspect.getsource" in found["g"]
