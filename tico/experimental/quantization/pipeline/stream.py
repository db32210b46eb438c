"""Checkpoint -> checkpoint, one decoder block at a time: memory holds one block and the calibration hidden
states, whatever the model's size.

1. Skeleton without weights (meta device); the parts outside the blocks are loaded, the blocks' inputs and call
   arguments captured over the calibration batches, and those parts released again.
2. For each block: load its tensors from the shards (on ``device``) -> ``prepare`` (probe forward on the first
   batch's real inputs) -> calibration forwards -> ``convert`` -> its outputs become the next block's inputs
   (from the converted block by default: later blocks calibrate on what they will really see; or from the
   float block, the calibration forward's own outputs) -> its tensors go into the output shards -> freed.
3. The rest (embeddings, final norm, LM head; tied embeddings saved once) is prepared, calibrated on the last
   block's outputs and converted the same way, then ``config.json`` is written and the folder published.

``prepare``/``convert`` are the public ones, applied to each unit, so every algorithm's own planning,
validation and reports apply unchanged; with float propagation the result is bit-identical to the in-memory
``prepare``/``convert`` of the whole model (tested).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from tico.experimental.quantization.structure.probe import PROBE_TOKENS, ProbeError, probe_token_ids, vocab_size
from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.export.compressed_tensors import (
    build_quantization_config,
    check_exportable,
    compressed_tensors_of,
    float_linears,
    layer_scheme,
)
from tico.experimental.quantization.export.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.pipeline.capture import BlockCall, capture_block_inputs, model_inputs, to_device
from tico.experimental.quantization.pipeline.source import Checkpoint, resolve_checkpoint
from tico.experimental.quantization.structure.blocks import find_blocks
from tico.experimental.quantization.pipeline.heap import trim_heap
from tico.experimental.quantization.pipeline.units import (
    BlockShell,
    BlockStub,
    names_of,
    quantizable_linears,
    rotates,
    scoped_config,
)
from tico.experimental.quantization.pipeline.vocab import (
    Passthrough,
    gathered_embedding,
    passthrough_matrices,
    stored_keys,
    untied_head,
)
from tico.experimental.quantization.public_interface import convert, get_quantizer, prepare

logger = logging.getLogger(__name__)

Propagate = Literal["quantized", "float"]
Batch = torch.Tensor | Mapping[str, Any]


@dataclass
class StreamResult:
    """What :func:`quantize_checkpoint` did, with timings (seconds)."""

    output_dir: Path | None
    blocks: int
    capture_s: float = 0.0
    block_s: list[float] = field(default_factory=list)  # load + calibrate + convert + propagate + write
    phases: list[dict[str, float]] = field(default_factory=list)  # per block: seconds per phase
    rest_s: float = 0.0
    total_s: float = 0.0
    reports: dict[str, Any] = field(default_factory=dict)  # unit name -> a one-line summary
    quantizers: dict[str, Any] = field(default_factory=dict)  # unit name -> UnitOutcome (its plan and report)

    @property
    def plan(self) -> Any:
        """Every unit's smoothing plan as one (model order), or None when no unit smooths."""
        from tico.experimental.quantization.algorithm.smoothquant.groups import SmoothingPlan

        plans = [getattr(q, "plan", None) for q in self.quantizers.values()]
        plans = [p for p in plans if p is not None]
        return SmoothingPlan([g for p in plans for g in p.groups]) if plans else None

    @property
    def report(self) -> Any:
        """Every unit's W8A8 report merged (quantized layers, float layers, alphas, ranges), or None."""
        from tico.experimental.quantization.algorithm.w8a8.quantizer import W8A8Report

        reports = [getattr(q, "report", None) for q in self.quantizers.values()]
        reports = [r for r in reports if r is not None]
        if not reports:
            return None
        return W8A8Report.merged(reports)


@dataclass(frozen=True)
class UnitOutcome:
    """What one unit's quantizer decided (smoothing plan, W8A8 report): small, unlike the quantizer itself,
    whose observers hold row samples that must be freed with the block."""

    plan: Any
    report: Any

    @classmethod
    def of(cls, quantizer: Any) -> "UnitOutcome":
        return cls(getattr(quantizer, "plan", None), getattr(quantizer, "report", None))


