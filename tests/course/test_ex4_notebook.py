"""Exercise 4's solution notebook: its graded pieces behave as peftlab's prefix/prompt tuning, and its checks bite.

The solution cells are executed here, outside Jupyter, by the course's runner (autograde/cells.py: a namespace named
``__main__`` as in a kernel):
- drift: on random inputs the notebook's ``PrefixKV``/``prefix_forward`` and ``SoftPrompt`` give the logits of
  peftlab's ``PrefixTuningModel`` / ``PromptTuningModel`` (which equal HF peft's, tests/methods/test_prefix_prompt.py);
- the grade cells (visible and hidden tests) pass on the solutions, fail on the released stubs, and fail on
  plausible wrong implementations (GQA ignored, keys/values swapped, mask on the wrong side, positions from 0, ...);
- points: every grade cell has points and the header's totals are their sums; every syllabus item 4.1-4.6 has a cell.
"""

import re

import pytest
import torch

from autograde import cells
from peftlab.models import build_from_config
from peftlab.prefix import PrefixConfig, PrefixTuningModel
from peftlab.prompt import PromptTuningConfig, PromptTuningModel

NAME = "ex4_prefix_prompt"
NB = cells.read_solution(NAME)


def _cells() -> dict:
    return {cells.cell_name(c): c for c in NB.cells if "nbgrader" in c.metadata}


def _namespace(replace: dict[str, tuple[str, str]] | None = None, stub: bool = False) -> dict:
    """The solution cells (optionally mutated or as released) run in a fresh namespace, as a kernel would."""
    sources = cells.solution_cells(NB)
    if stub:  # what nbgrader's release leaves
        sources = {gid: cells.stub(src) for gid, src in sources.items()}
    for gid, (old, new) in (replace or {}).items():
        sources[gid] = cells.mutate(sources[gid], old, new, gid)
    return cells.namespace(NB, sources)


def _grade(ns: dict, grade_id: str) -> None:
    """Run one grade cell, hidden tests included (as the autograder does)."""
    cells.run_check(ns, NB, grade_id)


@pytest.fixture(scope="module")
def solution():
    return _namespace()


