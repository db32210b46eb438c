"""One decoder block: load -> prepare (probe forward) -> calibrate -> convert -> propagate -> write -> free.

``prepare``/``convert`` are the public ones, with the config the algorithm gives this block
(``UnitScope.for_unit``), so every algorithm's own planning, validation and reports apply unchanged.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
from torch import nn

from tico.experimental.quantization import distributed
from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.pipeline.capture import BlockCall
from tico.experimental.quantization.pipeline.output import Output, summary
from tico.experimental.quantization.pipeline.source import Checkpoint
from tico.experimental.quantization.pipeline.units import BlockShell
from tico.experimental.quantization.public_interface import convert, get_quantizer, prepare
from tico.experimental.quantization.structure.probe import ProbeError

Propagate = Literal["quantized", "float"]


def hidden_of(output: Any) -> torch.Tensor:
    """A block's hidden states (the first element where it returns a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Clock:
    """Records the seconds since the previous call under a phase name (synchronising CUDA first)."""

    def __init__(self, phases: dict[str, float], device: torch.device) -> None:
        self.phases, self.device, self.last = phases, device, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


@dataclass
class BlockInputs:
    """What one block is called with: per calibration batch its hidden states and call, and the probe tokens'
    (None: prepare probes on the first batch)."""

    hidden: list[torch.Tensor]
    calls: list[BlockCall]
    probe: tuple[torch.Tensor, BlockCall] | None

    def probe_input(self) -> tuple[torch.Tensor, BlockCall]:
        return (self.hidden[0], self.calls[0]) if self.probe is None else self.probe


@dataclass
class BlockOutcome:
    outputs: list[torch.Tensor]  # the next block's calibration inputs
    returns_tuple: bool
    summary: str
    quantizer: Any  # convert detaches it from the block: kept for its plan and report


def load_block(ckpt: Checkpoint, blocks_path: str, i: int, keys: list[str], state_names: list[str],
               device: torch.device) -> BlockShell:
    """Block ``i``'s tensors from the shards, on ``device``, inside a :class:`BlockShell`."""
    block_path = f"{blocks_path}.{i}"
    block = ckpt.model.get_submodule(block_path)
    ckpt.load(keys, [n for n in state_names if n.startswith(block_path + ".")])
    block.to(device)
    return BlockShell(blocks_path, i, block)


@torch.no_grad()
def float_probe(shell: nn.Module, inputs: BlockInputs) -> tuple[torch.Tensor | None, bool]:
    """The float block's output on prepare's probe input, before any hook (the next block's probe input, None
    without probe tokens), and whether the block returns a tuple."""
    h, call = inputs.probe_input()
    out = call(shell, h)
    return (None if inputs.probe is None else hidden_of(out).detach()), isinstance(out, (tuple, list))


@contextmanager
def own_probe(unit: str) -> Iterator[None]:
    """prepare's probe forward of a unit runs on inputs this pipeline built (the probe tokens' captured states,
    token 0 with stand-ins), not on anything the caller passed: a failure is reported as the pipeline's own."""
    try:
        yield
    except ProbeError as exc:
        raise ProbeError(
            f"{unit}: the probe forward failed on the inputs the streamed pipeline built itself "
            f"({type(exc.cause).__name__}: {exc.cause}); this is an internal error of the pipeline, not a problem "
            "with the calibration data: please report it, and quantize in memory meanwhile (tico-sq quantize "
            "--in-memory, or prepare/convert)", exc.cause
        ) from exc


@torch.no_grad()
def quantize_block(shell: BlockShell, config: BaseConfig, inputs: BlockInputs, propagate: Propagate, out: Output,
                   clock: Clock) -> BlockOutcome:
    """prepare (probe forward) -> calibrate -> convert -> propagate -> write -> free the block."""
    probe_h, probe_call = inputs.probe_input()
    kwargs = probe_call.kwargs if probe_call.hidden_key is None else {**probe_call.kwargs, probe_call.hidden_key: probe_h}
    with distributed.together(f"calibrating {shell.target}"):  # local work; convert's collectives come next
        with own_probe(shell.target):
            prepare(shell, config, args=(probe_h, *probe_call.args), kwargs=kwargs)
        quantizer = get_quantizer(shell)
        outputs, returns_tuple = [], False
        for h, call in zip(inputs.hidden, inputs.calls):  # this rank's share of the batches
            o = call(shell, h)
            returns_tuple = isinstance(o, (tuple, list))
            outputs.append(hidden_of(o).detach())
        clock("calibrate")
    convert(shell)  # reduces the statistics over the ranks, then plans: the same block on every rank
    clock("convert")
    with distributed.together(f"propagating and writing {shell.target}"):
        if propagate == "quantized":
            outputs = [hidden_of(call(shell, h)).detach() for h, call in zip(inputs.hidden, inputs.calls)]
        clock("propagate")
        line = summary(shell)
        out.add(shell)
        Checkpoint.release(shell.get_submodule(shell.target))
        clock("write")
    return BlockOutcome(outputs, returns_tuple, line, quantizer)