def _check_config(config: BaseConfig, writes: bool) -> None:
    if not isinstance(config, (SmoothQuantConfig, W8A8Config)):
        raise TypeError(f"quantize_checkpoint supports SmoothQuantConfig and W8A8Config, got {type(config).__name__}")
    if writes and isinstance(config, W8A8Config):
        refused = config.unexportable_options()
        if refused:
            raise ValueError(
                f"W8A8Config({', '.join(refused)}) cannot be written as compressed-tensors (the format has no place for "
                "it); drop these options, or pass output_dir=None to measure without writing"
            )


def _check_names(config: BaseConfig, model: nn.Module) -> None:
    ignore, amap = names_of(config)
    modules = {n for n, _ in model.named_modules()}
    unknown = [n for n in [*ignore, *amap] if n not in modules]
    if unknown:
        raise ValueError(f"module names in the config that are not modules of {type(model).__name__}: {unknown}")
    if isinstance(config, W8A8Config):
        targets = quantizable_linears(model, config, config.ignore)
        unmatched = [p for p in config.tuning.rotate_in_quantizer if not any(rotates(t, p) for t in targets)]
        if unmatched:
            raise ValueError(f"W8A8Tuning.rotate_in_quantizer names that match no quantized layer of "
                             f"{type(model).__name__}: {unmatched}")


