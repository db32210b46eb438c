"""Quantization algorithms, each in its own sub-package."""
