"""The checkers the graded notebooks call from their locked cells: one module per exercise.

Each checker runs the student's own objects on a fixed seed and prints expected vs got; expected values
come from closed forms, Hugging Face's real module trees, bitsandbytes or peftlab's reference layers,
never from the student's code. :mod:`.core` holds what they share (:class:`~.core.Report`,
:func:`~.core.assert_own_work`, :func:`~.core.grading`). The check cells of exercises 1 and 2 were
released calling ``checks.check_*``, so their checkers are re-exported here; exercises 3 to 5 name their
module (``from peftlab.checks import ex3 as checks_ex3``).
"""

from . import core, ex1, ex2, ex3, ex4, ex5  # noqa: F401
from .core import FORBIDDEN, Report, assert_own_work, bert_config, device, grading, raised_by
from .ex1 import adam_bytes_reference, check_full_finetune_bytes, check_param_count, check_storage_bytes
from .ex2 import (
    check_add_lora,
    check_add_lora_no_match,
    check_hf_lora,
    check_lora_counts,
    check_lora_dropout,
    check_lora_forward,
    check_lora_init,
    check_lora_state,
    check_merge,
)

__all__ = [
    "FORBIDDEN", "Report", "assert_own_work", "bert_config", "device", "grading", "raised_by",
    "adam_bytes_reference", "check_full_finetune_bytes", "check_param_count", "check_storage_bytes",
    "check_add_lora", "check_add_lora_no_match", "check_hf_lora", "check_lora_counts", "check_lora_dropout",
    "check_lora_forward", "check_lora_init", "check_lora_state", "check_merge",
]
