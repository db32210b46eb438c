"""Fail in seconds, not at the end: a stage after the blocks that would fail (the rest-of-model pass, the
export of a layer kind, the names the loaders expect) fails before any block is calibrated, names the cause
and leaves no output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.pipeline import quantize_checkpoint
from tico.experimental.quantization.pipeline.preflight import PreflightError
from zoo import ARCHITECTURES, build_model, input_ids

STATIC = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), activations="static")


def _batches(key: str) -> list[torch.Tensor]:
    return [input_ids(key, batch=2, seq=16, seed=s) for s in range(2)]


def _save(model: nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture
def calibrated(monkeypatch) -> list[str]:
    """The blocks prepared for calibration, in order (a block's prepare gets its probe as ``args``)."""
    import tico.experimental.quantization.pipeline.block_pass as block_pass

    seen: list[str] = []
    real = block_pass.prepare

    def prepare(unit, config, args=None, kwargs=None):
        seen.append(unit.target)
        return real(unit, config, args=args, kwargs=kwargs)

    monkeypatch.setattr(block_pass, "prepare", prepare)
    return seen


def test_a_pad_id_past_the_vocabulary_stand_in_fails_before_any_block(tmp_path, monkeypatch, calibrated):
    """The real failure: a Llama config with ``pad_token_id=2`` failed after every block ("Padding_idx must be
    within num_embeddings": the one-row stand-in of the embedding). The stand-in is made to keep the pad id, as
    it did, whatever vocab.py does now: the preflight must stop the run first."""
    import tico.experimental.quantization.pipeline.vocab as vocab

    spec = ARCHITECTURES["llama"]
    config = spec.config_cls(**{**spec.config_kwargs, "pad_token_id": 2})
    torch.manual_seed(0)
    src = _save(spec.model_cls._from_config(config, dtype=torch.float32).eval(), tmp_path / "src")
    real_install = vocab.Passthrough.install

    def install(self, model, device):
        real_install(self, model, device)
        for name in self.names:
            module = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, nn.Embedding):
                module.padding_idx = 2  # what the unfixed stand-in kept

    monkeypatch.setattr(vocab.Passthrough, "install", install)
    with pytest.raises(PreflightError) as info:
        quantize_checkpoint(src, STATIC, _batches("llama"), tmp_path / "out")
    message = str(info.value)
    assert "rest-of-model pass" in message and "Padding_idx" in message
    assert "not a problem with the calibration data" in message and "pass inputs" not in message
    assert calibrated == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_rest_of_model_convert_failure_fails_before_any_block(tmp_path, monkeypatch, calibrated):
    import tico.experimental.quantization.pipeline.rest_pass as rest_pass

    def convert(model):
        raise RuntimeError("the LM head cannot be converted")

    monkeypatch.setattr(rest_pass, "convert", convert)
    src = _save(build_model("llama"), tmp_path / "src")
    with pytest.raises(PreflightError, match="rest-of-model pass.*the LM head cannot be converted"):
        quantize_checkpoint(src, STATIC, _batches("llama"), None)
    assert calibrated == []


def test_an_export_failure_of_a_layer_kind_fails_before_any_weight_is_read(tmp_path, monkeypatch, calibrated):
    """Only static layers fail to export (as a format version without per-tensor activations would): the run
    stops on the skeleton, before the capture reads a weight, naming the layer's scheme problem."""
    import tico.experimental.quantization.pipeline.preflight as preflight
    import tico.experimental.quantization.pipeline.stream as stream

    real_scheme = preflight.layer_scheme

    def layer_scheme(layer):
        scheme = real_scheme(layer)
        if not scheme[2]:
            raise ValueError("static per-tensor activations cannot be written")
        return scheme

    captured = []
    monkeypatch.setattr(preflight, "layer_scheme", layer_scheme)
    monkeypatch.setattr(stream, "capture_block_inputs", lambda *a: captured.append(1))
    src = _save(build_model("llama"), tmp_path / "src")
    with pytest.raises(PreflightError, match="compressed-tensors export.*static per-tensor activations cannot be written"):
        quantize_checkpoint(src, STATIC, _batches("llama"), tmp_path / "out")
    assert captured == [] and calibrated == []
    assert not (tmp_path / "out").exists()


def test_every_activation_mode_the_run_may_produce_is_exported_first(tmp_path, monkeypatch):
    """With ``dynamic_fallback`` a static layer may turn dynamic: both schemes (and their mix) are built."""
    import tico.experimental.quantization.pipeline.preflight as preflight

    seen: list[set] = []
    real_build = preflight.build_quantization_config
    monkeypatch.setattr(preflight, "build_quantization_config",
                        lambda schemes, ignore: seen.append(set(schemes.values())) or real_build(schemes, ignore))
    src = _save(build_model("llama"), tmp_path / "src")
    config = W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), activations="static", dynamic_fallback=16.0)
    with pytest.raises(KeyboardInterrupt):  # stop after the preflight: only its export is of interest here
        quantize_checkpoint(src, config, _batches("llama"), tmp_path / "out", on_block=_interrupt)
    assert {("channel", "tensor", False), ("channel", "token", True)} in seen


def _interrupt(index: int) -> None:
    raise KeyboardInterrupt


def test_a_conv1d_layout_the_loaders_cannot_read_is_refused_before_any_block(tmp_path, calibrated, monkeypatch):
    """GPT-2's Conv1D holds ``[in, out]`` and the export keeps that layout (what its loaders read); a layer that
    would be written as ``[out, in]`` instead is refused on the skeleton, naming the layer and its kind."""
    from tico.experimental.quantization.algorithm.w8a8 import scope

    src = _save(build_model("gpt2"), tmp_path / "src")
    monkeypatch.setattr(scope, "linear_output_axis", lambda module: 0)  # as if the export forgot Conv1D's layout
    with pytest.raises(PreflightError, match=r"transformer\.h\.0\.attn\.c_attn\.weight \(Conv1D\) would be written as"):
        quantize_checkpoint(src, STATIC, _batches("gpt2"), tmp_path / "out")
    assert calibrated == [] and not (tmp_path / "out").exists()
    monkeypatch.undo()
    quantize_checkpoint(src, STATIC, _batches("gpt2"), tmp_path / "out")  # the real layout passes and is written
    assert (tmp_path / "out" / "config.json").is_file()


def test_conv1d_streamed_unwritten_equals_in_memory(tmp_path):
    """What is refused is the writing: measured without writing, the streamed GPT-2 decides what the
    in-memory prepare/convert decides (layers, float layers, alphas, static ranges, bit for bit)."""
    src = _save(build_model("gpt2"), tmp_path / "src")
    batches = _batches("gpt2")
    result = quantize_checkpoint(src, STATIC, batches, None, propagate="float")
    model = prepare(AutoModelForCausalLM.from_pretrained(src), STATIC)
    quantizer = get_quantizer(model)
    with torch.no_grad():
        for b in batches:
            model(b)
    convert(model)
    ours, theirs = result.report, quantizer.report
    assert sorted(ours.quantized) == sorted(theirs.quantized) and ours.kept_float == theirs.kept_float
    assert ours.alphas == theirs.alphas and ours.act_ranges == theirs.act_ranges and ours.act_ranges
