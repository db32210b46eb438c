"""Massive activations: find the layers whose input no per-tensor static scale can hold, and keep them dynamic.

Small and mid-size LLMs put a few tokens (the first one of a sequence, often a delimiter too) through a few
channels with values hundreds or thousands of times the typical token's (Sun et al., 2024, "Massive
activations in large language models"); in Llama-like models they show up at the input of ``down_proj``. One
static per-tensor int8 scale must then either hold the massive token (and leave the ordinary tokens a handful
of int8 levels) or clip it (and destroy exactly the token that every later attention reads as its sink).
Smoothing cannot move it (it is a token, not a channel), and serving quantizes *every* token with the same
static scale, so dropping the token from calibration would only hide the problem.

The choice is made per layer, not per token, and by measured error:

* calibration keeps, beside the uniform row sample, the ``keep`` rows with the largest abs-max and their
  positions in the sequence (:class:`MassiveRowObserver`): the massive tokens are rare, so a uniform sample
  would hold few of them or none;
* convert measures each static layer's output error per token, ``||Q(x_i) Wq^T - x_i W^T||^2 / ||x_i W^T||^2``
  averaged over rows (on the ordinary rows, at most :data:`SCORE_ROWS` of them and :data:`SCORE_CHANNELS` output
  channels: seeded subsets), on the ordinary rows (the uniform sample) and on the largest rows separately, for the
  deployed static range and for dynamic per-token quantization (:func:`choose_activation_mode`);
* a layer stays static when, on both row sets, its static error is within ``budget`` times the dynamic
  error; otherwise its activations become dynamic per-token (still int8 and exportable: compressed-tensors
  gives such layers their own config group). Every decision and its numbers are reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import tensor_channel_absmax
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver, row_keys
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.algorithm.w8a8.search import int8_product, static_codes
from tico.experimental.quantization.distributed import portable
from tico.experimental.quantization.nn.qscheme import quantize_per_token, quantize_weight

logger = logging.getLogger(__name__)

MASSIVE_RATIO = 20.0  # a token whose abs-max exceeds this many median tokens' is reported as massive
# Ordinary rows scored per layer: the error is a mean of per-token ratios, which a seeded uniform subset of the
# sample estimates well; scoring every sampled row cost most of convert.
SCORE_ROWS = 512
# Output channels scored per layer on the ordinary rows (a seeded subset of wider layers): an ordinary token's
# relative error is a ratio of two sums over the output channels, which a subset estimates well; the full products
# of wide MLPs cost most of the fallback decision. The massive rows (<= keep) are scored on every channel: their
# error sits in a few output channels (a subset can flip the decision).
SCORE_CHANNELS = 1024


class MassiveRowObserver(SampledChannelObserver):
    """:class:`SampledChannelObserver` that also keeps the ``keep`` rows with the largest abs-max, with positions.

    The position of a row is its index along the second-to-last axis (the sequence axis of ``[batch, seq,
    channels]`` inputs; ``-1`` for 2-D inputs). ``position_max[t]`` is the largest token abs-max seen at
    position ``t`` (positions past ``max_positions`` are not tracked): the diagnostic that shows which
    positions carry massive values. Rows are ranked by (abs-max, sampling key), largest first, so ties are
    broken the same way whatever the order of the batches or the rank that saw them (see the parent class).
    """

    _LOCAL = SampledChannelObserver._LOCAL + (
        "massive_rows", "massive_positions", "_massive_absmax", "_massive_keys", "position_max")

    def __init__(self, channels: int, max_rows: int, keep: int = 64, max_positions: int = 8192, seed: int = 0) -> None:
        super().__init__(channels, max_rows, seed)
        self.keep = keep
        self.max_positions = max_positions
        self.massive_rows: torch.Tensor | None = None  # [<= keep, channels], input dtype
        self.massive_positions: torch.Tensor | None = None  # [<= keep] long
        self._massive_absmax: torch.Tensor | None = None  # [<= keep] fp32, CPU
        self._massive_keys: torch.Tensor | None = None  # [<= keep] int64, CPU
        self.position_max: torch.Tensor | None = None

    @torch.no_grad()
    def observe(self, x: Any) -> None:
        before = self.calls
        super().observe(x)
        if self.calls == before:
            return
        x = x.detach()
        flat = x.reshape(-1, self.channels)
        token_max = flat.abs().amax(dim=1).float()
        if x.dim() >= 3:
            seq = x.shape[-2]
            positions = torch.arange(seq, device=flat.device).repeat(flat.shape[0] // seq)
            self._track_positions(token_max.reshape(-1, seq).amax(dim=0)[: self.max_positions].cpu())
        else:
            positions = torch.full((flat.shape[0],), -1, dtype=torch.long, device=flat.device)
        token_max = token_max.cpu()
        keys = row_keys(tensor_channel_absmax(x, self.channels), flat.shape[0], self.seed)
        idx = top_rows(token_max, keys, self.keep)
        rows, pos = flat[idx.to(flat.device)], positions[idx.to(flat.device)]
        top, keys = token_max[idx], keys[idx]
        if self.massive_rows is not None:
            top, keys = torch.cat([self._massive_absmax, top]), torch.cat([self._massive_keys, keys])
            rows = torch.cat([self.massive_rows, rows.to(self.massive_rows.device)])
            pos = torch.cat([self.massive_positions, pos.to(self.massive_positions.device)])
            idx = top_rows(top, keys, self.keep)
            rows, pos, top, keys = rows[idx.to(rows.device)], pos[idx.to(pos.device)], top[idx], keys[idx]
        self._massive_absmax, self._massive_keys = top, keys
        self.massive_rows, self.massive_positions = rows.clone(), pos.clone()

    def _track_positions(self, per_pos: torch.Tensor) -> None:
        if self.position_max is None or self.position_max.numel() < per_pos.numel():
            grown = torch.zeros(per_pos.numel())
            if self.position_max is not None:
                grown[: self.position_max.numel()] = self.position_max
            self.position_max = grown
        torch.maximum(self.position_max[: per_pos.numel()], per_pos, out=self.position_max[: per_pos.numel()])

    # -- reduction over ranks --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The sampled summary plus this rank's largest rows (at most ``keep``: sent whole) and position maxima."""
        out = super().summary()
        if self.massive_rows is not None:
            out["massive"] = (self._massive_absmax, self._massive_keys, portable(self.massive_rows),
                              portable(self.massive_positions))
        out["position_max"] = self.position_max
        return out

    def merge(self, summaries: list[dict[str, Any]], contributions: list[Any], memo: dict) -> None:
        """Install the merged sample, the ``keep`` largest rows of all ranks and the positions' maxima."""
        device = self.massive_rows.device if self.massive_rows is not None else None
        super().merge(summaries, contributions, memo)
        device = device or self._device()
        parts = [s["massive"] for s in summaries if s.get("massive") is not None]
        if parts:
            top, keys, rows, pos = (torch.cat([p[i] for p in parts]) for i in range(4))
            idx = top_rows(top, keys, self.keep)
            self._massive_absmax, self._massive_keys = top[idx], keys[idx]
            self.massive_rows, self.massive_positions = rows[idx].to(device), pos[idx].to(device)
        maxima = [s["position_max"] for s in summaries if s.get("position_max") is not None]
        if maxima:
            merged = torch.zeros(max(m.numel() for m in maxima))
            for m in maxima:
                torch.maximum(merged[: m.numel()], m, out=merged[: m.numel()])
            self.position_max = merged