def _hidden_of(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Output:
    """Where converted units go: compressed-tensors (W8A8) or plain transformers tensors (smoothed float)."""

    def __init__(self, writer: ShardWriter | None, config: BaseConfig, dtype: torch.dtype, model: nn.Module) -> None:
        self.writer, self.dtype, self.model = writer, dtype, model
        self.compressed = isinstance(config, W8A8Config)
        self.schemes: dict[str, tuple[str, str, bool]] = {}
        self.ignore: list[str] = []

    def add(self, unit: nn.Module, passthrough: list[Passthrough] = ()) -> None:
        """Write ``unit``'s tensors; a :class:`Passthrough` stand-in is written as its checkpoint tensor."""
        if self.writer is None:  # measuring only: nothing to check or write
            return
        if self.compressed:
            check_exportable(unit)
            self.schemes.update({n: layer_scheme(m) for n, m in unit.named_modules() if isinstance(m, W8A8Linear)})
            self.ignore += float_linears(unit)
            tensors = compressed_tensors_of(unit, self.dtype)
        else:
            from transformers.core_model_loading import revert_weight_conversion

            seen: set[int] = set()
            tensors = {}
            for k, v in unit.state_dict(keep_vars=True).items():
                if id(v) not in seen:  # a tied parameter is saved once, as save_pretrained does
                    seen.add(id(v))
                    tensors[k] = v.detach()
            tensors = revert_weight_conversion(self.model, tensors)
        written = set()
        for name, tensor in tensors.items():
            p = next((p for p in passthrough if p.is_standin(tensor)), None)
            if p is None:
                self.writer.add(name, tensor)
                continue
            if tensor.shape != p.standin.shape:
                raise RuntimeError(f"{name}: the stand-in for {p.names[0]} was changed ({tuple(tensor.shape)}); not written")
            self.writer.add_chunks(name, p.dtype, list(p.source.shape), p.chunks())
            written.add(id(p))
        unwritten = [p.names[0] for p in passthrough if id(p) not in written]
        if unwritten:
            raise RuntimeError(f"{unwritten}: left as is, but not among the tensors to write")

    def finish(self, source: Path, config: Any) -> None:
        if self.writer is None:
            return
        if self.compressed:
            raw = config.to_dict()
            raw["quantization_config"] = build_quantization_config(self.schemes, self.ignore)
            self.writer.write_file("config.json", lambda p: p.write_text(json.dumps(raw, indent=2, default=str) + "\n"))
        else:
            self.writer.write_file("config.json", lambda p: config.save_pretrained(p.parent))
        if (source / "generation_config.json").is_file():
            self.writer.write_file("generation_config.json", lambda p: shutil.copyfile(source / "generation_config.json", p))


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
    before_publish: Callable[[Path, "StreamResult"], None] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> StreamResult:
    """Quantize a safetensors checkpoint block by block into ``output_dir``.

    Args:
        model_dir_or_id: a local checkpoint folder, or a Hugging Face hub id (safetensors only: pickle-only
            checkpoints are refused, since unpickling runs code).
        config: ``W8A8Config`` (written as compressed-tensors) or ``SmoothQuantConfig`` (a smoothed float
            checkpoint, as ``save_pretrained`` writes it).
        calibration: batches of token ids ``[batch, seq]`` (or dicts of model inputs); all are kept as hidden
            states in the model's dtype, so 32x256 tokens of a 2048-wide bf16 model take 32 MB.
        output_dir: a folder that must not exist or be empty; it appears only when complete. ``None`` writes
            nothing (to measure, or to try configs the format cannot hold).
        device: where each block is calibrated and converted (``"cuda"``: one block at a time on the GPU).
        propagate: ``"quantized"`` (default): the next block is calibrated on the converted block's outputs;
            ``"float"``: on the float block's outputs (what the in-memory ``prepare``/``convert`` does).
        max_shard_size: bytes or e.g. ``"2GB"``; shards are written as blocks finish, one tensor in memory at a time.
        blocks: dotted path of the decoder blocks' ``nn.ModuleList`` (found automatically otherwise).
        attn_implementation: passed to transformers when the skeleton is built (e.g. ``"eager"``).
        progress: show a tqdm bar over the blocks (time per block); otherwise the library only logs.
        before_publish: called with the staging folder and the result so far (plans, reports) before the folder
            is renamed into place: write the tokenizer, recipes, metadata there.
        on_block: called with each block's index after it is written and freed (monitoring, tests).
    """
    start = time.perf_counter()
    if propagate not in ("quantized", "float"):
        raise ValueError(f"propagate must be 'quantized' or 'float', got {propagate!r}")
    _check_config(config, writes=output_dir is not None)
    device = torch.device(device)
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch of token ids")
    ckpt = Checkpoint(resolve_checkpoint(model_dir_or_id), attn_implementation)
    model = ckpt.model
    _check_names(config, model)
    blocks_path, block_list = find_blocks(model, blocks)
    n_blocks = len(block_list)
    block_keys = [ckpt.keys_under(f"{blocks_path}.{i}") for i in range(n_blocks)]
    in_blocks = {k for keys in block_keys for k in keys}
    rest_keys = [k for k in ckpt.files if k not in in_blocks]
    state_names = list(model.state_dict(keep_vars=True))
    rest_expected = [n for n in state_names if not n.startswith(blocks_path + ".")]
    result = StreamResult(Path(output_dir) if output_dir is not None else None, n_blocks)

    # 1. the blocks' inputs, from the parts before them (the input embedding: only the calibration tokens' rows;
    # the LM head: not at all)
    head, head_keys = untied_head(ckpt, model)
    probe = _probe_ids(model, batches)
    captured_batches = batches if probe is None else [*batches, probe]
    with gathered_embedding(ckpt, model, captured_batches) as (gathered, gathered_keys):
        skipped, skipped_keys = {*gathered, *head}, {*gathered_keys, *head_keys}
        ckpt.load([k for k in rest_keys if k not in skipped_keys], [n for n in rest_expected if n not in skipped])
        t0 = time.perf_counter()
        captured = capture_block_inputs(model, block_list, captured_batches)
        result.capture_s = time.perf_counter() - t0
    _release_rest(model, blocks_path)
    memo: dict[int, Any] = {}
    hidden = [to_device(h, device, memo) for h in captured.hidden]
    calls = [[to_device(c, device, memo) for c in per_block] for per_block in captured.calls]
    del captured, memo
    probe_hidden = None if probe is None else hidden.pop()  # the probe's own call per block, beside the batches'
    probe_calls = [None if probe is None else per_block.pop() for per_block in calls]
    logger.info("captured %d calibration batch(es) at %d blocks of %s", len(batches), n_blocks, type(model).__name__)

    writer = ShardWriter(output_dir, max_shard_size) if output_dir is not None else None
    with writer if writer is not None else _NoWriter():
        out = _Output(writer, config, ckpt.dtype, model)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_blocks, desc="quantizing blocks", unit="block")
        returns_tuple = False
        try:
            for i in range(n_blocks):
                t0 = time.perf_counter()
                phases: dict[str, float] = {}
                probe_i = None if probe_hidden is None else (probe_hidden, probe_calls[i])
                hidden, returns_tuple, summary, quantizer, probe_hidden = _process_block(
                    ckpt, config, blocks_path, i, block_keys[i], hidden, calls[i], probe_i, device, propagate, out,
                    state_names, phases
                )
                result.phases.append(phases)
                block_list[i] = BlockStub(returns_tuple)
                calls[i], probe_calls[i] = [], None
                result.reports[f"{blocks_path}.{i}"] = summary
                result.quantizers[f"{blocks_path}.{i}"] = UnitOutcome.of(quantizer)
                del quantizer  # its observers' samples and the float layers it replaced: not into the next block
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                trim_heap()  # the freed block back to the OS, not kept by malloc under the next block's peak
                result.block_s.append(time.perf_counter() - t0)
                if bar is not None:
                    bar.set_postfix_str(f"{result.block_s[-1]:.1f}s/block")
                    bar.update(1)
                else:
                    logger.info("block %d/%d done in %.2fs", i + 1, n_blocks, result.block_s[-1])
                if on_block is not None:
                    on_block(i)
        finally:
            if bar is not None:
                bar.close()

        # 3. the rest of the model, calibrated on the last block's outputs
        t0 = time.perf_counter()
        passthrough = passthrough_matrices(ckpt, model, config, blocks_path)  # LM head, embeddings: copied as is
        skipped = [n for p in passthrough for n in p.names]
        skipped_keys = stored_keys(ckpt, model, skipped)
        ckpt.load([k for k in rest_keys if k not in skipped_keys], [n for n in rest_expected if n not in skipped])
        for p in passthrough:
            p.install(model, device)
        model.to(device)
        for p in passthrough:
            p.standin = model.get_parameter(p.names[0])
        result.reports["rest"], rest_quantizer = _process_rest(
            model, config, blocks_path, block_list, batches, hidden, device, out, passthrough
        )
        result.quantizers["rest"] = UnitOutcome.of(rest_quantizer)
        result.rest_s = time.perf_counter() - t0
        out.finish(ckpt.folder, ckpt.config)
        if writer is not None:
            if before_publish is not None:
                before_publish(writer.staging, result)
            writer.publish()
    result.total_s = time.perf_counter() - start
    return result


