"""Exercise 2.4's experiment at small scale: LoRA training beats the untrained model, in isolation."""

import pytest

from peftlab.experiments import finetune, table_rows, write_report
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
