"""Rotations fused into the weights (QuaRot / SpinQuant style): a plain float checkpoint, exact in fp32.

``fuse_rotations(model)`` rotates the residual stream and the attention values per head; ``hadamard`` builds the
(randomized) Hadamard matrices; ``online`` describes the rotations no weight can absorb (``down_proj`` inputs) as
a compressed-tensors ``transform_config``.
"""

from tico.experimental.quantization.algorithm.rotation.fuse import RotationError, RotationReport, fuse_rotations

__all__ = ["RotationError", "RotationReport", "fuse_rotations"]
