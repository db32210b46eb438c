"""Weight-only int8 embeddings (and the tied head that shares them)."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
from tico.experimental.quantization.export.compressed_tensors import save_compressed
from tico.experimental.quantization.nn.embedding import Int8Embedding, Int8TiedHead, quantize_rows
from zoo import build_model, input_ids


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(50, 16)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and (q.float() * scale[:, None] - w).abs().le(scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("key", ["gpt2", "llama"])  # gpt2 ties its head to the embedding
def test_quantized_embeddings_close_and_smaller(key, tmp_path):
    ids = input_ids(key, batch=4, seq=16)
    reference = build_model(key)
    model = prepare(build_model(key), W8A8Config(smoothing=SmoothQuantConfig(), quantize_embeddings=True))
    with torch.no_grad():
        model(ids)
    q = convert(model)
    assert isinstance(q.get_input_embeddings(), Int8Embedding)
    tied = reference.config.tie_word_embeddings
    assert isinstance(q.get_output_embeddings(), Int8TiedHead) == tied
    assert logit_fidelity(q, reference, ids).kl < 0.05
    emb_bytes = sum(b.numel() * b.element_size() for b in q.get_input_embeddings().buffers())
    assert emb_bytes < 0.3 * reference.get_input_embeddings().weight.numel() * 4
    with pytest.raises(ValueError, match="int8 embeddings"):
        save_compressed(q, tmp_path / "out")
