"""Rotations fused into the weights (QuaRot / SpinQuant style): a plain float checkpoint, exact in fp32."""
