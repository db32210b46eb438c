"""Symmetric int8 quantization maths: the one place where int8 scales, rounding and clamping are written.

Every other module (the int8 and fake backends of :class:`~.linear.W8A8Linear`, the int8 embedding, range
search, the alpha search, attention fake-quant, the exporter) calls the functions below, so they all produce the
*same integers*: only the float arithmetic after the integer matmul (summation order, order of the scale
multiplies) can differ between backends.

The scheme, for a tensor ``t`` (computed in fp32) and a scale ``d`` (fp32):

* ``d = max(r, EPS) / 127`` for a range (abs-max or clip) ``r`` (:func:`range_to_scale`); an all-zero
  row/column/tensor gets a tiny positive scale, never 0, NaN or inf,
* ``q = clamp(round(t * m), qmin, 127)`` with the fp32 multiplier ``m = 1 / d``; ``torch.round`` rounds half to
  even,
* dequantized value ``q * d``.

``qmin`` is ``-127`` for weights (symmetric; a weight's own abs-max never rounds below -127 anyway) and ``-128``
for activations, as compressed-tensors and vLLM's int8 kernels clamp: a static range that clips a negative
outlier then saturates at exactly the integer the serving engine produces.

Weights are quantized per output channel (one scale per row of ``[out, in]``) or per tensor. Activations are
quantized per token (one scale per row of the flattened ``[tokens, in]`` input, found at run time) or per tensor
with a static, calibrated scale.

Optional SmoothQuant smoothing inside the activation quantizer: the quantizer sees ``x / s`` (``s`` per input
channel, the matching weight already multiplied by ``s``):

* per token: ``t = x / s`` is formed first (a division, so the integers are *bitwise* those of quantizing an
  explicitly smoothed input), then the per-row scale is taken from ``t``;
* per tensor: ``1 / s`` is folded into the static multiplier, ``m_j = 1 / (s_j * d)`` (computed in fp64, rounded
  once to fp32), so smoothing costs no extra pass; the integers can differ from an explicitly smoothed input
  by one step on the rare values that land within an ulp of a rounding boundary.

Shapes: scales keep the reduced dimensions (``keepdim``), so ``q * scale`` broadcasts. Per-channel weight scales
are ``[out, 1]`` and per-tensor ones ``[1]``, the layout compressed-tensors checkpoints use for ``weight_scale``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

QMAX = 127
QMIN_WEIGHT = -127
QMIN_ACT = -128
EPS = 1e-12
"""Floor of an abs-max before it becomes a scale: rows that are (almost) all zero quantize to 0 with a finite scale."""

WeightGranularity = Literal["per_channel", "per_tensor"]
ActGranularity = Literal["per_token", "per_tensor"]
WEIGHT_GRANULARITIES: tuple[str, ...] = get_args(WeightGranularity)
ACT_GRANULARITIES: tuple[str, ...] = get_args(ActGranularity)


def check_granularity(value: object, allowed: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``allowed``, else a ``ValueError`` naming ``what`` and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_static_scale(scale: float | torch.Tensor | None) -> float:
    """A static activation scale as a positive, finite Python float (``ValueError`` otherwise)."""
    if scale is None:
        raise ValueError(
            "static per_tensor activation quantization needs act_scale (the fp32 scale, i.e. calibrated range / 127)"
        )
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"act_scale must be a single number, got a tensor of shape {list(scale.shape)}")
        scale = float(scale.item())
    value = float(scale)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"act_scale must be finite and > 0, got {value!r}")
    return value


def absmax_to_scale(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 scale ``max(absmax, EPS) / 127`` (never 0, so its reciprocal is finite)."""
    return absmax.float().clamp_min(EPS).div_(QMAX)


def range_to_scale(r: float | torch.Tensor) -> float:
    """The static fp32 scale of a per-tensor range ``r`` (abs-max or clip) as a Python float: ``max(r, EPS) / 127``."""
    return float(absmax_to_scale(torch.as_tensor(r, dtype=torch.float32).reshape(1)))


