"""Static per-tensor activation ranges: abs-max, MSE-optimal clipping (``mse``, ``output_mse``), or a percentile.

Each method is a :class:`RangeMethod` (:data:`RANGE_METHODS`, :func:`range_method`): ``W8A8Config.act_range`` is
interpreted here and nowhere else.

Abs-max over a calibration set is hostage to a few extreme tokens; clipping them costs a little error on those
tokens and buys resolution for all the others. ``mse`` picks the clip that minimises the quantization error of
the calibration sample, with exactly the quantizer that will be deployed.

Cost. Convert calls these once per layer and, for ``alpha="auto"``, once per scored alpha, so they must cost
a small fraction of one forward pass, not ``len(CLIP_RATIOS)`` passes over the sample:

* the clip is searched **coarse to fine** over :data:`CLIP_RATIOS` (every 8th ratio, then halving strides
  4, 2, 1 around the two best so far), with all candidates of a step scored in one batched tensor op;
* a sample of more than :data:`MAX_SCORED` values is scored through a :class:`RangeSketch`, **stratified**:
  each channel's largest ``|x|`` (the tail, where clipping happens, kept exactly) plus a seeded uniform
  subsample of the rest, weighted to stand for all of it (rounding error there is an average, well estimated
  from a subsample). The sketch commutes with per-channel smoothing scales, so the alpha search builds it once.

``tests/algorithm/w8a8/test_ranges.py`` checks the result against the exhaustive search on all values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tico.experimental.quantization.nn.qscheme import QMAX, QMIN_ACT, absmax_to_scale, fake_quant_range, multiplier_of

CLIP_RATIOS = torch.linspace(0.05, 1.0, 96)
COARSE_STEP = 8
"""Stride of the first pass over :data:`CLIP_RATIOS`; the second pass scores every ratio near the best ones."""
MAX_SCORED = 1 << 15
"""Values scored per candidate clip: samples larger than this are scored stratified (exact tail + subsample)."""
TAIL_FRACTION = 0.25
"""Share of :data:`MAX_SCORED` spent on the exact tail (each channel's largest ``|x|``), the rest on the subsample."""
SEED = 0


@dataclass(frozen=True)
class RangeSketch:
    """A bounded, weighted stand-in for a sample ``[N, C]`` whose clip errors estimate the whole sample's.

    Kept: every channel's ``m`` largest ``|x|`` (exact, weight 1: where clipping acts) and a seeded uniform
    subsample of the other values, weighted to stand for all of them (rounding error there is an average).
    Both choices are invariant under a per-channel scale, so ``RangeSketch.of(x).scaled(s)`` holds exactly the
    values of ``RangeSketch.of(x / s)``: the alpha search scores the range convert will deploy, without a pass
    over the whole sample per alpha.
    """

    values: torch.Tensor  # fp32 [M]
    channels: torch.Tensor  # long [M]: the channel of each value
    weights: torch.Tensor | None  # fp32 [M], None: every value of the sample, weight 1
    tail: int = 0  # the first ``tail`` values are the exact tail (weight 1), the others the uniform subsample

    @classmethod
    def of(cls, sample: torch.Tensor, max_scored: int = MAX_SCORED) -> "RangeSketch":
        x = sample.detach().reshape(-1, sample.shape[-1] if sample.dim() > 1 else 1)
        n_rows, c = x.shape
        n = x.numel()
        if n <= max_scored:
            channels = torch.arange(c, device=x.device).repeat(n_rows)
            return cls(x.float().flatten(), channels, None)
        m = max(1, min(n_rows, int(max_scored * TAIL_FRACTION) // c))
        top = x.abs().topk(m, dim=0).indices  # [m, C] (faster than on a contiguous transposed copy)
        tail = x.gather(0, top).float().flatten()
        tail_channels = torch.arange(c, device=x.device).repeat(m)
        in_tail = torch.zeros(n_rows, c, dtype=torch.bool, device=x.device).scatter_(0, top, True).flatten()
        gen = torch.Generator().manual_seed(SEED)
        idx = torch.randint(n, (max_scored - tail.numel(),), generator=gen).to(x.device)
        idx = idx[~in_tail[idx]]
        rest = x.flatten()[idx].float()
        weight = (n - tail.numel()) / max(1, idx.numel())
        return cls(
            torch.cat([tail, rest]),
            torch.cat([tail_channels, idx % c]),
            torch.cat([tail.new_ones(tail.numel()), tail.new_full((idx.numel(),), weight)]),
            tail.numel(),
        )

    def scaled(self, divisor: torch.Tensor) -> "RangeSketch":
        """The sketch of ``sample / divisor`` (``divisor``: one per channel)."""
        d = divisor.float().to(self.values.device).reshape(-1)
        return RangeSketch(self.values / d[self.channels], self.channels, self.weights, self.tail)

    def thinned(self, rest: int) -> "RangeSketch":
        """The same exact tail with only the first ``rest`` values of the uniform subsample, reweighted to stand
        for the same values (they are i.i.d. draws, so any prefix is a uniform subsample): a cheaper, noisier
        estimate of the same clip errors (``self`` when it has no more than ``rest`` of them)."""
        n_rest = self.values.numel() - self.tail
        if self.weights is None or n_rest <= rest:
            return self
        keep = self.tail + rest
        weights = self.weights[:keep].clone()
        weights[self.tail :] *= n_rest / max(1, rest)
        return RangeSketch(self.values[:keep], self.channels[:keep], weights, self.tail)

    def mse_clip(self, absmax: float, exhaustive: bool = False) -> float:
        """The clip in ``absmax * CLIP_RATIOS`` with the smallest (estimated) ``sum (x - q(x))**2``."""
        if absmax <= 0:
            return 0.0
        if self.values.numel() == 0:
            return absmax
        clips = (CLIP_RATIOS * absmax).tolist()
        best = coarse_to_fine(lambda idx: _clip_errors(self.values, self.weights, [clips[i] for i in idx]),
                              len(clips), step=1 if exhaustive else COARSE_STEP)
        return clips[best]


class SketchCache:
    """One :class:`RangeSketch` per sample tensor (by identity), for one convert: the alpha search and the
    static ranges of every layer reading that sample (``q/k/v`` read one) share it, scaled by their own
    smoothing divisor (``RangeSketch.of(x).scaled(s)`` holds the values of ``RangeSketch.of(x / s)``)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[torch.Tensor, int, RangeSketch]] = {}

    def of(self, sample: torch.Tensor) -> RangeSketch:
        hit = self._by_id.get(id(sample))
        if hit is not None and hit[0] is sample and hit[1] == sample._version:
            return hit[2]
        sketch = RangeSketch.of(sample)
        self._by_id[id(sample)] = (sample, sample._version, sketch)  # holds the sample: its id stays unique
        return sketch


def _clip_errors(values: torch.Tensor, weights: torch.Tensor | None, clips: list[float]) -> torch.Tensor:
    """Weighted ``sum (x - q_c(x))**2`` for every clip ``c``, batched; the integers of :func:`fake_quant_range`."""
    scale = absmax_to_scale(torch.tensor(clips, dtype=torch.float32))  # range_to_scale, elementwise
    mult = multiplier_of(scale).to(values.device).unsqueeze(1)  # static_multiplier, elementwise: [R, 1] fp32
    scale = scale.to(values.device).unsqueeze(1)
    q = (values.unsqueeze(0) * mult).round_().clamp_(QMIN_ACT, QMAX).mul_(scale)
    err = q.sub_(values).pow_(2)
    return (err @ weights) if weights is not None else err.sum(dim=1)


def coarse_to_fine(score, n: int, step: int = COARSE_STEP, keep: int = 2) -> int:
    """The index in ``range(n)`` minimising ``score(list of indices) -> tensor of errors``, searched coarse to
    fine: every ``step``-th index (and the last), then, with halving strides ``h = step / 2, ..., 1``, the
    indices ``b +- h`` around each of the ``keep`` best so far (about 25 of 96 scores instead of the ~35 of
    scoring every index within ``step`` of the best: the clip error is smooth at the coarse scale).

    Ties go to the larger index (the larger clip). Exhaustive when ``step <= 1``.
    """
    if step <= 1 or n <= 2 * step:
        idx = list(range(n))
    else:
        idx = sorted(set(range(0, n, step)) | {n - 1})
    errors = dict(zip(idx, score(idx).tolist()))
    h = step // 2 if len(idx) < n else 0
    while h >= 1:
        best = sorted(errors, key=lambda i: (errors[i], -i))[:keep]
        fine = sorted({j for b in best for j in (b - h, b + h) if 0 <= j < n} - set(errors))
        if fine:
            errors.update(zip(fine, score(fine).tolist()))
        h //= 2
    return min(errors, key=lambda i: (errors[i], -i))


def mse_range(sample: torch.Tensor, absmax: float, *, max_scored: int = MAX_SCORED, exhaustive: bool = False) -> float:
    """The clip in ``absmax * CLIP_RATIOS`` minimising ``sum (x - q(x))**2`` over ``sample``.

    Args:
        sample: calibration values ``[..., C]`` (any float dtype; scored in fp32).
        absmax: the range over *all* calibration data (the largest candidate).
        max_scored: values scored per candidate (a :class:`RangeSketch` of the sample above this).
        exhaustive: score every ratio on every value (the reference the fast search is tested against).
    """
    if absmax <= 0:
        return 0.0
    if exhaustive:
        return RangeSketch.of(sample, max_scored=sample.numel()).mse_clip(absmax, exhaustive=True)
    return RangeSketch.of(sample, max_scored).mse_clip(absmax)


def output_mse_range(
    sample: torch.Tensor, absmax: float, weight: torch.Tensor, weight_q: torch.Tensor, *, exhaustive: bool = False
) -> float:
    """The clip minimising the layer's *output* error ``|| q(x) Wq^T - x W^T ||^2`` on ``sample``.

    Clipping error in a channel that meets large weights costs more than in one that meets small weights;
    scoring the output sees that, scoring the activation alone does not. Searched coarse to fine.
    """
    if absmax <= 0:
        return 0.0
    x = sample.detach().float().reshape(-1, weight.shape[1])
    ref = x @ weight.float().T
    wq = weight_q.float().T
    clips = (CLIP_RATIOS * absmax).tolist()

    def score(idx: list[int]) -> torch.Tensor:
        return torch.tensor([float((fake_quant_range(x, clips[i]) @ wq - ref).pow(2).sum()) for i in idx])

    return clips[coarse_to_fine(score, len(clips), step=1 if exhaustive else COARSE_STEP)]


def percentile_range(sample: torch.Tensor, absmax: float, percentile: float) -> float:
    """The ``percentile`` of ``|x|`` over ``sample``, never above ``absmax``."""
    x = sample.float().abs().flatten()
    if x.numel() == 0:
        return absmax
    k = max(1, min(x.numel(), int(round(percentile / 100.0 * x.numel()))))
    return min(absmax, float(torch.kthvalue(x, k).values))


class RangeMethod:
    """How a static per-tensor range ``r`` (int8 scale ``r / 127``) is chosen: the one interpretation of
    ``W8A8Config.act_range``. Convert, the alpha search and the in-quantizer rotation all call :meth:`choose`.

    ``needs_sample``: chosen from a row sample (not from the per-channel statistics alone); ``per_weight``: depends
    on the layer's (smoothed) weight, so layers reading one input may get different ranges; ``sketched``: scores
    a :class:`RangeSketch` of the whole sample when one is given (the alpha search and convert share it).
    """

    name = ""
    needs_sample = True
    per_weight = False
    sketched = False

    def choose(
        self, sample: torch.Tensor | None, absmax: float, *, weight: torch.Tensor | None = None,
        weight_q: torch.Tensor | None = None, sketch: RangeSketch | None = None,
    ) -> float:
        """The range for ``sample`` (``absmax``: over all calibration data, the largest candidate). Without a
        sample the range is ``absmax`` (nothing else is known)."""
        if sample is None and sketch is None:
            return absmax
        return self._choose(sample, absmax, weight, weight_q, sketch)

    def _choose(self, sample, absmax, weight, weight_q, sketch) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AbsMax(RangeMethod):
    """The abs-max over all calibration data (from the per-channel statistics: no sample needed)."""

    name, needs_sample = "absmax", False

    def choose(self, sample, absmax, *, weight=None, weight_q=None, sketch=None) -> float:
        return absmax


class Mse(RangeMethod):
    """The clip with the smallest quantization error of the activation itself (:func:`mse_range`)."""

    name, sketched = "mse", True

    def _choose(self, sample, absmax, weight, weight_q, sketch) -> float:
        if sketch is not None:
            return sketch.mse_clip(absmax) if absmax > 0 else 0.0
        return mse_range(sample, absmax)


class OutputMse(RangeMethod):
    """The clip with the smallest output error of the layer, weights quantized as deployed (:func:`output_mse_range`)."""

    name, per_weight = "output_mse", True

    def _choose(self, sample, absmax, weight, weight_q, sketch) -> float:
        if sample is None or weight is None or weight_q is None:
            raise ValueError("act_range='output_mse' scores the layer's output: it needs the sample, the (smoothed) "
                             "weight and its deployed quantize-dequantize weight_q")
        return output_mse_range(sample, absmax, weight, weight_q)


@dataclass(frozen=True, repr=True)
class Percentile(RangeMethod):
    """The ``percentile`` of ``|x|`` over the sample (:func:`percentile_range`)."""

    percentile: float = 99.99
    name = "percentile"

    def _choose(self, sample, absmax, weight, weight_q, sketch) -> float:
        return percentile_range(sample, absmax, self.percentile)


RANGE_METHODS = {"absmax": AbsMax, "mse": Mse, "output_mse": OutputMse, "percentile": Percentile}
"""``act_range`` name -> its :class:`RangeMethod` (the names of ``W8A8Config.act_range``)."""


def range_method(name: str, percentile: float = 99.99) -> RangeMethod:
    """The :class:`RangeMethod` called ``name`` (``percentile``: the percentile method's parameter)."""
    if name not in RANGE_METHODS:
        raise ValueError(f"unknown activation range method {name!r}; expected one of {list(RANGE_METHODS)}")
    return Percentile(percentile) if name == "percentile" else RANGE_METHODS[name]()
