"""Checkpoint -> checkpoint quantization, one decoder block at a time (see :mod:`.stream`)."""

from tico.experimental.quantization.pipeline.stream import StreamResult, quantize_checkpoint

__all__ = ["quantize_checkpoint", "StreamResult"]
