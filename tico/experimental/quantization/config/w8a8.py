"""Settings of W8A8 quantization (int8 weights, int8 activations), optionally composed with SmoothQuant.

Two parts: :class:`W8A8Config` holds what a user of a servable checkpoint chooses (what is smoothed, how weights
and activations are quantized, which layers); :class:`W8A8Tuning` (its ``tuning`` field) holds everything else:
the searches' budgets, the run-time backend, and research options that compressed-tensors cannot hold.
Both are frozen, validated on construction, and round-trip through plain dicts (:meth:`W8A8Config.to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

WeightGranularity = Literal["per_channel", "per_tensor"]
Activations = Literal["dynamic", "static"]
ActRange = Literal["absmax", "mse", "output_mse", "percentile"]
Backend = Literal["int8", "fake"]


def _one_of(value: object, allowed: object, where: str) -> None:
    """``value`` must be one of the ``Literal`` type ``allowed``'s values (the type is the one source of them)."""
    if value not in get_args(allowed):
        raise ValueError(f"{where} must be one of {list(get_args(allowed))}, got {value!r}")


def _alphas(values: Any, where: str, *, empty: bool) -> tuple[float, ...]:
    alphas = tuple(float(a) for a in ((values,) if isinstance(values, (int, float)) else values))
    if (not empty and not alphas) or any(not math.isfinite(a) or not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"{where} must be {'' if empty else 'non-empty '}alphas in [0, 1], got {values!r}")
    return alphas


def _positive_int(value: object, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where} must be a positive int, got {value!r}")


