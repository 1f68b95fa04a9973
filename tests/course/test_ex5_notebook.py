"""Exercise 5 (QLoRA): the solution's graded pieces behave like peftlab's reference (and bitsandbytes'), the checks
give the solution full marks, the stubs none, and plausible wrong implementations lose points.

The notebook's GPU cells on a GPU machine (which lacks nbformat/nbval/ipykernel, so the code cells are exec'd from the
JSON; ``PEFTLAB_GRADING=1`` keeps the CPU experiments small and needs no offline model packages)::

    python -m pip install --no-deps .whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl
    PEFTLAB_GRADING=1 HF_HUB_OFFLINE=1 PYTHONPATH=. MPLBACKEND=Agg python -c \
      "import json; ns = {'__name__': '__main__'}; [exec(compile(''.join(c['source']), c['id'], 'exec'), ns) for c in \
       json.load(open('solutions/ex5_qlora/ex5_qlora.ipynb'))['cells'] if c['cell_type'] == 'code']"

``test_notebook_code_cells_run_on_gpu`` does the same under pytest where CUDA exists.
"""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from autograde import cells
from peftlab import quant

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "solutions" / "ex5_qlora" / "ex5_qlora.ipynb"


def solution_nb():
    return cells.read_solution("ex5_qlora", ROOT)


@pytest.fixture(scope="module")
def ns():
    return cells.namespace(solution_nb())


@pytest.fixture(autouse=True)
def _grading_env(monkeypatch):
    monkeypatch.setenv("PEFTLAB_GRADING", "1")


# --- no drift from peftlab.quant (and bitsandbytes) ---------------------------------------------------
def test_codebook_matches_peftlab_and_its_bitsandbytes_literal(ns):
    code = ns["nf4_codebook"]()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert (code.double() - quant.nf4_codebook().double()).abs().max() <= 1.2e-7
    assert (code.double() - quant.NF4_CODE.double()).abs().max() <= 1.2e-7


CASES = [((64, 64), 64, torch.float32), ((7, 9), 32, torch.float32), ((5, 77), 128, torch.bfloat16),
         ((3, 65), 64, torch.float16), ((1, 4097), 256, torch.float32), ((33, 17), 32, torch.bfloat16)]


@pytest.mark.parametrize("shape,blocksize,dtype", CASES, ids=str)
def test_quantize_dequantize_match_peftlab_bytes(ns, shape, blocksize, dtype):
    g = torch.Generator().manual_seed(sum(shape) + blocksize)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    ref_packed, ref_state = quant.quantize_nf4(w, blocksize)
    packed, absmax = ns["quantize_4bit"](w, quant.NF4_CODE, blocksize)
    assert torch.equal(packed.reshape(-1), ref_packed.reshape(-1))
    assert torch.equal(absmax, ref_state.absmax)
    out = ns["dequantize_4bit"](ref_packed, ref_state.absmax, quant.NF4_CODE, w.shape, blocksize, dtype)
    assert out.dtype == dtype and torch.equal(out, quant.dequantize_nf4(ref_packed, ref_state))


def test_uniform_int4_code_matches_peftlab(ns):
    w = torch.randn(96, 40)
    code = quant.int4_codebook()
    ref = quant.dequantize_4bit(*quant.quantize_4bit(w, 64, quant_type="int4"))
    mine = ns["dequantize_4bit"](*ns["quantize_4bit"](w, code, 64), code, w.shape)
    assert torch.equal(mine, ref)


@pytest.mark.slow
def test_quantize_matches_bitsandbytes_bytes_directly(ns):
    bf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(ns["nf4_codebook"]().double().round(decimals=6),
                       bf.get_4bit_type("nf4", device="cpu").double().round(decimals=6))
    for shape, blocksize, dtype in CASES:
        w = (torch.randn(shape) * 0.02).to(dtype)
        packed, state = bf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        mine, absmax = ns["quantize_4bit"](w, quant.NF4_CODE, blocksize)
        assert torch.equal(mine.reshape(-1), packed.reshape(-1).view(torch.uint8)), (shape, blocksize, dtype)
        assert torch.equal(absmax, state.absmax)
        out = ns["dequantize_4bit"](packed, state.absmax, quant.NF4_CODE, w.shape, blocksize, dtype)
        assert torch.equal(out, bf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape,blocksize", [((4096, 4096), 64), ((576, 1536), 64), ((7, 9), 32), ((1, 50), 64),
                                             ((300, 300), 128)])
