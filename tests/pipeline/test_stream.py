"""Streaming quantization: bit-identical to the in-memory prepare/convert (float propagation), bounded memory,
nothing left behind on failure, sharded output readable by both loaders, pickle-only checkpoints refused."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed
from tico.experimental.quantization.export.shards import read_tensors, safetensors_files
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.pipeline import quantize_checkpoint
from zoo import ARCHITECTURES, build_model, input_ids

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
EXPORTABLE = W8A8Config(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True), activations="static", act_range="mse")


def _batches(key: str, n: int = 3) -> list[torch.Tensor]:
    return [input_ids(key, batch=2, seq=16, seed=s) for s in range(n)]


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def _in_memory(src: Path, config, batches, out: Path) -> None:
    model = prepare(AutoModelForCausalLM.from_pretrained(src), config)
    with torch.no_grad():
        for b in batches:
            model(b)
    convert(model)
    if isinstance(config, W8A8Config):
        save_compressed(model, out)
    else:
        model.save_pretrained(out)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return dict(read_tensors(safetensors_files(folder)))


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]


def _post_ln_opt():
    spec = ARCHITECTURES["opt"]
    config = spec.config_cls(**{**spec.config_kwargs, "do_layer_norm_before": False})
    torch.manual_seed(0)
    return spec.model_cls._from_config(config, dtype=torch.float32).eval()


# llama: GQA (4 heads, 2 KV heads); gemma3: per-layer masks and rotary tables; qwen3_moe: fused 3-D experts
# (checkpoint holds per-expert tensors); opt post-LN; bloom: tuple-returning blocks; gpt2: tied embeddings +
# Conv1D (int8 weights written in its [in, out] layout).
IDENTITY = ["llama", "gemma3", "qwen3_moe", "bloom", "opt_post_ln", "gpt2"]


@pytest.mark.parametrize("key", IDENTITY)
def test_w8a8_streamed_with_float_propagation_is_bit_identical_to_in_memory(key, tmp_path):
    model = _post_ln_opt() if key == "opt_post_ln" else build_model(key)
    arch = "opt" if key == "opt_post_ln" else key
    src = _save(model, tmp_path / "src")
    batches = _batches(arch)
    result = quantize_checkpoint(src, EXPORTABLE, batches, tmp_path / "stream", propagate="float")
    _in_memory(src, EXPORTABLE, batches, tmp_path / "mem")
    _assert_identical(tmp_path / "stream", tmp_path / "mem")
    q_stream = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]
    q_mem = json.loads((tmp_path / "mem" / "config.json").read_text())["quantization_config"]
    assert q_stream == q_mem
    assert result.blocks == model.config.num_hidden_layers and len(result.block_s) == result.blocks


@pytest.mark.parametrize("key", ["llama", "qwen3_moe", "gpt2"])
def test_smoothquant_streamed_is_bit_identical_to_save_pretrained(key, tmp_path):
    src = _save(build_model(key), tmp_path / "src")
    batches = _batches(key)
    config = SmoothQuantConfig(alpha=0.5, linear_producers=True)
    quantize_checkpoint(src, config, batches, tmp_path / "stream", propagate="float")
    _in_memory(src, config, batches, tmp_path / "mem")
    _assert_identical(tmp_path / "stream", tmp_path / "mem")  # per-expert keys, as save_pretrained writes them
    smoothed = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    original = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():  # smoothing is exact in float: same logits up to rounding
        torch.testing.assert_close(smoothed(batches[0]).logits, original(batches[0]).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_propagation_calibrates_later_blocks_on_quantized_inputs(device, tmp_path):
    src = _save(build_model("llama"), tmp_path / "src")
    batches = _batches("llama")
    config = W8A8Config(activations="static", act_range="absmax", tuning=W8A8Tuning(backend="fake"))
    quantize_checkpoint(src, config, batches, tmp_path / "q", device=device)
    quantize_checkpoint(src, config, batches, tmp_path / "f", device=device, propagate="float")
    tq, tf = _tensors(tmp_path / "q"), _tensors(tmp_path / "f")
    assert torch.equal(tq["model.layers.0.self_attn.q_proj.input_scale"], tf["model.layers.0.self_attn.q_proj.input_scale"])
    later = [k for k in tq if k.endswith("input_scale") and k.startswith("model.layers.1.")]
    assert any(not torch.equal(tq[k], tf[k]) for k in later)  # block 1 saw block 0's quantized outputs


def test_sharded_output_loads_with_load_compressed_and_from_pretrained(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    src = _save(build_model("llama"), tmp_path / "src")
    batches = _batches("llama")
    out = tmp_path / "out"
    quantize_checkpoint(src, EXPORTABLE, batches, out, max_shard_size="16KB", progress=True)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert (out / "generation_config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in out.iterdir())
    ours = load_compressed(out, backend="fake")
    assert sum(isinstance(m, W8A8Linear) for m in ours.modules()) == 14  # 7 per block, LM head in float
    decompressed = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(src)(batches[0]).logits
        for model in (ours, decompressed):
            logits = model(batches[0]).logits
            assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.99


def test_interrupted_run_leaves_nothing_behind(tmp_path):
    src = _save(build_model("llama"), tmp_path / "src")

    def fail(index: int) -> None:
        if index == 0:
            raise KeyboardInterrupt  # as Ctrl-C would, after the first block was written

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, EXPORTABLE, _batches("llama"), tmp_path / "out", on_block=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_pickle_only_checkpoint_is_refused_with_the_reason(tmp_path):
    model = build_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refused on purpose.*unpickling runs arbitrary code.*save_pretrained"):
        quantize_checkpoint(tmp_path, EXPORTABLE, _batches("llama"), tmp_path.parent / "out")
    assert not (tmp_path.parent / "out").exists()


def test_configs_the_format_cannot_hold_are_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match="rotate.*output_dir=None"):
        quantize_checkpoint(tmp_path, W8A8Config(tuning=W8A8Tuning(rotate_in_quantizer=("all",))),
                            [torch.zeros(1, 4, dtype=torch.long)], tmp_path / "o")


def test_unknown_module_names_in_the_config_are_refused(tmp_path):
    src = _save(build_model("llama"), tmp_path / "src")
    with pytest.raises(ValueError, match="model.layers.7"):
        quantize_checkpoint(src, W8A8Config(ignore=("model.layers.7",)), _batches("llama"), tmp_path / "o")


def test_config_names_apply_to_their_block_only(tmp_path):
    src = _save(build_model("llama"), tmp_path / "src")
    batches = _batches("llama")
    config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5, custom_alpha_map={"model.layers.1.mlp": 0.8}),
                        ignore=("model.layers.0.mlp.down_proj",))
    quantize_checkpoint(src, config, batches, tmp_path / "stream", propagate="float")
    _in_memory(src, config, batches, tmp_path / "mem")
    _assert_identical(tmp_path / "stream", tmp_path / "mem")
    ignore = json.loads((tmp_path / "stream" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.down_proj" in ignore


def test_bf16_checkpoint_stays_bf16(tmp_path):
    src = _save(build_model("llama", dtype=torch.bfloat16), tmp_path / "src")
    quantize_checkpoint(src, W8A8Config(activations="static"), _batches("llama"), tmp_path / "out")
    tensors = _tensors(tmp_path / "out")
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert tensors["model.norm.weight"].dtype == torch.bfloat16


def _live_tensor_bytes() -> int:
    """Bytes of every live CPU tensor storage in the process (deduplicated)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - some objects refuse isinstance/attribute access
            continue
    return sum(seen.values())


