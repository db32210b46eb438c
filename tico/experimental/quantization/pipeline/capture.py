"""Capture, once, what the decoder blocks are called with: the first block's hidden states and every block's
other arguments (position embeddings, masks, ...), per calibration batch.

Every block is replaced by a :class:`_Catcher` that records its call and passes its input on; the last one
stops the forward. Recording every block (not only the first) keeps per-layer arguments right, e.g. Gemma's
sliding-window and global layers get different masks and rotary tables. The recorded objects are the model's
own (shared between blocks, not copied), so this costs the hidden states plus one set of masks per batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the last catcher: nothing after the blocks needs to run."""


@dataclass
class BlockCall:
    """How one block is called for one batch: the hidden states go where ``hidden_key`` says."""

    args: tuple[Any, ...]  # positional arguments after the hidden states
    kwargs: dict[str, Any]
    hidden_key: str | None = None  # None: hidden states are the first positional argument

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> Any:
        if self.hidden_key is None:
            return block(hidden, *self.args, **self.kwargs)
        return block(*self.args, **{**self.kwargs, self.hidden_key: hidden})


@dataclass
class Captured:
    hidden: list[torch.Tensor] = field(default_factory=list)  # per batch: the first block's input
    calls: list[list[BlockCall]] = field(default_factory=list)  # per block, per batch


class _Catcher(nn.Module):
    def __init__(self, index: int, captured: Captured, last: bool) -> None:
        super().__init__()
        self.index, self.captured, self.last = index, captured, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, call = args[0], BlockCall(tuple(args[1:]), dict(kwargs))
        else:
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            hidden, call = kwargs[key], BlockCall((), {k: v for k, v in kwargs.items() if k != key}, key)
        self.captured.calls[self.index].append(call)
        if self.index == 0:
            self.captured.hidden.append(hidden.detach())
        if self.last:
            raise _Stop
        return hidden


def model_inputs(model: nn.Module, batch: torch.Tensor | Mapping[str, Any]) -> dict[str, Any]:
    """A calibration batch (token ids, or a dict of model inputs) as keyword arguments, without a KV cache."""
    kwargs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else dict(batch)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs.setdefault("use_cache", False)
    return kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[Any]) -> Captured:
    """Run ``model`` (blocks not needed: they are swapped for catchers, then put back) on every batch."""
    captured = Captured(calls=[[] for _ in blocks])
    originals = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = _Catcher(i, captured, last=i == len(blocks) - 1)
    try:
        for batch in batches:
            try:
                model(**model_inputs(model, batch))
            except _Stop:
                continue
            raise RuntimeError(f"{type(model).__name__}'s forward did not call its last decoder block")
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return captured