def top_rows(values: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``(values, keys)`` pairs, largest first (CPU tensors): a total order, so the
    rows kept from a union do not depend on how it was split."""
    candidates = torch.arange(values.numel())
    if values.numel() > k:
        floor = torch.topk(values, k).values[-1]
        candidates = (values >= floor).nonzero().flatten()
    order = candidates[torch.argsort(keys[candidates], descending=True, stable=True)]
    order = order[torch.argsort(values[order], descending=True, stable=True)]
    return order[:k]


@dataclass
class LayerChoice:
    """The activation mode chosen for one layer, with the measurements behind it.

    ``ratio`` is the largest token abs-max over the median token abs-max; ``positions`` the sequence
    positions of the kept rows above :data:`MASSIVE_RATIO` times the median; errors are relative output
    errors ``(ordinary rows, massive rows)`` (the largest kept rows when none is massive).
    """

    mode: str  # "static" | "dynamic"
    ratio: float
    positions: list[int] = field(default_factory=list)
    static_error: tuple[float, float] = (0.0, 0.0)
    dynamic_error: tuple[float, float] = (0.0, 0.0)

    def describe(self) -> str:
        where = f"massive tokens at positions {self.positions}" if self.positions else "no massive token"
        return (f"{self.mode} ({where}; max/median token {self.ratio:.0f}x; output error static "
                f"{self.static_error[0]:.2e}/{self.static_error[1]:.2e} vs dynamic "
                f"{self.dynamic_error[0]:.2e}/{self.dynamic_error[1]:.2e} on ordinary/massive rows)")


def _relative_errors(x: torch.Tensor, static_range: float, weight: torch.Tensor, qw: torch.Tensor,
                     sw: torch.Tensor) -> tuple[float, float]:
    """Static (range ``static_range``) and dynamic per-token: mean over the rows of ``x`` of
    ``||Qa(x_i) Qw(W)^T - x_i W^T||^2 / ||x_i W^T||^2``, every token counting by its *own* error. ``Qa(x) Qw(W)^T``
    is the exact int8 x int8 -> int32 product of the codes (``qw``, scales ``sw``), then the two scales.

    A pooled ratio ``sum err / sum ref`` would be dominated by the massive rows' output energy and hide a
    scale that leaves the ordinary tokens a handful of int8 levels (a layer can look fine pooled and alone
    wreck a model's output).
    """
    if x.shape[0] == 0:
        return 0.0, 0.0
    ref = x @ weight.T
    energy = ref.pow(2).sum(dim=1).clamp_min(1e-30)
    errors = []
    for q, sx in (static_codes(x, static_range), quantize_per_token(x)):
        out = int8_product(q, sx, qw, sw)
        errors.append(float((out.sub_(ref).pow_(2).sum(dim=1) / energy).mean()))
    return errors[0], errors[1]


def choose_activation_mode(
    sample: torch.Tensor,
    massive_rows: torch.Tensor,
    massive_positions: torch.Tensor,
    static_range: float,
    weight: torch.Tensor,
    budget: float,
    weight_granularity: str = "per_channel",
) -> LayerChoice:
    """Static or dynamic per-token activations for one layer, whichever the measured output error allows.

    Args:
        sample: a uniform sample of the layer's (smoothed) input rows: the ordinary tokens.
        massive_rows: the (smoothed) rows with the largest abs-max over all calibration data.
        massive_positions: their sequence positions.
        static_range: the range the deployed static scale would have (``scale = range / 127``).
        weight: the layer's (smoothed) ``[out, in]`` float weight, quantized as deployed (``weight_granularity``).
        budget: how many times the dynamic per-token error a static layer may cost, on either row set.
    """
    x, m = sample.float(), massive_rows.float()
    token_max = x.abs().amax(dim=1)
    median = float(token_max.median()) if token_max.numel() else 0.0
    m_max = m.abs().amax(dim=1)
    ratio = float(m_max.max()) / median if median > 0 and m_max.numel() else 0.0
    is_massive = m_max > MASSIVE_RATIO * median
    positions = sorted({int(p) for p in massive_positions[is_massive.to(massive_positions.device)].tolist()})
    if bool(is_massive.any()):  # score the massive tokens themselves, not the largest ordinary ones beside them
        m = m[is_massive]
    if x.shape[0] > SCORE_ROWS:  # seeded, not a prefix: the sample's order follows batches and positions
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:SCORE_ROWS]
        x = x[pick.to(x.device)]
    weight = weight.float()
    qw, sw = quantize_weight(weight, weight_granularity)  # type: ignore[arg-type]
    w, qw_x, sw_x = weight, qw, sw
    if weight.shape[0] > SCORE_CHANNELS:  # ordinary rows only: a massive row's error sits in a few output channels
        keep = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(1))[:SCORE_CHANNELS].sort().values
        keep = keep.to(weight.device)
        w, qw_x, sw_x = weight[keep], qw[keep], sw[keep] if sw.numel() > 1 else sw
    x_static, x_dynamic = _relative_errors(x, static_range, w, qw_x, sw_x)
    m_static, m_dynamic = _relative_errors(m, static_range, weight, qw, sw)
    static, dynamic = (x_static, m_static), (x_dynamic, m_dynamic)
    keep_static = all(s <= budget * d for s, d in zip(static, dynamic))
    return LayerChoice("static" if keep_static else "dynamic", ratio, positions, static, dynamic)


def choose_layer_mode(
    name: str, linear: torch.nn.Linear, obs: Any, divisor: torch.Tensor | None, smooth: torch.Tensor | None,
    sample: torch.Tensor | None, static_r: float, budget: float, weight_granularity: str, report: W8A8Report,
) -> str:
    """Layer ``name`` (its smoothed ``linear``, its :class:`MassiveRowObserver` ``obs``, its input divided by
    ``divisor``): static unless its measured output error (ordinary and massive rows) exceeds ``budget``; the
    choice and its numbers go to ``report.act_modes`` (a dynamic layer's static range leaves ``act_ranges``)."""
    rows = obs.massive_rows.float()
    if divisor is not None:
        rows = rows / divisor.to(rows.device)
    weight = linear.weight.detach().float() * (1.0 if smooth is None else smooth.to(linear.weight.device))
    choice = choose_activation_mode(sample, rows, obs.massive_positions, static_r, weight, budget, weight_granularity)
    report.act_modes[name] = choice.describe()
    if choice.mode == "dynamic":
        report.act_ranges.pop(name, None)
        logger.info("%s: %s", name, choice.describe())
    return choice.mode
