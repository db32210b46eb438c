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
