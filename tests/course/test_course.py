"""The graded notebooks end to end: solutions match peftlab, wrong answers lose points, the release has no answers,
regenerating it changes nothing, and nbgrader grades real and hostile submissions as expected."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from torch import nn

from autograde import cells, pipeline, sandbox
from autograde.pipeline import PARTIAL, assignments
from peftlab import checks

ROOT = Path(__file__).resolve().parents[2]
# Assignments with a partly wrong sample (PARTIAL) get the in-process and round-trip tests; add yours there.
ASSIGNMENTS = [n for n in assignments(ROOT) if n in PARTIAL]


def solution_nb(name: str):
    return cells.read_solution(name, ROOT)


def solution_namespace(name: str) -> dict:
    return cells.namespace(solution_nb(name))


@pytest.fixture(autouse=True)
def _grading_env(monkeypatch):
    monkeypatch.setenv("PEFTLAB_GRADING", "1")


# --- the solutions: full marks, and no drift from peftlab -----------------------------------------
@pytest.mark.slow  # runs the graded cells of a notebook (seconds per run): make test, not make quick
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_solution_passes_every_check_including_hidden(name):
    results = cells.run_graded(solution_nb(name))
    assert results and all(results.values()), {k: v for k, v in results.items() if not v}


@pytest.mark.slow
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_untouched_release_scores_zero(name):
    release = nbformat.read(ROOT / "notebooks" / name / f"{name}.ipynb", as_version=4)
    results = cells.run_graded(solution_nb(name), replace=cells.submission(solution_nb(name), release))
    assert not any(results.values()), results


def test_lora_solution_matches_peftlab_reference():
    """Same seed, same A; same B copied in: same outputs, delta, merge and injected names as peftlab.lora."""
    import peftlab

    ns = solution_namespace("ex2_lora")
    for d, k, r, alpha in [(24, 10, 3, 6.0), (7, 13, 1, 2.0), (64, 64, 8, 16.0)]:
        torch.manual_seed(0)
        base, ref_base = nn.Linear(k, d), nn.Linear(k, d)
        ref_base.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        mine = ns["LoRALinear"](base, r, alpha)
        torch.manual_seed(1)
        ref = peftlab.LoraLinear(ref_base, peftlab.LoraConfig(r=r, lora_alpha=alpha))
        assert torch.equal(mine.lora_A, ref.lora_A)  # same init: same RNG draws
        with torch.no_grad():
            ref.lora_B.normal_()
            mine.lora_B.copy_(ref.lora_B)
        x = torch.randn(4, 3, k)
        torch.testing.assert_close(mine(x), ref(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(mine.delta_weight(), ref.delta_weight(), rtol=0, atol=1e-6)
    model_mine, model_ref = checks.core.tiny_model("tiny-llama"), checks.core.tiny_model("tiny-llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(5)
    names = ns["add_lora"](model_mine, targets, r=4, lora_alpha=8.0)
    torch.manual_seed(5)
    peftlab.apply_lora(model_ref, peftlab.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets))
    assert names == [n for n, m in model_ref.named_modules() if isinstance(m, peftlab.LoraLinear)]
    assert peftlab.count_parameters(model_ref)[0] == sum(p.numel() for p in model_mine.parameters() if p.requires_grad)
    tiny = checks.core.tiny_model("tiny-llama")
    assert ns["count_lora_params"](tiny, targets, 4) == peftlab.count_parameters(model_ref)[0]
    with torch.no_grad():
        for n in names:
            model_ref.get_submodule(n).lora_B.normal_()
            model_mine.get_submodule(n).lora_A.copy_(model_ref.get_submodule(n).lora_A)
            model_mine.get_submodule(n).lora_B.copy_(model_ref.get_submodule(n).lora_B)
        ids = torch.randint(5, 200, (2, 8))
        torch.testing.assert_close(model_mine(input_ids=ids).logits, model_ref(input_ids=ids).logits)
        ns["merge_lora"](model_mine)
        peftlab.merge_lora(model_ref)
        for n in names:
            torch.testing.assert_close(model_mine.get_submodule(n).base.weight, model_ref.get_submodule(n).base.weight)


def test_motivation_solutions_match_independent_references():
    ns = solution_namespace("ex1_motivation")
    for name, over in [("minilm-l6", {}), ("tiny-bert", {"hidden_size": 12, "num_attention_heads": 3}),
                       ("tiny-bert", {"intermediate_size": 5, "num_hidden_layers": 4, "vocab_size": 17})]:
        config = checks.bert_config(name, **over)
        assert ns["bert_param_count"](config) == checks.ex1.meta_param_count(config)
    # Adam's real state after one step on a real (tiny) model: weights + grads + m + v = 16 bytes/param in fp32
    model = checks.core.tiny_model("tiny-bert").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(5, 200, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    measured = size(model.parameters()) + size(p.grad for p in model.parameters()) + \
        size(t for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert ns["full_finetune_bytes"](sum(p.numel() for p in model.parameters()), 4) == measured
    assert ns["storage_bytes"](10, 3, 2, bytes_per_param=2) == (60, 32)


# --- plausible wrong answers lose points ------------------------------------------------------------
CHEAT_COUNT = '''
def bert_param_count(config) -> int:
    import torch
    from transformers import BertModel
    with torch.device("meta"):
        return sum(p.numel() for p in BertModel(config).parameters())
'''
CHEAT_BYTES = '''
import peftlab.checks as _ref
def full_finetune_bytes(n_params, weight_bytes=4):
    return _ref.adam_bytes_reference(n_params, weight_bytes)
'''
CHEAT_INJECT = '''
def add_lora(model, target_modules, r=8, lora_alpha=16.0):
    import peftlab
    peftlab.apply_lora(model, peftlab.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules))
    return [n for n, m in model.named_modules() if isinstance(m, peftlab.LoraLinear)]
'''
MUTANTS = [  # (assignment, cell, old, new or None for a whole-cell replacement, check that must fail)
    ("ex1_motivation", "bert_param_count", "pooler = h * h + h", "pooler = 0", "check_bert_param_count"),
    ("ex1_motivation", "bert_param_count", "(V + P + T) * h", "V * h", "check_bert_param_count"),
    ("ex1_motivation", "bert_param_count", "(h * i + i) + (i * h + h)", "2 * h * i", "check_bert_param_count"),
    ("ex1_motivation", "bert_param_count", None, CHEAT_COUNT, "check_bert_param_count"),
    ("ex1_motivation", "full_finetune_bytes", "+ 8 + master", "+ 4 + master", "check_full_finetune_bytes"),
    ("ex1_motivation", "full_finetune_bytes", "master = 4 if weight_bytes < 4 else 0", "master = 0",
     "check_full_finetune_bytes"),
    ("ex1_motivation", "full_finetune_bytes", None, CHEAT_BYTES, "check_full_finetune_bytes"),
    ("ex1_motivation", "storage_bytes", "(n_params + n_tasks * adapter_params)", "(n_tasks * adapter_params)",
     "check_storage_bytes"),
    ("ex2_lora", "lora_layer", "self.scaling = lora_alpha / r", "self.scaling = lora_alpha", "check_lora_init"),
    ("ex2_lora", "lora_layer", "torch.zeros(d, r, **like)", "torch.randn(d, r, **like)", "check_lora_init"),
    ("ex2_lora", "lora_layer", "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))", "nn.init.zeros_(self.lora_A)",
     "check_lora_init"),
    ("ex2_lora", "lora_layer", "for p in self.base.parameters():\n            p.requires_grad_(False)", "pass",
     "check_lora_init"),
    ("ex2_lora", "lora_layer", "out = self.base(x)", "out = self.base(self.dropout(x))", "check_lora_forward"),
    ("ex2_lora", "lora_layer", "if not self.merged:", "if True:", "check_merge"),
    ("ex2_lora", "merge", "m.base.weight += m.delta_weight()", "m.base.weight += m.lora_B @ m.lora_A", "check_merge"),
    ("ex2_lora", "merge", "if isinstance(m, LoRALinear) and not m.merged:", "if isinstance(m, LoRALinear):",
     "check_merge"),
    ("ex2_lora", "add_lora", "    for p in model.parameters():\n        p.requires_grad_(False)\n", "",
     "check_add_lora"),
    ("ex2_lora", "add_lora", 'raise ValueError(f"target_modules', 'print(f"target_modules', "check_add_lora"),
    ("ex2_lora", "add_lora", None, CHEAT_INJECT, "check_add_lora"),
    ("ex2_lora", "lora_counts", "return r * (d + k)", "return r * d * k", "check_lora_counts"),
    ("ex2_lora", "make_hf_lora", "r=8, lora_alpha=16", "r=16, lora_alpha=16", "check_hf_lora"),
    ("ex2_lora", "lora_state", 'if k.endswith(("lora_A", "lora_B"))', "", "check_lora_state"),
    ("ex2_lora", "lora_state", "if result.unexpected_keys:", "if False:", "check_lora_state"),
]


def _lora_layer_shapes_swapped(source: str) -> str:
    for old, new in [("torch.empty(r, k, **like)", "torch.empty(k, r, **like)"),
                     ("torch.zeros(d, r, **like)", "torch.zeros(r, d, **like)"),
                     ("self.lora_A.T @ self.lora_B.T", "self.lora_A @ self.lora_B"),
                     ("return (self.lora_B @ self.lora_A)", "return (self.lora_A @ self.lora_B).T")]:
        assert old in source
        source = source.replace(old, new)
    return source


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS + [("ex2_lora", "lora_layer", "swap", "shapes", "check_lora_init")],
                         ids=lambda m: f"{m[1]}:{(m[2] or 'cheat')[:30]}")
def test_plausible_wrong_answer_loses_points(mutant):
    name, cell_id, old, new, must_fail = mutant
    nb = solution_nb(name)
    source = next(c.source for c in nb.cells if c.id == cell_id)
    source = _lora_layer_shapes_swapped(source) if old == "swap" else cells.mutate(source, old, new, cell_id)
    results = cells.run_graded(nb, replace={cell_id: source})
    points = cells.graded_cells(nb)
    assert not results[must_fail], f"{must_fail} still passes"
    assert sum(points[c] for c, ok in results.items() if ok) < sum(points.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_partial_example_fails_exactly_the_expected_checks(name):
    example = nbformat.read(ROOT / "autograde" / "examples" / "partial" / name / f"{name}.ipynb", as_version=4)
    results = cells.run_graded(solution_nb(name), replace=cells.submission(solution_nb(name), example))
    assert sorted(c for c, ok in results.items() if not ok) == sorted(PARTIAL[name]["failing"])


# --- the release: regenerated without drift, no answers in it ----------------------------------------
def test_release_has_no_solutions_hidden_tests_or_reference_answers():
    for name in ASSIGNMENTS:
        release = nbformat.read(ROOT / "notebooks" / name / f"{name}.ipynb", as_version=4)
        text = (ROOT / "notebooks" / name / f"{name}.ipynb").read_text()
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "Reference answer", "Rubric"):
            assert marker not in text, (name, marker)
        released = {c.id: c for c in release.cells}
        for cell in solution_nb(name).cells:
            meta = cell.metadata.get("nbgrader", {})
            out = released[cell.id]
            if cell.cell_type == "code":
                assert not out.outputs and out.execution_count is None
            if meta.get("solution") and cell.cell_type == "markdown":
                assert out.source == "YOUR ANSWER HERE", cell.id
            elif meta.get("solution"):
                answer = cell.source.split("### BEGIN SOLUTION", 1)[1].split("### END SOLUTION")[0]
                answer = cells.student_source(answer)
                assert answer.strip() not in out.source and "raise NotImplementedError()" in out.source, cell.id
            elif meta.get("grade"):
                assert out.source == cell.source.split("### BEGIN HIDDEN TESTS")[0].rstrip("\n"), cell.id


@pytest.fixture(scope="module")
def release_check():
    """``python -m autograde release --check``, run once. It leaves the release in build/course, which the round trip
    below copies and ``make release-check`` (after the tests in ``make test``) finds up to date: nbgrader builds the
    release once per ``make test``."""
    return subprocess.run([sys.executable, "-m", "autograde", "release", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_regenerating_the_release_gives_the_committed_notebooks(release_check):
    assert release_check.returncode == 0, release_check.stdout + release_check.stderr
    assert pipeline.is_built(ROOT, ROOT / pipeline.BUILD)


def _fake_course(tmp: Path) -> tuple[Path, Path]:
    """A repository with one assignment and a course folder stamped as its release, without running nbgrader."""
    root, course = tmp / "repo", tmp / "course"
    (root / "solutions" / "ex9_demo").mkdir(parents=True)
    (root / "solutions" / "ex9_demo" / "ex9_demo.ipynb").write_text("{}")
    (root / "autograde").mkdir()
    shutil.copy(ROOT / "autograde" / pipeline.CONFIG_NAME, root / "autograde")
    pipeline.prepare_course(root, course)
    (course / "release" / "ex9_demo").mkdir(parents=True)
    (course / "release" / "ex9_demo" / "ex9_demo.ipynb").write_text("{}")
    (course / "gradebook.db").write_bytes(b"")
    (course / pipeline.STAMP).write_text("\n".join([pipeline.release_inputs(root), *pipeline._built_files(course)]))
    return root, course


@pytest.mark.parametrize("change", ["nothing", "solution", "config", "release", "source", "gradebook", "new file"])
def test_a_built_release_is_reused_only_while_its_inputs_and_outputs_are_unchanged(tmp_path, change):
    root, course = _fake_course(tmp_path)
    edit = {"solution": root / "solutions" / "ex9_demo" / "ex9_demo.ipynb", "config": root / "autograde" /
            pipeline.CONFIG_NAME, "release": course / "release" / "ex9_demo" / "ex9_demo.ipynb",
            "source": course / "source" / "ex9_demo" / "ex9_demo.ipynb",
            "new file": root / "solutions" / "ex9_demo" / "data.json"}
    if change == "gradebook":
        (course / "gradebook.db").unlink()
    elif change in edit:
        with open(edit[change], "a") as f:
            f.write(" ")
    assert pipeline.is_built(root, course) == (change == "nothing")


# --- nbgrader round trip with real and hostile submissions --------------------------------------------
def _hostile(tmp: Path) -> None:
    """Students whose ex1 is corrupt, loops forever, deleted cells, or kills its kernel."""
    src = ROOT / "autograde" / "examples" / "solution" / "ex1_motivation" / "ex1_motivation.ipynb"
    for student in ("corrupt", "looper", "deleter", "crasher"):
        (tmp / student / "ex1_motivation").mkdir(parents=True)
    (tmp / "corrupt" / "ex1_motivation" / "ex1_motivation.ipynb").write_text('{"cells": [ this is not json')
    nb = nbformat.read(src, as_version=4)
    exp = [c for c in nb.cells if c.id.startswith("exp-") or c.id.startswith("md-")]
    loop = nbformat.reads(nbformat.writes(nb), as_version=4)
    for c in loop.cells:
        if c.id == "full_finetune_bytes":
            c.source = cells.student_source(c.source).replace('"""\n', '"""\n    while True:\n        pass\n', 1)
    nbformat.write(loop, tmp / "looper" / "ex1_motivation" / "ex1_motivation.ipynb")
    gone = {"check_bert_param_count", "check_storage_bytes", "storage_bytes"} | {c.id for c in exp}
    deleted = nbformat.reads(nbformat.writes(nb), as_version=4)
    deleted.cells = [c for c in deleted.cells if c.id not in gone]
    nbformat.write(deleted, tmp / "deleter" / "ex1_motivation" / "ex1_motivation.ipynb")
    crash = nbformat.reads(nbformat.writes(nb), as_version=4)
    crash.cells[1].source = "import os\nos._exit(1)  # the kernel dies on import"
    nbformat.write(crash, tmp / "crasher" / "ex1_motivation" / "ex1_motivation.ipynb")
    # A correct student whose code is noisy: a UserWarning when a cell runs, stderr lines whenever a graded
    # function is called (inside the locked check cells) -- harmless, so full marks.
    warner = nbformat.reads(nbformat.writes(nb), as_version=4)
    (tmp / "warner" / "ex1_motivation").mkdir(parents=True)
    for c in warner.cells:
        if c.id in ("bert_param_count", "storage_bytes"):
            noisy = '"""\n    print("debug: called", file=sys.stderr)\n'
            c.source = ("import sys\nimport warnings\n\nwarnings.warn('my own harmless warning', UserWarning)\n"
                        + cells.student_source(c.source).replace('"""\n', noisy, 1))
    nbformat.write(warner, tmp / "warner" / "ex1_motivation" / "ex1_motivation.ipynb")


