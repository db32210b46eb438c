"""Layers vLLM fuses (q/k/v, gate/up) must share one activation scheme for vLLM to run what we measured."""

from __future__ import annotations

import json
import logging

import torch

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed, w8a8_layers
from tico.experimental.quantization.export.fusion import fused_groups, mixed_fused_groups, unify_fused_activations
from zoo import build_model, input_ids


def _static():
    ids = input_ids("llama", batch=4, seq=16)
    config = W8A8Config(smoothing=SmoothQuantConfig(linear_producers=True), activations="static")
    model = prepare(build_model("llama"), config)
    with torch.no_grad():
        model(ids)
    return convert(model), ids


def test_mixed_groups_are_found_warned_and_unified(tmp_path, caplog):
    model, ids = _static()
    layers = w8a8_layers(model)
    groups = fused_groups(layers)
    assert groups and all(len(g) in (2, 3) for g in groups)
    assert mixed_fused_groups(layers) == []  # same input, same calibrated scale: nothing to do
    qkv = next(g for g in groups if g[0].endswith("q_proj"))
    gate_up = next(g for g in groups if g[0].endswith("gate_proj"))
    # as dynamic_fallback may choose: k dynamic, q and v static; and different static scales for gate/up
    k = layers[qkv[1]]
    k.act_granularity, k.act_scale, k._rt = "per_token", None, None
    layers[gate_up[1]].act_scale.mul_(2.0)
    layers[gate_up[1]]._rt = None
    assert sorted(mixed_fused_groups(layers)) == sorted([qkv, gate_up])
    with caplog.at_level(logging.WARNING):
        save_compressed(model, tmp_path / "mixed")
    assert "unify_fused_activations" in caplog.text
    top = float(layers[gate_up[1]].act_scale)
    changed = unify_fused_activations(model)
    assert set(changed) == {qkv[0], qkv[2], gate_up[0]}, changed
    assert all(layers[n].quantization_state()["dynamic"] for n in qkv)
    assert all(float(layers[n].act_scale) == top for n in gate_up)
    assert mixed_fused_groups(layers) == [] and unify_fused_activations(model) == {}
    save_compressed(model, tmp_path / "unified")
    config = json.loads((tmp_path / "unified" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2  # the dynamic q/k/v and the static rest
    loaded = load_compressed(tmp_path / "unified")
    loaded.set_attn_implementation(model.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
