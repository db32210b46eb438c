"""Weight-only int8 storage for the token embedding and a tied LM head.

The embedding is the largest tensor of small and mid-size LLMs, and lookups cannot use int8 matmuls, so
W8A8 leaves it in float. Stored as int8 rows with one fp32 scale per row (per token), it takes a quarter of
the memory; a lookup dequantizes only the rows it reads. A head tied to it shares the same int8 buffer and
multiplies float activations by the dequantized weight (``torch._weight_int8pack_mm`` on CPU where available),
so the LM head's activations stay in float, as W8A8 keeps them by default.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tico.experimental.quantization.nn.qscheme import quantize_rows


class Int8Embedding(nn.Module):
    """An ``nn.Embedding`` whose rows are stored in int8 (lookup returns the original dtype)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        q, scale = quantize_rows(embedding.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.padding_idx = embedding.padding_idx
        self.dtype = embedding.weight.dtype
        self.num_embeddings, self.embedding_dim = q.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight_int8).float() * F.embedding(ids, self.weight_scale[:, None])
        return rows.to(self.dtype)

    def dequantized(self) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(self.dtype)


class Int8TiedHead(nn.Module):
    """An LM head reading the int8 rows of a tied :class:`Int8Embedding` (float activations, int8 weight)."""

    def __init__(self, embedding: Int8Embedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = [embedding]  # a plain list: not a submodule, so its buffers are saved once
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.embedding[0]
        flat = x.reshape(-1, x.shape[-1])
        if flat.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm") and flat.dtype == torch.float32:
            out = torch._weight_int8pack_mm(flat.contiguous(), emb.weight_int8, emb.weight_scale)
        else:
            out = flat.float() @ emb.dequantized().float().T
        out = out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias
