"""compressed-tensors export: the library itself decompresses our weights; our loader round-trips logits."""

from __future__ import annotations

import json

import pytest
import torch

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed
from tico.experimental.quantization.nn.linear import W8A8Linear
from zoo import build_model, input_ids


def _w8a8(activations: str, linear_producers: bool = True, **kw):
    ids = input_ids("llama", batch=4, seq=16)
    smoothing = SmoothQuantConfig(linear_producers=linear_producers)
    model = prepare(build_model("llama"), W8A8Config(smoothing=smoothing, activations=activations, **kw))
    with torch.no_grad():
        model(ids)
    return convert(model), ids


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_round_trip_into_our_int8_modules(activations, tmp_path):
    model, ids = _w8a8(activations)
    save_compressed(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    (group,) = config["config_groups"].values()
    assert group["input_activations"]["dynamic"] is (activations == "dynamic")
    assert "lm_head" in config["ignore"]
    loaded = load_compressed(tmp_path)
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) == sum(isinstance(m, W8A8Linear) for m in model.modules())
    loaded.set_attn_implementation(model.config._attn_implementation)  # same attention kernel as the original
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_compressed_tensors_library_decompresses_our_weights(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, _ = _w8a8("dynamic")
    save_compressed(model, tmp_path)
    decompressed = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(run_compressed=False))
    for name, layer in model.named_modules():
        if isinstance(layer, W8A8Linear):
            state = layer.quantization_state()
            ours = state["weight"].float() * state["weight_scale"].float()
            assert torch.equal(decompressed.get_submodule(name).weight.float(), ours), name


def test_smoothing_inside_the_quantizer_is_refused(tmp_path):
    model, _ = _w8a8("static", linear_producers=False, smooth_in_quantizer=True)  # o_proj/down_proj smoothed inside
    with pytest.raises(ValueError, match="smooth_in_quantizer=False"):
        save_compressed(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
