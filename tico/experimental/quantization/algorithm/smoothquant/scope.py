"""What a :class:`SmoothQuantConfig` means for one part of a model, for the streamed pipeline (see
:class:`~tico.experimental.quantization.registry.UnitScope`): the pipeline asks, this module reads the config.

SmoothQuant writes a float checkpoint (``save_pretrained``'s layout), quantizes no layer, and names modules
only in ``custom_alpha_map``: a block gets the names inside it (an enclosing name, such as ``model.layers``,
becomes the block's own name with that alpha), the rest of the model gets the names outside the blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterable, Iterator

from torch import nn

from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.registry import register_scope
from tico.experimental.quantization.structure.names import within
from tico.experimental.quantization.structure.producers import LINEAR_OUTPUT_AXIS, linear_output_axis

_LOGGER = "tico.experimental.quantization.algorithm.smoothquant.quantizer"


def output_embedding(model: nn.Module) -> nn.Module | None:
    """``model``'s LM head (``get_output_embeddings()``), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        module = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):  # transformers' default for models without one
        module = None
    return module if isinstance(module, nn.Module) else None


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Loggers ``names`` at ERROR level inside the block (their levels are restored afterwards)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


@register_scope(SmoothQuantConfig)
class SmoothQuantScope:
    """A smoothing config, unit by unit."""

    output_format = "transformers"

    def __init__(self, config: SmoothQuantConfig) -> None:
        self.config = config

    def check_streamable(self, writes: bool) -> None:
        """Every SmoothQuant config streams (smoothing is exact in float, and the result a plain checkpoint)."""

    def check_names(self, model: nn.Module) -> None:
        modules = {n for n, _ in model.named_modules()}
        unknown = [n for n in self.names() if n not in modules]
        if unknown:
            raise ValueError(f"SmoothQuantConfig.custom_alpha_map names that are not modules of {type(model).__name__}: "
                             f"{unknown}")

    def names(self) -> list[str]:
        """The module names the config refers to."""
        return list(self.config.custom_alpha_map or {})

    def for_unit(self, unit: nn.Module, block_path: str | None, blocks_path: str) -> SmoothQuantConfig:
        """The config with only the alpha-map names that concern ``unit``, so the quantizer's own checks stay exact."""
        amap = dict(self.config.custom_alpha_map or {})
        if block_path is not None:
            scoped = {n: a for n, a in amap.items() if within(n, block_path)}
            enclosing = [n for n in amap if block_path.startswith(n + ".") or n == ""]
            if enclosing and block_path not in scoped:
                scoped[block_path] = amap[max(enclosing, key=len)]
        else:
            modules = {n for n, _ in unit.named_modules()}
            scoped = {n: a for n, a in amap.items() if not within(n, blocks_path) and n in modules}
        return dataclasses.replace(self.config, custom_alpha_map=scoped or None)

    def quantized_layers(self, model: nn.Module) -> list[str]:
        return []

    def leaves_vocabulary(self, model: nn.Module, blocks_path: str) -> bool:
        """No Linear-like layer outside the blocks but the LM head: then no smoothing group folds into the
        embeddings (a group feeding the LM head is always skipped), so they stay as they are."""
        head = output_embedding(model)
        return not any(
            not within(n, blocks_path) and m is not head
            and (isinstance(m, tuple(LINEAR_OUTPUT_AXIS)) or linear_output_axis(m) is not None)
            for n, m in model.named_modules()
        )

    def observes(self, quantizer: Any) -> bool:
        return bool(quantizer.observers)

    def export_forms(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        return {}

    def merged_plan(self, outcomes: Iterable[Any]) -> Any:
        return merge_plans(outcomes)

    def merged_report(self, outcomes: Iterable[Any]) -> Any:
        return None

    def quiet_outside_blocks(self) -> contextlib.AbstractContextManager[None]:
        return quiet(_LOGGER)


def merge_plans(outcomes: Iterable[Any]) -> Any:
    """Every unit's smoothing plan as one (in the units' order), or None when no unit smooths."""
    from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingPlan

    plans = [o.plan for o in outcomes if getattr(o, "plan", None) is not None]
    return SmoothingPlan([g for p in plans for g in p.groups]) if plans else None
