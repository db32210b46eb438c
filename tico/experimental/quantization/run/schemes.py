"""The named schemes of the command line, as library configs, and configs as JSON-ready dicts.

One place decides what ``--scheme w8a8-static`` means, so the command line, the examples and the streaming
pipeline build the same config from the same words. The defaults are chosen among what can be exported to a
compressed-tensors checkpoint: ``alpha="auto"`` scored with the deployed quantizer, Linear -> Linear smoothing
(``linear_producers=True``) and MSE static ranges. (Smoothing inside the activation quantizer has no place in
the exported format, so no scheme uses it.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence, Union

from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning

__all__ = ["SCHEMES", "DEFAULT_ALPHA", "DEFAULT_ACT_RANGE", "DEFAULT_DYNAMIC_FALLBACK", "DEFAULT_BLOCK_OBJECTIVE", "build_config", "config_to_dict", "demo_recipes"]

Scheme = Literal["smooth", "w8a8-dynamic", "w8a8-static"]
SCHEMES: dict[str, str] = {
    "smooth": "SmoothQuant smoothing only: a float model with changed weights, outputs unchanged "
    "(save_pretrained folder; quantize it with any tool)",
    "w8a8-dynamic": "smoothing + int8 weights (per channel) + int8 activations with a per-token scale computed at "
    "run time (compressed-tensors checkpoint)",
    "w8a8-static": "smoothing + int8 weights (per channel) + int8 activations with one scale per tensor fixed from "
    "calibration (compressed-tensors checkpoint)",
}
DEFAULT_ALPHA: dict[str, float | str] = {"smooth": 0.5, "w8a8-dynamic": "auto", "w8a8-static": "auto"}
DEFAULT_ACT_RANGE = "mse"
# Static W8A8 on real LLMs meets massive activations (a few tokens no per-tensor scale can hold): by default a
# layer whose static error exceeds 16x its dynamic per-token error runs dynamic, and each block keeps the
# searched smoothing or none by its output error on the calibration data. Both are choices made by measuring the
# calibration data (benchmarks/ compares them), and both export.
DEFAULT_DYNAMIC_FALLBACK: dict[str, float] = {"w8a8-static": 16.0}
DEFAULT_BLOCK_OBJECTIVE: dict[str, bool] = {"w8a8-static": True}
OFF = "off"

AnyConfig = Union[SmoothQuantConfig, W8A8Config]


def build_config(
    scheme: str,
    alpha: float | str | None = None,
    act_range: str = DEFAULT_ACT_RANGE,
    ignore: Sequence[str] = (),
    linear_producers: bool | None = None,
    dynamic_fallback: float | str | None = None,
    block_objective: bool | None = None,
) -> AnyConfig:
    """The config for ``scheme`` (see :data:`SCHEMES`); ``None`` arguments take the scheme's default.

    ``alpha="auto"`` needs a W8A8 scheme (it is scored with the quantizer that will run); ``act_range`` matters
    for ``w8a8-static`` only; ``ignore`` names modules (or name prefixes) kept in float. Linear -> Linear
    smoothing is on for the W8A8 schemes (it folds what the exported format can hold) and off for ``smooth``,
    which keeps the paper's norm -> Linear groups unless asked. ``dynamic_fallback`` (``w8a8-static`` only) lets
    layers whose static error exceeds that many times their dynamic error run dynamic per token.
    ``block_objective`` (W8A8 schemes) keeps, per decoder block, the searched smoothing or none, whichever
    quantized block reproduces the float block's output best (``W8A8Config.block_objective``). Both are on for
    ``w8a8-static`` by default (:data:`DEFAULT_DYNAMIC_FALLBACK`, :data:`DEFAULT_BLOCK_OBJECTIVE`);
    ``dynamic_fallback="off"`` and ``block_objective=False`` turn them off.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    alpha = DEFAULT_ALPHA[scheme] if alpha is None else alpha
    if alpha == "auto" and scheme == "smooth":
        raise ValueError("alpha='auto' needs a W8A8 scheme to score alphas against (w8a8-dynamic or w8a8-static)")
    if linear_producers is None:
        linear_producers = scheme != "smooth"
    smoothing = SmoothQuantConfig(alpha=alpha, linear_producers=linear_producers)  # type: ignore[arg-type]
    if dynamic_fallback not in (None, OFF) and scheme != "w8a8-static":
        raise ValueError("dynamic_fallback applies to w8a8-static (it turns single layers dynamic per token)")
    if dynamic_fallback is None:
        dynamic_fallback = DEFAULT_DYNAMIC_FALLBACK.get(scheme)
    elif dynamic_fallback == OFF:
        dynamic_fallback = None
    if block_objective and scheme == "smooth":
        raise ValueError("block_objective applies to the W8A8 schemes (it measures the quantized blocks)")
    if scheme == "smooth":
        if ignore:
            raise ValueError("ignore applies to the W8A8 schemes (smoothing has no layers to keep in float)")
        return smoothing
    if block_objective is None:
        block_objective = DEFAULT_BLOCK_OBJECTIVE.get(scheme, False)
    activations = scheme.split("-")[1]
    return W8A8Config(smoothing=smoothing, activations=activations, act_range=act_range, ignore=tuple(ignore),  # type: ignore[arg-type]
                      dynamic_fallback=dynamic_fallback, block_objective=block_objective)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Every field of a (possibly nested) config dataclass, with its class name, ready for JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {"type": type(value).__name__, **{f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def demo_recipes() -> dict[str, AnyConfig | None]:
    """The rows of ``tico-sq demo``: float, then naive and SmoothQuant W8A8, dynamic and static.

    SmoothQuant rows smooth inside the activation quantizer too (``smooth_in_quantizer``), which also covers
    post-LN encoders such as the default demo model, whose norms cannot absorb a scale.
    """
    smooth = SmoothQuantConfig(alpha="auto", linear_producers=True)
    return {
        "float": None,
        "W8A8 dynamic, naive": W8A8Config(activations="dynamic"),
        "W8A8 dynamic, SmoothQuant": W8A8Config(smoothing=smooth, activations="dynamic", tuning=W8A8Tuning(smooth_in_quantizer=True)),
        "W8A8 static, naive": W8A8Config(activations="static", act_range="absmax"),
        "W8A8 static, SmoothQuant": W8A8Config(smoothing=smooth, activations="static", tuning=W8A8Tuning(smooth_in_quantizer=True)),
    }
