"""The studies: fine-tuning comparisons, the memory model and its measurements, the QLoRA instruction recipe.

They use the library (``peftlab``) and nothing in the library imports them. ``peftlab compare|memory``
(:mod:`.cli`) runs them from a terminal; ``make course`` writes their reports into ``reports/``.

- :mod:`.methods`: the one method table (how each method is applied, its learning rate, the notes' claim, 4-bit or
  not, modelled or not) that the comparison and the memory model share.
- :mod:`.comparison`: one fine-tuning run per method on tweet sentiment, and the comparison table and plot.
- :mod:`.memory`: the analytic memory model (weights, gradients, optimizer state, activations) and its measurement.
- :mod:`.memory_report`: the memory comparison report (135M to 70B, with GPU and CPU measurements).
- :mod:`.qlora`: QLoRA's studies: instruction tuning of a causal LM on a 4-bit base, the NF4 figures (exercise 5).
- :mod:`.multitask`: one frozen MiniLM serving two tasks with a bottleneck adapter each (exercise 3).
"""

from .comparison import METHODS, compare, finetune, table_rows  # noqa: F401
