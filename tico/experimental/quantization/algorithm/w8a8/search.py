"""``alpha="auto"``: per group, the alpha whose *deployed* W8A8 quantization reproduces the outputs best.

The score of an alpha is ``sum_k || Qa(X / s) Qw(W_k s)^T - X W_k^T ||^2`` over the group's consumers ``W_k``,
on the calibration row sample ``X``. ``Qa`` is exactly the activation quantizer that will run: per-token
dynamic, or per-tensor static with the range chosen by the deployed method, where the abs-max range comes
from the statistics of *all* calibration data (not from the sample: a range taken from a subset is smaller
than the deployed one, favours large alphas, and picked alphas that made a real model worse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import smoothing_scales
from tico.experimental.quantization.algorithm.w8a8.ranges import static_range
from tico.experimental.quantization.w8a8.qscheme import fake_quant_activation, fake_quant_weight


@dataclass(frozen=True)
class DeployedQuant:
    """The quantizer as it will be deployed: granularities and the static range method."""

    weights: str  # "per_channel" | "per_tensor"
    activations: str  # "dynamic" | "static"
    act_range: str  # "absmax" | "mse" | "percentile"
    percentile: float

    def quantize_acts(self, x_smoothed: torch.Tensor, absmax_smoothed: torch.Tensor) -> torch.Tensor:
        """``Qa``: the deployed activation quantize-dequantize of already-smoothed rows."""
        if self.activations == "dynamic":
            return fake_quant_activation(x_smoothed, "per_token")
        r = static_range(self.act_range, x_smoothed, float(absmax_smoothed.max()), self.percentile)
        return fake_quant_activation(x_smoothed, "per_tensor", scale=max(r, 1e-12) / 127.0)

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.weights)


def output_error(
    sample: torch.Tensor,
    act_absmax: torch.Tensor,
    weights: list[torch.Tensor],
    references: list[torch.Tensor],
    scales: torch.Tensor,
    quant: DeployedQuant,
) -> float:
    """Squared output error of the group's consumers under smoothing ``scales`` and the deployed quantizer."""
    xq = quant.quantize_acts(sample / scales, act_absmax / scales)
    err = 0.0
    for w, ref in zip(weights, references):
        err += float((xq @ quant.quantize_weight(w * scales).T - ref).pow(2).sum())
    return err


def search_alpha(
    sample: torch.Tensor,
    act_absmax: torch.Tensor,
    weights: list[torch.Tensor],
    grid: tuple[float, ...],
    quant: DeployedQuant,
    scales_for: Callable[[float], torch.Tensor] | None = None,
) -> tuple[float, dict[float, float]]:
    """The alpha of ``grid`` with the smallest :func:`output_error`, and every alpha's error.

    Args:
        sample: ``[rows, C]`` calibration rows of the unsmoothed input (any dtype; scored in fp32).
        act_absmax: ``[C]`` per-channel abs-max over all calibration data.
        weights: each consumer's weight as ``[out, C]`` (unsmoothed).
        grid: candidate alphas.
        quant: the deployed quantizer.
        scales_for: alpha -> scales; defaults to :func:`smoothing_scales` with the weights' column abs-max.
    """
    x = sample.float()
    ws = [w.float() for w in weights]
    refs = [x @ w.T for w in ws]
    act = act_absmax.float()
    if scales_for is None:
        w_absmax = torch.stack([w.abs().amax(dim=0) for w in ws]).amax(dim=0)

        def scales_for(alpha: float) -> torch.Tensor:
            return smoothing_scales(act, w_absmax, alpha)

    errors = {a: output_error(x, act, ws, refs, scales_for(a), quant) for a in grid}
    best = min(grid, key=lambda a: (errors[a], abs(a - 0.5)))  # ties: the alpha nearest the paper's default
    return best, errors