def test_peak_memory_does_not_grow_with_the_layer_count(tmp_path, monkeypatch):
    """Live tensor bytes while each block is converted (block loaded, statistics held) and after it is written:
    the same for 2 or 8 layers, although the weights grow 4x. Counted bytes, not timings or RSS."""
    import tico.experimental.quantization.pipeline.block_pass as stream

    spec = ARCHITECTURES["llama"]
    samples: list[int] = []
    real_convert = stream.convert

    def convert_and_measure(module, *args, **kwargs):
        samples.append(_live_tensor_bytes())
        return real_convert(module, *args, **kwargs)

    monkeypatch.setattr(stream, "convert", convert_and_measure)
    peaks, weights = {}, {}
    for layers in (2, 8):
        config = spec.config_cls(**{**spec.config_kwargs, "hidden_size": 256, "intermediate_size": 1024,
                                    "num_hidden_layers": layers, "tie_word_embeddings": True})
        torch.manual_seed(0)
        model = spec.model_cls._from_config(config, dtype=torch.float32).eval()
        weights[layers] = sum(p.numel() * 4 for p in model.parameters())
        src = _save(model, tmp_path / f"src{layers}")
        del model
        samples.clear()
        base = _live_tensor_bytes()
        config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), activations="static", act_range="mse")
        quantize_checkpoint(src, config, _batches("llama"), tmp_path / f"out{layers}",
                            on_block=lambda i: samples.append(_live_tensor_bytes()))
        peaks[layers] = max(samples) - base
    block = (weights[8] - weights[2]) // 6
    assert weights[8] > 3 * weights[2] and peaks[2] > block  # a block is really held while it is converted
    assert peaks[8] < peaks[2] + block // 4, (peaks, block)


