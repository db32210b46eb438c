"""Checkpoint -> checkpoint, one decoder block at a time: memory holds one block and the calibration hidden
states, whatever the model's size.

1. Skeleton without weights (meta device); the config is checked against it and the export of every layer the
   run will quantize is built and checked (:mod:`.preflight`). The parts outside the blocks are loaded, the
   blocks' inputs and call arguments captured over the calibration batches, and those parts released again.
2. For each block (:mod:`.block_pass`): load its tensors from the shards (on ``device``) -> ``prepare`` (probe
   forward) -> calibration forwards -> ``convert`` -> its outputs become the next block's inputs (from the
   converted block by default: later blocks calibrate on what they will really see; or from the float block,
   the calibration forward's own outputs) -> its tensors go into the output shards -> freed. Before the first
   block is prepared, the rest-of-model pass is run on a copy of the skeleton (:func:`.preflight.check_rest`).
3. The rest (embeddings, final norm, LM head; tied embeddings saved once) is prepared, calibrated on the last
   block's outputs and converted the same way (:mod:`.rest_pass`), then ``config.json`` is written and the
   folder published.

The pipeline only orchestrates: what each unit's config is, which layers are quantized, which matrices are left
as they are, how plans and reports merge, all come from the algorithm's scope
(:func:`~tico.experimental.quantization.registry.get_scope`). Progress goes through
:mod:`~tico.experimental.quantization.progress`. With float propagation the result is bit-identical to the
in-memory ``prepare``/``convert`` of the whole model (tested).

Under a process group (``torchrun``; see docs/distributed.md) every rank is given the same batches and keeps a
contiguous share of them, in rank order (:func:`rank_share`): each block is calibrated and propagated on every
rank's own share, and each ``convert`` reduces the statistics over the ranks first, so every rank converts the
block one process would. The collectives are reached on every rank in the same order (the preflight's dry
rest-of-model pass included); the local work before and between them (reading the checkpoint and the
calibration batches included) runs inside ``distributed.together``, so a failure on one rank ends every rank
with an error. Only rank 0 writes the output folder and reports progress.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from tico.experimental.quantization import distributed
from tico.experimental.quantization.structure.probe import probe_token_ids, vocab_size
from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.export.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter
from tico.experimental.quantization.pipeline import preflight
from tico.experimental.quantization.pipeline.block_pass import (
    BlockInputs,
    Clock,
    Propagate,
    float_probe,
    load_block,
    quantize_block,
)
from tico.experimental.quantization.distributed import to_device
from tico.experimental.quantization.pipeline.capture import capture_block_inputs
from tico.experimental.quantization.pipeline.heap import trim_heap
from tico.experimental.quantization.pipeline.output import Output
from tico.experimental.quantization.pipeline.rest_pass import load_rest, release_rest, rest_names, run_rest
from tico.experimental.quantization.pipeline.result import StreamResult, UnitOutcome
from tico.experimental.quantization.pipeline.source import Checkpoint, resolve_checkpoint
from tico.experimental.quantization.pipeline.units import BlockStub
from tico.experimental.quantization.pipeline.vocab import gathered_embedding, untied_head
from tico.experimental.quantization.progress import track
from tico.experimental.quantization.registry import UnitScope, get_scope
from tico.experimental.quantization.structure.blocks import find_blocks

__all__ = ["quantize_checkpoint", "rank_share", "StreamResult"]

logger = logging.getLogger(__name__)

Batch = torch.Tensor | Mapping[str, Any]


@dataclass
class _Run:
    """One run's fixed parts: the checkpoint and its skeleton, the blocks, the algorithm's scope, the options."""

    ckpt: Checkpoint
    scope: UnitScope
    blocks_path: str
    blocks: nn.ModuleList
    device: torch.device
    propagate: Propagate
    writes: bool
    state_names: list[str]  # the skeleton's, before any block is swapped for a stub

    @property
    def model(self) -> nn.Module:
        return self.ckpt.model


def quantize_checkpoint(
    model_dir_or_id: str | Path,
    config: BaseConfig,
    calibration: Iterable[Batch],
    output_dir: str | Path | None,
    *,
    device: str | torch.device = "cpu",
    propagate: Propagate = "quantized",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    blocks: str | None = None,
    attn_implementation: str | None = None,
    progress: bool = False,
    before_publish: Callable[[Path, StreamResult], None] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> StreamResult:
    """Quantize a safetensors checkpoint block by block into ``output_dir``.

    Args:
        model_dir_or_id: a local checkpoint folder, or a Hugging Face hub id (safetensors only: pickle-only
            checkpoints are refused, since unpickling runs code).
        config: ``W8A8Config`` (written as compressed-tensors) or ``SmoothQuantConfig`` (a smoothed float
            checkpoint, as ``save_pretrained`` writes it): any config whose algorithm registers a scope.
        calibration: batches of token ids ``[batch, seq]`` (or dicts of model inputs); all are kept as hidden
            states in the model's dtype (batches x tokens x hidden size values).
        output_dir: a folder that must not exist or be empty; it appears only when complete. ``None`` writes
            nothing (to measure, or to try configs the format cannot hold).
        device: where each block is calibrated and converted (``"cuda"``: one block at a time on the GPU).
        propagate: ``"quantized"`` (default): the next block is calibrated on the converted block's outputs;
            ``"float"``: on the float block's outputs (what the in-memory ``prepare``/``convert`` does).
        max_shard_size: bytes or e.g. ``"2GB"``; shards are written as blocks finish, one tensor in memory at a time.
        blocks: dotted path of the decoder blocks' ``nn.ModuleList`` (found automatically otherwise).
        attn_implementation: passed to transformers when the skeleton is built (e.g. ``"eager"``).
        progress: report the blocks as the step ``"quantizing blocks"`` to the progress callback installed with
            :func:`~tico.experimental.quantization.progress.progress_callback` (the command line draws it);
            the library draws nothing itself and logs each block either way.
        before_publish: called with the staging folder and the result so far (plans, reports) before the folder
            is renamed into place: write the tokenizer, recipes, metadata there.
        on_block: called with each block's index after it is written and freed (monitoring, tests).

    Raises:
        ValueError: the config or the calibration does not fit the checkpoint (names the option or module).
        preflight.PreflightError: a later stage (rest of the model, export) would fail; raised before the
            first block is quantized.
    """
    start = time.perf_counter()
    writes_here = output_dir is not None and distributed.rank() == 0
    # Everything before the first collective, reading the calibration batches included, fails on every rank.
    with distributed.together("preparing the streamed run"):
        if propagate not in ("quantized", "float"):
            raise ValueError(f"propagate must be 'quantized' or 'float', got {propagate!r}")
        batches = rank_share(list(calibration))
        scope = get_scope(config)
        scope.check_streamable(writes=output_dir is not None)
        ckpt = Checkpoint(resolve_checkpoint(model_dir_or_id), attn_implementation)
        scope.check_names(ckpt.model)
        blocks_path, block_list = find_blocks(ckpt.model, blocks)
        run = _Run(ckpt, scope, blocks_path, block_list, torch.device(device), propagate, output_dir is not None,
                   list(ckpt.model.state_dict(keep_vars=True)))
        result = StreamResult(Path(output_dir) if output_dir is not None else None, len(block_list), scope=scope)
        t0 = time.perf_counter()
        if run.writes:
            preflight.check_export(scope, ckpt.model, ckpt.dtype, ckpt.config)
        result.preflight_s = time.perf_counter() - t0
        hidden, calls, probe = _capture(run, batches, result)
        writer = ShardWriter(output_dir, max_shard_size) if writes_here else None

    with writer if writer is not None else _NoWriter():
        out = Output(writer, scope.output_format, ckpt.dtype, ckpt.model)
        hidden = _quantize_blocks(run, hidden, calls, probe, out, result, progress and distributed.rank() == 0,
                                  on_block)
        _quantize_rest(run, batches, hidden, out, result)
        with distributed.together("writing the output folder on rank 0"):
            out.finish(ckpt.folder, ckpt.config)
            if writer is not None:
                if before_publish is not None:
                    before_publish(writer.staging, result)
                writer.publish()
    result.total_s = time.perf_counter() - start
    return result


def rank_share(batches: list[Batch]) -> list[Batch]:
    """This rank's calibration batches: a contiguous share, in rank order (all of them without a process group).

    Contiguous, not interleaved: the block objective keeps the first recorded calls of rank 0, then of rank 1,
    ..., which are the first calls one process records only when the shares follow the batches' order. Decided
    here, in the one entry point every caller (the command line, a user's script) goes through, so every rank is
    given the same list and no caller splits it.
    """
    if not batches:
        raise ValueError("calibration is empty: give at least one batch of token ids")
    world = distributed.world_size()
    if len(batches) < world:
        raise ValueError(f"{len(batches)} calibration batch(es) for {world} ranks: give at least one batch per rank")
    q, extra = divmod(len(batches), world)  # the first ``extra`` ranks take one batch more: none is left empty
    r = distributed.rank()
    first = r * q + min(r, extra)
    return batches[first:first + q + (r < extra)]


def _capture(run: _Run, batches: list[Batch], result: StreamResult) -> tuple[list, list[list], tuple | None]:
    """The blocks' inputs, from the parts before them (the input embedding: only the calibration tokens' rows;
    the LM head: not at all), on the run's device: the first block's hidden states per batch, every block's calls
    per batch, and the probe tokens' (hidden states, calls per block), or None without probe tokens."""
    ckpt, model = run.ckpt, run.model
    head, head_keys = untied_head(ckpt, model)
    probe = _probe_ids(model, batches)
    captured_batches = batches if probe is None else [*batches, probe]
    keys, expected = rest_names(ckpt, model, run.blocks_path)
    with gathered_embedding(ckpt, model, captured_batches) as (gathered, gathered_keys):
        skipped, skipped_keys = {*gathered, *head}, {*gathered_keys, *head_keys}
        ckpt.load([k for k in keys if k not in skipped_keys], [n for n in expected if n not in skipped])
        t0 = time.perf_counter()
        captured = capture_block_inputs(model, run.blocks, captured_batches)
        result.capture_s = time.perf_counter() - t0
    release_rest(model, run.blocks_path)
    memo: dict[int, Any] = {}
    hidden = [to_device(h, run.device, memo) for h in captured.hidden]
    calls = [[to_device(c, run.device, memo) for c in per_block] for per_block in captured.calls]
    del captured, memo
    logger.info("captured %d calibration batch(es) at %d blocks of %s", len(batches), len(run.blocks), type(model).__name__)
    if probe is None:
        return hidden, calls, None
    return hidden, calls, (hidden.pop(), [per_block.pop() for per_block in calls])  # the probe's own calls


