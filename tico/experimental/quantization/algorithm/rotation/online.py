"""Online rotations that no weight can absorb, described as a compressed-tensors ``transform_config``.

``down_proj``'s input ``act(gate) * up`` is where the token-varying outliers live, and the nonlinearity before it
means no weight can absorb a rotation of it. QuaRot/SpinQuant ("R4") rotate it at run time: ``x -> x H`` with a
Hadamard ``H`` (``O(n log n)`` on a GPU kernel), and ``W -> W H`` offline, so ``(x H)(W H)^T = x W^T``.

compressed-tensors (>= 0.12) describes this as a :class:`TransformScheme` with two
:class:`TransformArgs` on the same targets: ``location="input"`` (online, activations) and
``location="weight_input", inverse=True`` (fused into the weight). It lives in the checkpoint's
``config.json`` under ``quantization_config["transform_config"]``, and the transform matrix itself is saved as a
tensor ``<module>.<group>_input.weight``; vLLM applies input transforms of types ``hadamard`` (powers of two) and
``random-hadamard`` (any size with a known Hadamard base, e.g. 172).

This module builds that description; :func:`transform_config` is what an exporter would write. Fused MoE
experts (3-D parameters, not Linear modules) are not targets. Wiring it into
W8A8 calibration (the quantizer must observe the rotated input) and into ``save_compressed`` is not done yet.
"""

from __future__ import annotations

from typing import Any

from tico.experimental.quantization.algorithm.rotation.hadamard import hadamard_order_base

__all__ = ["DOWN_PROJ_TARGETS", "transform_config"]

# Modules whose input is an elementwise product of two projections (no weight before them can absorb Q).
DOWN_PROJ_TARGETS = ("re:.*mlp\\.down_proj$", "re:.*mlp\\.shared_expert\\.down_proj$")


def transform_config(size: int, targets: tuple[str, ...] = DOWN_PROJ_TARGETS, group: str = "r4") -> Any:
    """A compressed-tensors ``TransformConfig``: an online Hadamard on the inputs of ``targets`` of width ``size``.

    ``hadamard`` (deterministic Sylvester) for powers of two, ``random-hadamard`` otherwise. Raises ValueError
    for a size with no Hadamard matrix (not 1, 2 or a multiple of 4 times a known base).
    """
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    base = hadamard_order_base(size)
    if base is None:
        raise ValueError(f"no Hadamard matrix of order {size}: an online Hadamard transform cannot rotate {targets}")
    kind = "hadamard" if base == 1 else "random-hadamard"
    scheme = TransformScheme(
        type=kind,
        apply=[
            TransformArgs(targets=list(targets), location="input"),
            TransformArgs(targets=list(targets), location="weight_input", inverse=True),
        ],
    )
    return TransformConfig(config_groups={group: scheme})
