"""The transform_config for an online down_proj Hadamard: compressed-tensors itself applies it exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from tico.experimental.quantization.algorithm.rotation.fuse import fuse_rotations
from tico.experimental.quantization.algorithm.rotation.online import transform_config

ct = pytest.importorskip("compressed_tensors.transform")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("key", ["llama", "qwen2_moe"])
def test_library_applies_it_exactly_after_fused_rotations(key: str) -> None:
    model = zoo.build_model(key)
    ids = zoo.input_ids(key)
    with torch.no_grad():
        ref = model(ids).logits
    fuse_rotations(model)
    down = model.model.layers[0].mlp
    down = getattr(down, "down_proj", None) or down.shared_expert.down_proj
    config = transform_config(down.in_features)
    assert config.config_groups["r4"].type == "hadamard"
    ct.apply_transform_config(model, config)
    assert hasattr(model.model.layers[0].mlp.shared_expert.down_proj if key == "qwen2_moe"
                   else model.model.layers[0].mlp.down_proj, "r4_input")
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 2e-5


def test_stories260k_intermediate_172(stories_dir) -> None:
    """172 = 4 * 43 is not a power of two: random-hadamard from the known matrices."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    config = transform_config(model.config.intermediate_size)
    assert config.config_groups["r4"].type == "random-hadamard"
    ct.apply_transform_config(model, config)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-5


def test_no_hadamard_order_refused() -> None:
    with pytest.raises(ValueError, match="order 86"):
        transform_config(86)


@pytest.mark.parametrize("key", ["llama", "qwen2_moe"])
def test_online_rotations_exact_then_w8a8_quantizes_the_rotated_input(key: str) -> None:
    from tico.experimental.quantization import convert, prepare
    from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations
    from tico.experimental.quantization.nn.rotated import RotatedInputLinear
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.config.w8a8 import W8A8Config
    from tico.experimental.quantization.nn.linear import W8A8Linear

    model = zoo.build_model(key)
    ids = zoo.input_ids(key, batch=2, seq=12, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    fuse_rotations(model)
    rotated = add_online_rotations(model)
    assert rotated and all(r.kind == "hadamard" for r in rotated.values())
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 2e-5
    config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5, linear_producers=True), activations="static")
    q = prepare(model, config)
    with torch.no_grad():
        q(ids)
    q = convert(q)
    for name in rotated:
        layer = q.get_submodule(name)
        assert isinstance(layer, RotatedInputLinear) and isinstance(layer.inner, W8A8Linear), name
    with torch.no_grad():
        assert _rel(q(ids).logits, ref) < 0.2  # int8: close, not exact


def test_online_rotations_need_targets() -> None:
    from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations

    with pytest.raises(ValueError, match="no plain nn.Linear"):
        add_online_rotations(zoo.build_model("llama"), suffixes=("mlp.nothing",))
