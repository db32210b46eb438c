"""In-quantizer rotation (``W8A8Tuning.rotate_in_quantizer``): ``y = Q(x R) Q(W R)^T`` with ``R`` orthogonal.

A rotation spreads a few large channels (and a few large tokens' peaks) over many channels before per-tensor
int8 quantization, which a diagonal smoothing scale cannot do when the outliers move from token to token. ``R``
is block-diagonal with random orthogonal blocks (seeded per layer name); the layer runs as a
:class:`~tico.experimental.quantization.nn.rotated.RotatedInputLinear` that keeps ``R`` as a buffer.
compressed-tensors has no place for it (only one Hadamard block without smoothing is exported: that is the
other rotation, :mod:`tico.experimental.quantization.algorithm.rotation`, fused into the weights).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from tico.experimental.quantization.algorithm.w8a8.ranges import RangeMethod, range_method
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.nn.qscheme import range_to_scale
from tico.experimental.quantization.nn.rotated import RotatedInputLinear, rotate

MAX_BLOCK = 128
SUBSTITUTED_RANGE = ("absmax", "mse")
"""``act_range="absmax"`` is planned as ``"mse"`` on a rotated input (said in ``report.notes``): the abs-max of
the rotated input over all calibration data is not known from per-channel statistics, only from the sample."""


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a ``rotate_in_quantizer`` pattern names layer ``name`` (``"all"``, the name, or a name suffix)."""
    return any(p == "all" or name == p or name.endswith("." + p) for p in patterns)


def block_size(channels: int, max_block: int = MAX_BLOCK) -> int:
    """The largest divisor of ``channels`` not above ``max_block``."""
    return max(d for d in range(1, min(channels, max_block) + 1) if channels % d == 0)


def random_rotation(channels: int, name: str) -> torch.Tensor:
    """``[channels / b, b, b]`` random orthogonal blocks, seeded by the layer ``name`` (reproducible)."""
    b = block_size(channels)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q, r = torch.linalg.qr(torch.randn(channels // b, b, b, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # a uniformly random orthogonal block
    return q.float()


def rotated_range_method(act_range: str, percentile: float) -> tuple[RangeMethod, str | None]:
    """The range method planned on a rotated input, and the note that says so when it is not ``act_range``."""
    if act_range == SUBSTITUTED_RANGE[0]:
        note = (f"act_range={SUBSTITUTED_RANGE[0]!r} planned as {SUBSTITUTED_RANGE[1]!r}: the rotated input's "
                "abs-max over all calibration data is not known from per-channel statistics")
        return range_method(SUBSTITUTED_RANGE[1], percentile), note
    return range_method(act_range, percentile), None


def rotated_layer(
    name: str, linear: nn.Linear, sample: torch.Tensor | None, smooth: torch.Tensor | None, method: RangeMethod | None,
    weights: str, backend: str, quantize_weight, act_range: float | None = None,
) -> tuple[nn.Module, float | None]:
    """A layer whose (smoothed) input is rotated inside the quantizer, and its static range (None: dynamic).

    ``method`` None: dynamic per-token activations; otherwise the static range is chosen by ``method`` from the
    rotated sample (the full-data abs-max of a rotated input is not known from per-channel statistics), or is
    ``act_range`` when given (a range chosen before, on this rank or another: ``sample`` is not read)."""
    blocks = random_rotation(linear.in_features, name).to(linear.weight.device)
    weight = linear.weight.detach().float() * (1.0 if smooth is None else smooth.to(linear.weight.device))
    rotated = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        rotated.weight.copy_(rotate(weight, blocks).to(linear.weight.dtype))
        if linear.bias is not None:
            rotated.bias.copy_(linear.bias)
    r = act_range if method is not None else None
    if method is not None and r is None:
        x = rotate(sample.float(), blocks.to(sample.device))
        w = rotated.weight.float()
        r = method.choose(x, float(x.abs().max()), weight=w, weight_q=quantize_weight(w) if method.per_weight else None)
    inner = W8A8Linear.from_linear(
        rotated, weight_granularity=weights, act_granularity="per_token" if method is None else "per_tensor",
        act_scale=None if r is None else range_to_scale(r), backend=backend,
    )
    return RotatedInputLinear(inner, blocks, smooth), r
