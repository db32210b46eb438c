"""tico_recipe.json read back: every scheme's config round-trips, and a bad file is named."""

from __future__ import annotations

import json

import pytest

from tico.experimental.quantization.run.recipe import RecipeError, config_from_dict, read_recipe
from tico.experimental.quantization.run.schemes import build_config, config_to_dict


@pytest.mark.parametrize("scheme", ["smooth", "w8a8-dynamic", "w8a8-static"])
def test_every_scheme_config_round_trips(scheme):
    config = build_config(scheme, ignore=() if scheme == "smooth" else ("model.layers.0.mlp",))
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_read_recipe_returns_the_config_and_the_options_that_repeat_the_run(tmp_path):
    config = build_config("w8a8-dynamic", alpha=0.6)
    (tmp_path / "tico_recipe.json").write_text(json.dumps({
        "config": config_to_dict(config),
        "options": {"model": "/m", "scheme": "w8a8-dynamic", "rotate": "none", "streamed": True, "batch_size": 2},
        "calibration": {"dataset": "/t.txt", "windows": 8, "seq_len": 64, "split": None},
    }))
    recipe = read_recipe(tmp_path)  # the folder or the file
    assert recipe.config == config
    assert recipe.options == {"model": "/m", "scheme": "w8a8-dynamic", "rotate": "none", "streaming": True,
                              "batch_size": 2, "dataset": "/t.txt", "samples": 8, "seq_len": 64}


@pytest.mark.parametrize("recorded, replayed", [
    ("spread", "spread"), ("first", "first"), ("random", "random"),
    ("the first windows of the text's token stream (one BOS at its start)", "first"),  # written before spreading
    (None, None), ("something else", None),
])
def test_a_replay_takes_the_recorded_runs_calibration_windows(recorded, replayed, tmp_path):
    calibration = {"dataset": "/t.txt", "windows": 8, "seq_len": 64, "selection": recorded}
    (tmp_path / "tico_recipe.json").write_text(json.dumps({"config": config_to_dict(build_config("w8a8-static")),
                                                           "calibration": calibration}))
    assert read_recipe(tmp_path).options.get("calibration_selection") == replayed


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("not json", "cannot be read"),
    ('{"options": {}}', "has no 'config'"),
    ('{"config": {"type": "W8A8Config", "no_such_field": 1}}', "no_such_field"),
    ('{"config": {"type": "NoSuchConfig"}}', "NoSuchConfig"),
])
def test_a_bad_recipe_is_named(content, needle, tmp_path):
    path = tmp_path / "tico_recipe.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError, match=needle) as exc:
        read_recipe(path)
    assert str(path) in str(exc.value)
