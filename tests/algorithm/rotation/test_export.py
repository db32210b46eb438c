"""Fused rotations leave a plain model: W8A8 on top of it exports to compressed-tensors and loads back."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.algorithm.rotation.fuse import fuse_rotations
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed
from zoo import build_model, input_ids


@pytest.mark.parametrize("key", ["llama", "gemma"])  # gemma: tied embeddings, untied by the rotation
def test_rotated_w8a8_exports(key: str, tmp_path) -> None:
    model = build_model(key)
    report = fuse_rotations(model)
    config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5, linear_producers=True), activations="static")
    model = prepare(model, config)
    ids = input_ids(key, batch=4, seq=16)
    with torch.no_grad():
        model(ids)
    q = convert(model)
    save_compressed(q, tmp_path)
    loaded = load_compressed(tmp_path)
    loaded.set_attn_implementation(q.config._attn_implementation)
    assert (report.untied is not None) == (key == "gemma")
    assert not loaded.config.tie_word_embeddings
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
