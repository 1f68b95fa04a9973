"""One frozen MiniLM, two tasks: each adapter saved alone and reloaded predicts as the trained model."""

import pytest

from peftlab.experiments.multitask import multitask_demo


@pytest.mark.slow
def test_one_minilm_serves_two_tasks_from_small_files(tmp_path):
    out = multitask_demo(steps=3, limit=32, batch_size=8, out_dir=tmp_path, progress=False)
    for task, num_labels in (("sentiment", 3), ("topic", 5)):
        r = out[task]
        assert r["num_labels"] == num_labels
        assert r["accuracy_reloaded"] == r["accuracy"]  # saved alone, reloaded into a fresh base: same predictions
        assert r["trainable"] == 12 * (2 * 384 * 24 + 384 + 24) + 384 * num_labels + num_labels
        assert r["file_bytes"] < out["base_model_bytes"] / 50  # ~0.9 MB next to a 91 MB base model
