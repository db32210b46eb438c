"""Tiny hand-written models that isolate one dataflow pattern each."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + (0.0 if unit_offset else 0.5))
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y * (1 + self.weight) if self.unit_offset else y * self.weight


class Block(nn.Module):
    """Pre-norm block: norm -> (a, b) -> sum, with a residual on the norm's *input* (foldable)."""

    def __init__(self, dim: int = 16, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.LayerNorm(dim)
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.a(h) + self.b(h)


class Toy(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 2, block=Block) -> None:
        super().__init__()
        self.layers = nn.ModuleList([block(dim) for _ in range(layers)])
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(torch.rand(dim) + 0.5)
                    m.bias.copy_(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class PostNormBlock(Block):
    """The norm's output is also the residual (BERT-style): not foldable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.a(h)


class SplitChannelsBlock(Block):
    """Linear ``a`` reads half of the norm's channels (``b`` reads all): each column still sees one channel."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim)
        self.a = nn.Linear(dim // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.a(h[..., : h.shape[-1] // 2]) + self.b(h)


class ViewGatherBlock(Block):
    """The norm's output is flattened, gathered by token and cast before the Linears: foldable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        flat = h.reshape(-1, h.shape[-1])
        picked = flat[torch.arange(flat.shape[0] - 1, -1, -1)].to(torch.float32).contiguous()
        out = self.a(picked) + self.b(flat)
        return x + out.view_as(x)


class SharedLinearBlock(Block):
    """Linear ``a`` is also applied to the raw input: its weight cannot absorb the scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.a(h) + self.b(h) + self.a(x)


class MatmulBlock(Block):
    """The consumer reads the norm output through ``x @ W.T`` with a raw Parameter (Falcon style)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim)
        self.w = nn.Parameter(torch.randn(dim, dim) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + h @ self.w.T + self.b(h)


class CumsumBlock(Block):
    """The norm's output is summed along the sequence before the Linears read it: exact to fold (a cumulative sum
    is linear per channel), but the trace does not follow ``cumsum`` and refuses the group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cumsum(self.norm(x), dim=1)
        return x + self.a(h) + self.b(h)


class NormThenActBlock(Block):
    """A norm's output read by ``a`` and, through ``sigmoid``, not linearly: no mapping can make it exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.a(h) * torch.sigmoid(h) + self.b(h)
