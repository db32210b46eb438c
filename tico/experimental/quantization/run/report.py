"""``tico-sq report``: the smoothing decisions of a ``quantize`` run, with the outlier statistics behind them.

The decisions are not taken again here: the same config goes through :func:`.workflow.quantize_to_folder` with
the same options as ``tico-sq quantize`` (streamed block by block unless a rotation or a dtype needs the whole
model, so later blocks calibrate on the quantized outputs of earlier ones exactly as there), into a temporary
folder that is removed afterwards; the plan and the W8A8 report of that run (alphas, blocks the block objective
left unsmoothed, layers the dynamic fallback runs per token) are what the report shows, so they equal what
``quantize`` records in ``tico_recipe.json``.

The bars are the float model's statistics (one more calibration pass, after the same rotations): the per-channel
abs-max of each group's consumer input, before and after dividing by the scales the run applied. The streamed run
computed its scales from the inputs each block saw after the blocks before it were quantized, which differ from
the float inputs by the quantization error of those blocks.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from tico.experimental.quantization.quantizer import QuantizationError
from tico.experimental.quantization.evaluation.outliers import decisions_summary, outlier_report, producer_absmax, write_report
from tico.experimental.quantization.run.calibration import QuantizationResult, calibrate
from tico.experimental.quantization.run.loading import load_model
from tico.experimental.quantization.run.workflow import CalibrationSet, apply_rotations, quantize_to_folder

__all__ = ["ReportRun", "report_run", "float_statistics"]


@dataclasses.dataclass
class ReportRun:
    """A quantize run (``result``: plan and report), its decisions as text and one row per smoothing group."""

    result: QuantizationResult
    decisions: str
    rows: list[dict[str, Any]]


def report_run(
    model_name: str, tokenizer: Any, config: Any, calibration: CalibrationSet, *, batch_size: int = 4,
    dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False, rotate: str = "none",
    streaming: bool = True, options: dict[str, Any] | None = None,
) -> ReportRun:
    """Run ``quantize``'s path on ``config`` (the checkpoint goes to a temporary folder, then is removed) and
    gather its decisions and the float model's outlier statistics per smoothing group."""
    with tempfile.TemporaryDirectory(prefix="tico-report-") as tmp:
        result = quantize_to_folder(model_name, tokenizer, config, calibration, Path(tmp) / "checkpoint", batch_size,
                                    dtype, device, trust_remote_code, options, rotate=rotate, streaming=streaming)
    plan, report = result.plan, result.report
    if plan is None or not plan.smoothed:
        raise QuantizationError(f"{model_name}: the run smoothed no group (no smoothing configured, or no producer found): "
                         "there is nothing to report")
    absmax = float_statistics(model_name, config, calibration.windows, batch_size, dtype, device, trust_remote_code,
                              rotate)
    return ReportRun(result, decisions_summary(plan, report), outlier_report(plan, absmax, report))


def float_statistics(
    model_name: str, config: Any, windows: torch.Tensor, batch_size: int, dtype: str, device: str,
    trust_remote_code: bool, rotate: str,
) -> dict[str, torch.Tensor]:
    """Per smoothing group: the float model's per-channel abs-max of its consumers' input over ``windows`` (after
    the same rotations as the run), from SmoothQuant's own observers; nothing is converted."""
    from tico.experimental.quantization import get_quantizer, prepare

    smoothing = getattr(config, "smoothing", config)
    observe_only = dataclasses.replace(smoothing, alpha=0.5, custom_alpha_map=None)  # alphas are never computed here
    model = load_model(model_name, dtype, device, trust_remote_code, causal_lm=True)
    apply_rotations(model, rotate)
    model = prepare(model, observe_only)
    quantizer = get_quantizer(model)
    calibrate(model, windows, batch_size, device)
    return producer_absmax(quantizer.plan, quantizer.observers)


def write_report_folder(run: ReportRun, folder: Path, plots: int) -> str:
    """``outliers.json``, ``summary.txt`` (the decisions, then the statistics) and the plots into ``folder``."""
    return write_report(run.rows, folder, plots=plots, decisions=run.decisions)
