"""Several tasks, one frozen model: a bottleneck adapter per task on one MiniLM, each saved alone and reloaded.

References:
    - Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751.
    - Pfeiffer et al., "AdapterFusion", arXiv:2005.00247 (one adapter per task on a shared frozen model).
"""

from __future__ import annotations

from ..adapters import AdapterConfig, apply_adapters, load_adapters, save_adapters
from ..inject import set_adapter


def multitask_demo(steps: int = 60, limit: int = 600, batch_size: int = 16, out_dir=None,
                   progress: bool = True) -> dict:
    """Train a Houlsby adapter for tweet sentiment and one for BBC topics on ONE frozen MiniLM.

    Saves each adapter alone, reloads both into a fresh base model and checks that its accuracy
    per task equals the trained model's. Returns sizes and accuracies per task.

    Usage (about a minute on a CPU; ``tests/experiments/test_multitask.py`` runs it)::

        result = multitask_demo(steps=10, limit=60)
    """
    import tempfile
    from pathlib import Path

    from ..data import load_bbc_news, load_tweets, tokenize
    from ..models import load_classifier, minilm_path
    from ..train import evaluate, make_loader, train

    tasks = {"sentiment": (load_tweets, 64), "topic": (load_bbc_news, 128)}  # news needs a longer window
    model, tokenizer = load_classifier(num_labels=3)
    loaders, out = {}, {"base_model_bytes": (minilm_path() / "model.safetensors").stat().st_size}
    for name, (load, max_length) in tasks.items():
        data = load(limit=limit)
        num_labels = data["train"].features["label"].num_classes
        loaders[name] = make_loader(tokenize(data["validation"], tokenizer, max_length), tokenizer, 64, False)
        apply_adapters(model, AdapterConfig(placement="houlsby", num_labels=num_labels), adapter_name=name)
        result = train(model, make_loader(tokenize(data["train"], tokenizer, max_length), tokenizer, batch_size,
                                          True), loaders[name], steps=steps, lr=1e-3, desc=name, progress=progress)
        out[name] = {"num_labels": num_labels, "accuracy": result.accuracy, "trainable": result.trainable}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(out_dir or tmp)
        fresh, _ = load_classifier(num_labels=3)
        for name in tasks:
            out[name]["file_bytes"] = save_adapters(model, out_dir / name, name)
            load_adapters(fresh, out_dir / name, name)
        for name in tasks:  # the same base model serves either task by switching the adapter
            set_adapter(fresh, name)
            out[name]["accuracy_reloaded"] = evaluate(fresh, loaders[name])
    return out
