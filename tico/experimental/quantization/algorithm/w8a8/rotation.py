"""Rotation inside the activation quantizer: ``y = Q(x R) Q(W R)^T`` with ``R`` orthogonal, so ``x W^T`` is unchanged.

A rotation spreads a few large channels (and a few large tokens' peaks) over many channels before per-tensor
int8 quantization, which a diagonal smoothing scale cannot do when the outliers move from token to token. ``R``
is block-diagonal with random orthogonal blocks (seeded per layer), so applying it costs ``C * block`` multiply-adds
per token instead of ``C * C``. The layer keeps ``R`` as a buffer; formats without rotations refuse such layers.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

MAX_BLOCK = 128


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
