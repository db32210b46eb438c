"""Post-training quantization behind two functions: ``prepare`` (observe) and ``convert`` (transform).

>>> from tico.experimental.quantization import convert, prepare
>>> from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
>>> model = prepare(model, SmoothQuantConfig())   # doctest: +SKIP
>>> for batch in calibration_data:                # doctest: +SKIP
...     model(batch)
>>> model = convert(model)                        # doctest: +SKIP
"""

from tico.experimental.quantization.public_interface import convert, get_quantizer, prepare

__all__ = ["prepare", "convert", "get_quantizer"]
