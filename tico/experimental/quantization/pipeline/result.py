"""What a streamed run did: per unit its outcome (plan, report), timings, and the merged plan and report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class UnitOutcome:
    """What one unit's quantizer decided (smoothing plan, W8A8 report): small, unlike the quantizer itself,
    whose observers hold row samples that must be freed with the block."""

    plan: Any
    report: Any

    @classmethod
    def of(cls, quantizer: Any) -> "UnitOutcome":
        return cls(getattr(quantizer, "plan", None), getattr(quantizer, "report", None))


@dataclass
class StreamResult:
    """What :func:`~tico.experimental.quantization.pipeline.quantize_checkpoint` did, with timings (seconds)."""

    output_dir: Path | None
    blocks: int
    capture_s: float = 0.0
    preflight_s: float = 0.0  # the later stages checked on the skeleton, before the first block
    block_s: list[float] = field(default_factory=list)  # load + calibrate + convert + propagate + write
    phases: list[dict[str, float]] = field(default_factory=list)  # per block: seconds per phase
    rest_s: float = 0.0
    total_s: float = 0.0
    reports: dict[str, Any] = field(default_factory=dict)  # unit name -> a one-line summary
    quantizers: dict[str, UnitOutcome] = field(default_factory=dict)  # unit name -> its plan and report
    scope: Any = field(default=None, repr=False)  # the algorithm's UnitScope: it merges plans and reports

    @property
    def plan(self) -> Any:
        """Every unit's smoothing plan as one (model order), or None when no unit smooths."""
        return None if self.scope is None else self.scope.merged_plan(self.quantizers.values())

    @property
    def report(self) -> Any:
        """Every unit's report merged (W8A8: quantized layers, float layers, alphas, ranges), or None."""
        return None if self.scope is None else self.scope.merged_report(self.quantizers.values())
