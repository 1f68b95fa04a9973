"""Exercise 2.4's experiment at small scale: LoRA training beats the untrained model, in isolation."""

import pytest
import torch

from peftlab.experiments.comparison import (
    METHODS,
    apply_method,
    check_method,
    compare,
    finetune,
    table_rows,
    verdict,
    write_report,
)
from peftlab.train import run_isolated


@pytest.mark.slow
def test_lora_beats_untrained_model_and_saves_a_small_file():
    r = finetune("lora", steps=60, limit=600, eval_limit=300, batch_size=16, progress=False)
    assert r["accuracy"] > r["accuracy_before"] + 0.10, r
    assert r["losses"][-10:] and sum(r["losses"][-10:]) / 10 < sum(r["losses"][:10]) / 10
    # r=8 on query and value of 6 layers (384 -> 384) plus the 3-way head copy
    assert r["trainable"] == 6 * 2 * 8 * (384 + 384) + 384 * 3 + 3
    assert r["saved_bytes"] < 400_000


def test_run_isolated_returns_the_value_and_reports_failures():
    assert run_isolated("json:dumps", obj=[1, 2]) == "[1, 2]"
    with pytest.raises(RuntimeError, match="(?s)failed in its subprocess.*JSONDecodeError"):
        run_isolated("json:loads", s="{")


def test_peak_memory_restarts_after_reset():
    """train() reports the peak of its steps, not of loading (which can copy the whole model once)."""
    import sys

    from peftlab.train import peak_memory_bytes, reset_peak_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU peak is resettable on Linux only (/proc/self/clear_refs)")
    big = torch.ones(50_000_000)  # 200 MB, touched; a block this large is returned to the OS when freed
    high = peak_memory_bytes("cpu")
    del big
    reset_peak_memory("cpu")
    assert peak_memory_bytes("cpu") < high - 150e6


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        finetune("lorra")


def test_report_files(tmp_path):
    rows = [dict(method=m, trainable=t, total=100, accuracy_before=0.4, accuracy=a, seconds_per_step=0.1,
                 peak_memory_bytes=2**20 * mb, saved_bytes=2**20, steps=5, train_examples=10)
            for m, t, a, mb in [("full", 100, 0.7, 300), ("lora", 1, 0.65, 200)]]
    write_report(rows, tmp_path, "x")
    assert {p.name for p in tmp_path.iterdir()} == {"x.json", "x.csv", "x.md", "x.png"}
    assert table_rows(rows)[1]["trainable_pct"] == 1.0
    assert "| lora | 1 | 100 | 1.0 |" in (tmp_path / "x.md").read_text()


# --- the registry: every method on a tiny BERT classifier ----------------------------------------
# tiny-bert: hidden 64, 2 layers, feed-forward 128; a 3-way head (64 x 3 + 3). Closed-form trainable counts.
H, LAYERS, FF, HEAD = 64, 2, 128, 64 * 3 + 3
ADAPTER = (H // 16) * H + H // 16 + H * (H // 16) + H  # down (m x d) + b + up (d x m) + b, m = d / 16
P = 20  # virtual tokens
EXPECTED = {  # method: (trainable parameters, pattern every trainable parameter's name matches)
    "lora": (LAYERS * 2 * 8 * (H + H) + HEAD, r"\.(query|value)\.adapters\.default\.lora_[AB]$|classifier\."),
    "houlsby": (LAYERS * 2 * ADAPTER + HEAD,
                r"layer\.\d\.(attention\.)?output\.dense\.adapters\.default\.|classifier\.heads\.default\."),
    "pfeiffer": (LAYERS * ADAPTER + HEAD,
                 r"layer\.\d\.output\.dense\.adapters\.default\.|classifier\.heads\.default\."),
    "prefix": (2 * LAYERS * P * H + HEAD, r"^prefix_encoder\.|^base\.classifier\."),  # keys and values, P each
    "prompt": (P * H + HEAD, r"^prompt_encoder\.|^base\.classifier\."),
    "ia3": (LAYERS * (H + H + FF) + HEAD, r"\.(attention\.self\.(key|value)|layer\.\d\.output\.dense)\.ia3_l$"
                                          r"|classifier\."),
}
KWARGS = {"prompt": {"prompt_tuning_init": "RANDOM"}}  # TEXT init needs MiniLM's tokenizer (tiny-bert has 256 ids)


def _tiny_bert():
    import torch

    from peftlab.models import build_from_config

    base = build_from_config("tiny-bert", task="classification", num_labels=3)
    g = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(1, 256, (4, 9), generator=g), attention_mask=torch.ones(4, 9, dtype=int),
                 token_type_ids=torch.zeros(4, 9, dtype=int), labels=torch.tensor([0, 1, 2, 1]))
    return base, batch


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_applies_to_a_tiny_bert_and_trains_only_its_parameters(method, tmp_path):
    import re

    import torch

    base, batch = _tiny_bert()
    all_base = sum(p.numel() for p in base.parameters())
    biases = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    model, save = apply_method(method, base, None, **KWARGS.get(method, {}))  # with the head, as finetune does
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    count = sum(p.numel() for p in trainable.values())
    if method == "full":
        assert count == all_base
    elif method == "bitfit":  # every bias (the head's included) and the head's weight
        assert count == biases + 64 * 3 and all(n.endswith(".bias") or "classifier" in n for n in trainable)
    else:
        expected, pattern = EXPECTED[method]
        assert count == expected
        assert all(re.search(pattern, n) for n in trainable), [n for n in trainable if not re.search(pattern, n)]
    # One AdamW step (no weight decay): the frozen parameters get no gradient and do not move.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(**batch).loss.backward()
    torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # The file a user keeps holds at least the trained numbers (fp32) and little else.
    saved = save(model, str(tmp_path))
    assert 4 * count <= saved <= 4 * count + 10_000, (saved, 4 * count)


