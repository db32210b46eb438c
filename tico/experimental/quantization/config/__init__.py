"""Quantization configs: one frozen, validated dataclass per algorithm."""

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config

__all__ = ["BaseConfig", "SmoothQuantConfig", "W8A8Config"]
