"""Rotation inside the activation quantizer: exact in float, better in int8, refused by the exporter."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.w8a8.in_quantizer_rotation import block_size, random_rotation
from tico.experimental.quantization.algorithm.w8a8.planner import needs_samples
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
from tico.experimental.quantization.export.compressed_tensors import save_compressed
from tico.experimental.quantization.nn.rotated import RotatedInputLinear, rotate
from zoo import build_model, input_ids


def test_block_rotation_is_orthogonal_and_exact_in_float():
    assert block_size(172) == 86 and block_size(4096) == 128 and block_size(97) == 97
    blocks = random_rotation(172, "layer")
    eye = torch.eye(86).expand(2, 86, 86)
    assert torch.allclose(blocks @ blocks.transpose(-1, -2), eye, atol=1e-5)
    assert torch.equal(blocks, random_rotation(172, "layer"))  # seeded by name
    x, w = torch.randn(5, 3, 172), torch.randn(7, 172)
    assert torch.allclose(rotate(x, blocks) @ rotate(w, blocks).T, x @ w.T, atol=1e-4)
    s = torch.rand(172) + 0.5
    layer = RotatedInputLinear(torch.nn.Linear(172, 7, bias=False), blocks, s)
    with torch.no_grad():
        layer.inner.weight.copy_(rotate(w * s, blocks))
        assert torch.allclose(layer(x), x @ w.T, atol=1e-4)


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_rotation_improves_outlier_model(activations):
    ids = input_ids("llama", batch=8, seq=16)
    reference = build_model("llama")
    kls = {}
    for rot in ((), ("all",)):
        model = prepare(build_model("llama"), W8A8Config(smoothing=SmoothQuantConfig(), activations=activations,
                                                         tuning=W8A8Tuning(rotate_in_quantizer=rot)))
        with torch.no_grad():
            model(ids)
        q = convert(model)
        assert any(isinstance(m, RotatedInputLinear) for m in q.modules()) == bool(rot)
        kls[rot] = logit_fidelity(q, reference, ids).kl
    assert kls[("all",)] < 0.05


def test_unmatched_rotate_name_and_export_refusal(tmp_path):
    with pytest.raises(ValueError, match="rotate_in_quantizer names that match no quantized layer"):
        prepare(build_model("llama"), W8A8Config(tuning=W8A8Tuning(rotate_in_quantizer=("no_such_proj",))))
    ids = input_ids("llama")
    model = prepare(build_model("llama"), W8A8Config(tuning=W8A8Tuning(rotate_in_quantizer=("down_proj",))))
    assert needs_samples(get_quantizer(model).config)
    with torch.no_grad():
        model(ids)
    q = convert(model)
    with pytest.raises(ValueError, match="rotations"):
        save_compressed(q, tmp_path / "out")
