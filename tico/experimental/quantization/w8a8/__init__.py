"""int8 execution of W8A8 (int8 weights, int8 activations) layers: the quantization maths and ``W8A8Linear``.

* :mod:`.qscheme`: symmetric int8 quantization shared by the real and the simulated backends.
* :mod:`.linear`: :class:`W8A8Linear`, built with :meth:`W8A8Linear.from_linear`.
"""

from tico.experimental.quantization.w8a8.linear import W8A8Linear, int8_matmul, onednn_int8_available
from tico.experimental.quantization.w8a8.qscheme import (
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