def test_freed_memory_goes_back_to_the_os_after_every_block(tmp_path, monkeypatch):
    import tico.experimental.quantization.pipeline.stream as stream

    calls = []
    monkeypatch.setattr(stream, "trim_heap", lambda: calls.append(1) or True)
    src = _save(build_model("llama"), tmp_path / "src")
    result = quantize_checkpoint(src, W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5)), _batches("llama"), None)
    assert len(calls) == result.blocks == 2


@pytest.mark.parametrize("as_dicts", [False, True])
def test_each_block_is_probed_on_the_probe_tokens_not_a_calibration_batch(as_dicts, tmp_path, monkeypatch):
    """prepare's traced forward costs a tenth of a block's calibration when it runs a whole batch: token-id
    batches give each block the 8 probe tokens' own input and call; dict batches keep the first batch."""
    import tico.experimental.quantization.pipeline.block_pass as stream
    from tico.experimental.quantization.structure.probe import PROBE_TOKENS

    probed = []
    real_prepare = stream.prepare

    def prepare(unit, config, args=None, kwargs=None):
        if args is not None:  # a block (the rest of the model is probed with kwargs)
            probed.append(tuple(args[0].shape))
        return real_prepare(unit, config, args=args, kwargs=kwargs)

    monkeypatch.setattr(stream, "prepare", prepare)
    src = _save(build_model("llama"), tmp_path / "src")
    batches = _batches("llama")
    if as_dicts:
        batches = [{"input_ids": b} for b in batches]
    quantize_checkpoint(src, W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5)), batches, None)
    first = tuple(input_ids("llama", batch=2, seq=16, seed=0).shape)
    assert [s[:2] for s in probed] == [first if as_dicts else (1, PROBE_TOKENS)] * 2

