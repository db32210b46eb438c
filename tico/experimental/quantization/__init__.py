"""Post-training quantization behind two functions: ``prepare`` (observe) and ``convert`` (transform).

>>> from tico.experimental.quantization import convert, prepare
>>> from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
>>> model = prepare(model, SmoothQuantConfig())   # doctest: +SKIP
>>> for batch in calibration_data:                # doctest: +SKIP
...     model(batch)
>>> model = convert(model)                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["prepare", "convert", "get_quantizer"]

if TYPE_CHECKING:
    from tico.experimental.quantization.public_interface import convert, get_quantizer, prepare


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``tico-sq --help`` (which imports this package) does not wait for torch.
    if name in __all__:
        from tico.experimental.quantization import public_interface

        return getattr(public_interface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
