"""``alpha="auto"``: per group, the alpha whose *deployed* W8A8 quantization reproduces the outputs best.

The score of an alpha is ``sum_k || Qa(X / s) Qw(W_k s)^T - X W_k^T ||^2`` over the group's consumers ``W_k``,
on the calibration row sample ``X``. ``Qa`` is exactly the activation quantizer that will run: per-token
dynamic, or per-tensor static with the range chosen by the deployed method, where the abs-max range comes
from the statistics of *all* calibration data (not from the sample: a range taken from a subset is smaller
than the deployed one, favours large alphas, and picked alphas that made a real model worse).

Cost. Scoring one alpha costs a forward of the scored rows through the group's consumers, so the search must
not score every alpha on every sampled row (that was ``len(grid) * calibration_rows`` rows per layer, several
times the calibration forward itself). It therefore

* scores at most :data:`SCORE_CHANNELS` output channels of each consumer (a seeded subset, its error scaled
  up by ``out / kept``): with per-channel weight scales each output channel's error is its own, so a subset
  estimates the sum without bias, and on wide layers (an MLP's 8192-14336 outputs) quantizing ``W_k s`` and its
  product for every alpha was most of the search,
* scores at most ``max_rows`` (:data:`SCORE_ROWS`) rows, stratified: the sample's most extreme tokens (they
  carry most of a static quantizer's clipping error) plus a weighted seeded uniform subset of the others (the
  static range itself is still chosen, as deployed, from the whole sample and the full-data abs-max),
* searches the grid coarse to fine in two fidelities: the coarse points (every ``len(grid) // 5``-th alpha and
  the one nearest 0.5) are *estimated* on a third of the non-extreme scored rows (all extreme rows kept) with
  the range from a thinned sketch (:class:`_Input`), then the best of them and the points around the best
  (halving steps, moving on while that improves) are *scored* at full fidelity; only full-fidelity scores
  compete for the result (about 7 estimates and 4 to 5 scores instead of 11 scores),
* scores each alpha with exact int8 x int8 -> int32 products (``int8_matmul``: the integers of ``Qa`` and
  ``Qw``, then their two scales), cheaper than fp32 fake-quant products on CPU,
* computes ``Qa(X / s)`` once per distinct input (``q/k/v`` read one tensor) and the references ``X W^T`` once,
* chooses MSE ranges from one :class:`~.ranges.RangeSketch` of the sample per input (shared with convert's
  static ranges through a :class:`~.ranges.SketchCache`), scaled per alpha (the
  very range convert deploys, with no pass over the whole sample per alpha).

``exhaustive=True`` scores every alpha on every row: the reference ``tests/algorithm/w8a8/test_search.py``
holds the fast search to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import to_columns
from tico.experimental.quantization.algorithm.w8a8.ranges import RangeMethod, RangeSketch, SketchCache, range_method
from tico.experimental.quantization.nn.kernels import int8_matmul
from tico.experimental.quantization.nn.qscheme import (
    fake_quant_activation,
    fake_quant_range,
    fake_quant_weight,
    quantize_per_tensor,
    quantize_per_token,
    quantize_weight,
    range_to_scale,
)

SCORE_ROWS = 512
"""Rows of the calibration sample scored per alpha (:func:`score_rows` when the sample is larger): fewer rows
chose worse alphas where outliers are spread over many tokens, more rows overfit small calibration sets
(``tests/algorithm/w8a8/test_quantizer.py``)."""
SCORE_CHANNELS = 1024
"""Output channels of a consumer scored per alpha (a seeded subset when it has more; per-channel weights and
ranges that do not depend on the weight only, where the subset is an unbiased estimate): the products of wide
layers were most of the search."""
SEED = 0
COARSE_OTHERS = 1 / 3
"""Share of the non-extreme scored rows the coarse stage of the search scores (all extreme rows are kept)."""
COARSE_SKETCH_REST = 1 << 12
"""Subsample values of the range sketch the coarse stage scores clips on (the exact tail is kept whole)."""


@dataclass(frozen=True)
class DeployedQuant:
    """The quantizer as it will be deployed: granularities and the static range method."""

    weights: str  # "per_channel" | "per_tensor"
    activations: str  # "dynamic" | "static"
    act_range: str  # a name of ranges.RANGE_METHODS
    percentile: float

    @property
    def method(self) -> RangeMethod:
        """The static range method (:mod:`.ranges`)."""
        return range_method(self.act_range, self.percentile)

    def quantize_acts(
        self,
        x_smoothed: torch.Tensor,
        absmax_smoothed: torch.Tensor,
        weight: torch.Tensor | None = None,
        range_sample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``Qa``: the deployed activation quantize-dequantize of already-smoothed rows (``weight``: smoothed,
        for output-error ranges; ``range_sample``: the smoothed rows the static range is chosen from, by
        default ``x_smoothed`` itself)."""
        if self.activations == "dynamic":
            return fake_quant_activation(x_smoothed, "per_token")
        r = self.static_range(x_smoothed if range_sample is None else range_sample, absmax_smoothed, weight)
        return fake_quant_range(x_smoothed, r)

    def static_range(self, sample: torch.Tensor, absmax_smoothed: torch.Tensor, weight: torch.Tensor | None = None) -> float:
        """The deployed static range of a smoothed input (as convert computes it)."""
        method = self.method
        wq = None if weight is None or not method.per_weight else self.quantize_weight(weight)
        return method.choose(sample, float(absmax_smoothed.max()), weight=weight, weight_q=wq)

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


