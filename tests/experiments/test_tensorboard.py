"""TensorBoard logs: peftlab.train and peftlab compare write event files whose scalars are the JSON's figures
(read back with tensorboard's own EventAccumulator)."""

import json
import subprocess
import sys

import pytest
import torch

from peftlab.models import build_from_config
from peftlab.train import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_matches(scalars, result: dict, steps: int):
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, steps + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(result["losses"], abs=1e-4)  # float32 events
    assert scalars["train/seconds_per_step"] == [(steps, pytest.approx(result["seconds_per_step"], rel=1e-6))]
    assert scalars["memory/peak_mb"] == [(steps, pytest.approx(result["peak_memory_bytes"] / 2**20, rel=1e-6))]
    if result.get("accuracy") is not None:
        assert scalars["eval/accuracy"][-1] == (steps, pytest.approx(result["accuracy"], abs=1e-6))
        assert scalars["eval/accuracy"][0] == (0, pytest.approx(result["accuracy_before"], abs=1e-6))


def test_train_writes_its_figures_as_tensorboard_scalars(tmp_path):
    model = build_from_config("tiny-llama")
    ids = torch.randint(0, 256, (2, 8))
    result = train(model, [dict(input_ids=ids, labels=ids)], steps=5, lr=1e-2, progress=False, log_dir=tmp_path)
    scalars = _scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/seconds_per_step", "memory/peak_mb"}  # no eval set: no accuracy
    _assert_matches(scalars, result.to_dict(), 5)
    assert scalars["train/loss"][-1][1] < scalars["train/loss"][0][1]


@pytest.mark.slow
def test_compare_command_writes_one_run_per_method_next_to_the_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "peftlab.experiments", "compare", "--methods", "lora,bitfit",
                           "--steps", "4", "--limit", "32", "--eval-limit", "32", "--out", str(tmp_path),
                           "--name", "tb"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"TensorBoard: tensorboard --logdir {tmp_path}/runs/tb" in proc.stdout
    rows = json.loads((tmp_path / "tb.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "bitfit"]
    for row in rows:
        scalars = _scalars(tmp_path / "runs" / "tb" / row["method"])
        _assert_matches(scalars, row, 4)
