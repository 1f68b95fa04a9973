"""The environment: pinned torch, conda file in step with pyproject.toml, offline assets, CLI entry point."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.envcheck import LOCK, installed_versions, lock_differences, read_lock

ROOT = Path(__file__).resolve().parents[1]


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock", ROOT / "requirements" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_environment_yml_and_pyproject_agree():
    """The three descriptions of the environment: pyproject's ranges admit the lock, environment.yml pins the lock."""
    import yaml
    from packaging.requirements import Requirement

    lock = _lock_module()
    pins = read_lock(LOCK)
    assert pins, f"{LOCK} holds no pins"
    for line in lock.declared():
        req = Requirement(line)
        name = lock.name_of(line)
        assert name in pins, f"{name} is declared in pyproject.toml but not locked in {LOCK.name}"
        assert req.specifier.contains(pins[name].split("+")[0], prereleases=True), \
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {req.specifier}"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {lock.name_of(p): p.split("==", 1)[1] for p in pip_list if "==" in p}
    declared = {lock.name_of(r) for r in lock.declared()}
    assert set(listed) == declared, f"only in environment.yml: {set(listed) - declared}; " \
                                    f"only in pyproject: {declared - set(listed)}"
    for name, version in listed.items():
        assert version == pins[name].split("+")[0], f"environment.yml pins {name}=={version}, the lock {pins[name]}"
    assert f"pip={pins['pip']}" in env["dependencies"]
    assert lock.environment_yml(pins) == (ROOT / "environment.yml").read_text(), "run `make lock`"


def test_lock_is_complete_and_exact():
    """Every locked line is an exact pin; nothing points at a local path; torch has no local tag (+cpu)."""
    text = LOCK.read_text()
    requirement_lines = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert all(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^\s]+$", ln) for ln in requirement_lines), \
        [ln for ln in requirement_lines if "==" not in ln]
    assert "file://" not in text and "peftlab" not in read_lock(LOCK)
    assert re.search(r"^torch==\d+\.\d+\.\d+$", text, flags=re.M)
    # The packages the suite leans on are pinned, transitive ones included.
    for name in ("torch", "transformers", "peft", "bitsandbytes", "nbgrader", "nbconvert", "jupyter-client",
                 "numpy", "tokenizers", "safetensors", "huggingface-hub", "pip", "setuptools", "pytest"):
        assert name in read_lock(LOCK), f"{name} is not pinned in {LOCK.name}"


def test_installed_environment_matches_the_lock():
    """make installs from the lock: nothing in this environment differs from it (torch against its pin)."""
    diffs = lock_differences(read_lock(LOCK), installed_versions(), skip={"torch"})
    if os.environ.get("PEFTLAB_LATEST") == "1":
        pytest.skip(f"make test-latest runs the newest allowed versions, not the lock: {len(diffs)} differ: "
                    + "; ".join(diffs))
    assert diffs == []


def test_vendored_copies_further_down_sys_path_do_not_count(monkeypatch):
    """setuptools vendors its own packaging and wheel (other versions); once its _vendor folder is on sys.path
    (some imports put it there), what imports is still the first copy: the one the lock pinned."""
    import setuptools

    vendor = Path(setuptools.__file__).parent / "_vendor"
    monkeypatch.setattr(sys, "path", [*sys.path, str(vendor)])
    versions = installed_versions()
    import importlib.metadata

    for name in ("packaging", "wheel"):
        assert versions[name] == importlib.metadata.version(name)


def test_envcheck_warns_and_strict_fails_on_lock_drift(tmp_path):
    """A package at another version than the lock: a warning (exit 0), an error under --strict (exit 1)."""
    pins = read_lock(LOCK)
    drifted = tmp_path / "course.lock"
    drifted.write_text(LOCK.read_text().replace(f"tqdm=={pins['tqdm']}", "tqdm==0.0.1"))
    run = lambda *flags: subprocess.run([sys.executable, "-m", "peftlab.envcheck", "--lock", str(drifted), *flags],  # noqa: E731
                                        capture_output=True, text=True)
    soft, strict = run(), run("--strict")
    assert soft.returncode == 0 and "environment warning: tqdm" in soft.stderr and "the lock has 0.0.1" in soft.stderr
    assert strict.returncode == 1 and "environment error: tqdm" in strict.stderr


def test_pinned_torch_is_installed():
    """CI must fail when a package silently replaces the pinned CPU torch."""
    import torch

    pin = os.environ.get("PEFTLAB_TORCH_PIN", "torch==2.13.0")
    if not pin.startswith("torch=="):
        pytest.fail(f"PEFTLAB_TORCH_PIN={pin!r}: the course machines pin torch exactly")
    assert torch.__version__.split("+")[0] == pin.split("==")[1]


def test_envcheck_reports_a_wrong_torch():
    env = {**os.environ, "PEFTLAB_TORCH_PIN": "torch==1.13.1"}
    proc = subprocess.run([sys.executable, "-m", "peftlab.envcheck", "--strict"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and "1.13.1 is pinned" in proc.stderr


def test_peftlab_command_is_installed_and_rejects_bad_input():
    exe = shutil.which("peftlab", path=str(Path(sys.executable).parent))
    assert exe, "the [project.scripts] entry point 'peftlab' is not installed"
    proc = subprocess.run([exe, "compare", "--methods", "full,lorra"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown method 'lorra'" in proc.stderr and "'lora'" in proc.stderr


def test_no_network_in_tests():
    import socket

    with pytest.raises(RuntimeError, match="must not reach the network"):
        socket.create_connection(("1.1.1.1", 443), timeout=1)
