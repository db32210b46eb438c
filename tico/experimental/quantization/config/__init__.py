"""Quantization configs: one frozen, validated dataclass per algorithm."""

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

__all__ = ["BaseConfig", "SmoothQuantConfig"]
