"""The one module-name matcher: exact names, ``re:`` patterns, covering what is inside, unmatched keys."""

from __future__ import annotations

import pytest

from tico.experimental.quantization.structure import names

MODULES = ["", "model", "model.layers", "model.layers.0", "model.layers.0.mlp", "model.layers.0.mlp.up_proj",
           "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.10.mlp.up_proj"]


def test_exact_name_matches_itself_and_with_inside_what_it_contains():
    assert names.matches("model.layers.0.mlp", "model.layers.0.mlp")
    assert not names.matches("model.layers.0", "model.layers.0.mlp.up_proj")
    assert names.matches("model.layers.0", "model.layers.0.mlp.up_proj", inside=True)
    assert not names.matches("model.layers.1", "model.layers.10.mlp.up_proj", inside=True)  # dotted boundary
    assert names.matches("", "model.layers.0", inside=True)  # the model covers everything


def test_pattern_matches_whole_names_and_with_inside_enclosing_modules():
    assert names.select(["re:.*\\.up_proj"], MODULES) == [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.10.mlp.up_proj"]
    assert not names.matches("re:up_proj", "model.layers.0.mlp.up_proj")  # not a search: the whole name
    assert names.matches("re:model\\.layers\\.0\\.mlp", "model.layers.0.mlp.up_proj", inside=True)
    assert not names.matches("re:model\\.layers\\.0\\.mlp", "model.layers.0.self_attn.q_proj", inside=True)


def test_unmatched_names_the_keys_that_match_nothing():
    keys = ["model.layers.0.mlp", "model.layers.9", "re:.*k_proj", "re:.*q_proj"]
    assert names.unmatched(keys, MODULES) == ["model.layers.9", "re:.*k_proj"]


def test_most_specific_prefers_exact_names_then_the_longest_then_the_first_pattern():
    up = ["model.layers.0.mlp.up_proj"]
    assert names.most_specific(["model.layers.0", "model.layers.0.mlp", "re:.*up_proj"], up) == "model.layers.0.mlp"
    assert names.most_specific(["re:.*mlp", "re:.*up_proj"], up) == "re:.*mlp"
    assert names.most_specific(["model.layers.1"], up) is None


def test_check_keys_names_a_bad_pattern_and_a_non_string():
    with pytest.raises(ValueError, match=r"ignore: 're:\(' is not a valid regular expression"):
        names.check_keys(["re:("], "ignore")
    with pytest.raises(ValueError, match=r"ignore: module names must be strings, got 3"):
        names.check_keys([3], "ignore")
