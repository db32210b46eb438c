"""SmoothQuant: migrate activation outliers into weights by an exact per-channel rescaling.

The path from config to folded weights, in reading order (six files besides the dataflow tracer,
``structure/dataflow.py`` with its probe forward ``structure/probe.py``):

1. ``config/smoothquant.py``: what the user chooses (alpha, the alpha map, explicit ``mappings``).
2. ``structure/names.py``: the one module-name matcher (exact names and ``re:`` patterns) for every key above.
3. ``algorithm/smoothquant/groups.py``: the plan: which producer feeds which consumers (from the trace, or from
   ``mappings``), the proof nothing else reads it, each group's alpha, and where its statistics are taken.
4. ``structure/producers.py``: producer forms (Linear, ``norm(x) * w``, ``norm(x) * (1 + w)``), the probe that
   recognises them, and the fold of ``1/s`` into a producer.
5. ``algorithm/smoothquant/scales.py``: statistics (the observer), the scales, and the fold of ``s`` into the
   consumers and of a whole group.
6. ``algorithm/smoothquant/quantizer.py``: the lifecycle: trace -> plan -> observe in ``prepare``, plan scales ->
   validate -> apply (one transaction) in ``convert``.

Beside the path: ``recipe.py`` saves a convert's scales and re-applies them without calibration.
"""

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup, SmoothingPlan, SmoothQuantError
from tico.experimental.quantization.algorithm.smoothquant.quantizer import ScalePlan, SmoothQuantQuantizer

__all__ = ["SmoothQuantQuantizer", "SmoothQuantError", "SmoothingPlan", "SmoothingGroup", "ScalePlan"]
