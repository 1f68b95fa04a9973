"""The module names of earlier releases still import, as the very modules that replaced them.

A student who began a notebook on an earlier release has ``from peftlab import checks, checks_ex3`` (or
``checks_ex5, memory, qlora``) in a setup cell that nbgrader does not restore; it must keep working.
"""

import importlib
import subprocess
import sys

import pytest

from peftlab._renamed import RENAMED


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_old_name_is_the_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(RENAMED[old])
    assert importlib.import_module(RENAMED[old]).__spec__.name == RENAMED[old]  # the alias leaves the module alone


def test_earlier_setup_cells_still_run():
    code = ("from peftlab import checks, checks_ex3\nfrom peftlab import checks_ex4\n"
            "from peftlab import checks, checks_ex5, memory, qlora, quant\n"
            "from peftlab.memory import get_model_config\n"
            "import peftlab.checks.ex5, peftlab.experiments.qlora\n"
            "assert checks_ex5 is peftlab.checks.ex5 and qlora is peftlab.experiments.qlora\n"
            "assert callable(checks.check_lora_init) and callable(checks_ex3.check_add_adapters)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_library_does_not_import_the_checkers_or_the_studies():
    code = ("import sys, peftlab\n"
            "bad = [m for m in sys.modules if m.startswith(('peftlab.checks', 'peftlab.experiments', 'autograde'))]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
