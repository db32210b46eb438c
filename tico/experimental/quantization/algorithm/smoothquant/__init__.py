"""SmoothQuant: migrate activation outliers into weights by an exact per-channel rescaling."""

from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingGroup, SmoothingPlan
from tico.experimental.quantization.algorithm.smoothquant.quantizer import (
    ScalePlan,
    SmoothQuantError,
    SmoothQuantQuantizer,
)

__all__ = ["SmoothQuantQuantizer", "SmoothQuantError", "SmoothingPlan", "SmoothingGroup", "ScalePlan"]
