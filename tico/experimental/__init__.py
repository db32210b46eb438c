"""Experimental features of tico; the quantization API lives in ``tico.experimental.quantization``."""
