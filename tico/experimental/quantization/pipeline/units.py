"""What ``prepare``/``convert`` are run on in the pipeline: one block under its full name, or the rest of the model.

:class:`BlockShell` holds one decoder block at its dotted path (``model.layers.3``), so the quantizers'
module names, plans, reports and the config's ``ignore``/``custom_alpha_map`` names are the same as for the
whole model. :class:`BlockStub` stands in for a finished block when the rest of the model (embeddings, final
norm, LM head) is calibrated: it returns the last block's recorded output.
Which config each unit gets is the algorithm's answer (:func:`~tico.experimental.quantization.registry.get_scope`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.structure.blocks import BLOCKS_ATTR


class BlockShell(nn.Module):
    """``block`` registered at ``path.index`` inside empty containers; calling the shell calls the block."""

    def __init__(self, path: str, index: int, block: nn.Module) -> None:
        super().__init__()
        parent: nn.Module = self
        for part in path.split("."):
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(str(index), block)
        self.target = f"{path}.{index}"
        setattr(self, BLOCKS_ATTR, (self.target,))  # see structure.blocks.decoder_blocks

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_submodule(self.target)(*args, **kwargs)


class BlockStub(nn.Module):
    """A finished block: returns ``feed`` (the recorded output of the last block) when set, else its input.

    Without ``feed`` (the probe forward) the input is read by an addition, so the dataflow trace sees a
    non-Linear reader, as the residual connection of a real block is.
    """

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple
        self.feed: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        out = self.feed if self.feed is not None and self.feed.shape == hidden.shape else hidden + 0
        return (out,) if self.returns_tuple else out