def _probe_ids(model: nn.Module, batches: list[Batch]) -> torch.Tensor | None:
    """The token ids of prepare's probe forward, as the in-memory ``prepare`` uses (:data:`PROBE_TOKENS` seeded
    ids), captured beside the calibration batches so each block's probe has its own arguments (masks, rotary
    tables): prepare then traces 8 tokens instead of a whole calibration batch (a tenth of a block's forward at
    32x256 tokens in batches of 4). None (probe on the first batch) when the batches are not plain token ids."""
    vocab = vocab_size(model)
    if vocab is None:
        return None
    if not all(isinstance(b, torch.Tensor) and b.dtype in (torch.int64, torch.int32) for b in batches):
        return None
    return probe_token_ids(vocab).to(batches[0].device)


class _NoWriter:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _release_rest(model: nn.Module, blocks_path: str) -> None:
    """Free every parameter/persistent buffer outside the blocks (back to meta)."""
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for key, p in list(module._parameters.items()):
            if p is not None and not p.is_meta:
                module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=False)
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        for key in persistent:
            b = module._buffers[key]
            if b is not None and not b.is_meta:
                module._buffers[key] = b.to("meta")


@torch.no_grad()
def _process_block(
    ckpt: Checkpoint, config: BaseConfig, blocks_path: str, i: int, keys: list[str], hidden: list[torch.Tensor],
    calls: list[BlockCall], probe: tuple[torch.Tensor, BlockCall] | None, device: torch.device, propagate: Propagate,
    out: _Output, state_names: list[str], phases: dict[str, float],
) -> tuple[list[torch.Tensor], bool, str, Any, torch.Tensor | None]:
    """Load -> prepare -> calibrate -> convert -> propagate -> write -> free one block (``phases``: seconds).

    ``probe``: the probe tokens' input and call for prepare's traced forward (None: the first batch's).
    Returns the block's outputs, whether it returns a tuple, a one-line summary, its quantizer and the probe
    tokens' output of the float block (the next block's probe input)."""
    clock = _Clock(phases, device)
    block_path = f"{blocks_path}.{i}"
    block = ckpt.model.get_submodule(block_path)
    ckpt.load(keys, [n for n in state_names if n.startswith(block_path + ".")])
    block.to(device)
    clock("load")
    shell = BlockShell(blocks_path, i, block)
    probe_h, probe_call = (hidden[0], calls[0]) if probe is None else probe
    next_probe = None if probe is None else _hidden_of(probe_call(shell, probe_h)).detach()  # before any hook
    with _own_probe(block_path):
        prepare(shell, scoped_config(config, block_path, blocks_path, shell), args=(probe_h, *probe_call.args),
                kwargs=probe_call.kwargs if probe_call.hidden_key is None else {**probe_call.kwargs, probe_call.hidden_key: probe_h})
    quantizer = get_quantizer(shell)  # convert detaches it: kept for the plan and report
    outputs, returns_tuple = [], False
    for h, call in zip(hidden, calls):
        o = call(shell, h)
        returns_tuple = isinstance(o, (tuple, list))
        outputs.append(_hidden_of(o).detach())
    clock("calibrate")
    convert(shell)
    clock("convert")
    if propagate == "quantized":
        outputs = [_hidden_of(call(shell, h)).detach() for h, call in zip(hidden, calls)]
    clock("propagate")
    summary = _summary_or_empty(shell)
    out.add(shell)
    Checkpoint.release(block)
    clock("write")
    return outputs, returns_tuple, summary, quantizer, next_probe


