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

from tico.experimental.quantization.algorithm.smoothquant.scales import to_columns
from tico.experimental.quantization.algorithm.w8a8.ranges import static_range
from tico.experimental.quantization.nn.qscheme import fake_quant_activation, fake_quant_range, fake_quant_weight


@dataclass(frozen=True)
class DeployedQuant:
    """The quantizer as it will be deployed: granularities and the static range method."""

    weights: str  # "per_channel" | "per_tensor"
    activations: str  # "dynamic" | "static"
    act_range: str  # "absmax" | "mse" | "output_mse" | "percentile"
    percentile: float

    def quantize_acts(
        self, x_smoothed: torch.Tensor, absmax_smoothed: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``Qa``: the deployed activation quantize-dequantize of already-smoothed rows (``weight``: smoothed,
        for output-error ranges)."""
        if self.activations == "dynamic":
            return fake_quant_activation(x_smoothed, "per_token")
        wq = None if weight is None else self.quantize_weight(weight)
        r = static_range(self.act_range, x_smoothed, float(absmax_smoothed.max()), self.percentile, weight, wq)
        return fake_quant_range(x_smoothed, r)

    def quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.weights)


@dataclass
class Term:
    """One consumer layer in a search: its input sample/abs-max, its ``[out, in]`` weight, its column map."""

    sample: torch.Tensor
    act_absmax: torch.Tensor
    weight: torch.Tensor
    channel_map: tuple[int, ...] | None = None

    def columns(self, scales: torch.Tensor) -> torch.Tensor:
        return to_columns(scales, self.channel_map)


def output_error(terms: list[Term], references: list[torch.Tensor], scales: torch.Tensor, quant: DeployedQuant) -> float:
    """Squared output error of the consumers under producer-channel ``scales`` and the deployed quantizer."""
    err = 0.0
    for term, ref in zip(terms, references):
        s = term.columns(scales).to(term.sample.device)
        w = term.weight * s
        xq = quant.quantize_acts(term.sample / s, term.act_absmax.to(s.device) / s, w)
        err += float((xq @ quant.quantize_weight(w).T - ref).pow(2).sum())
    return err


def search_alpha(
    terms: list[Term],
    scales_for: Callable[[float], torch.Tensor],
    grid: tuple[float, ...],
    quant: DeployedQuant,
) -> tuple[float, dict[float, float]]:
    """The alpha of ``grid`` with the smallest :func:`output_error`, and every alpha's error.

    Args:
        terms: the consumers to score, each with its own (unsmoothed) input sample and abs-max over all data.
        scales_for: alpha -> per-producer-channel smoothing scales (exactly those convert would fold).
        grid: candidate alphas.
        quant: the deployed quantizer.
    """
    terms = [Term(t.sample.float(), t.act_absmax.float(), t.weight.float(), t.channel_map) for t in terms]
    refs = [t.sample @ t.weight.T for t in terms]
    errors = {a: output_error(terms, refs, scales_for(a), quant) for a in grid}
    best = min(grid, key=lambda a: (errors[a], abs(a - 0.5)))  # ties: the alpha nearest the paper's default
    return best, errors
