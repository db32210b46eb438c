"""``RotatedInputLinear``: a layer that multiplies its input by an orthogonal matrix before its inner layer.

The run-time half of two different rotations: the exportable online Hadamard rotation
(:mod:`tico.experimental.quantization.algorithm.rotation`, one Hadamard block, no smoothing scale) and W8A8's
in-quantizer rotation (:mod:`tico.experimental.quantization.algorithm.w8a8.in_quantizer_rotation`, random
block-orthogonal, possibly with a smoothing scale; not exportable). ``R`` is block-diagonal, stored as
``[channels / b, b, b]``, so applying it costs ``C * b`` multiply-adds per token instead of ``C * C``.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``t @ blockdiag(blocks)`` along the last axis."""
    nb, b, _ = blocks.shape
    lead = t.shape[:-1]
    out = torch.einsum("...nb,nbc->...nc", t.reshape(*lead, nb, b), blocks.to(t.dtype))
    return out.reshape(*lead, nb * b)


class RotatedInputLinear(nn.Module):
    """``inner(rotate(x / s))`` where ``inner`` holds the int8 weight of ``rotate(W * s)``."""

    def __init__(self, inner: nn.Module, blocks: torch.Tensor, smooth_scale: torch.Tensor | None) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("rotation", blocks)
        self.register_buffer("smooth_scale", smooth_scale.float() if smooth_scale is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth_scale is not None:
            x = x / self.smooth_scale.to(x.dtype)
        return self.inner(rotate(x, self.rotation))
