"""Fail in seconds, not at the end: every stage after the blocks is built and checked before the first block
is quantized, on the skeleton (meta-device model, config, shard index), so a run that cannot finish says so
before it spends minutes per block.

* :func:`check_export` (before any weight is read): the int8 form of every layer the config quantizes, built
  the way ``convert`` builds it, goes through the compressed-tensors export (exportable, its
  ``quantization_config`` built for every scheme the run may produce), and the names and shapes it would write
  are checked against the model's own state dict, which is what the loaders fill (``load_compressed``,
  ``from_pretrained``): a layer kind written in another layout (GPT-2's ``Conv1D`` holds ``[in, out]``), a
  tensor left out or a name no loader expects is refused here.
* :func:`check_rest` (after the capture, with the first block loaded but not yet prepared): the rest-of-model
  pass (vocabulary stand-ins, final norm, LM head; prepare, calibrate, convert, write to a :class:`DryWriter`)
  runs on a copy of the skeleton, on token 0.

A failure raises :class:`PreflightError`, naming the stage and the cause; nothing is written.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.structure.probe import PROBE_TOKENS
from tico.experimental.quantization.export.compressed_tensors import (
    build_quantization_config,
    check_exportable,
    compressed_tensors_of,
    float_linears,
    layer_scheme,
)
from tico.experimental.quantization.pipeline.output import DryWriter, Output
from tico.experimental.quantization.pipeline.rest_pass import load_rest, run_rest
from tico.experimental.quantization.pipeline.source import Checkpoint
from tico.experimental.quantization.pipeline.units import BlockStub
from tico.experimental.quantization.registry import UnitScope

QUANTIZATION_TENSORS = ("weight_scale", "input_scale")  # what compressed-tensors adds beside an int8 layer's weight


class PreflightError(RuntimeError):
    """A later stage of the streamed run would fail; found before the first block was quantized."""


def _root(exc: BaseException) -> str:
    """The first exception of a chain (``raise ... from``), whose message names what broke: the wrappers on the
    way were written for other callers (a probe failure asks for other inputs, which the pipeline built)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _fail(model: nn.Module, stage: str, cause: str) -> PreflightError:
    return PreflightError(
        f"{stage} of {type(model).__name__} would fail after every block is quantized, so nothing was quantized "
        f"or written: {cause}. This is a limit of the streamed pipeline or of the export for this model, not a "
        "problem with the calibration data"
    )


def check_export(scope: UnitScope, model: nn.Module, dtype: torch.dtype, config: Any) -> None:
    """The compressed-tensors checkpoint of this run can be built and read back (see the module docstring)."""
    if scope.output_format != "compressed-tensors":
        return
    stage = "the compressed-tensors export"
    try:
        json.dumps(config.to_dict(), default=str)
        forms = scope.export_forms(model)
        written = _export(model, forms, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure here is one the end of the run would hit
        raise _fail(model, stage, _root(exc)) from exc
    problems = _layout_problems(model, forms, written)
    if problems:
        raise _fail(model, stage, "the checkpoint could not be loaded back, its tensors do not match the model's: "
                    + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def _export(model: nn.Module, forms: dict[str, list[nn.Module]], dtype: torch.dtype) -> dict[str, tuple[int, ...]]:
    """The export of a meta copy of ``model`` with its layers swapped for their int8 forms, once per mix of
    forms (layer ``i`` takes form ``i + k``: every scheme, alone and mixed); the names and shapes written."""
    shell = copy.deepcopy(model)
    written: dict[str, tuple[int, ...]] = {}
    for k in range(max((len(f) for f in forms.values()), default=1)):
        for i, (name, options) in enumerate(forms.items()):
            shell.set_submodule(name, options[(i + k) % len(options)])
        check_exportable(shell)
        schemes = {n: layer_scheme(shell.get_submodule(n)) for n in forms}  # type: ignore[arg-type]
        build_quantization_config(schemes, float_linears(shell))
        written = {n: tuple(t.shape) for n, t in compressed_tensors_of(shell, dtype).items()}
    return written


def _layout_problems(model: nn.Module, forms: dict[str, list[nn.Module]], written: dict[str, tuple[int, ...]]) -> list[str]:
    """What a loader filling ``model``'s state dict from ``written`` would trip on."""
    expected: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied parameter is written once, under its first name
            seen.add(id(t))
            expected[name] = tuple(t.shape)
    problems = []
    for name, shape in written.items():
        owner, _, leaf = name.rpartition(".")
        if name in expected and shape != expected[name]:
            kind = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
            problems.append(f"{name} ({kind}) would be written as {list(shape)}, the model holds {list(expected[name])}")
        elif name not in expected and not (owner in forms and leaf in QUANTIZATION_TENSORS):
            problems.append(f"{name} would be written, but the model has no such tensor")
    problems += [f"{name} would not be written" for name in expected if name not in written]
    return problems


def check_rest(ckpt: Checkpoint, scope: UnitScope, blocks_path: str, blocks: nn.ModuleList, returns_tuple: bool,
               device: torch.device, writes: bool) -> None:
    """The rest-of-model pass on a copy of the skeleton (finished blocks stand-ins that return their input),
    calibrated on token 0; ``writes``: its output goes through the real export into a :class:`DryWriter`."""
    shell = _without_blocks(ckpt.model, blocks, returns_tuple)
    last = shell.get_submodule(blocks_path)[len(blocks) - 1]
    try:
        passthrough = load_rest(ckpt, shell, scope, blocks_path, device)
        out = Output(DryWriter() if writes else None, scope.output_format, ckpt.dtype, shell)
        ids = torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=device)
        run_rest(shell, scope, blocks_path, last, [ids], [None], device, out, passthrough)
    except Exception as exc:  # noqa: BLE001 - any failure here is one the end of the run would hit
        raise _fail(ckpt.model, f"the rest-of-model pass (everything outside {blocks_path}: embeddings, final norm, "
                    "LM head)", _root(exc)) from exc


def _without_blocks(model: nn.Module, blocks: nn.ModuleList, returns_tuple: bool) -> nn.Module:
    """A deep copy of ``model`` whose blocks are :class:`BlockStub` (nothing of the blocks is copied)."""
    originals = list(blocks)
    for i in range(len(blocks)):
        blocks[i] = BlockStub(returns_tuple)
    try:
        return copy.deepcopy(model)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