def _names(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class W8A8Tuning:
    """Search budgets, the run-time backend, and research options of W8A8 (one place, apart from the recipe).

    Search budgets and the backend change how a recipe is computed or run, not what is served. The research
    options (``smooth_in_quantizer``, ``rotate_in_quantizer``, ``quantize_attention``) change the model in ways
    compressed-tensors cannot hold: :meth:`W8A8Config.unexportable_options` names them.

    Args:
        backend: ``"int8"`` (real int8 matmuls via ``torch._int_mm``) or ``"fake"`` (float simulation with
            identical rounding and clamping, for accuracy studies on any device).
        percentile: the percentile of ``|x|`` used when ``act_range="percentile"``.
        alpha_grid: candidate alphas for ``smoothing.alpha="auto"`` (each group, and each layer smoothed inside its
            quantizer, gets the alpha of the grid with the smallest deployed-quantization output error on the
            calibration sample).
        calibration_rows: rows (tokens) per observed tensor kept as a uniform sample for ``act_range`` other
            than ``"absmax"``, ``alpha="auto"``, ``dynamic_fallback`` and in-quantizer rotations.
        sample_seed: seed of the calibration row sample (the rows the searches, MSE ranges and ``dynamic_fallback``
            score). Choices made from a sample depend on which rows it holds: another seed shows by how much.
        block_objective_tokens: tokens per block recorded for ``block_objective`` (whole calibration calls are
            recorded until this many tokens).
        block_objective_alphas: more ``block_objective`` candidates: each alpha, for all of a block's switchable
            groups (e.g. ``(0.5,)``); each costs one more planning of those layers and one more trial forward per
            block.
        smooth_in_quantizer: for Linear inputs that no producer can absorb ``1/s`` for (``o_proj``,
            ``down_proj``, post-LN models, MoE expert outputs), apply the smoothing scale inside the activation
            quantizer instead (``x/s`` fused into the int8 quantization step, ``W*s`` into the int8 weights).
            Not exportable.
        rotate_in_quantizer: names (or name suffixes such as ``"down_proj"``, or ``"all"``) of layers whose input
            is multiplied by a random block-orthogonal matrix inside the activation quantizer (``W`` gets the same
            rotation: exact in float). Spreads outliers that smoothing cannot move; costs a small matmul per
            token. Not exportable; unrelated to the exportable Hadamard rotations fused into the weights
            (``tico-sq quantize --rotate``, :mod:`tico.experimental.quantization.algorithm.rotation`).
        quantize_attention: also quantize the query/key/value inputs of the attention matmuls, int8 static
            per tensor (simulated), as the paper's W8A8 settings do; Hugging Face models whose attention goes
            through transformers' ``AttentionInterface`` only (checked by ``prepare``, which switches the model's
            attention implementation to ``"tico_w8a8_sdpa"``; the converted model keeps it and a
            ``_tico_attention_quant`` attribute per attention module with the fixed scales). Not exportable.
    """

    backend: Backend = "int8"
    percentile: float = 99.99
    alpha_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
    calibration_rows: int = 2048
    sample_seed: int = 0
    block_objective_tokens: int = 1024
    block_objective_alphas: tuple[float, ...] = ()
    smooth_in_quantizer: bool = False
    rotate_in_quantizer: tuple[str, ...] = ()
    quantize_attention: bool = False

    def __post_init__(self) -> None:
        _one_of(self.backend, Backend, "W8A8Tuning.backend")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise ValueError(f"W8A8Tuning.percentile must be in (0, 100], got {self.percentile!r}")
        object.__setattr__(self, "alpha_grid", _alphas(self.alpha_grid, "W8A8Tuning.alpha_grid", empty=False))
        _positive_int(self.calibration_rows, "W8A8Tuning.calibration_rows")
        if not isinstance(self.sample_seed, int) or isinstance(self.sample_seed, bool) or self.sample_seed < 0:
            raise ValueError(f"W8A8Tuning.sample_seed must be an integer >= 0, got {self.sample_seed!r}")
        _positive_int(self.block_objective_tokens, "W8A8Tuning.block_objective_tokens")
        alphas = _alphas(self.block_objective_alphas, "W8A8Tuning.block_objective_alphas", empty=True)
        object.__setattr__(self, "block_objective_alphas", alphas)
        object.__setattr__(self, "rotate_in_quantizer", _names(self.rotate_in_quantizer))


@dataclass(frozen=True)
class W8A8Config(BaseConfig):
    """int8 weights and int8 activations for every Linear-like layer, with smoothing in the same calibration.

    ``prepare(model, W8A8Config(...))`` observes, in **one** calibration pass, what smoothing needs (per-channel
    abs-max) and what static activation ranges need (the same abs-max, plus a bounded sample of rows for
    error-minimising ranges and ``alpha="auto"``): the range of a smoothed activation follows from the
    statistics of the unsmoothed one, ``max_j max|X_j| / s_j``, so no second pass over the data is needed.

    Args:
        smoothing: a :class:`SmoothQuantConfig` to smooth before quantizing, or None for naive W8A8. Its
            ``alpha`` may be ``"auto"`` here (see ``tuning.alpha_grid``).
        weights: int8 symmetric weight scales ``"per_channel"`` (one per output channel) or ``"per_tensor"``.
        activations: ``"dynamic"``: one int8 scale per token computed at run time; ``"static"``: one scale
            per tensor fixed from calibration.
        act_range: how a static range is chosen: ``"absmax"`` over the calibration data, ``"mse"`` (the clip
            that minimises the activation's quantization error on the calibration sample), ``"output_mse"`` (the
            clip that minimises the layer's output error, weights quantized as deployed) or ``"percentile"``
            (``tuning.percentile``). See :mod:`tico.experimental.quantization.algorithm.w8a8.ranges`.
        dynamic_fallback: with ``activations="static"``, a budget ``b``: calibration also keeps each layer's
            largest-magnitude rows (massive tokens, with their positions), and a layer whose static output error
            exceeds ``b`` times its dynamic per-token error, on the ordinary or on the massive rows, gets dynamic
            per-token activations instead (still int8 and exportable). Every choice is in
            ``report.act_modes``. None (default): every layer static.
        block_objective: choose per decoder block, by the quantized block's output error against the float
            block's on the first ``tuning.block_objective_tokens`` calibration tokens, between the searched
            smoothing and no smoothing for that block's groups (each fully planned: ranges, ``dynamic_fallback``);
            every choice and its errors are in ``report.block_choices``. Needs ``smoothing``; see
            :mod:`tico.experimental.quantization.algorithm.w8a8.block_objective`.
        quantize_embeddings: store the input embedding as int8 rows (weight-only), and a tied LM head (unless
            quantized as a layer with ``quantize_lm_head``) as the same int8 rows with float activations: about a
            quarter of the embedding's memory. Needs an ``nn.Embedding`` input embedding (checked by ``prepare``).
            Not exportable (an in-memory choice).
        ignore: modules kept in float, with everything inside them: exact module names or ``re:`` patterns
            (the one name syntax of :mod:`tico.experimental.quantization.structure.names`). The model's output embedding (LM head) is always
            kept in float unless ``quantize_lm_head`` is set.
        quantize_lm_head: quantize the output embedding too.
        tuning: search budgets, the backend and research options (:class:`W8A8Tuning`).
    """

    smoothing: SmoothQuantConfig | None = None
    weights: WeightGranularity = "per_channel"
    activations: Activations = "dynamic"
    act_range: ActRange = "mse"
    dynamic_fallback: float | None = None
    block_objective: bool = False
    quantize_embeddings: bool = False
    ignore: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    tuning: W8A8Tuning = field(default_factory=W8A8Tuning)

    def __post_init__(self) -> None:
        _one_of(self.weights, WeightGranularity, "W8A8Config.weights")
        _one_of(self.activations, Activations, "W8A8Config.activations")
        _one_of(self.act_range, ActRange, "W8A8Config.act_range")
        if self.smoothing is not None and not isinstance(self.smoothing, SmoothQuantConfig):
            raise ValueError(f"W8A8Config.smoothing must be a SmoothQuantConfig or None, got {type(self.smoothing).__name__}")
        if not isinstance(self.tuning, W8A8Tuning):
            raise ValueError(f"W8A8Config.tuning must be a W8A8Tuning, got {type(self.tuning).__name__}")
        object.__setattr__(self, "ignore", _names(self.ignore))
        fb = self.dynamic_fallback
        if fb is not None and not (isinstance(fb, (int, float)) and math.isfinite(fb) and fb >= 1):
            raise ValueError(f"W8A8Config.dynamic_fallback must be None or a finite number >= 1, got {fb!r}")
        if self.block_objective and self.smoothing is None:
            raise ValueError("W8A8Config.block_objective chooses between smoothing and none per block: it needs smoothing")

    @property
    def name(self) -> str:
        return "w8a8"

    @property
    def alpha_search(self) -> bool:
        """Whether smoothing alphas are searched (``smoothing.alpha="auto"``): the one place W8A8 asks."""
        return self.smoothing is not None and self.smoothing.alpha_is_auto

    @property
    def mixed_modes(self) -> bool:
        """``dynamic_fallback``: static layers may each turn dynamic per-token, by measured error."""
        return self.activations == "static" and self.dynamic_fallback is not None

    @property
    def needs_samples(self) -> bool:
        """Whether calibration keeps a row sample (error-minimising ranges or the alpha search need one)."""
        ranged = self.activations == "static" and (self.act_range != "absmax" or self.mixed_modes)
        return self.alpha_search or bool(self.tuning.rotate_in_quantizer) or ranged

    def unexportable_options(self) -> list[str]:
        """The options set here that compressed-tensors (and so vLLM) cannot hold, in declaration order; empty
        when the quantized model can be exported. The one place that decides exportability."""
        t = self.tuning
        found = [("tuning.smooth_in_quantizer", t.smooth_in_quantizer),
                 ("tuning.rotate_in_quantizer", bool(t.rotate_in_quantizer)),
                 ("tuning.quantize_attention", t.quantize_attention),
                 ("quantize_embeddings", self.quantize_embeddings)]
        return [name for name, on in found if on]

    @property
    def exportable(self) -> bool:
        """Whether compressed-tensors (and so vLLM) can hold the quantized model (:meth:`unexportable_options`)."""
        return not self.unexportable_options()

    def with_tuning(self, **changes: Any) -> "W8A8Config":
        """A copy with ``tuning``'s fields ``changes`` replaced (validated like any new config)."""
        return dataclasses.replace(self, tuning=dataclasses.replace(self.tuning, **changes))


def first_unexportable_option(config: W8A8Config) -> str | None:
    """The first option of ``config`` that compressed-tensors cannot hold (None: exportable), for an exporter's
    error message."""
    options = config.unexportable_options()
    return options[0] if options else None
