"""A whole quantization run, model folder to checkpoint folder: load -> calibrate -> convert -> save.

``tico-sq quantize`` is this module plus argument parsing. Each step is a function, so a different backend
(e.g. a streaming, block-by-block pipeline) replaces :func:`quantize_to_folder` with one call and keeps the
same calibration data and metadata.

Calibration takes ``samples`` disjoint windows **spread evenly over the whole text** (:data:`SELECTION`): a text is
usually many documents (WikiText's articles, a concatenated dataset), and the first windows would all come from
the first of them; llm-compressor shuffles its calibration samples for the same reason. The spread is
deterministic (no seed), so the same text gives the same windows. The run records which tokens those were in
``tico_recipe.json``; ``tico-sq eval`` on the same text then scores only windows that share no token with them,
so perplexity is never measured on the calibration tokens.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tico.experimental.quantization.run.calibration import QuantizationResult, quantize_model
from tico.experimental.quantization.export.publish import RECIPE_FILE, write_atomically
from tico.experimental.quantization.run.loading import is_local_model, load_model
from tico.experimental.quantization.run.schemes import config_to_dict

__all__ = ["SELECTION", "CalibrationSet", "calibration_set", "save_quantized", "quantize_to_folder", "FORMAT"]

logger = logging.getLogger(__name__)

FORMAT = "tico-run/1"


SELECTION = "spread"  # which windows of the text calibrate (evaluation.data.window_picks): the one place it is chosen


@dataclass
class CalibrationSet:
    """Calibration windows and where they came from (recorded so evaluation can skip them)."""

    windows: torch.Tensor
    source: dict[str, Any] = field(default_factory=dict)  # dataset name/path, config, split, column
    token_ranges: list[tuple[int, int]] = field(default_factory=list)  # [first, end) of each window in the stream
    selection: str = SELECTION

    @property
    def end_token(self) -> int:
        """The end of the last calibration window in the text's token stream: no token after it calibrated."""
        return max((end for _, end in self.token_ranges), default=int(self.windows.numel()))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.source,
            "windows": int(self.windows.size(0)),
            "seq_len": int(self.windows.size(1)),
            "first_token": min((first for first, _ in self.token_ranges), default=0),
            "end_token": self.end_token,
            "seed": None,  # no random choice: the same text gives the same windows
            "selection": self.selection,
            "token_ranges": [list(r) for r in self.token_ranges],  # in the stream without BOS; tico-sq eval skips them
        }


def calibration_set(tokenizer: Any, text: str, seq_len: int, samples: int, source: dict[str, Any] | None = None,
                    selection: str = SELECTION) -> CalibrationSet:
    """``samples`` disjoint windows of ``seq_len`` tokens of ``text``, picked by ``selection`` (spread evenly over the
    text by default, :func:`~tico.experimental.quantization.evaluation.data.window_picks`), in text order, with
    their token ranges. Raises ValueError if the text is too short."""
    from tico.experimental.quantization.evaluation.data import text_tokens_per_window, token_windows, window_picks

    grid = token_windows(tokenizer, text, seq_len)
    if samples > grid.size(0):
        raise ValueError(f"text too short: {samples} disjoint windows of seq_len={seq_len} are asked for, "
                         f"but the text has room for only {grid.size(0)}")
    picks = window_picks(grid.size(0), samples, selection)
    step = text_tokens_per_window(tokenizer, seq_len)
    ranges = [(int(k) * step, (int(k) + 1) * step) for k in picks]
    return CalibrationSet(grid[picks].clone(), dict(source or {}), ranges, selection)


