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
from tico.experimental.quantization.algorithm.w8a8.search import SCORE_ROWS, DeployedQuant, Term, search_alpha
from tico.experimental.quantization.algorithm.w8a8.targets import LINEAR_TYPES, weight_rows
from tico.experimental.quantization import distributed
from tico.experimental.quantization.config.w8a8 import W8A8Config


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
    kept in float has no quantization error); None without ``alpha="auto"`` (SmoothQuant's own alphas).

    Each group's search is one unit of work: under a process group the groups are split over the ranks (by their
    estimated cost, :func:`search_cost`) and the alphas exchanged (:func:`~...distributed.split_work`)."""
    if not config.alpha_search:
        return None
    groups = {g.producer: g for g in sq.plan.smoothed}
    scored = {p: [c for c in g.consumers if _scored(model, observers, c.module)] for p, g in groups.items()}

    def alpha_of(producer: str) -> float:  # the terms are built here: one search's fp32 weights at a time
        g = groups[producer]
        terms = [Term(observers[c.module].rows_sample, observers[c.module].absmax,  # type: ignore[arg-type]
                      weight_rows(model.get_submodule(c.module)), c.channel_map) for c in scored[producer]]
        return resolve_alpha(config, g.alpha, terms, _lazy(lambda: sq.scales_for(model, g)), quant, sketches)

    costs = [search_cost([(observers[c.module], model.get_submodule(c.module)) for c in scored[p]]) for p in groups]
    return distributed.split_work("choosing alphas", list(groups), costs, alpha_of, progress="choosing alphas (per group)")


def _scored(model: nn.Module, observers: dict[str, SampledChannelObserver], consumer: str) -> bool:
    """Whether a consumer's quantization error is scored: one kept in float (or fused experts) has none."""
    obs = observers.get(consumer)
    return obs is not None and obs.rows_sample is not None and isinstance(model.get_submodule(consumer), LINEAR_TYPES)


def search_cost(consumers: list[tuple[SampledChannelObserver, nn.Module]]) -> float:
    """An estimate of one alpha search: the rows it scores through its consumers' weights (rows x in x out), what
    the split over ranks balances (the grid is the same for every search)."""
    return float(sum(min(obs.rows_sample.shape[0], SCORE_ROWS) * layer.weight.numel()  # type: ignore[union-attr]
                     for obs, layer in consumers))


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
    scales_for = in_quantizer_scales(linear, obs)
    terms = [] if obs.rows_sample is None else [Term(obs.rows_sample, obs.absmax, linear.weight.detach().float())]
    alpha = resolve_alpha(config, sq.alpha_for([name]), terms, scales_for, quant, sketches)
    return alpha, scales_for(alpha)


def in_quantizer_scales(linear: nn.Linear, obs: SampledChannelObserver) -> Callable[[float], torch.Tensor]:
    """``alpha -> `` the in-quantizer smoothing scales of ``linear``'s input (SmoothQuant's ``smoothing_scales``
    of its input abs-max and weight): a layer planned on another rank is rebuilt from its alpha alone."""
    w_absmax = channel_absmax(linear.weight.detach().float(), 1).to(obs.absmax.device)

    def scales_for(a: float) -> torch.Tensor:
        return smoothing_scales(obs.absmax, w_absmax, a)

    return scales_for