def score_rows(
    sample: torch.Tensor, max_rows: int | None, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At most ``max_rows`` rows of ``sample [N, C]`` (fp32, in order) and their weights (None: all rows, exact).

    Stratified, because a few extreme tokens carry most of a static quantizer's clipping error: the
    ``max_rows // 4`` rows with the largest ``max_j |x_j| / absmax_j`` (invariant under any smoothing scale,
    so the same rows are extreme for every alpha) are kept with weight 1, and a seeded uniform subset of the
    other rows stands for all of them with weight ``(#others) / (#kept others)``.
    """
    sample = sample.reshape(-1, sample.shape[-1])
    n = sample.shape[0]
    if max_rows is None or n <= max_rows:
        return sample.float(), None
    n_tail = max_rows // 4
    if absmax is None:
        absmax = sample.abs().amax(dim=0)
    ratio = (sample.abs().float() / absmax.float().to(sample.device).clamp_min(1e-30)).amax(dim=1)
    tail = torch.topk(ratio, n_tail).indices if n_tail else ratio.new_zeros(0, dtype=torch.long)
    is_tail = torch.zeros(n, dtype=torch.bool, device=sample.device)
    is_tail[tail] = True
    others = (~is_tail).nonzero().flatten()
    gen = torch.Generator().manual_seed(SEED)
    picked = others[torch.randperm(others.numel(), generator=gen)[: max_rows - n_tail].to(others.device)]
    idx = torch.cat([tail, picked]).sort().values
    weights = torch.where(is_tail[idx], 1.0, others.numel() / max(1, picked.numel())).float()
    return sample[idx].float(), weights


class _Rows:
    """What one fidelity of the search scores: rows, their weights (None: every row, weight 1), the consumers'
    float references on them, and the range sketch of the whole sample the static mse range is chosen from."""

    def __init__(self, rows: torch.Tensor, weights: torch.Tensor | None, sketch: Callable[[], RangeSketch]) -> None:
        self.rows, self.weights, self.sketch = rows, weights, sketch
        self.refs: list[torch.Tensor] = []


class _Input:
    """The consumers of one input tensor (one sample, one column map): ``Qa(X/s)`` is shared by all of them.

    Two fidelities: ``full`` (the :func:`score_rows` sample, the whole sample's sketch) and ``coarse`` (the
    extreme rows and a seeded :data:`COARSE_OTHERS` share of the others, a sketch thinned to
    :data:`COARSE_SKETCH_REST` subsample values): the same estimate of the whole sample's error, cheaper and
    noisier. ``coarse is full`` when the sample is small enough to be scored whole."""

    def __init__(self, first: Term, max_rows: int | None) -> None:
        self.sample = first.sample
        self.absmax = first.act_absmax.float()
        self.channel_map = first.channel_map
        self.weights: list[torch.Tensor] = []
        self.factors: list[float] = []  # per consumer: out / scored output channels
        self.sketches: SketchCache | None = None
        self._sketch: RangeSketch | None = None
        self._thin: RangeSketch | None = None
        rows, row_weights = score_rows(first.sample, max_rows, self.absmax)
        self.full = _Rows(rows, row_weights, self.sketch)
        self.coarse = self.full
        if row_weights is not None:
            others = (row_weights != 1.0).nonzero().flatten()  # score_rows: weight 1 exactly for the extreme rows
            n_keep = max(1, int(others.numel() * COARSE_OTHERS))
            if n_keep < others.numel():
                gen = torch.Generator().manual_seed(SEED + 1)
                keep = others[torch.randperm(others.numel(), generator=gen)[:n_keep].to(others.device)]
                idx = torch.cat([(row_weights == 1.0).nonzero().flatten(), keep]).sort().values
                weights = row_weights[idx].clone()
                weights[weights != 1.0] *= others.numel() / n_keep
                self._coarse_idx = idx
                self.coarse = _Rows(rows[idx], weights, self.thin_sketch)

    def add(self, term: Term, max_channels: int | None = None) -> None:
        w = term.weight.float().to(self.full.rows.device)
        if max_channels is not None and w.shape[0] > max_channels:
            gen = torch.Generator().manual_seed(SEED + 2 + len(self.weights))
            keep = torch.randperm(w.shape[0], generator=gen)[:max_channels].sort().values
            self.factors.append(w.shape[0] / max_channels)
            w = w[keep.to(w.device)]
        else:
            self.factors.append(1.0)
        self.weights.append(w)
        ref = self.full.rows @ w.T
        self.full.refs.append(ref)
        if self.coarse is not self.full:
            self.coarse.refs.append(ref[self._coarse_idx])

    def error(self, scales: torch.Tensor, quant: DeployedQuant, coarse: bool = False) -> float:
        view = self.coarse if coarse else self.full
        s = to_columns(scales, self.channel_map).to(view.rows.device).float()
        x = view.rows / s
        absmax = self.absmax.to(s.device) / s
        err = 0.0
        method = quant.method
        if quant.activations == "static" and method.per_weight:  # the range depends on each weight
            for w, ref, f in zip(self.weights, view.refs, self.factors):
                ws = w * s
                qx, sx = static_codes(x, quant.static_range(x, absmax, ws))
                err += f * _weighted(_int_output(qx, sx, ws, quant).sub_(ref), view.weights)
            return err
        if quant.activations == "dynamic":
            qx, sx = quantize_per_token(x)
        elif method.sketched:  # the deployed range, from the whole sample's sketch
            qx, sx = static_codes(x, method.choose(None, float(absmax.max()), sketch=view.sketch().scaled(s)))
        else:  # the deployed range comes from the whole sample, not only the scored rows
            full = None
            if method.needs_sample and self.sample.numel() > x.numel():
                full = self.sample.reshape(-1, s.numel()) / s
            qx, sx = static_codes(x, quant.static_range(x if full is None else full, absmax))
        for w, ref, f in zip(self.weights, view.refs, self.factors):
            err += f * _weighted(_int_output(qx, sx, w * s, quant).sub_(ref), view.weights)
        return err

    def sketch(self) -> RangeSketch:
        """The whole sample's :class:`RangeSketch`, built once (it commutes with smoothing scales)."""
        if self._sketch is None:
            self._sketch = RangeSketch.of(self.sample) if self.sketches is None else self.sketches.of(self.sample)
        return self._sketch

    def thin_sketch(self) -> RangeSketch:
        if self._thin is None:
            self._thin = self.sketch().thinned(COARSE_SKETCH_REST)
        return self._thin


def _weighted(diff: torch.Tensor, row_weights: torch.Tensor | None) -> float:
    """``sum_i weight_i ||diff_i||^2`` over the scored rows (the estimate of the whole sample's error)."""
    per_row = torch.linalg.vecdot(diff, diff)  # one pass (not pow_ then sum)
    return float(per_row.sum() if row_weights is None else per_row @ row_weights)


def static_codes(x: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and scale of the static per-tensor quantization of ``x`` with range ``r`` (the integers of
    :func:`fake_quant_range`)."""
    scale = range_to_scale(r)
    return quantize_per_tensor(x, scale), torch.tensor(scale, dtype=torch.float32, device=x.device)


def _int_output(qx: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, quant: DeployedQuant) -> torch.Tensor:
    """``Qa(x) Qw(w)^T`` in fp32 from the activation codes ``qx`` (scale ``sx``) and the float weight ``w``."""
    qw, sw = quantize_weight(w, quant.weights)  # type: ignore[arg-type]
    return int8_product(qx, sx, qw, sw)


def int8_product(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """``Qa(x) Qw(w)^T`` in fp32 from the codes ``qx`` (scale ``sx``: ``[]`` or ``[rows, 1]``) and ``qw`` (scale
    ``sw``: ``[out, 1]`` or ``[1]``): one exact int8 x int8 -> int32 product (cheaper than the fp32 one on CPU),
    then the two scales."""
    out = int8_matmul(qx, qw).float()
    if sx.numel() == 1:  # static: one pass with the product of the two scales
        return out.mul_(sw.reshape(1, -1) * sx)
    return out.mul_(sx).mul_(sw.reshape(1, -1))


def output_error(terms: list[Term], references: list[torch.Tensor], scales: torch.Tensor, quant: DeployedQuant) -> float:
    """Squared output error of the consumers under producer-channel ``scales`` and the deployed quantizer,
    every sampled row scored (``references[k] = sample_k @ W_k^T``)."""
    err = 0.0
    for term, ref in zip(terms, references):
        s = term.columns(scales).to(term.sample.device).float()
        w = term.weight.float() * s
        xq = quant.quantize_acts(term.sample.float() / s, term.act_absmax.float().to(s.device) / s, w)
        err += float((xq @ quant.quantize_weight(w).T - ref).pow(2).sum())
    return err


def _coarse_to_fine(grid: list[float], coarse_error: Callable[[float], float], error: Callable[[float], float]) -> None:
    """Estimate ``coarse_error`` on a coarse subset of the sorted ``grid`` (every ``len // 5``-th point and the
    one nearest 0.5), then score with ``error`` the best of them and, with halving steps, the points around the
    best scored so far, moving on at a step while that improves (both memoise)."""
    n = len(grid)
    step = max(1, n // 5)
    coarse = set(range(0, n, step)) | {n - 1, min(range(n), key=lambda i: abs(grid[i] - 0.5))}
    estimates = {i: coarse_error(grid[i]) for i in sorted(coarse)}
    best = min(estimates, key=lambda i: (estimates[i], abs(grid[i] - 0.5)))
    scores = {best: error(grid[best])}
    h = step // 2
    while h >= 1:
        for j in (best - h, best + h):
            if 0 <= j < n and j not in scores:
                scores[j] = error(grid[j])
        moved = min(scores, key=lambda i: (scores[i], abs(grid[i] - 0.5)))
        if moved == best:
            h //= 2
        best = moved


def search_alpha(
    terms: list[Term],
    scales_for: Callable[[float], torch.Tensor],
    grid: tuple[float, ...],
    quant: DeployedQuant,
    *,
    max_rows: int | None = SCORE_ROWS,
    max_channels: int | None = SCORE_CHANNELS,
    exhaustive: bool = False,
    sketches: SketchCache | None = None,
) -> tuple[float, dict[float, float]]:
    """The alpha of ``grid`` with the smallest output error, and the error of every alpha scored.

    Args:
        terms: the consumers to score, each with its own (unsmoothed) input sample and abs-max over all data.
            Terms with the same ``sample`` object and column map share one activation quantization.
        scales_for: alpha -> per-producer-channel smoothing scales (exactly those convert would fold).
        grid: candidate alphas.
        quant: the deployed quantizer.
        max_rows: rows scored per alpha (None: all of the sample).
        max_channels: output channels scored per consumer and alpha (None: all); only with per-channel weight
            scales and a range that does not depend on the weight (otherwise every channel is scored).
        exhaustive: score every alpha of the grid on every row (the reference for the fast search).
        sketches: where the samples' range sketches are built once per convert (shared with the static ranges).

    Returns:
        ``(best, errors)``: ``best`` has the smallest full-fidelity error (ties go to the alpha nearest the paper's
        default 0.5); ``errors`` holds every scored alpha, the coarse stage's estimates replaced by full-fidelity
        scores where both exist (all of ``grid`` when exhaustive; always the grid point nearest 0.5).
    """
    inputs: dict[tuple[int, tuple[int, ...] | None], _Input] = {}
    subsample = not exhaustive and quant.weights == "per_channel" and not quant.method.per_weight
    for t in terms:
        key = (id(t.sample), t.channel_map)
        if key not in inputs:
            inputs[key] = _Input(t, None if exhaustive else max_rows)
            inputs[key].sketches = sketches
        inputs[key].add(t, max_channels if subsample else None)
    errors: dict[float, float] = {}  # full fidelity
    estimates: dict[float, float] = {}  # coarse fidelity
    scales_of: dict[float, torch.Tensor] = {}
    same = all(inp.coarse is inp.full for inp in inputs.values())  # small samples: one fidelity

    def scales(a: float) -> torch.Tensor:
        if a not in scales_of:
            scales_of[a] = scales_for(a)
        return scales_of[a]

    def error(a: float) -> float:
        if a not in errors:
            errors[a] = sum(inp.error(scales(a), quant) for inp in inputs.values())
        return errors[a]

    def coarse_error(a: float) -> float:
        if same:
            return error(a)
        if a not in estimates:
            estimates[a] = sum(inp.error(scales(a), quant, coarse=True) for inp in inputs.values())
        return estimates[a]

    points = sorted({float(a) for a in grid})
    if exhaustive or len(points) <= 7:
        for a in points:
            error(a)
    else:
        _coarse_to_fine(points, coarse_error, error)
    finite = [a for a in errors if math.isfinite(errors[a])] or list(errors)
    best = min(finite, key=lambda a: (errors[a], abs(a - 0.5)))  # ties: the alpha nearest the paper's default
    return best, {**estimates, **errors}