# Library noise forced into the grader's own processes (nbgrader, the comparison of the re-run's answers): every
# warning shown each time it is raised, and the loggers of the libraries writing DEBUG lines to stderr. The
# sandboxed runs start from a clean environment; the warner below makes its own noise there.
NOISY_SITECUSTOMIZE = """
import logging, sys
_handler = logging.StreamHandler(sys.stderr)
for _name in ("bitsandbytes", "transformers", "peft", "torch", "accelerate", "peftlab"):
    logging.getLogger(_name).setLevel(logging.DEBUG)
    logging.getLogger(_name).addHandler(_handler)
"""


@pytest.mark.slow
@pytest.mark.skipif(sandbox.available() is not None, reason=f"grading needs its sandbox: {sandbox.available()}")
def test_autograde_round_trip_with_hostile_submissions(tmp_path, release_check):
    submitted = tmp_path / "submitted"
    for student in ("solution", "untouched", "partial"):
        for name in ASSIGNMENTS:
            shutil.copytree(ROOT / "autograde" / "examples" / student / name, submitted / student / name)
    _hostile(submitted)
    course = tmp_path / "course"
    if release_check.returncode == 0:  # the release built once (release_check): graded without building it again
        shutil.copytree(ROOT / pipeline.BUILD, course)
    noise = tmp_path / "noise"
    noise.mkdir()
    (noise / "sitecustomize.py").write_text(NOISY_SITECUSTOMIZE)
    path = os.pathsep.join([str(noise), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "autograde", "grade", str(submitted), "--course-dir", str(course),
                           "--timeout", "45"], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "always",
                               "TRANSFORMERS_VERBOSITY": "debug", "PYTHONPATH": path})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    with open(course / "scores.csv") as f:
        rows = {(r["student"], r["assignment"]): r for r in csv.DictReader(f)}
    maxima = {n: sum(cells.graded_cells(solution_nb(n)).values()) for n in ASSIGNMENTS}
    summary_page = (course / "summary.html").read_text()
    for name in ASSIGNMENTS:
        assert float(rows["solution", name]["autograded"]) == maxima[name], rows["solution", name]
        assert float(rows["untouched", name]["autograded"]) == 0
        lost = sum(cells.graded_cells(solution_nb(name))[c] for c in PARTIAL[name]["failing"])
        assert float(rows["partial", name]["autograded"]) == maxima[name] - lost
        assert sorted(rows["partial", name]["failed_cells"].split()) == sorted(PARTIAL[name]["failing"])
        assert (course / "feedback" / "solution" / name / f"{name}.html").exists()
        # the one-page class summary links this feedback and lists the partial submission's lost cells
        assert f"href='feedback/solution/{name}/{name}.html'" in summary_page
        for cell in PARTIAL[name]["failing"]:
            assert f"<td>{name}</td><td>{cell}</td>" in summary_page, (name, cell)
    assert "corrupt/ex1_motivation: ex1_motivation.ipynb: not readable" in log
    assert "not graded: no readable notebook" in rows["corrupt", "ex1_motivation"]["status"], rows["corrupt",
                                                                                                         "ex1_motivation"]
    assert [rows["corrupt", n]["status"] for n in ASSIGNMENTS[1:]] == ["not submitted"] * (len(ASSIGNMENTS) - 1)
    assert rows["looper", "ex1_motivation"]["failed_cells"] == "check_full_finetune_bytes"
    assert rows["deleter", "ex1_motivation"]["failed_cells"] == "check_storage_bytes"  # restored check, no function
    assert "restored" in rows["deleter", "ex1_motivation"]["status"]
    # The setup cell is locked: the crasher's os._exit there is replaced by the released setup cell.
    assert float(rows["crasher", "ex1_motivation"]["autograded"]) == maxima["ex1_motivation"]
    warner = rows["warner", "ex1_motivation"]
    assert float(warner["autograded"]) == maxima["ex1_motivation"], warner
    # The noise really reached the grade cells of the feedback run (else this test proves nothing), kept as [stderr].
    graded = nbformat.read(course / "autograded" / "warner" / "ex1_motivation" / "ex1_motivation.ipynb", as_version=4)
    streams = [o for c in graded.cells if c.metadata.get("nbgrader", {}).get("grade") for o in c.get("outputs", [])
               if o.output_type == "stream"]
    assert any("[stderr] debug: called" in o.text for o in streams)
    assert not any(o.name == "stderr" for o in streams)
    with open(course / "grades.csv") as f:
        exported = list(csv.DictReader(f))
    assert {r["student_id"] for r in exported} >= {"solution", "untouched", "partial", "looper"}
    seconds = [float(rows["solution", n]["seconds"]) for n in ASSIGNMENTS]
    print(f"grading the solution student: {seconds} s per notebook")
