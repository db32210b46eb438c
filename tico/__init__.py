"""Tico: SmoothQuant W8A8 quantization for Hugging Face language models."""
