"""Configs round-trip through plain data (``to_dict``/``from_dict``), as a recorded ``tico_recipe.json`` does."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tico.experimental.quantization.config.base import BaseConfig
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

FULL = SmoothQuantConfig(
    alpha=0.65,
    custom_alpha_map={"model.layers.0": 0.3, "re:.*\\.mlp": 0.8},
    acts_from="output",
    linear_producers=True,
    mappings=[("re:.*input_layernorm", ["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"]),
              ("model.layers.0.post_attention_layernorm", "model.layers.0.mlp.up_proj")],
)


def through_json(config: BaseConfig) -> dict:
    return json.loads(json.dumps(config.to_dict()))


@pytest.mark.parametrize("config", [SmoothQuantConfig(), SmoothQuantConfig(alpha="auto"), FULL])
def test_smoothquant_config_round_trips(config):
    back = SmoothQuantConfig.from_dict(through_json(config))
    assert back == config and hash(back) == hash(config)


def test_mappings_are_normalised_to_tuples():
    assert FULL.mappings == (
        ("re:.*input_layernorm", ("re:.*q_proj", "re:.*k_proj", "re:.*v_proj")),
        ("model.layers.0.post_attention_layernorm", ("model.layers.0.mlp.up_proj",)),
    )


def test_unknown_key_is_refused_by_name():
    data = through_json(FULL) | {"alpah": 0.5}
    with pytest.raises(ValueError, match=r"SmoothQuantConfig.from_dict: unknown key 'alpah'"):
        SmoothQuantConfig.from_dict(data)


def test_values_are_validated_when_read_back():
    with pytest.raises(ValueError, match=r"custom_alpha_map\['model.layers.0'\]"):
        SmoothQuantConfig.from_dict({"custom_alpha_map": {"model.layers.0": 2.0}})
    with pytest.raises(ValueError, match=r"mappings\[0\] must be a \(producer, consumers\) pair"):
        SmoothQuantConfig.from_dict({"mappings": [["re:.*norm"]]})


@dataclass(frozen=True)
class Outer(BaseConfig):
    """A config holding another one and a tuple, as W8A8Config does."""

    smoothing: SmoothQuantConfig | None = None
    ignore: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "outer"


def test_nested_configs_and_tuples_round_trip():
    config = Outer(smoothing=FULL, ignore=("lm_head", "re:.*gate"))
    data = through_json(config)
    assert data["smoothing"]["mappings"][1] == ["model.layers.0.post_attention_layernorm", ["model.layers.0.mlp.up_proj"]]
    assert Outer.from_dict(data) == config
    assert Outer.from_dict({"smoothing": None}) == Outer()
    with pytest.raises(ValueError, match=r"unknown key 'alhpa'"):
        Outer.from_dict({"smoothing": {"alhpa": 0.5}})
