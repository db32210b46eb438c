"""compressed-tensors export: the library itself decompresses our weights; our loader round-trips logits."""

from __future__ import annotations

import json

import pytest
import torch

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
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
    # o_proj/down_proj smoothed inside
    model, _ = _w8a8("static", linear_producers=False, tuning=W8A8Tuning(smooth_in_quantizer=True))
    with pytest.raises(ValueError, match="smooth_in_quantizer=False"):
        save_compressed(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_sharded_checkpoint_loads_back_with_both_loaders(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, ids = _w8a8("static")
    out = tmp_path / "sharded"
    save_compressed(model, out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    loaded = load_compressed(out)
    loaded.set_attn_implementation(model.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    decompressed = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False))
    name = "model.layers.0.mlp.down_proj"
    state = model.get_submodule(name).quantization_state()
    assert torch.equal(decompressed.get_submodule(name).weight.float(), state["weight"].float() * state["weight_scale"].float())


def test_config_is_validated_by_compressed_tensors(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    model, _ = _w8a8("dynamic")
    save_compressed(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(raw)
    assert parsed.config_groups["group_0"].weights.strategy == "channel"


def test_bf16_model_gets_bf16_scales_and_readable_files(tmp_path):
    import os
    import stat

    from safetensors import safe_open

    ids = input_ids("llama", batch=2, seq=8)
    model = prepare(build_model("llama", dtype=torch.bfloat16), W8A8Config(activations="static"))
    with torch.no_grad():
        model(ids)
    convert(model)
    out = tmp_path / "bf16"
    save_compressed(model, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.down_proj.input_scale").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.int8
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["bf16"]  # no staging folder left


def test_refusal_writes_nothing_and_a_non_empty_output_is_refused(tmp_path):
    model, _ = _w8a8("dynamic")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_compressed(model, tmp_path / "x")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]


def test_sigterm_and_stale_staging_leave_nothing_behind(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    stale = tmp_path / ".out.partial-999999999"  # a staging folder of a process that no longer runs
    stale.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from tico.experimental.quantization.export.shards import ShardWriter
        with ShardWriter({str(tmp_path / 'out')!r}) as w:
            w.add("a", torch.zeros(4))
            os.kill(os.getpid(), signal.SIGTERM)
            w.publish()
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ}, capture_output=True, text=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- GPT-2: Conv1D layers, weight stored [in, out] ------------------------------------------------------------
def _gpt2_converted(config, tmp_path):
    """A tiny GPT-2 saved to ``tmp_path / "src"``, and its in-memory prepare -> calibrate -> convert with ``config``."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    build_model("gpt2").save_pretrained(src)
    batches = [input_ids("gpt2", batch=2, seq=16, seed=s) for s in range(3)]
    model = prepare(AutoModelForCausalLM.from_pretrained(src), config)
    with torch.no_grad():
        for b in batches:
            model(b)
    return src, batches, convert(model)


def _assert_loads_as(folder, model, ids) -> None:
    """``load_compressed(folder)`` has an int8 layer wherever ``model`` has one and computes the same logits: same
    int8 weights, scales and kernels, so bit-identical (no int8-rounding tolerance is needed)."""
    loaded = load_compressed(folder)
    ours = {n for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    assert ours and {n for n, m in loaded.named_modules() if isinstance(m, W8A8Linear)} == ours
    loaded.set_attn_implementation(model.config._attn_implementation)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("scheme", ["w8a8-static", "w8a8-dynamic"])
def test_gpt2_conv1d_checkpoint_is_in_gpt2s_layout_and_loads_back(scheme, tmp_path):
    """The int8 weight of a Conv1D is written [in, out], as GPT-2 checkpoints store it and its loaders (vLLM's
    transposes every c_attn/c_proj/c_fc weight) read it; scales per output channel. ``load_compressed`` computes
    what the converted model computes, and writes the same files again."""
    from tico.experimental.quantization.export.shards import read_tensors, safetensors_files
    from tico.experimental.quantization.run.schemes import build_config

    src, batches, model = _gpt2_converted(build_config(scheme), tmp_path)
    save_compressed(model, tmp_path / "q")
    tensors = dict(read_tensors(safetensors_files(tmp_path / "q")))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(layer, W8A8Linear) and layer.weight.shape == (96, 32)  # [out, in] inside the layer
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # [in, out] as the float checkpoint
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.weight"].t(), layer.weight)
    assert tensors["transformer.h.0.attn.c_attn.weight_scale"].shape == (96, 1)
    _assert_loads_as(tmp_path / "q", model, batches[0])
    save_compressed(load_compressed(tmp_path / "q"), tmp_path / "again")
    again = dict(read_tensors(safetensors_files(tmp_path / "again")))
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("scheme,options", [
    ("w8a8-dynamic", {}),
    # block_objective=False: with it, GPT-2's in-memory and streamed block choices differ (a separate issue)
    ("w8a8-static", {"block_objective": False}),
])
def test_gpt2_streamed_checkpoint_loads_back_as_the_in_memory_model(scheme, options, tmp_path):
    from tico.experimental.quantization.pipeline import quantize_checkpoint
    from tico.experimental.quantization.run.schemes import build_config

    config = build_config(scheme, **options)
    src, batches, model = _gpt2_converted(config, tmp_path)
    quantize_checkpoint(src, config, batches, tmp_path / "stream", propagate="float")
    _assert_loads_as(tmp_path / "stream", model, batches[0])


def test_gpt2_conv1d_kept_in_float_is_ignored_and_loads_back(tmp_path):
    """A Conv1D left in float is in compressed-tensors' ignore list (vLLM's Linear target would match it)."""
    config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), activations="static", ignore=("transformer.h.0.mlp.c_proj",))
    _, batches, model = _gpt2_converted(config, tmp_path)
    save_compressed(model, tmp_path / "q")
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "transformer.h.0.mlp.c_proj" in ignore
    assert not isinstance(load_compressed(tmp_path / "q").get_submodule("transformer.h.0.mlp.c_proj"), W8A8Linear)
    _assert_loads_as(tmp_path / "q", model, batches[0])


def test_a_conv1d_weight_in_the_wrong_layout_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, model = _gpt2_converted(W8A8Config(activations="dynamic"), tmp_path)
    save_compressed(model, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight is int8 \(64, 32\).*Conv1D"):
        load_compressed(tmp_path / "q")
