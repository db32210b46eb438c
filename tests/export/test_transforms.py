"""Online Hadamard rotations exported as a compressed-tensors transform_config, and loaded back."""

from __future__ import annotations

import json

import pytest
import torch

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.algorithm.rotation.fuse import fuse_rotations
from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations
from tico.experimental.quantization.nn.rotated import RotatedInputLinear
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed
from tico.experimental.quantization.nn.linear import W8A8Linear
from zoo import build_model, input_ids


def _quantized(activations: str = "static", fused: bool = True, **kw):
    model = build_model("llama")
    if fused:
        fuse_rotations(model)
    add_online_rotations(model)
    ids = input_ids("llama", batch=4, seq=16)
    model = prepare(model, W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5, linear_producers=True),
                                      activations=activations, **kw))
    with torch.no_grad():
        model(ids)
    return convert(model), ids


@pytest.mark.parametrize("activations,fused", [("static", True), ("dynamic", True), ("dynamic", False)])
def test_round_trip_with_transform_config(activations: str, fused: bool, tmp_path) -> None:
    q, ids = _quantized(activations, fused)  # fused=False: the online Hadamard alone (--rotate online-only)
    save_compressed(q, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    (scheme,) = raw["transform_config"]["config_groups"].values()
    assert scheme["type"] == "random-hadamard"
    targets = scheme["apply"][0]["targets"]
    assert targets == [r"re:^model\.layers\.0\.mlp\.down_proj$", r"re:^model\.layers\.1\.mlp\.down_proj$"]
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert not any(".inner." in k or k.endswith(".rotation") for k in tensors)
    t = tensors["model.layers.0.mlp.down_proj.r4_input.weight"]
    assert torch.equal(t.abs(), torch.ones_like(t))
    loaded = load_compressed(tmp_path)
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, RotatedInputLinear) and isinstance(layer.inner, W8A8Linear)
    loaded.set_attn_implementation(q.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)


def test_compressed_tensors_reads_the_transform_config(tmp_path) -> None:
    """The library parses our block and, applied to the dequantized float model, reproduces our layers' maths."""
    ct = pytest.importorskip("compressed_tensors.transform")
    q, _ = _quantized("dynamic")
    save_compressed(q, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["transform_config"]
    config = ct.TransformConfig.model_validate(raw)
    assert config.config_groups["r4"].apply[0].location == "input"


def test_random_block_rotations_still_refused(tmp_path) -> None:
    model = build_model("llama")
    ids = input_ids("llama", batch=4, seq=16)
    model = prepare(model, W8A8Config(activations="dynamic", tuning=W8A8Tuning(rotate_in_quantizer=("down_proj",))))
    with torch.no_grad():
        model(ids)
    with pytest.raises(ValueError, match="only one Hadamard block"):
        save_compressed(convert(model), tmp_path)


def test_loaders_that_ignore_the_transform_refuse_the_checkpoint(tmp_path) -> None:
    """transformers' from_pretrained would load the int8 weights without the rotation (garbage, one warning line):
    the marker in every quantization group makes it refuse instead, naming what the checkpoint needs, while
    load_compressed still computes what was saved."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from tico.experimental.quantization.export import transforms

    q, ids = _quantized("dynamic", fused=False)  # --scheme w8a8-dynamic --rotate online-only
    save_compressed(q, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert all(g[transforms.MARKER] == transforms.MARKER_VALUE for g in raw["config_groups"].values())
    for kwargs in ({}, {"quantization_config": CompressedTensorsConfig(run_compressed=False)}):
        with pytest.raises(Exception, match=transforms.MARKER) as info:
            AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
        assert "load_compressed" in str(info.value)
    loaded = load_compressed(tmp_path)
    loaded.set_attn_implementation(q.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    assert "refuses" in transforms.engines_line(raw) and "load_compressed" in transforms.engines_line(raw)


def test_checkpoints_without_a_transform_are_not_marked(tmp_path) -> None:
    from tico.experimental.quantization.export import transforms

    model = build_model("llama")
    model = prepare(model, W8A8Config(activations="dynamic"))
    with torch.no_grad():
        model(input_ids("llama", batch=2, seq=8))
    save_compressed(convert(model), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert not any(transforms.MARKER in g for g in raw["config_groups"].values())
    assert "from_pretrained" in transforms.engines_line(raw) and "refuses" not in transforms.engines_line(raw)


def test_quantize_summary_says_which_loaders_run_a_transform_checkpoint(stories_dir, tinystories_text, tmp_path, capsys) -> None:
    from tico.experimental.quantization.cli.main import main

    out = tmp_path / "online"
    code = main(["quantize", "--model", str(stories_dir), "--dataset", str(tinystories_text), "--samples", "2",
                 "--seq-len", "64", "--scheme", "w8a8-dynamic", "--rotate", "online-only", "--output", str(out)])
    assert code == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("runs with:"))
    assert "load_compressed" in line and "from_pretrained refuses" in line
