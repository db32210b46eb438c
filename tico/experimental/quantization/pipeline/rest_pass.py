"""The rest of the model (embeddings, final norm, LM head, anything outside the blocks): loaded, prepared,
calibrated on the last block's outputs (recorded in a :class:`BlockStub`), converted and written.

The vocabulary matrices that the algorithm leaves as they are (``UnitScope.leaves_vocabulary``) are not loaded:
one-row stand-ins take their place (see :mod:`.vocab`), and the probe forward then reads token 0.
The preflight runs the same two steps on a copy of the skeleton, before the first block.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from tico.experimental.quantization import distributed
from tico.experimental.quantization.pipeline.block_pass import own_probe
from tico.experimental.quantization.pipeline.capture import model_inputs
from tico.experimental.quantization.pipeline.output import Output, summary
from tico.experimental.quantization.pipeline.source import Checkpoint
from tico.experimental.quantization.pipeline.units import BlockStub
from tico.experimental.quantization.pipeline.vocab import Passthrough, passthrough_matrices, stored_keys
from tico.experimental.quantization.public_interface import convert, get_quantizer, prepare
from tico.experimental.quantization.registry import UnitScope
from tico.experimental.quantization.structure.names import within
from tico.experimental.quantization.structure.probe import PROBE_TOKENS


def release_rest(model: nn.Module, blocks_path: str) -> None:
    """Free every parameter/persistent buffer outside the blocks (back to meta)."""
    for name, module in model.named_modules():
        if within(name, blocks_path):
            continue
        for key, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=False)
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        for key in persistent:
            b = module._buffers[key]
            if b is not None and not b.is_meta:
                module._buffers[key] = b.to("meta")


def rest_names(ckpt: Checkpoint, model: nn.Module, blocks_path: str) -> tuple[list[str], list[str]]:
    """The checkpoint keys outside the blocks, and the state-dict names outside the blocks."""
    in_blocks = set(ckpt.keys_under(blocks_path))
    keys = [k for k in ckpt.files if k not in in_blocks]
    return keys, [n for n in model.state_dict(keep_vars=True) if not n.startswith(blocks_path + ".")]


def load_rest(ckpt: Checkpoint, model: nn.Module, scope: UnitScope, blocks_path: str,
              device: torch.device) -> list[Passthrough]:
    """Load ``model``'s parts outside the blocks (the skeleton, or a copy of it) on ``device``, with stand-ins
    for the vocabulary matrices left as they are; returns those stand-ins' records."""
    with distributed.together(f"loading {type(model).__name__} outside {blocks_path}"):
        passthrough = passthrough_matrices(ckpt, model, scope.leaves_vocabulary(model, blocks_path), blocks_path)
        skipped = [n for p in passthrough for n in p.names]
        skipped_keys = stored_keys(ckpt, model, skipped)
        keys, expected = rest_names(ckpt, model, blocks_path)
        ckpt.load([k for k in keys if k not in skipped_keys], [n for n in expected if n not in skipped], into=model)
        for p in passthrough:
            p.install(model, device)
        model.to(device)
        for p in passthrough:
            p.standin = model.get_parameter(p.names[0])
    return passthrough


@torch.no_grad()
def run_rest(model: nn.Module, scope: UnitScope, blocks_path: str, last: BlockStub, batches: Sequence[Any],
             hidden: Sequence[torch.Tensor | None], device: torch.device, out: Output,
             passthrough: list[Passthrough]) -> tuple[str, Any]:
    """prepare/calibrate/convert/write the rest; ``last`` returns each batch's recorded last-block output
    (``None``: its input). Returns a one-line summary and the quantizer."""
    probe = {"input_ids": torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=device)} if passthrough else None
    unit = f"{type(model).__name__} outside {blocks_path}"
    with distributed.together(f"calibrating {unit}"):  # local work; convert's collectives come next
        with scope.quiet_outside_blocks(), own_probe(unit):
            prepare(model, scope.for_unit(model, None, blocks_path), kwargs=probe)
        quantizer = get_quantizer(model)
        observes = scope.observes(quantizer)
        if passthrough and observes:
            raise RuntimeError(f"{[p.names[0] for p in passthrough]} were expected to be left as is, but the rest of "
                               f"{type(model).__name__} observes activations")
        for batch, h in zip(batches if observes else [], hidden):  # nothing observes: no forward (LM head logits)
            last.feed = h
            inputs = model_inputs(model, batch)
            model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        last.feed = None
    with scope.quiet_outside_blocks():
        convert(model)  # on every rank, the preflight's dry pass included: the same collectives in the same order
    with distributed.together(f"writing {unit}"):
        out.add(model, passthrough)
    return summary(model), quantizer
