"""``prepare`` and ``convert``: the two functions users call. They dispatch on the config's type.

The quantizer that ``prepare`` creates is kept on the model (in ``model.__dict__``, not as a submodule, so
it is invisible to ``state_dict``/``save_pretrained``) until ``convert`` removes it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.quantizer import BaseQuantizer
from tico.experimental.quantization.registry import get_quantizer_class

_STATE_ATTR = "_tico_quantizer"


def get_quantizer(model: torch.nn.Module) -> BaseQuantizer:
    """The quantizer attached by :func:`prepare` (for example to inspect ``get_quantizer(model).plan``)."""
    quantizer = model.__dict__.get(_STATE_ATTR)
    if quantizer is None:
        raise RuntimeError(
            f"{type(model).__name__} has not been prepared: call "
            "tico.experimental.quantization.prepare(model, config) and run calibration forwards first"
        )
    return quantizer


def prepare(
    model: torch.nn.Module,
    quant_config: BaseConfig,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    inplace: bool = True,
) -> torch.nn.Module:
    """Attach the observers ``quant_config``'s algorithm needs; no weight changes.

    Args:
        model: the float model (e.g. a ``transformers`` ``PreTrainedModel``).
        quant_config: an algorithm config, e.g. ``SmoothQuantConfig()``.
        args, kwargs: example inputs for one short forward that some algorithms run to discover the model's
            dataflow. Optional for Hugging Face models, where a few token ids are used.
        inplace: if False, ``model`` is left untouched and a prepared deep copy is returned.

    Returns:
        The prepared model. Run the calibration forwards on it, then call :func:`convert`.
    """
    if not isinstance(quant_config, BaseConfig):
        raise TypeError(f"quant_config must be a quantization config (BaseConfig), got {type(quant_config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _STATE_ATTR in model.__dict__:
        prepared_with = type(model.__dict__[_STATE_ATTR].config).__name__
        raise RuntimeError(
            f"{type(model).__name__} is already prepared with {prepared_with}; call convert(model) first"
        )
    quantizer = get_quantizer_class(quant_config)(quant_config)
    if not inplace:
        model = copy.deepcopy(model)
    model = quantizer.prepare(model, args=args, kwargs=kwargs)
    model.__dict__[_STATE_ATTR] = quantizer
    return model


def convert(model: torch.nn.Module, inplace: bool = True) -> torch.nn.Module:
    """Apply the prepared algorithm using the statistics gathered since :func:`prepare`.

    The returned model has the same class and no hooks, and the quantizer kept by :func:`prepare` is removed.
    SmoothQuant leaves no other trace than the changed weights. W8A8 swaps modules (``W8A8Linear``, and with
    ``tuning.rotate_in_quantizer``/``quantize_embeddings`` ``RotatedInputLinear``/``Int8Embedding``); with
    ``tuning.quantize_attention`` each attention module also keeps a ``_tico_attention_quant`` attribute (its fixed
    int8 scales, not in ``state_dict``) and ``config._attn_implementation`` stays ``"tico_w8a8_sdpa"``, as :func:`prepare` set it.

    The algorithm plans every change, validates the whole plan, then applies it as one transaction: if the
    statistics or the plan are invalid, one error names every offending module, and if anything fails while
    applying, every change already made is undone. Either way the model is left exactly as it was, still
    prepared, so ``convert`` can be called again once the cause is fixed.

    Args:
        model: a model returned by :func:`prepare`, after calibration forwards.
        inplace: if False, the prepared ``model`` is left as it is (observers included) and a converted deep copy
            is returned.
    """
    quantizer = get_quantizer(model)
    if not inplace:
        quantizer.detach(model)
        del model.__dict__[_STATE_ATTR]
        try:
            target = copy.deepcopy(model)
        finally:
            model.__dict__[_STATE_ATTR] = quantizer
            quantizer.attach(model)
        # The copy is converted with the original's statistics; its (absent) hooks need no removal.
        return quantizer.convert(target)
    converted = quantizer.convert(model)  # raises before changing anything if the plan is invalid
    quantizer.detach(model)
    model.__dict__.pop(_STATE_ATTR, None)
    return converted
