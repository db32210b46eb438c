"""W8A8Config: the recipe and its tuning, validated, round-tripping through plain dicts, and saying if it exports."""

from __future__ import annotations

import json

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning, first_unexportable_option
from tico.experimental.quantization.run.schemes import config_to_dict
from zoo import build_model, input_ids

RICH = W8A8Config(
    smoothing=SmoothQuantConfig(alpha="auto", custom_alpha_map={"model.layers.0": 0.3}, linear_producers=True),
    weights="per_tensor", activations="static", act_range="percentile", dynamic_fallback=16.0, block_objective=True,
    quantize_embeddings=True, ignore=("lm_head",), quantize_lm_head=False,
    tuning=W8A8Tuning(backend="fake", percentile=99.9, alpha_grid=(0.25, 0.5), calibration_rows=64,
                      block_objective_tokens=32, block_objective_alphas=(0.5,), smooth_in_quantizer=True,
                      rotate_in_quantizer=("down_proj",), quantize_attention=True),
)


@pytest.mark.parametrize("config", [W8A8Config(), RICH, W8A8Config(smoothing=SmoothQuantConfig(alpha=0.7))])
def test_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert W8A8Config.from_dict(data) == config
    assert W8A8Config.from_dict(config_to_dict(config)) == config  # the recipe file's form ("type" keys)


def test_from_dict_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown key .rotate"):
        W8A8Config.from_dict({"rotate": ["all"]})
    with pytest.raises(ValueError, match="unknown key .alpha_objective"):
        W8A8Config.from_dict({"tuning": {"alpha_objective": "absolute"}})
    with pytest.raises(ValueError, match="describes a SmoothQuantConfig"):
        W8A8Config.from_dict({"type": "SmoothQuantConfig"})
    with pytest.raises(ValueError, match="act_range"):
        W8A8Config.from_dict({"act_range": "minmax"})
    assert W8A8Config.from_dict({}) == W8A8Config()


def test_exportable_names_every_option_the_format_cannot_hold():
    assert W8A8Config().exportable and first_unexportable_option(W8A8Config()) is None
    plain = W8A8Config(smoothing=SmoothQuantConfig(alpha="auto"), activations="static", dynamic_fallback=16.0,
                       block_objective=True, tuning=W8A8Tuning(backend="fake", alpha_grid=(0.5,)))
    assert plain.exportable
    assert RICH.unexportable_options() == ["tuning.smooth_in_quantizer", "tuning.rotate_in_quantizer",
                                           "tuning.quantize_attention", "quantize_embeddings"]
    for option in RICH.unexportable_options():
        field = option.removeprefix("tuning.")
        if field != option:
            config = W8A8Config().with_tuning(**{field: getattr(RICH.tuning, field)})
        else:
            config = W8A8Config(**{field: True})
        assert not config.exportable and first_unexportable_option(config) == option


def test_tuning_is_frozen_and_replaced_as_a_whole():
    config = W8A8Config(tuning=W8A8Tuning(rotate_in_quantizer="all"))
    assert config.tuning.rotate_in_quantizer == ("all",)
    with pytest.raises(Exception):
        config.tuning.backend = "fake"  # type: ignore[misc]
    assert config.with_tuning(backend="fake").tuning == W8A8Tuning(backend="fake", rotate_in_quantizer=("all",))


def test_absmax_on_a_rotated_input_is_planned_as_mse_and_said_so():
    model = prepare(build_model("llama"), W8A8Config(activations="static", act_range="absmax",
                                                     tuning=W8A8Tuning(rotate_in_quantizer=("down_proj",))))
    quantizer = get_quantizer(model)
    with torch.no_grad():
        model(input_ids("llama"))
    convert(model)
    notes = quantizer.report.notes
    rotated = [n for n in quantizer.targets if n.endswith("down_proj")]
    assert rotated and set(notes) == set(rotated)
    assert all("planned as 'mse'" in why for why in notes.values())
    assert all(name in quantizer.report.summary() for name in rotated)


def test_merged_report_keeps_every_part():
    a = W8A8Report(quantized=["x"], alphas={"p": 0.5}, act_ranges={"x": 1.0}, notes={"x": "n"}, block_objective_s=1.0)
    b = W8A8Report(quantized=["y"], kept_float={"z": "why"}, act_modes={"y": "dynamic"}, block_objective_s=2.0)
    m = W8A8Report.merged([a, b])
    assert m.quantized == ["x", "y"] and m.kept_float == {"z": "why"} and m.alphas == {"p": 0.5}
    assert m.act_ranges == {"x": 1.0} and m.act_modes == {"y": "dynamic"} and m.notes == {"x": "n"}
    assert m.block_objective_s == 3.0
