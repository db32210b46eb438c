"""Settings of SmoothQuant (Xiao et al., 2023), validated when constructed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, get_args

from tico.experimental.quantization.config.base import BaseConfig

ActsFrom = Literal["input", "output"]


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

    Args:
        alpha: default migration strength in [0, 1]. 0 leaves activations as they are (weights are only
            normalised per channel), 1 moves all of the activation range into the weights. 0.5 is the
            paper's default for most models. ``"auto"`` searches a grid per group for the alpha that minimises
            the quantized output error; it needs a quantization config to score against
            (``W8A8Config(smoothing=SmoothQuantConfig(alpha="auto"))``).
        custom_alpha_map: ``{module name: alpha}`` overrides. A name may be a decoder block
            (``"model.layers.3"``), a part of it (``"model.layers.3.mlp"``), a norm or a Linear. A group
            takes the alpha of the most specific (longest) name that is, or contains, its producer or one
            of its consumers. Names that are not modules of the model, or that reach no smoothing group,
            are rejected by ``prepare`` with the list of offending names.
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
    """

    alpha: float | Literal["auto"] = 0.5
    custom_alpha_map: Mapping[str, float] | None = None
    acts_from: ActsFrom = "input"
    linear_producers: bool = False

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

    def __hash__(self) -> int:  # the alpha map is a dict: hash its items, so configs can key caches
        return hash((self.alpha, tuple(sorted(self.custom_alpha_map.items())), self.acts_from, self.linear_producers))

    @property
    def name(self) -> str:
        return "smoothquant"

    @property
    def alpha_is_auto(self) -> bool:
        return self.alpha == "auto"

    def alpha_for(self, module_names: "list[str] | tuple[str, ...]") -> float:
        """The alpha for a group whose producer and consumers have ``module_names``.

        The most specific override wins: the longest map key equal to, or a dotted prefix of, any of the names.
        """
        best: tuple[int, float] | None = None
        default = 0.5 if self.alpha == "auto" else float(self.alpha)  # auto: the search's starting point
        for key, value in self.custom_alpha_map.items():
            if any(_contains(key, n) for n in module_names):
                depth = len(key)
                if best is None or depth > best[0]:
                    best = (depth, value)
        return default if best is None else best[1]


def _contains(prefix: str, name: str) -> bool:
    """True if module ``name`` is ``prefix`` or lies inside the module named ``prefix``."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")