def rowwise_absmax(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` over the last dimension, keepdim (two reductions, no ``|t|`` temporary)."""
    return torch.maximum(t.amax(dim=-1, keepdim=True), t.amin(dim=-1, keepdim=True).neg())


def round_clamp_(t: torch.Tensor, qmin: int = QMIN_ACT) -> torch.Tensor:
    """In place: ``clamp(round(t), qmin, 127)`` (round half to even). ``t`` must be a float tensor we own."""
    return t.round_().clamp_(qmin, QMAX)


# -- weights ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def weight_scale(weight: torch.Tensor, granularity: WeightGranularity = "per_channel") -> torch.Tensor:
    """fp32 scale of ``weight [out, in]``: ``[out, 1]`` per channel, ``[1]`` per tensor."""
    check_granularity(granularity, WEIGHT_GRANULARITIES, "weight_granularity")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if granularity == "per_channel":
        return absmax_to_scale(rowwise_absmax(weight))
    absmax = torch.maximum(weight.max(), weight.min().neg()) if weight.numel() else weight.new_zeros(())
    return absmax_to_scale(absmax.reshape(1))


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor, granularity: WeightGranularity = "per_channel"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of ``weight [out, in]`` (any float dtype; computed in fp32).

    Returns:
        ``(q, scale)``: int8 ``[out, in]`` in ``[-127, 127]`` and its fp32 scale (``[out, 1]`` or ``[1]``),
        with ``weight ~= q * scale``.
    """
    scale = weight_scale(weight, granularity)
    q = round_clamp_(weight.float() * scale.reciprocal(), QMIN_WEIGHT).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in fp32 (``scale`` broadcasts: ``[out, 1]``, ``[tokens, 1]``, ``[1]`` or ``[]``)."""
    return q.float() * scale


def fake_quant_weight(weight: torch.Tensor, granularity: WeightGranularity = "per_channel") -> torch.Tensor:
    """Quantize-dequantize ``weight [out, in]`` exactly as the int8 backend stores it; fp32."""
    q, scale = quantize_weight(weight, granularity)
    return dequantize(q, scale)


# -- activations ------------------------------------------------------------------------------------------------


def static_multiplier(scale: float, smooth_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 multiplier of static per-tensor quantization: ``1 / scale`` (``[1]``), or ``1 / (s * scale)`` (``[in]``).

    Computed in fp64 and rounded once to fp32, so folding the smoothing divisor ``s`` in costs no extra pass.
    (1-D on purpose: a 0-dim fp32 tensor would not promote a bf16/fp16 input, and the product would be rounded
    to the input's precision before rounding to an integer.)
    """
    scale = check_static_scale(scale)
    if smooth_scale is not None:
        check_smooth_scale(smooth_scale)
    return multiplier_of(torch.tensor([scale], dtype=torch.float64), smooth_scale)


def multiplier_of(scale: torch.Tensor, smooth_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`static_multiplier` of a scale *tensor*, unchecked and traceable (``torch.compile``): fp32
    ``1 / (s * scale)`` computed in fp64."""
    d = scale.detach().double().reshape(-1)
    if smooth_scale is not None:
        d = smooth_scale.detach().double().to(d.device) * d
    return d.reciprocal().float()


def quantize_static(x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """int8 ``clamp(round(x * m), -128, 127)``, computed in fp32 (traceable: plain tensor ops)."""
    t = torch.mul(x, multiplier.to(x.device), out=torch.empty(x.shape, dtype=torch.float32, device=x.device))
    return round_clamp_(t).to(torch.int8)


def check_smooth_scale(smooth_scale: torch.Tensor, in_features: int | None = None) -> None:
    """``smooth_scale`` is a 1-D tensor of finite, strictly positive values (of length ``in_features``)."""
    if not isinstance(smooth_scale, torch.Tensor) or smooth_scale.dim() != 1:
        raise ValueError("smooth_scale must be a 1-D tensor with one divisor per input channel")
    if in_features is not None and smooth_scale.numel() != in_features:
        raise ValueError(f"smooth_scale has {smooth_scale.numel()} entries, the layer has {in_features} input features")
    s = smooth_scale.detach()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("smooth_scale must be finite and strictly positive")


def _smoothed_fp32(x: torch.Tensor, smooth_scale: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """``x / s`` (or ``x``) in fp32, and whether the result is a fresh tensor that may be modified in place."""
    if smooth_scale is not None:
        return torch.div(x, smooth_scale, out=torch.empty(x.shape, dtype=torch.float32, device=x.device)), True
    if x.dtype != torch.float32:
        return x.float(), True
    return x, False


def quantize_per_token(
    x: torch.Tensor, smooth_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: one scale per row (last dimension reduced), found from the data.

    Args:
        x: ``[..., in]`` activations, any float dtype.
        smooth_scale: optional ``[in]`` fp32 smoothing divisor ``s``; the rows quantized are ``x / s``.

    Returns:
        ``(q, scale)``: int8 of ``x``'s shape and fp32 ``[..., 1]`` with ``x / s ~= q * scale``.
    """
    t, owned = _smoothed_fp32(x, smooth_scale)
    scale = absmax_to_scale(rowwise_absmax(t))
    inv = scale.reciprocal()
    t = t.mul_(inv) if owned else t * inv
    return round_clamp_(t).to(torch.int8), scale


def quantize_per_tensor(
    x: torch.Tensor, scale: float, smooth_scale: torch.Tensor | None = None, multiplier: torch.Tensor | None = None
) -> torch.Tensor:
    """Static per-tensor quantization with a given fp32 ``scale``: int8 ``clamp(round(x * m), -128, 127)``.

    ``m`` is :func:`static_multiplier` ``(scale, smooth_scale)``; pass it precomputed as ``multiplier`` to skip
    recomputing it (it must come from the same ``scale`` and ``smooth_scale``).
    """
    m = static_multiplier(scale, smooth_scale) if multiplier is None else multiplier
    return quantize_static(x, m)


def quantize_activation(
    x: torch.Tensor,
    granularity: ActGranularity,
    *,
    scale: float | None = None,
    smooth_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations and their fp32 scale: dynamic ``per_token`` or static ``per_tensor`` (needs ``scale``).

    Returns:
        ``(q, scale)``: int8 of ``x``'s shape, and the scale (``[..., 1]`` per token, ``[]`` per tensor).
    """
    check_granularity(granularity, ACT_GRANULARITIES, "act_granularity")
    if granularity == "per_token":
        return quantize_per_token(x, smooth_scale)
    value = check_static_scale(scale)
    return quantize_per_tensor(x, value, smooth_scale), torch.tensor(value, dtype=torch.float32, device=x.device)


def fake_quant_activation(
    x: torch.Tensor,
    granularity: ActGranularity,
    *,
    scale: float | None = None,
    smooth_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize activations exactly as the int8 backend does (same integers); returns fp32.

    Note the smoothing divisor is *not* undone: the result approximates ``x / s`` (the weight carries ``s``).
    """
    check_granularity(granularity, ACT_GRANULARITIES, "act_granularity")
    if granularity == "per_token":
        t, owned = _smoothed_fp32(x, smooth_scale)
        d = absmax_to_scale(rowwise_absmax(t))
        t = t.mul_(d.reciprocal()) if owned else t * d.reciprocal()
        return round_clamp_(t).mul_(d)
    value = check_static_scale(scale)
    return fake_quant_static(x, static_multiplier(value, smooth_scale), value)


def fake_quant_static(x: torch.Tensor, multiplier: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Static per-tensor quantize-dequantize with a precomputed ``multiplier`` (traceable); fp32."""
    t = torch.mul(x, multiplier.to(x.device), out=torch.empty(x.shape, dtype=torch.float32, device=x.device))
    return round_clamp_(t).mul_(scale)


def fake_quant_range(x: torch.Tensor, r: float) -> torch.Tensor:
    """Static per-tensor quantize-dequantize of ``x`` with range ``r`` (scale ``r / 127``): what range
    searches score, with the deployed kernel's exact integers."""
    return fake_quant_activation(x, "per_tensor", scale=range_to_scale(r))


@torch.no_grad()
def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 rows (an embedding table): ``(int8 [rows, dim], fp32 scale [rows])``, the integers of
    per-channel :func:`quantize_weight`."""
    q, scale = quantize_weight(weight.detach(), "per_channel")
    return q, scale.reshape(-1)