def test_constant_bits_equal_the_stored_tensors(ns, shape, blocksize):
    w = torch.randn(shape)
    n = w.numel()
    for dq in (False, True):
        stored = quant.storage_bits(*quant.quantize_nf4(w, blocksize, double_quant=dq))["constants"]
        assert math.isclose(ns["constant_bits"](n, blocksize, dq), stored, rel_tol=1e-12)
    assert round(ns["constant_bits"](4096 * 4096, 64, True), 3) == 0.127  # the paper's figure


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_peftlab_linear4bit(ns, compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(33, 17)
    ref = quant.Linear4bit.from_linear(linear, quant.QuantConfig(blocksize=32, double_quant=False,
                                                                 compute_dtype=compute_dtype))
    mine = ns["NF4Linear"](linear, quant.NF4_CODE, 32, compute_dtype)
    assert torch.equal(mine.weight.reshape(-1), ref.weight.reshape(-1))
    x = torch.randn(4, 33)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ref(x1), mine(x2)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
    assert not [p for p in mine.parameters() if p.requires_grad]


# --- grading: full marks, zero for the stubs, wrong answers lose points ---------------------------------
@pytest.mark.slow  # runs the graded cells of a notebook (seconds per run): make test, not make quick
def test_solution_passes_every_check_including_hidden():
    results = cells.run_graded(solution_nb())
    assert set(results) == {"check_blockwise_quant", "check_nf4_codebook", "check_double_quant_bits",
                            "check_linear4bit"}
    assert all(results.values()), results


@pytest.mark.slow
def test_stubs_score_zero():
    nb = solution_nb()
    stubs = {c: cells.stub(s) for c, s in cells.solution_cells(nb).items()}
    assert all("raise NotImplementedError()" in s and "BEGIN SOLUTION" not in s for s in stubs.values())
    results = cells.run_graded(nb, replace=stubs)
    assert not any(results.values()), results


def test_points_and_header_total():
    nb = solution_nb()
    points = {c.id: c.metadata["nbgrader"]["points"] for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")}
    auto = sum(v for k, v in points.items() if k.startswith("check_"))
    assert f"**Total: {sum(points.values())} points**" in nb.cells[0].source
    assert f"{auto} autograded" in nb.cells[0].source


CHEAT_CODEBOOK = '''
def nf4_codebook():
    import bitsandbytes.functional as bf
    return bf.get_4bit_type("nf4", device="cpu")
'''
CHEAT_QUANT = '''
import peftlab.quant as _q
def quantize_4bit(w, code, blocksize=64):
    packed, state = _q.quantize_nf4(w, blocksize)
    return packed, state.absmax
def dequantize_4bit(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    return _q.dequantize_4bit(packed, _q.QuantState(absmax, torch.Size(shape), dtype, blocksize, code))
'''
MUTANTS = [  # (cell, old, new or None for a whole-cell replacement, check that must fail)
    ("quantize_4bit", "packed = (q[0::2] << 4) | q[1::2]", "packed = (q[1::2] << 4) | q[0::2]",
     "check_blockwise_quant"),  # wrong nibble order
    ("quantize_4bit", "scaled = (blocks / absmax.clamp(min=1e-38).unsqueeze(1))", "scaled = (blocks)",
     "check_blockwise_quant"),  # missing absmax scaling
    ("quantize_4bit", "torch.bucketize(scaled, midpoints)", "(scaled.unsqueeze(-1) - code).abs().argmin(-1)",
     None),  # argmin differs only at exact ties: allowed by the checks
    ("quantize_4bit", "blocks.abs().max(dim=1).values", "blocks.max(dim=1).values", "check_blockwise_quant"),
    ("quantize_4bit", "absmax.clamp(min=1e-38)", "absmax", "check_blockwise_quant"),  # all-zero block -> NaN
    ("quantize_4bit", "q = torch.cat([q, torch.bucketize(torch.zeros(1), midpoints)])",
     "q = torch.cat([q, torch.zeros(1, dtype=q.dtype)])", "check_blockwise_quant"),  # pads with index 0 (-1.0)
    ("quantize_4bit", "x = w.detach().reshape(-1).float()", "x = w.detach().reshape(-1)",
     "check_blockwise_quant"),  # absmax in bf16/fp16
    ("quantize_4bit", "return (code.float()[q] * scale)", "return (code.float()[q])", "check_blockwise_quant"),
    ("quantize_4bit", "torch.stack([p >> 4, p & 0x0F], dim=1)", "torch.stack([p & 0x0F, p >> 4], dim=1)",
     "check_blockwise_quant"),
    ("quantize_4bit", None, CHEAT_QUANT, "check_blockwise_quant"),
    ("nf4_codebook", "return (values / values.max()).float()", "return values.float()", "check_nf4_codebook"),
    ("nf4_codebook", "torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]",
     "torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]", "check_nf4_codebook"),  # symmetric 8 + 8
    ("nf4_codebook", "offset = 0.9677083", "offset = 0.99", "check_nf4_codebook"),
    ("nf4_codebook", None, CHEAT_CODEBOOK, "check_nf4_codebook"),
    ("constant_bits", "(8 * blocks + 32 * blocks2 + 32)", "(8 * blocks)", "check_double_quant_bits"),
    ("constant_bits", "blocks = math.ceil(n_params / blocksize)", "blocks = n_params // blocksize",
     "check_double_quant_bits"),
    ("constant_bits", "return 32 * blocks / n_params", "return 16 * blocks / n_params", "check_double_quant_bits"),
    ("nf4_linear", 'self.register_buffer("weight", packed)',
     'self.weight = nn.Parameter(packed, requires_grad=False)', "check_linear4bit"),
    ("nf4_linear", "nn.Parameter(linear.bias.detach().clone(), requires_grad=False)",
     "nn.Parameter(linear.bias.detach().clone())", "check_linear4bit"),  # bias trains
    ("nf4_linear", "return nn.functional.linear(x.to(self.compute_dtype), w, bias).to(x.dtype)",
     "return nn.functional.linear(x.to(self.compute_dtype), w, bias)", "check_linear4bit"),  # wrong output dtype
    ("nf4_linear", "return nn.functional.linear(x.to(self.compute_dtype), w, bias)",
     "return nn.functional.linear(x.to(self.compute_dtype), w.T.reshape(w.shape), bias)", "check_linear4bit"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: f"{m[0]}:{(m[1] or 'cheat')[:32]}")
def test_plausible_wrong_answer_loses_points(mutant):
    cell_id, old, new, must_fail = mutant
    nb = solution_nb()
    source = cells.mutate(cells.solution_cells(nb)[cell_id], old, new, cell_id)
    results = cells.run_graded(nb, replace={cell_id: source})
    points = cells.graded_cells(nb)
    if must_fail is None:  # a harmless variant keeps full marks
        assert all(results.values()), results
        return
    assert not results[must_fail], f"{must_fail} still passes"
    assert sum(points[c] for c, ok in results.items() if ok) < sum(points.values())


# --- the notebook's GPU cells on a GPU (device tool) ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run with the device tool)")
def test_notebook_code_cells_run_on_gpu():
    log = run_cells(NOTEBOOK)
    assert "exp-5-5-gpu" in log and "QLoRA step peak" in log


def run_cells(path: Path) -> str:
    """Execute every code cell of the notebook in one namespace, as a kernel would; returns what they printed."""
    import contextlib
    import io
    import json

    import matplotlib

    matplotlib.use("Agg")
    ns, buf = {"__name__": "__main__"}, io.StringIO()
    with contextlib.redirect_stdout(buf):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                print(f"### {cell['id']}")
                exec(compile("".join(cell["source"]), cell["id"], "exec"), ns)
    return buf.getvalue()