def test_unknown_method_option_is_named_before_anything_loads():
    with pytest.raises(ValueError, match="method 'lora' takes no option 'rank'"):
        finetune("lora", rank=4)
    with pytest.raises(ValueError, match="method 'bitfit' takes no option 'r'"):
        check_method("bitfit", r=8)


def test_verdict_against_the_notes():
    assert verdict("lora", 0.32) == "within the notes' 0.1-1.0 %"
    assert verdict("houlsby", 0.99) == "OUTSIDE the notes' 1.0-5.0 %"
    assert verdict("prompt", 0.03) == "within the notes' < 0.1 %"
    assert verdict("ia3", 0.06) == "no claim"


def _row(method, trainable, head, total=1000):
    return dict(method=method, trainable=trainable, head_params=head, total=total, accuracy_before=0.4,
                accuracy=0.6, seconds_per_step=0.1, peak_memory_bytes=2**20, saved_bytes=2**20, steps=5,
                train_examples=10, lr=1e-3)


def test_report_checks_the_claims_without_the_head(tmp_path):
    # houlsby: 1.1 % with the head, 0.9 % without: outside the notes' 1-5 %.
    table = write_report([_row("houlsby", 11, 2), _row("lora", 5, 2)], tmp_path, "y")
    assert table[0]["trainable_pct"] == 1.1 and table[0]["trainable_pct_no_head"] == 0.9
    assert table[0]["notes_claim"] == "OUTSIDE the notes' 1.0-5.0 %"
    assert table[1]["notes_claim"] == "within the notes' 0.1-1.0 %"
    md = (tmp_path / "y.md").read_text()
    assert "| houlsby | 11 | 1,000 | 1.1 | 0.9 | OUTSIDE the notes' 1.0-5.0 % |" in md
    assert "OUTSIDE" in (tmp_path / "y.csv").read_text()


def test_compare_writes_after_every_method_and_survives_a_failure(tmp_path, monkeypatch):
    import json

    import peftlab.train

    calls = []

    def fake_run_isolated(target, method, **kwargs):
        calls.append(method)
        if method == "prefix":
            raise RuntimeError("prefix broke")
        if method == "bitfit":  # the report already holds lora's row when bitfit starts
            assert [r["method"] for r in json.loads((tmp_path / "z.json").read_text())] == ["lora"]
        return _row(method, 5, 2)

    monkeypatch.setattr(peftlab.train, "run_isolated", fake_run_isolated)
    with pytest.warns(UserWarning, match="prefix failed"):
        rows = compare(["lora", "prefix", "bitfit"], out_dir=tmp_path, name="z", steps=1)
    assert calls == ["lora", "prefix", "bitfit"]
    assert [r["method"] for r in rows] == ["lora", "bitfit"]
    assert [r["method"] for r in json.loads((tmp_path / "z.json").read_text())] == ["lora", "bitfit"]
    with pytest.raises(ValueError, match="unknown method 'lorra'"):  # checked before the first run
        compare(["lora", "lorra"], out_dir=tmp_path)
    assert len(calls) == 3


def test_cli_rejects_an_unknown_method(capsys):
    from peftlab.experiments.cli import main

    assert main(["compare", "--methods", "full,lorra"]) == 2
    assert "unknown method 'lorra'" in capsys.readouterr().err


def test_one_method_table_serves_the_comparison_the_memory_model_and_the_report():
    from peftlab.experiments import memory, memory_report, methods

    assert list(METHODS) == ["full", "lora", "houlsby", "pfeiffer", "prefix", "prompt", "ia3", "bitfit"]
    assert all(METHODS[n] is methods.METHODS[n] for n in METHODS)
    assert memory.METHODS == ("full", "lora", "qlora", "houlsby", "pfeiffer", "prefix", "prompt")
    assert memory_report.CPU_METHODS == ["full", "lora", "qlora-peftlab", "qlora-bnb", "houlsby", "pfeiffer",
                                         "prefix", "prompt"]
    with pytest.raises(ValueError, match="unknown method 'dora'; choose one of \\['full', 'lora', 'qlora'"):
        methods.apply_method("dora", None)
    with pytest.raises(ValueError, match="method 'ia3' takes no option 'r'; its options: \\[\\]"):
        methods.apply_method("ia3", None, r=4)
