"""QuantizationResult.summary() counts what convert applied, after the block objective's choices."""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.run.calibration import QuantizationResult


def group(block: str, producer: str) -> SimpleNamespace:
    return SimpleNamespace(block=block, producer=producer, alpha=0.5)


def result(choices: dict[str, str]) -> QuantizationResult:
    smoothed = [group(f"model.layers.{i}", f"model.layers.{i}.{n}") for i in range(3) for n in ("input_layernorm", "v_proj")]
    plan = SimpleNamespace(smoothed=smoothed, skipped=[object()])
    report = W8A8Report(quantized=["a", "b"], block_choices=choices)
    return QuantizationResult(nn.Identity(), SimpleNamespace(plan=plan, report=report))


def test_groups_of_blocks_the_block_objective_left_unsmoothed_are_not_counted_as_smoothed():
    lines = result({"model.layers.0": "searched (error 1.0 vs 2.0)", "model.layers.1": "unsmoothed (error 1.0 vs 2.0)",
                    "model.layers.2": "searched"}).summary().splitlines()
    assert lines[0] == "smoothing: 4 groups smoothed, 1 skipped, 2 left unsmoothed by the block objective"
    assert "block objective: 1 of 3 blocks unsmoothed ['model.layers.1']" in lines


def test_without_the_block_objective_every_planned_group_counts():
    assert result({}).summary().splitlines()[0] == "smoothing: 6 groups smoothed, 1 skipped"
