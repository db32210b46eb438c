"""Settings of SmoothQuant (Xiao et al., 2023), validated when constructed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, get_args

from tico.experimental.quantization.config.base import BaseConfig

ActsFrom = Literal["input", "output"]
# (producer key, consumer keys): see SmoothQuantConfig.mappings
Mapping_ = tuple[str, tuple[str, ...]]


def _check_alpha(value: object, where: str) -> float:
    """Return ``value`` as a float if it is a finite number in [0, 1]; raise a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a finite number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SmoothQuantConfig(BaseConfig):
    """How much quantization difficulty to migrate from activations to weights.

    For every smoothing group (a producer such as a LayerNorm/RMSNorm and the Linear-like layers that read
    its output) the per-channel scale is ``s_j = max|X_j|**alpha / max_k max|W_k[:, j]|**(1 - alpha)``;
    ``X / s`` is folded into the producer and ``W * s`` into every consumer, which leaves a float model's
    outputs unchanged.

    Module names below are *keys* of the one matcher (:mod:`tico.experimental.quantization.structure.names`):
    an exact name from ``model.named_modules()``, or ``"re:"`` and a regular expression matching whole names.
    Pattern syntax is checked by ``prepare``, which also refuses, naming them, keys that match nothing.

    Args:
        alpha: default migration strength in [0, 1]. 0 leaves activations as they are (weights are only
            normalised per channel), 1 moves all of the activation range into the weights. 0.5 is the
            paper's default for most models. ``"auto"`` searches a grid per group for the alpha that minimises
            the quantized output error; it needs a quantization config to score against
            (``W8A8Config(smoothing=SmoothQuantConfig(alpha="auto"))``).
        custom_alpha_map: ``{key: alpha}`` overrides. A key may name a decoder block (``"model.layers.3"``),
            a part of it (``"model.layers.3.mlp"``), a norm or a Linear, or be a pattern (``"re:.*\\.mlp"``);
            it covers what it names and everything inside. A group takes the alpha of the most specific key
            covering its producer or one of its consumers: exact names before patterns, the longest name
            first, among patterns the first listed. Keys that match no module, or reach no smoothing group,
            are rejected by ``prepare`` with the list of offending keys.
        acts_from: which tensor the activation statistics ``max|X_j|`` are taken from.
            ``"input"``: the tensor that enters the consumers (the paper's definition), observed at the
            input of one consumer of the group. ``"output"``: the producer's output. For a norm producer
            both are the same tensor; they differ only for producers whose output is transformed before
            the consumers read it (a Linear -> activation -> Linear bridge, where ``"output"`` is the
            pre-activation). Statistics always have one value per channel of the folded axis.
        linear_producers: also smooth Linear -> Linear pairs that the traced dataflow proves exact:
            ``v_proj -> o_proj`` (per key/value head, through attention and grouped-query head repeats),
            ``up_proj -> down_proj`` (the gated product is linear in ``up``) and Linear -> ReLU -> Linear. Off by
            default, which is the paper's (norm -> Linear only).
        mappings: explicit smoothing groups, for what the dataflow trace refuses (an operation it cannot
            follow) or to state groups yourself: a sequence of ``(producer, consumers)``, the producer a key and
            the consumers a key or a sequence of keys, e.g.
            ``(("re:.*input_layernorm", ("re:.*q_proj", "re:.*k_proj", "re:.*v_proj")),)``. Every module the
            producer key matches (a norm with a 1-D weight, or a Linear) forms one group with the modules the
            consumer keys match inside the producer's parent module (``model.layers.3`` for
            ``model.layers.3.input_layernorm``); consumers must be Linear-like. A mapped producer replaces
            what the trace decided for it, including a refusal because of a read the trace could not follow,
            but not the proof: ``prepare`` folds random scales into every mapped group and refuses, naming the
            producer and leaving the model untouched, unless the model's outputs on the probe input stay the
            same; the producer's form is probed as for traced groups, and a Linear the trace shows reading the
            producer that the mapping does not list is an error.
    """

    alpha: float | Literal["auto"] = 0.5
    custom_alpha_map: Mapping[str, float] | None = None
    acts_from: ActsFrom = "input"
    linear_producers: bool = False
    mappings: tuple[Mapping_, ...] | None = None

    def __post_init__(self) -> None:
        if self.alpha != "auto":
            object.__setattr__(self, "alpha", _check_alpha(self.alpha, "SmoothQuantConfig.alpha"))
        if not isinstance(self.linear_producers, bool):
            raise ValueError(f"SmoothQuantConfig.linear_producers must be a bool, got {self.linear_producers!r}")
        if self.acts_from not in get_args(ActsFrom):
            raise ValueError(f"SmoothQuantConfig.acts_from must be one of {list(get_args(ActsFrom))}, got {self.acts_from!r}")
        amap = self.custom_alpha_map
        if amap is None:
            amap = {}
        if not isinstance(amap, Mapping):
            raise ValueError(
                f"SmoothQuantConfig.custom_alpha_map must be a mapping {{module name: alpha}}, got {type(amap).__name__}"
            )
        checked = {}
        for name, value in amap.items():
            if not isinstance(name, str):
                raise ValueError(f"SmoothQuantConfig.custom_alpha_map keys must be module names (str), got {name!r}")
            checked[name] = _check_alpha(value, f"SmoothQuantConfig.custom_alpha_map[{name!r}]")
        # A private copy, so mutating the caller's dict later cannot change a validated config.
        object.__setattr__(self, "custom_alpha_map", dict(checked))
        if self.mappings is not None:
            object.__setattr__(self, "mappings", _check_mappings(self.mappings))

    def __hash__(self) -> int:  # the alpha map is a dict: hash its items, so configs can key caches
        return hash(
            (self.alpha, tuple(sorted(self.custom_alpha_map.items())), self.acts_from, self.linear_producers, self.mappings)
        )

    @property
    def name(self) -> str:
        return "smoothquant"

    @property
    def alpha_is_auto(self) -> bool:
        return self.alpha == "auto"


def _check_mappings(value: object) -> tuple[Mapping_, ...]:
    """``value`` as a tuple of ``(producer, (consumer, ...))``; a ValueError names the entry of any other shape."""
    shape = "a sequence of (producer, consumers) pairs, e.g. ((\"re:.*input_layernorm\", (\"re:.*q_proj\",)),)"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ValueError(f"SmoothQuantConfig.mappings must be {shape}, got {type(value).__name__}")
    out = []
    for i, entry in enumerate(value):
        where = f"SmoothQuantConfig.mappings[{i}]"
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"{where} must be a (producer, consumers) pair, got {entry!r}")
        producer, consumers = entry
        if isinstance(consumers, str):
            consumers = (consumers,)
        if not isinstance(consumers, Sequence) or not consumers:
            raise ValueError(f"{where}: consumers must be a module name or a non-empty sequence of them, got {consumers!r}")
        for key in (producer, *consumers):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: module names must be non-empty strings, got {key!r}")
        out.append((producer, tuple(consumers)))
    return tuple(out)