def _quantize_rest(run: _Run, batches: list[Batch], hidden: list[torch.Tensor], out: Output, result: StreamResult) -> None:
    """The rest of the model, calibrated on the last block's outputs (see :mod:`.rest_pass`)."""
    t0 = time.perf_counter()
    passthrough = load_rest(run.ckpt, run.model, run.scope, run.blocks_path, run.device)
    last: BlockStub = run.blocks[len(run.blocks) - 1]  # type: ignore[assignment]
    result.reports["rest"], quantizer = run_rest(
        run.model, run.scope, run.blocks_path, last, batches, hidden, run.device, out, passthrough)
    result.quantizers["rest"] = UnitOutcome.of(quantizer)
    result.rest_s = time.perf_counter() - t0


def _probe_ids(model: nn.Module, batches: list[Batch]) -> torch.Tensor | None:
    """The token ids of prepare's probe forward, as the in-memory ``prepare`` uses (seeded ids), captured beside
    the calibration batches so each block's probe has its own arguments (masks, rotary tables): prepare then
    traces a few tokens instead of a whole calibration batch. None (probe on the first batch) when the batches
    are not plain token ids."""
    vocab = vocab_size(model)
    if vocab is None:
        return None
    if not all(isinstance(b, torch.Tensor) and b.dtype in (torch.int64, torch.int32) for b in batches):
        return None
    return probe_token_ids(vocab).to(batches[0].device)