class _Clock:
    """Records the seconds since the previous call under a phase name (synchronising CUDA first)."""

    def __init__(self, phases: dict[str, float], device: torch.device) -> None:
        self.phases, self.device, self.last = phases, device, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now


def _summary_or_empty(unit: nn.Module) -> str:
    lines = [f"{type(m).__name__}: {n}" for n, m in unit.named_modules() if isinstance(m, W8A8Linear)]
    return f"{len(lines)} W8A8 layers" if lines else "float"


@contextmanager
def _own_probe(unit: str) -> Iterator[None]:
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


@contextmanager
def _quiet_if_nothing_to_do() -> Iterator[None]:
    """Outside the blocks there is usually nothing to quantize (the LM head stays float, the final norm feeds only
    it): the quantizers' "nothing to do" warnings are expected there, so they are silenced for that unit."""
    loggers = [logging.getLogger(f"tico.experimental.quantization.algorithm.{m}.quantizer") for m in ("w8a8", "smoothquant")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


@torch.no_grad()
def _process_rest(
    model: nn.Module, config: BaseConfig, blocks_path: str, block_list: nn.ModuleList, batches: list[Batch],
    hidden: list[torch.Tensor], device: torch.device, out: _Output, passthrough: list[Passthrough],
) -> tuple[str, Any]:
    """Embeddings, final norm, LM head and anything else outside the blocks: prepare/calibrate/convert/write.
    With ``passthrough`` stand-ins (one row) in place of the vocabulary matrices, the probe forward reads token 0.
    Returns a one-line summary and the quantizer."""
    last: BlockStub = block_list[len(block_list) - 1]  # type: ignore[assignment]
    scoped = scoped_config(config, None, blocks_path, model)
    probe = {"input_ids": torch.zeros(1, PROBE_TOKENS, dtype=torch.long, device=device)} if passthrough else None
    with _quiet_if_nothing_to_do(), _own_probe(f"{type(model).__name__} outside {blocks_path}"):
        prepare(model, scoped, kwargs=probe)
    quantizer = get_quantizer(model)
    idle = getattr(quantizer, "observers", None) == {} and not getattr(quantizer, "attention_modules", None)
    if passthrough and not idle:
        raise RuntimeError(f"{[p.names[0] for p in passthrough]} were expected to be left as is, but the rest of "
                           f"{type(model).__name__} observes activations")
    for batch, h in zip([] if idle else batches, hidden):  # nothing observes: no forward (LM head logits) needed
        last.feed = h
        inputs = model_inputs(model, batch)
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    last.feed = None
    with _quiet_if_nothing_to_do():
        convert(model)
    out.add(model, passthrough)
    return _summary_or_empty(model), quantizer
