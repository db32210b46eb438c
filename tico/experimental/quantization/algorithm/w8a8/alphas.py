"""Smoothing alphas for W8A8: ``alpha="auto"`` resolved here and only here (the search itself is :mod:`.search`).

With ``alpha="auto"`` each smoothing group, and each layer smoothed inside its quantizer, gets the alpha of
``tuning.alpha_grid`` whose deployed quantization reproduces its quantized consumers' outputs best; otherwise
(or with nothing to score) the configured alpha. The scales come from SmoothQuant's own functions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tico.experimental.quantization.algorithm.smoothquant.quantizer import SmoothQuantQuantizer
from tico.experimental.quantization.algorithm.smoothquant.scales import channel_absmax, smoothing_scales
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver
from tico.experimental.quantization.algorithm.w8a8.ranges import SketchCache
from tico.experimental.quantization.algorithm.w8a8.search import DeployedQuant, Term, search_alpha
from tico.experimental.quantization.algorithm.w8a8.targets import LINEAR_TYPES, weight_rows
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.progress import track


def resolve_alpha(
    config: W8A8Config, default: float, terms: list[Term], scales_for: Callable[[float], torch.Tensor],
    quant: DeployedQuant, sketches: SketchCache,
) -> float:
    """The searched alpha with ``alpha="auto"`` and something to score, else ``default``."""
    if not config.alpha_search or not terms:
        return default
    return search_alpha(terms, scales_for, config.tuning.alpha_grid, quant, sketches=sketches)[0]


def group_alphas(
    config: W8A8Config, sq: SmoothQuantQuantizer, model: nn.Module, observers: dict[str, SampledChannelObserver],
    quant: DeployedQuant, sketches: SketchCache,
) -> dict[str, float] | None:
    """Per smoothing group (by producer), its alpha scored on the consumers that will be quantized (a consumer
    kept in float has no quantization error); None without ``alpha="auto"`` (SmoothQuant's own alphas)."""
    if not config.alpha_search:
        return None
    alphas = {}
    for g in track(sq.plan.smoothed, "choosing alphas (per group)"):
        terms = []
        for c in g.consumers:
            obs = observers.get(c.module)
            if obs is None or obs.rows_sample is None or not isinstance(model.get_submodule(c.module), LINEAR_TYPES):
                continue  # kept in float (or fused experts): its quantization error is zero
            terms.append(Term(obs.rows_sample, obs.absmax, weight_rows(model.get_submodule(c.module)), c.channel_map))
        alphas[g.producer] = resolve_alpha(config, g.alpha, terms, _lazy(lambda g=g: sq.scales_for(model, g)), quant,
                                           sketches)
    return alphas


def _lazy(make: Callable[[], Callable[[float], torch.Tensor]]) -> Callable[[float], torch.Tensor]:
    """``alpha -> scales``, built by ``make`` at its first call (a group with nothing to score never builds it)."""
    built: list[Callable[[float], torch.Tensor]] = []

    def call(alpha: float) -> torch.Tensor:
        if not built:
            built.append(make())
        return built[0](alpha)

    return call


def in_quantizer_alpha_scales(
    config: W8A8Config, sq: SmoothQuantQuantizer, name: str, linear: nn.Linear, obs: SampledChannelObserver,
    quant: DeployedQuant, sketches: SketchCache,
) -> tuple[float, torch.Tensor]:
    """``tuning.smooth_in_quantizer``: the alpha and smoothing scales applied inside the activation quantizer of a
    layer whose input no producer absorbs (SmoothQuant's ``smoothing_scales`` of its input and weight)."""
    weight = linear.weight.detach().float()
    w_absmax = channel_absmax(weight, 1).to(obs.absmax.device)

    def scales_for(a: float) -> torch.Tensor:
        return smoothing_scales(obs.absmax, w_absmax, a)

    terms = [] if obs.rows_sample is None else [Term(obs.rows_sample, obs.absmax, weight)]
    alpha = resolve_alpha(config, sq.alpha_for([name]), terms, scales_for, quant, sketches)
    return alpha, scales_for(alpha)
