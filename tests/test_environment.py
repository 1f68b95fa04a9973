"""The environment: pinned torch, conda file in step with pyproject.toml, offline assets, CLI entry point."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements):
    return {re.split(r"[<>=!~\[ ]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    import yaml

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _names(pyproject["dependencies"])
    for extra, reqs in pyproject["optional-dependencies"].items():
        if extra != "all":
            declared |= _names(reqs)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = _names(p for p in pip_list if not p.startswith("-e"))
    assert listed == declared, f"only in environment.yml: {listed - declared}; only in pyproject: {declared - listed}"


def test_pinned_torch_is_installed():
    """CI must fail when a package silently replaces the pinned CPU torch."""
    import torch

    pin = os.environ.get("PEFTLAB_TORCH_PIN", "torch==2.13.0")
    if not pin.startswith("torch=="):
        pytest.fail(f"PEFTLAB_TORCH_PIN={pin!r}: the course machines pin torch exactly")
    assert torch.__version__.split("+")[0] == pin.split("==")[1]


def test_envcheck_reports_a_wrong_torch():
    env = {**os.environ, "PEFTLAB_TORCH_PIN": "torch==1.13.1"}
    proc = subprocess.run([sys.executable, "-m", "peftlab.envcheck"], env=env, capture_output=True, text=True)
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
