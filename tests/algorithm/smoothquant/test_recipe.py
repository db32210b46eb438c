"""Recipes: save after convert, re-apply without calibration, same weights; bad recipes change nothing."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.smoothquant.recipe import apply_recipe, save_recipe
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from zoo import build_model, input_ids


@pytest.mark.parametrize("key", ["llama", "gpt2", "mixtral"])
def test_recipe_reproduces_the_same_weights(key, tmp_path):
    ids = input_ids(key)
    model = prepare(build_model(key), SmoothQuantConfig(alpha=0.7, linear_producers=True))
    with torch.no_grad():
        model(ids)
    quantizer = get_quantizer(model)
    smoothed = convert(model)
    save_recipe(quantizer.plan, tmp_path / "recipe.json")
    fresh = apply_recipe(build_model(key), tmp_path / "recipe.json")
    for (n, a), (_, b) in zip(smoothed.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_bad_recipe_changes_nothing(tmp_path):
    ids = input_ids("llama")
    model = prepare(build_model("llama"), SmoothQuantConfig())
    with torch.no_grad():
        model(ids)
    quantizer = get_quantizer(model)
    convert(model)
    save_recipe(quantizer.plan, tmp_path / "r.json")
    other = build_model("gpt2")
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match="no such module"):
        apply_recipe(other, tmp_path / "r.json")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a smoothing recipe"):
        apply_recipe(other, tmp_path / "x.json")