def test_without_output_dir_nothing_is_written_and_any_recipe_runs(tmp_path):
    src = _save(build_model("llama"), tmp_path / "src")
    config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), activations="static",
                        tuning=W8A8Tuning(smooth_in_quantizer=True, rotate_in_quantizer=("all",), backend="fake"))
    result = quantize_checkpoint(src, config, _batches("llama"), None)
    assert result.output_dir is None and len(result.phases) == 2 and result.phases[0]["convert"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("key", ["llama", "gemma3"])
def test_block_objective_streamed_with_float_propagation_is_bit_identical_to_in_memory(key, tmp_path):
    """Each block's choice is made on the same recorded calls (the first calibration batch) in both."""
    config = dataclasses.replace(EXPORTABLE, dynamic_fallback=16.0, block_objective=True).with_tuning(block_objective_tokens=16)
    src = _save(build_model(key), tmp_path / "src")
    batches = _batches(key)
    result = quantize_checkpoint(src, config, batches, tmp_path / "stream", propagate="float")
    model = prepare(AutoModelForCausalLM.from_pretrained(src), config)
    quantizer = get_quantizer(model)
    with torch.no_grad():
        for b in batches:
            model(b)
    convert(model)
    save_compressed(model, tmp_path / "mem")
    _assert_identical(tmp_path / "stream", tmp_path / "mem")
    assert result.report.block_errors == quantizer.report.block_errors
    assert result.report.block_choices == quantizer.report.block_choices
    assert len(quantizer.report.block_choices) == build_model(key).config.num_hidden_layers


@pytest.mark.parametrize("tied", [True, False])
def test_vocabulary_matrices_are_never_loaded_whole(tied, tmp_path, monkeypatch):
    """The input embedding gives the blocks' inputs from the calibration tokens' rows only, and the LM head /
    embeddings are copied to the output in row ranges: no tensor of vocabulary rows is ever read whole, and the
    output, plan and report are those of the in-memory prepare/convert."""
    import tico.experimental.quantization.pipeline.source as checkpoint
    import tico.experimental.quantization.pipeline.vocab as vocab
    from tico.experimental.quantization.algorithm.smoothquant.quantizer import probe_token_ids
    from tico.experimental.quantization.export.shards import StoredTensor
    from tico.experimental.quantization.public_interface import get_quantizer

    spec = ARCHITECTURES["llama"]
    config = spec.config_cls(**{**spec.config_kwargs, "vocab_size": 3000, "tie_word_embeddings": tied})
    torch.manual_seed(0)
    model = spec.model_cls._from_config(config, dtype=torch.float32).eval()
    src = _save(model, tmp_path / "src")
    vocab_keys = {"model.embed_tokens.weight", "lm_head.weight"}
    loaded, rows_read, chunk_rows = [], [], []
    real_read, real_rows, real_chunks = checkpoint.read_tensors, StoredTensor.rows, StoredTensor.row_chunks

    def read(files, names=None, device="cpu"):
        for name, t in real_read(files, names, device):
            loaded.append(name)
            yield name, t

    def rows(self, index):
        rows_read.append(len(index))
        return real_rows(self, index)

    def chunks(self, max_bytes):
        for c in real_chunks(self, max_bytes):
            chunk_rows.append(c.shape[0])
            yield c

    monkeypatch.setattr(checkpoint, "read_tensors", read)
    monkeypatch.setattr(StoredTensor, "rows", rows)
    monkeypatch.setattr(StoredTensor, "row_chunks", chunks)
    monkeypatch.setattr(vocab, "COPY_CHUNK_BYTES", 100 * config.hidden_size * 4)  # 100 rows a piece
    batches = _batches("llama")
    result = quantize_checkpoint(src, EXPORTABLE, batches, tmp_path / "stream", propagate="float")
    assert loaded and not vocab_keys & set(loaded)
    probe = probe_token_ids(3000)  # prepare's probe tokens are captured beside the batches
    assert rows_read == [len(torch.unique(torch.cat([b.reshape(-1) for b in [*batches, probe]])))] and rows_read[0] < 3000
    assert max(chunk_rows) == 100 and sum(chunk_rows) == 3000 * (1 if tied else 2)

    _in_memory(src, EXPORTABLE, batches, tmp_path / "mem")
    _assert_identical(tmp_path / "stream", tmp_path / "mem")
    in_memory = prepare(AutoModelForCausalLM.from_pretrained(src), EXPORTABLE)
    with torch.no_grad():
        for b in batches:
            in_memory(b)
    quantizer = get_quantizer(in_memory)
    convert(in_memory)
    def groups(plan):  # "block" aside: a streamed unit names no enclosing block (as before this test)
        return [{k: v for k, v in g.items() if k != "block"} for g in plan.to_dict()["groups"]]

    assert groups(result.plan) == groups(quantizer.plan)
    assert any(g["producer"] == "model.norm" for g in groups(result.plan))  # the rest's group, traced with stand-ins
    assert result.report.kept_float == quantizer.report.kept_float


# Pad ids as released configs set them, inside the real vocabulary but past the rows the pipeline holds (the
# calibration tokens' rows for the blocks' inputs, a one-row stand-in for the rest of the model): Llama
# checkpoints' 2, Phi-3's 32000 (of 32064), OPT's 1.
PADDED = {"llama": dict(pad_token_id=2), "phi3": dict(pad_token_id=32000, vocab_size=32064), "opt": dict(pad_token_id=1)}


@pytest.mark.parametrize("key", list(PADDED))
def test_a_pad_token_id_past_the_rows_held_does_not_break_the_embedding(key, tmp_path):
    """The default static scheme, streamed (default propagation, then float propagation, which must equal the
    in-memory prepare/convert bit for bit) on a config with a pad id; the checkpoint loads back."""
    from tico.experimental.quantization.run.schemes import build_config

    spec = ARCHITECTURES[key]
    config = spec.config_cls(**{**spec.config_kwargs, **PADDED[key]})
    torch.manual_seed(0)
    model = spec.model_cls._from_config(config, dtype=torch.float32).eval()
    assert model.get_input_embeddings().padding_idx == config.pad_token_id  # the case under test
    src = _save(model, tmp_path / "src")
    batches = _batches(key)
    batches[0][0, -4:] = config.pad_token_id  # padded calibration text: the pad row is among the rows held
    scheme = build_config("w8a8-static")
    quantize_checkpoint(src, scheme, batches, tmp_path / "stream")
    loaded = load_compressed(tmp_path / "stream", backend="fake")
    assert sum(isinstance(m, W8A8Linear) for m in loaded.modules()) > 0
    with torch.no_grad():
        assert torch.isfinite(loaded(batches[1]).logits).all()
    quantize_checkpoint(src, scheme, batches, tmp_path / "float", propagate="float")
    _in_memory(src, scheme, batches, tmp_path / "mem")
    _assert_identical(tmp_path / "float", tmp_path / "mem")


def test_a_failed_probe_of_the_pipelines_own_inputs_is_reported_as_internal(tmp_path, monkeypatch):
    """The rest of the model is probed on inputs the pipeline built (token 0, stand-ins): a failure there must
    name the unit and not ask the caller for other inputs."""
    import tico.experimental.quantization.pipeline.rest_pass as rest_pass

    real_prepare = rest_pass.prepare

    def boom(module, args):
        raise ValueError("boom")

    def prepare(unit, config, args=None, kwargs=None):
        if args is None:  # the rest of the model: its LM head fails
            unit.get_output_embeddings().register_forward_pre_hook(boom)
        return real_prepare(unit, config, args=args, kwargs=kwargs)

    monkeypatch.setattr(rest_pass, "prepare", prepare)
    src = _save(build_model("llama"), tmp_path / "src")
    with pytest.raises(RuntimeError) as info:
        quantize_checkpoint(src, W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5)), _batches("llama"), tmp_path / "o")
    message = str(info.value)
    # caught by the preflight on the skeleton, before any block: it names the stage and the cause
    assert "outside model.layers" in message and "LlamaForCausalLM" in message and "boom" in message
    assert "not a problem with the calibration data" in message and "pass inputs" not in message
    assert not (tmp_path / "o").exists()
