"""Run-time modules of W8A8 (no calibration code): what a quantized model executes.

* :mod:`.qscheme`: the int8 quantization maths every other module calls (scales, rounding, clamping).
* :mod:`.kernels`: int8 x int8 -> int32 matmuls (``torch._int_mm``, oneDNN, an exact fallback).
* :mod:`.linear`: :class:`W8A8Linear`, built with :meth:`W8A8Linear.from_linear`.
* :mod:`.embedding`: weight-only int8 embedding rows and a tied int8 LM head.
* :mod:`.rotated`: :class:`RotatedInputLinear`, an orthogonal rotation of the input before an inner layer.
"""

from tico.experimental.quantization.nn.embedding import Int8Embedding, Int8TiedHead
from tico.experimental.quantization.nn.kernels import int8_matmul, onednn_int8_available
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.nn.rotated import RotatedInputLinear
from tico.experimental.quantization.nn.qscheme import (
    dequantize,
    fake_quant_activation,
    fake_quant_weight,
    quantize_activation,
    quantize_per_tensor,
    quantize_per_token,
    quantize_weight,
)

__all__ = [
    "W8A8Linear",
    "Int8Embedding",
    "Int8TiedHead",
    "RotatedInputLinear",
    "int8_matmul",
    "onednn_int8_available",
    "quantize_weight",
    "quantize_activation",
    "quantize_per_token",
    "quantize_per_tensor",
    "dequantize",
    "fake_quant_weight",
    "fake_quant_activation",
]