def run_metadata(result: QuantizationResult, config: Any, calibration: CalibrationSet, options: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to understand or repeat the run (``tico-sq quantize --recipe`` reads it back): the full
    config, the options, the calibration text and tokens, and the outcome."""
    report = result.report
    return {
        "format": FORMAT,
        "config": config_to_dict(config),
        "options": options,
        "calibration": calibration.to_dict(),
        "alphas": result.alphas(),
        "act_ranges": dict(getattr(report, "act_ranges", {}) or {}),
        "kept_float": dict(getattr(report, "kept_float", {}) or {}),
        "act_modes": dict(getattr(report, "act_modes", {}) or {}),
        "block_choices": dict(getattr(report, "block_choices", {}) or {}),
        "quantized": list(getattr(report, "quantized", []) or []),
    }


def save_quantized(result: QuantizationResult, tokenizer: Any, output: str | Path, metadata: dict[str, Any]) -> Path:
    """Write a smoothed float model (``save_pretrained``) or a compressed-tensors W8A8 checkpoint, atomically.

    Beside the weights: the tokenizer, ``tico_recipe.json`` (``metadata``) and, when groups were smoothed,
    ``smoothquant_recipe.json`` (re-appliable with ``apply_recipe``).
    """
    from tico.experimental.quantization.export.compressed_tensors import save_compressed

    def write(folder: Path) -> None:
        if result.report is None:
            result.model.save_pretrained(folder)
        else:
            save_compressed(result.model, folder)
        write_sidecars(folder, tokenizer, result.plan, metadata)

    return write_atomically(output, write)


def write_sidecars(folder: Path, tokenizer: Any, plan: Any, metadata: dict[str, Any]) -> None:
    """The files beside the weights: tokenizer, ``smoothquant_recipe.json`` (when groups were smoothed) and
    ``tico_recipe.json``; shared by the in-memory and the streamed paths so both folders look the same."""
    from tico.experimental.quantization.algorithm.smoothquant.recipe import save_recipe

    tokenizer.save_pretrained(folder)
    if plan is not None and plan.smoothed:
        save_recipe(plan, folder / "smoothquant_recipe.json")
    (folder / RECIPE_FILE).write_text(json.dumps(metadata, indent=1))


ROTATIONS = ("none", "fused", "online", "online-only")


def apply_rotations(model: torch.nn.Module, mode: str) -> str:
    """Rotate ``model`` before calibration: ``"fused"`` folds a Hadamard rotation of the residual stream (and of
    each head's values) into the float weights, exactly; ``"online"`` also rotates ``down_proj`` inputs at run
    time (exported as a compressed-tensors ``transform_config``); ``"online-only"`` rotates the ``down_proj``
    inputs at run time without the fused rotations. Returns what was done, for the summary."""
    from tico.experimental.quantization.algorithm.rotation.fuse import fuse_rotations
    from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations

    if mode not in ROTATIONS:
        raise ValueError(f"rotate must be one of {list(ROTATIONS)}, got {mode!r}")
    if mode == "none":
        return ""
    lines = [] if mode == "online-only" else [fuse_rotations(model).summary()]
    if mode in ("online", "online-only"):
        lines.append(f"online Hadamard on the inputs of {len(add_online_rotations(model))} layers")
    return "\n".join(lines)


def quantize_to_folder(
    model_name: str,
    tokenizer: Any,
    config: Any,
    calibration: CalibrationSet,
    output: str | Path,
    batch_size: int = 4,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    options: dict[str, Any] | None = None,
    rotate: str = "none",
    streaming: bool = True,
) -> QuantizationResult:
    """Load ``model_name``, (optionally rotate it,) calibrate on ``calibration``, convert with ``config`` and
    write ``output``.

    With ``streaming`` (the default) the checkpoint is quantized block by block from its safetensors shards
    (:func:`~tico.experimental.quantization.pipeline.quantize_checkpoint`): memory holds one decoder block and
    the calibration hidden states, whatever the model's size, and later blocks calibrate on the quantized
    outputs of earlier ones. Rotations (which rewrite the whole residual stream) and a ``dtype`` other than the
    checkpoint's need the whole model in memory, so they take the in-memory path.
    """
    options = dict(options or {}, model=_recorded_name(model_name))
    if streaming and rotate == "none" and dtype == "auto":
        return _stream_to_folder(model_name, tokenizer, config, calibration, output, batch_size, device, options)
    start = time.perf_counter()
    model = load_model(model_name, dtype, device, trust_remote_code, causal_lm=True)
    rotated = apply_rotations(model, rotate)
    if rotated:
        logger.info("%s", rotated)
    result = quantize_model(model, config, calibration.windows, batch_size, device)
    result.notes = rotated
    metadata = run_metadata(result, config, calibration, dict(options, streamed=False))
    save_quantized(result, tokenizer, output, metadata)
    logger.info("quantized %s into %s in %.1fs", model_name, output, time.perf_counter() - start)
    return result


def _recorded_name(model_name: str) -> str:
    """A local model by its absolute path (a recipe replayed from another folder finds it), a hub id as is."""
    return str(Path(model_name).expanduser().resolve()) if is_local_model(model_name) else model_name


def _stream_to_folder(
    model_name: str, tokenizer: Any, config: Any, calibration: CalibrationSet, output: str | Path, batch_size: int,
    device: str, options: dict[str, Any],
) -> QuantizationResult:
    """The block-by-block path of :func:`quantize_to_folder`; the folder is published only when complete."""
    from tico.experimental.quantization import distributed
    from tico.experimental.quantization.export.publish import check_output
    from tico.experimental.quantization.export.shards import CheckpointError
    from tico.experimental.quantization.run.loading import InputError, hub_quiet
    from tico.experimental.quantization.pipeline import quantize_checkpoint
    from tico.experimental.quantization.pipeline.source import resolve_checkpoint
    from tico.experimental.quantization.quantizer import QuantizationError

    start = time.perf_counter()
    with distributed.together("finding the checkpoint"):  # under torchrun: a failure here stops every rank
        try:
            with hub_quiet(model_name):
                folder = resolve_checkpoint(model_name)
        except OSError as exc:
            raise InputError(str(exc)) from None
        check_output(output)

    def finish(staging: Path, stream: Any) -> None:
        result = QuantizationResult(None, stream)  # type: ignore[arg-type]
        write_sidecars(staging, tokenizer, stream.plan, run_metadata(result, config, calibration, dict(options, streamed=True)))

    try:
        stream = quantize_checkpoint(folder, config, calibration.windows.split(batch_size), output, device=device,
                                     progress=True, before_publish=finish)
    except CheckpointError as exc:  # the source's weights cannot be read: a loading error, not a quantization one
        raise InputError(str(exc)) from None
    except (QuantizationError, OSError, InputError):
        raise
    except (ValueError, RuntimeError, TypeError) as exc:
        raise QuantizationError(f"streamed quantization failed: {type(exc).__name__}: {exc}") from exc
    logger.info("quantized %s into %s block by block in %.1fs", model_name, output, time.perf_counter() - start)
    return QuantizationResult(None, stream)  # type: ignore[arg-type]
