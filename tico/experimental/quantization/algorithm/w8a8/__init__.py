"""W8A8: int8 weights and activations, with SmoothQuant composed into one calibration pass."""