# --- drift: the notebook's solution vs peftlab's reference on random inputs ----------------------------
@pytest.mark.parametrize("name,P,batch", [("tiny-llama", 3, 2), ("tiny-gpt2", 1, 3), ("tiny-bert", 5, 1)])
def test_solution_prefix_equals_peftlab(solution, name, P, batch):
    task = "classification" if "bert" in name else "causal_lm"
    base = build_from_config(name, task=task, num_labels=3, seed=3)
    torch.manual_seed(4)
    prefix = solution["PrefixKV"](base.config, P)
    ref = PrefixTuningModel(build_from_config(name, task=task, num_labels=3, seed=3),
                            PrefixConfig(num_virtual_tokens=P))
    with torch.no_grad():
        ref.prefix_encoder.embedding.weight.copy_(prefix.prefix.permute(3, 0, 1, 2, 4).reshape(P, -1))
    ids = torch.randint(3, 200, (batch, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        got = solution["prefix_forward"](base, prefix, ids, mask)
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


class _WordTokenizer:
    """A stand-in tokenizer: one id per word (its length + 10), so the text init path needs no model files."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(w) + 10 for w in text.split()]}


@pytest.mark.parametrize("name,P", [("tiny-llama", 7), ("tiny-bert", 3)])
def test_solution_soft_prompt_equals_peftlab(solution, name, P):
    task = "classification" if "bert" in name else "causal_lm"
    base = build_from_config(name, task=task, num_labels=3, seed=5)
    text = "Classify the sentiment:"
    ids_text = _WordTokenizer()(text)["input_ids"]
    soft = solution["SoftPrompt"](base.get_input_embeddings(), P, ids_text)
    ref = PromptTuningModel(build_from_config(name, task=task, num_labels=3, seed=5), PromptTuningConfig(
        num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text=text), _WordTokenizer())
    torch.testing.assert_close(soft.prompt.detach(), ref.prompt_encoder().detach(), atol=0, rtol=0)  # same init
    with torch.no_grad():  # and the same logits after "training" both to the same values
        soft.prompt.normal_()
        ref.prompt_encoder.embedding.copy_(soft.prompt)
    ids = torch.randint(3, 200, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    embeds, ext = soft(ids, mask)
    with torch.no_grad():
        got = base(inputs_embeds=embeds, attention_mask=ext).logits
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- the grade cells ---------------------------------------------------------------------------------
GRADE_CELLS = ["check_prefix_kv", "check_gqa_shapes", "check_extend_mask", "check_prefix_forward",
               "check_soft_prompt_init", "check_soft_prompt_forward"]


@pytest.mark.slow  # runs the graded cells of a notebook (seconds per run): make test, not make quick
@pytest.mark.parametrize("grade_id", GRADE_CELLS)
def test_solutions_get_full_marks(solution, grade_id):
    _grade(solution, grade_id)  # the verdict; stderr (a library's warning) does not count: autograde/preprocessors.py


@pytest.mark.slow
def test_released_stubs_get_no_points():
    ns = _namespace(stub=True)
    for grade_id in GRADE_CELLS:
        with pytest.raises(AssertionError):
            _grade(ns, grade_id)


# (solution cell, (text in the solution, its wrong replacement), grade cells that must now fail)
WRONG = {
    "GQA ignored: kv_heads = query heads": (
        "prefix_kv", ('getattr(config, "num_key_value_heads", None) or heads', "heads"),
        ["check_prefix_kv", "check_gqa_shapes", "check_prefix_forward"]),
    "prefix as wide as hidden_size": (
        "prefix_kv", ('getattr(config, "head_dim", None) or config.hidden_size // heads', "config.hidden_size"),
        ["check_prefix_kv", "check_gqa_shapes"]),
    "keys and values swapped": (
        "prefix_kv", ("return [(layer[0].expand(batch_size, -1, -1, -1), layer[1].expand(batch_size, -1, -1, -1))",
                      "return [(layer[1].expand(batch_size, -1, -1, -1), layer[0].expand(batch_size, -1, -1, -1))"),
        ["check_prefix_kv", "check_prefix_forward"]),
    "no batch expansion": (
        "prefix_kv", ("return [(layer[0].expand(batch_size, -1, -1, -1), layer[1].expand(batch_size, -1, -1, -1))",
                      "return [(layer[0][None], layer[1][None])"),
        ["check_prefix_kv"]),
    "prefix detached": (
        "prefix_kv", ("for layer in self.prefix]", "for layer in self.prefix.detach()]"), ["check_prefix_kv"]),
    "mask extended at the end": (
        "extend_mask", ("torch.cat([ones, attention_mask], dim=1)", "torch.cat([attention_mask, ones], dim=1)"),
        ["check_extend_mask", "check_prefix_forward"]),
    "prefix masked out": (
        "extend_mask", ("torch.cat([ones, attention_mask], dim=1)", "torch.cat([0 * ones, attention_mask], dim=1)"),
        ["check_extend_mask", "check_prefix_forward"]),
    "real tokens numbered from 0": (
        "prefix_forward", ("past_key_values=cache)", "past_key_values=cache, "
                           "position_ids=torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1))"),
        ["check_prefix_forward"]),
    "soft prompt after the tokens": (
        "soft_prompt", ("torch.cat([self.prompt.unsqueeze(0).expand(B, -1, -1), tokens], dim=1)",
                        "torch.cat([tokens, self.prompt.unsqueeze(0).expand(B, -1, -1)], dim=1)"),
        ["check_soft_prompt_forward"]),
    "long init text cut silently": (
        "soft_prompt", ("raise ValueError(", "ids = ids[:num_virtual_tokens]  # ("), ["check_soft_prompt_init"]),
    "embedding table left trainable": (
        "soft_prompt", ("embedding.requires_grad_(False)", "pass"), ["check_soft_prompt_init"]),
    "text not repeated to fill P": (
        "soft_prompt", ("ids = (ids * num_virtual_tokens)[:num_virtual_tokens]",
                        "ids = (ids + [0] * num_virtual_tokens)[:num_virtual_tokens]"),
        ["check_soft_prompt_init"]),
    "random init N(0, 1) instead of U(-0.5, 0.5)": (
        "soft_prompt", (".uniform_(-0.5, 0.5)", ".normal_()"), ["check_soft_prompt_init"]),
    "virtual tokens masked out": (
        "soft_prompt", ("torch.cat([attention_mask.new_ones(B, P), attention_mask], dim=1)",
                        "torch.cat([attention_mask.new_zeros(B, P), attention_mask], dim=1)"),
        ["check_soft_prompt_forward"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(WRONG))
def test_wrong_implementations_lose_points(what):
    gid, mutation, failing = WRONG[what]
    ns = _namespace({gid: mutation})
    for grade_id in failing:
        with pytest.raises(AssertionError):
            _grade(ns, grade_id)


@pytest.mark.slow
def test_importing_peftlab_instead_of_writing_code_loses_points():
    ns = _namespace()
    exec("import peftlab.prompt\n"
         "_Mine = SoftPrompt\n"
         "class SoftPrompt(_Mine):\n"
         "    def forward(self, input_ids, attention_mask=None):\n"
         "        peftlab.prompt.SoftPrompt  # leaning on the reference\n"
         "        return _Mine.forward(self, input_ids, attention_mask)\n", ns)
    with pytest.raises(AssertionError, match="peftlab"):
        _grade(ns, "check_soft_prompt_forward")
    ns = _namespace()
    exec("import peftlab.prefix\n"
         "def extend_attention_mask(attention_mask, num_virtual_tokens):\n"
         "    ones = peftlab.prefix.torch.ones_like(attention_mask[:, :1]).expand(-1, num_virtual_tokens)\n"
         "    return peftlab.prefix.torch.cat([ones, attention_mask], 1)\n", ns)
    with pytest.raises(AssertionError, match="own code"):
        _grade(ns, "check_extend_mask")


# --- structure: points, totals, syllabus coverage --------------------------------------------------
def test_points_and_totals_match_the_header():
    by_name = _cells()
    graded = {gid: c for gid, c in by_name.items() if c["metadata"]["nbgrader"].get("grade")}
    assert all(c["metadata"]["nbgrader"].get("points", 0) > 0 for c in graded.values())
    auto = sum(c["metadata"]["nbgrader"]["points"] for c in graded.values() if c["cell_type"] == "code")
    manual = sum(c["metadata"]["nbgrader"]["points"] for c in graded.values() if c["cell_type"] == "markdown")
    header = by_name["header"].source
    m = re.search(r"\*\*Total: (\d+) points\*\* — (\d+) autograded .* and (\d+) for written answers", header)
    assert m and tuple(map(int, m.groups())) == (auto + manual, auto, manual)
    assert set(GRADE_CELLS) == {gid for gid, c in graded.items() if c["cell_type"] == "code"}


def test_every_syllabus_item_has_a_written_answer_with_a_reference():
    by_name = _cells()
    for item in range(1, 7):
        cell = by_name[f"answer_4_{item}"]
        meta = cell["metadata"]["nbgrader"]
        assert meta["solution"] and meta["grade"] and cell["cell_type"] == "markdown"
        assert "### BEGIN SOLUTION" in cell.source and "Rubric" in cell.source


def test_the_reference_answers_correct_the_notes_and_cite_the_papers():
    answer = _cells()["answer_4_6"].source
    for arxiv in ("2104.08691", "2103.10385", "2101.00190", "2110.07602"):
        assert arxiv in answer
    assert "P, \\dots, P+T-1" in answer
