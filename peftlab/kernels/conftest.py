"""The Triton kernels import triton at module level: without it (CPU CI) their doctest collection is skipped, said."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["nf4_triton.py"]
