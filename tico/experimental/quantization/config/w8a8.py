"""Settings of W8A8 quantization (int8 weights, int8 activations), optionally composed with SmoothQuant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

WeightGranularity = Literal["per_channel", "per_tensor"]
Activations = Literal["dynamic", "static"]
ActRange = Literal["absmax", "mse", "output_mse", "percentile"]
Backend = Literal["int8", "fake"]
AlphaObjective = Literal["absolute", "token_relative"]


def _one_of(value: object, allowed: object, where: str) -> None:
    """``value`` must be one of the ``Literal`` type ``allowed``'s values (the type is the one source of them)."""
    if value not in get_args(allowed):
        raise ValueError(f"W8A8Config.{where} must be one of {list(get_args(allowed))}, got {value!r}")


@dataclass(frozen=True)
class W8A8Config(BaseConfig):
    """int8 weights and int8 activations for every Linear-like layer, with smoothing in the same calibration.

    ``prepare(model, W8A8Config(...))`` observes, in **one** calibration pass, what smoothing needs (per-channel
    abs-max) and what static activation ranges need (the same abs-max, plus a bounded sample of rows for
    error-minimising ranges and ``alpha="auto"``): the range of a smoothed activation follows from the
    statistics of the unsmoothed one, ``max_j max|X_j| / s_j``, so no second pass over the data is needed.

    Args:
        smoothing: a :class:`SmoothQuantConfig` to smooth before quantizing, or None for naive W8A8. Its
            ``alpha`` may be ``"auto"`` here (see ``alpha_grid``).
        weights: int8 symmetric weight scales ``"per_channel"`` (one per output channel) or ``"per_tensor"``.
        activations: ``"dynamic"``: one int8 scale per token computed at run time; ``"static"``: one scale
            per tensor fixed from calibration.
        act_range: how a static range is chosen: ``"absmax"`` over the calibration data, ``"mse"`` (the clip
            that minimises the activation's quantization error on the calibration sample), ``"output_mse"`` (the
            clip that minimises the layer's output error, weights quantized as deployed) or ``"percentile"``.
        percentile: the percentile of ``|x|`` used when ``act_range="percentile"``.
        smooth_in_quantizer: for Linear inputs that no producer can absorb ``1/s`` for (``o_proj``,
            ``down_proj``, post-LN models, MoE expert outputs), apply the smoothing scale inside the activation
            quantizer instead (``x/s`` fused into the int8 quantization step, ``W*s`` into the int8 weights).
        quantize_attention: also quantize the query/key/value inputs of the attention matmuls, int8 static
            per tensor (simulated), as the paper's W8A8 settings do; Hugging Face models whose attention goes
            through transformers' ``AttentionInterface`` only (checked by ``prepare``, which switches the model's
            attention implementation to ``"tico_w8a8_sdpa"``; the converted model keeps it and a
            ``_tico_attention_quant`` attribute per attention module with the fixed scales).
        rotate: names (or name suffixes such as ``"down_proj"``, or ``"all"``) of layers whose input is multiplied by a random
            block-orthogonal matrix inside the activation quantizer (``W`` gets the same rotation: exact in float).
            Spreads outliers that smoothing cannot move; costs a small matmul per token. Not exportable.
        quantize_embeddings: store the input embedding as int8 rows (weight-only), and a tied LM head (unless
            quantized as a layer with ``quantize_lm_head``) as the same int8 rows with float activations: about a
            quarter of the embedding's memory. Needs an ``nn.Embedding`` input embedding (checked by ``prepare``).
            Not exportable.
        ignore: module names (or name prefixes) kept in float. The model's output embedding (LM head) is always
            kept in float unless ``quantize_lm_head`` is set.
        quantize_lm_head: quantize the output embedding too.
        backend: ``"int8"`` (real int8 matmuls via ``torch._int_mm``) or ``"fake"`` (float simulation with
            identical rounding and clamping, for accuracy studies on any device).
        alpha_grid: candidate alphas for ``smoothing.alpha="auto"`` (each group, and each layer smoothed inside its
            quantizer, gets the alpha of the grid with the smallest deployed-quantization output error on the
            calibration sample).
        alpha_objective: what the alpha search minimises over the scored rows: ``"absolute"``, the squared output
            error ``sum_i ||y^_i - y_i||^2``; ``"token_relative"``, each token's squared error relative to its own
            float output ``sum_i ||y^_i - y_i||^2 / ||y_i||^2`` (massive tokens, hundreds of times larger than
            the others, no longer decide the alpha alone). Default ``"absolute"``: token_relative measured no
            better on SmolLM2-135M with dynamic activations (+1.67% ppl vs +1.62%,
            ``benchmarks/massive_activations.py``).
        calibration_rows: rows (tokens) per observed tensor kept as a uniform sample for ``act_range`` other
            than ``"absmax"`` and for ``alpha="auto"``.
        dynamic_fallback: with ``activations="static"``, a budget ``b``: calibration also keeps each layer's
            largest-magnitude rows (massive tokens, with their positions), and a layer whose static output error
            exceeds ``b`` times its dynamic per-token error, on the ordinary or on the massive rows, gets dynamic
            per-token activations instead (still int8 and exportable). Every choice is in
            ``report.act_modes``. None (default): every layer static.
        block_objective: choose per decoder block, by the quantized block's output error against the float
            block's on the first ``block_objective_tokens`` calibration tokens, between the searched smoothing
            and no smoothing for that block's groups (each fully planned: ranges, ``dynamic_fallback``); every
            choice and its errors are in ``report.block_choices``. Needs ``smoothing``; see
            :mod:`tico.experimental.quantization.algorithm.w8a8.block_objective`.
        block_objective_alphas: more ``block_objective`` candidates: each alpha, for all of a block's switchable
            groups (e.g. ``(0.5,)``); each costs one more planning of those layers and one more trial forward per
            block.
        block_objective_tokens: tokens per block recorded for ``block_objective`` (whole calibration calls are
            recorded until this many tokens).
    """

    smoothing: SmoothQuantConfig | None = None
    weights: WeightGranularity = "per_channel"
    activations: Activations = "dynamic"
    act_range: ActRange = "mse"
    percentile: float = 99.99
    smooth_in_quantizer: bool = False
    quantize_attention: bool = False
    rotate: tuple[str, ...] = ()
    quantize_embeddings: bool = False
    ignore: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    backend: Backend = "int8"
    alpha_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
    alpha_objective: AlphaObjective = "absolute"
    calibration_rows: int = 2048
    dynamic_fallback: float | None = None
    block_objective: bool = False
    block_objective_tokens: int = 1024
    block_objective_alphas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _one_of(self.weights, WeightGranularity, "weights")
        _one_of(self.activations, Activations, "activations")
        _one_of(self.act_range, ActRange, "act_range")
        _one_of(self.backend, Backend, "backend")
        _one_of(self.alpha_objective, AlphaObjective, "alpha_objective")
        if self.smoothing is not None and not isinstance(self.smoothing, SmoothQuantConfig):
            raise ValueError(f"W8A8Config.smoothing must be a SmoothQuantConfig or None, got {type(self.smoothing).__name__}")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise ValueError(f"W8A8Config.percentile must be in (0, 100], got {self.percentile!r}")
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "rotate", (self.rotate,) if isinstance(self.rotate, str) else tuple(self.rotate))
        grid = tuple(float(a) for a in self.alpha_grid)
        if not grid or any(not math.isfinite(a) or not 0 <= a <= 1 for a in grid):
            raise ValueError(f"W8A8Config.alpha_grid must be non-empty alphas in [0, 1], got {self.alpha_grid!r}")
        object.__setattr__(self, "alpha_grid", grid)
        if not isinstance(self.calibration_rows, int) or self.calibration_rows < 1:
            raise ValueError(f"W8A8Config.calibration_rows must be a positive int, got {self.calibration_rows!r}")
        fb = self.dynamic_fallback
        if fb is not None and not (isinstance(fb, (int, float)) and math.isfinite(fb) and fb >= 1):
            raise ValueError(f"W8A8Config.dynamic_fallback must be None or a finite number >= 1, got {fb!r}")
        if self.block_objective and self.smoothing is None:
            raise ValueError("W8A8Config.block_objective chooses between smoothing and none per block: it needs smoothing")
        alphas = tuple(float(a) for a in self.block_objective_alphas)
        if any(not math.isfinite(a) or not 0 <= a <= 1 for a in alphas):
            raise ValueError(f"W8A8Config.block_objective_alphas must be alphas in [0, 1], got {self.block_objective_alphas!r}")
        object.__setattr__(self, "block_objective_alphas", alphas)
        if not isinstance(self.block_objective_tokens, int) or self.block_objective_tokens < 1:
            raise ValueError(f"W8A8Config.block_objective_tokens must be a positive int, got {self.block_objective_tokens!r}")

    @property
    def name(self) -> str:
        return "w8a8"

    @property
    def needs_samples(self) -> bool:
        """Whether calibration keeps a row sample (error-minimising ranges or the alpha search need one)."""
        auto = self.smoothing is not None and self.smoothing.alpha_is_auto
        mixed = self.dynamic_fallback is not None
        return auto or bool(self.rotate) or (self.activations == "static" and (self.act_range != "absmax" or mixed))
