"""What ``prepare``/``convert`` are run on in the pipeline: one block under its full name, or the rest of the model.

:class:`BlockShell` holds one decoder block at its dotted path (``model.layers.3``), so the quantizers'
module names, plans, reports and the config's ``ignore``/``custom_alpha_map`` names are the same as for the
whole model. :class:`BlockStub` stands in for a finished block when the rest of the model (embeddings, final
norm, LM head) is calibrated: it returns the last block's recorded output.
:func:`scoped_config` keeps only the names of a config that concern one unit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.structure.producers import LINEAR_OUTPUT_AXIS
from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.structure.blocks import BLOCKS_ATTR
from tico.experimental.quantization.structure.names import within


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



def names_of(config: BaseConfig) -> tuple[tuple[str, ...], dict[str, float]]:
    """The module names a config refers to: W8A8 ``ignore`` and the smoothing ``custom_alpha_map``."""
    smoothing = config.smoothing if isinstance(config, W8A8Config) else config
    amap = dict(smoothing.custom_alpha_map or {}) if isinstance(smoothing, SmoothQuantConfig) else {}
    ignore = config.ignore if isinstance(config, W8A8Config) else ()
    return ignore, amap


def scoped_config(config: BaseConfig, block_path: str | None, blocks_path: str, unit: nn.Module) -> BaseConfig:
    """``config`` with only the names that concern one unit, so the quantizers' own checks stay exact.

    A block (``block_path`` set) gets the names inside it; an enclosing name (``model.layers``) becomes the
    block's own name with that alpha. The rest of the model (``block_path=None``) gets the names outside the
    blocks. ``ignore`` names are kept where they are modules of the unit.
    """
    ignore, amap = names_of(config)
    modules = {n for n, _ in unit.named_modules()}
    if block_path is not None:
        scoped = {n: a for n, a in amap.items() if within(n, block_path)}
        enclosing = [n for n in amap if block_path.startswith(n + ".") or n == ""]
        if enclosing and block_path not in scoped:
            scoped[block_path] = amap[max(enclosing, key=len)]
        kept_ignore = tuple(n for n in ignore if n in modules and (within(n, block_path) or block_path.startswith(n + ".")))
    else:
        scoped = {n: a for n, a in amap.items() if not within(n, blocks_path) and n in modules}
        kept_ignore = tuple(n for n in ignore if n in modules and not within(n, blocks_path))
    smoothing = config.smoothing if isinstance(config, W8A8Config) else config
    if isinstance(smoothing, SmoothQuantConfig):
        smoothing = dataclasses.replace(smoothing, custom_alpha_map=scoped or None)
    if isinstance(config, W8A8Config):
        targets = quantizable_linears(unit, config, kept_ignore)
        rotate = tuple(p for p in config.tuning.rotate_in_quantizer if any(rotates(t, p) for t in targets))
        return dataclasses.replace(config, smoothing=smoothing, ignore=kept_ignore).with_tuning(rotate_in_quantizer=rotate)
    return smoothing  # type: ignore[return-value]


def rotates(name: str, pattern: str) -> bool:
    """Whether a ``W8A8Tuning.rotate_in_quantizer`` pattern names layer ``name`` (``"all"``, the name, or a name
    suffix)."""
    return pattern == "all" or name == pattern or name.endswith("." + pattern)


def quantizable_linears(unit: nn.Module, config: W8A8Config, ignore: tuple[str, ...]) -> list[str]:
    """Linear-like layers of ``unit`` that W8A8 would quantize (not ignored, not a float LM head), so that
    ``rotate_in_quantizer`` patterns are given only to the units they concern (the quantizer refuses unmatched ones)."""
    getter = getattr(unit, "get_output_embeddings", None)
    head = getter() if callable(getter) and not config.quantize_lm_head else None
    return [
        n for n, m in unit.named_modules()
        if isinstance(m, tuple(LINEAR_OUTPUT_AXIS)) and m is not head and not any(within(n, p) for p in ignore)
    ]