def _quantize_blocks(run: _Run, hidden: list[torch.Tensor], calls: list[list], probe: tuple | None, out: Output,
                     result: StreamResult, progress: bool, on_block: Callable[[int], None] | None) -> list[torch.Tensor]:
    """Every block in order (see :mod:`.block_pass`); the rest-of-model preflight runs once the first block's
    output form is known, before it is prepared. Returns the last block's outputs."""
    n = len(run.blocks)
    probe_hidden = None if probe is None else probe[0]
    for i in track(range(n), "quantizing blocks") if progress else range(n):
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        clock = Clock(phases, run.device)
        with distributed.together(f"loading block {i}"):
            keys = run.ckpt.keys_under(f"{run.blocks_path}.{i}")
            shell = load_block(run.ckpt, run.blocks_path, i, keys, run.state_names, run.device)
            clock("load")
            inputs = BlockInputs(hidden, calls[i], None if probe is None else (probe_hidden, probe[1][i]))
            next_probe, returns_tuple = float_probe(shell, inputs) if probe is not None or i == 0 else (None, False)
        checked = 0.0
        if i == 0:
            p0 = time.perf_counter()
            preflight.check_rest(run.ckpt, run.scope, run.blocks_path, run.blocks, returns_tuple, run.device, run.writes)
            clock.last = time.perf_counter()
            checked = clock.last - p0
            result.preflight_s += checked
        block = quantize_block(shell, run.scope.for_unit(shell, shell.target, run.blocks_path), inputs, run.propagate,
                               out, clock)
        hidden, probe_hidden = block.outputs, next_probe
        result.phases.append(phases)
        run.blocks[i] = BlockStub(block.returns_tuple)
        calls[i] = []
        result.reports[shell.target] = block.summary
        result.quantizers[shell.target] = UnitOutcome.of(block.quantizer)
        del block, shell  # the quantizer's observer samples and replaced float layers: not into the next block
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        trim_heap()  # the freed block back to the OS, not kept by malloc under the next block's peak
        result.block_s.append(time.perf_counter() - t0 - checked)
        logger.info("block %d/%d done in %.2fs", i + 1, n, result.block_s[-1])
        with distributed.together(f"after block {i}"):
            if on_block is not None:
                on_block(i)
    return hidden


class _NoWriter:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
