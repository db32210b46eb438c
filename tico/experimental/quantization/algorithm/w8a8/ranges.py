"""Static per-tensor activation ranges: abs-max, MSE-optimal clipping (``mse``, ``output_mse``), or a percentile.

Abs-max over a calibration set is hostage to a few extreme tokens; clipping them costs a little error on those
tokens and buys resolution for all the others. ``mse`` picks the clip that minimises the quantization error of
the calibration sample, with exactly the quantizer that will be deployed.
"""

from __future__ import annotations

import torch

from tico.experimental.quantization.nn.qscheme import fake_quant_range

CLIP_RATIOS = torch.linspace(0.05, 1.0, 96)


def mse_range(sample: torch.Tensor, absmax: float) -> float:
    """The clip in ``(0, absmax]`` minimising ``sum (x - q(x))**2`` over ``sample`` (fp32)."""
    if absmax <= 0:
        return 0.0
    x = sample.float().flatten()
    best, best_err = absmax, float("inf")
    for ratio in CLIP_RATIOS.tolist():
        clip = absmax * ratio
        err = float((fake_quant_range(x, clip) - x).pow(2).sum())
        if err < best_err:
            best, best_err = clip, err
    return best


def output_mse_range(sample: torch.Tensor, absmax: float, weight: torch.Tensor, weight_q: torch.Tensor) -> float:
    """The clip minimising the layer's *output* error ``|| q(x) Wq^T - x W^T ||^2`` on ``sample``.

    Clipping error in a channel that meets large weights costs more than in one that meets small weights;
    scoring the output sees that, scoring the activation alone does not.
    """
    if absmax <= 0:
        return 0.0
    x = sample.float()
    ref = x @ weight.float().T
    wq = weight_q.float().T
    best, best_err = absmax, float("inf")
    for ratio in CLIP_RATIOS.tolist():
        clip = absmax * ratio
        err = float((fake_quant_range(x, clip) @ wq - ref).pow(2).sum())
        if err < best_err:
            best, best_err = clip, err
    return best


def percentile_range(sample: torch.Tensor, absmax: float, percentile: float) -> float:
    """The ``percentile`` of ``|x|`` over ``sample``, never above ``absmax``."""
    x = sample.float().abs().flatten()
    if x.numel() == 0:
        return absmax
    k = max(1, min(x.numel(), int(round(percentile / 100.0 * x.numel()))))
    return min(absmax, float(torch.kthvalue(x, k).values))


def static_range(
    method: str,
    sample: torch.Tensor | None,
    absmax: float,
    percentile: float,
    weight: torch.Tensor | None = None,
    weight_q: torch.Tensor | None = None,
) -> float:
    """The range ``r`` of a static per-tensor int8 scale ``r / 127`` under ``method``.

    ``"output_mse"`` needs the layer's (smoothed) ``weight`` and its deployed quantize-dequantize ``weight_q``;
    without them it falls back to ``"mse"``.
    """
    if method == "absmax" or sample is None:
        return absmax
    if method == "output_mse" and weight is not None and weight_q is not None:
        return output_mse_range(sample, absmax, weight, weight_q)
    if method == "output_mse":
        method = "mse"
    if method == "mse":
        return mse_range(sample, absmax)
    if method == "percentile":
        return percentile_range(sample, absmax, percentile)
    raise ValueError(f"unknown activation range method {method!r}; expected 'absmax', 'mse', 'output_mse' or 'percentile'")
