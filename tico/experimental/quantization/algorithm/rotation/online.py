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

:func:`add_online_rotations` puts the rotation into the float model: each target becomes a
:class:`~tico.experimental.quantization.nn.rotated.RotatedInputLinear` (``x -> inner(x H)``) whose
``inner`` Linear holds ``W H``; W8A8 then calibrates and quantizes ``inner`` on the rotated input, exactly as the
run-time transform will feed it, and ``save_compressed`` writes the ``transform_config``
(:mod:`tico.experimental.quantization.export.transforms`). :func:`transform_config` gives the same description
as a compressed-tensors object, e.g. to apply it to a float model with the library. Fused MoE experts (3-D
parameters, not Linear modules) are not targets.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.algorithm.rotation.fuse import _logits
from tico.experimental.quantization.algorithm.rotation.hadamard import Rotation, hadamard_order_base, make_rotation
from tico.experimental.quantization.nn.rotated import RotatedInputLinear
from tico.experimental.quantization.structure.probe import example_inputs, run_probe

__all__ = ["DOWN_PROJ_TARGETS", "ONLINE_SUFFIXES", "add_online_rotations", "transform_config"]

logger = logging.getLogger(__name__)

# Modules whose input is an elementwise product of two projections (no weight before them can absorb Q).
ONLINE_SUFFIXES = ("mlp.down_proj", "mlp.shared_expert.down_proj")
DOWN_PROJ_TARGETS = tuple("re:.*" + s.replace(".", "\\.") + "$" for s in ONLINE_SUFFIXES)


@torch.no_grad()
def add_online_rotations(
    model: nn.Module,
    suffixes: tuple[str, ...] = ONLINE_SUFFIXES,
    seed: int = 0,
    kind: str = "hadamard",
    tolerance: float = 1e-4,
) -> dict[str, Rotation]:
    """Rotate the inputs of the plain ``nn.Linear`` layers named ``*.<suffix>`` at run time, exactly in float.

    One rotation per input width (shared by all layers of that width, as a run-time kernel would share it).
    The probe's logits are compared before and after; on a mismatch every layer is put back and ValueError is
    raised. Returns the rotation of each layer, by name.
    """
    targets = {
        name: m for name, m in model.named_modules()
        if type(m) is nn.Linear and any(name == s or name.endswith("." + s) for s in suffixes)
    }
    if not targets:
        raise ValueError(f"no plain nn.Linear named *.{suffixes} in {type(model).__name__} to rotate online")
    probe = example_inputs(model, None, None)
    reference = _logits(run_probe(model, *probe, own_inputs=True)).double()
    rotations: dict[int, Rotation] = {}
    done: dict[str, Rotation] = {}
    for name, linear in targets.items():
        rot = rotations.setdefault(linear.in_features, make_rotation(linear.in_features, seed, kind))
        inner = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
        r = rot.matrix.to(linear.weight.device)
        inner.weight.copy_((linear.weight.double() @ r).to(linear.weight.dtype))  # x R (W R)^T = x W^T
        if linear.bias is not None:
            inner.bias.copy_(linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RotatedInputLinear(inner, r.float().unsqueeze(0), None))
        done[name] = rot
    got = _logits(run_probe(model, *probe, own_inputs=True)).double()
    err = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    if not err <= tolerance:
        for name, linear in targets.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
        raise ValueError(f"online rotations changed the probe's logits by {err:.2e} (relative); the model was restored")
    logger.info("online rotations on %d layers (%s), max relative logit change %.2e", len(done),
                ", ".join(sorted({r.describe() for r in done.values()})), err)
    return done


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
