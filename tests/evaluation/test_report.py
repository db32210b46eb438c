"""``tico-sq report`` shows the decisions ``tico-sq quantize`` takes, on the shared stories260K Llama.

The default w8a8-static recipe has every decision the issue named: searched alphas, blocks the block objective
leaves unsmoothed, layers the dynamic fallback runs per token. Both commands run here with the same options; the
report's per-group decisions must equal what quantize recorded in ``tico_recipe.json``.
"""

from __future__ import annotations

import json

import pytest

from tico.experimental.quantization.cli.main import main

OPTIONS = ["--samples", "4", "--seq-len", "128"]


@pytest.fixture(scope="module")
def both_runs(stories_dir, tinystories_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_vs_quantize")
    common = ["--model", str(stories_dir), "--dataset", str(tinystories_text), *OPTIONS]
    assert main(["quantize", *common, "--output", str(root / "q")]) == 0
    assert main(["report", *common, "--output", str(root / "r")]) == 0
    recipe = json.loads((root / "q" / "tico_recipe.json").read_text())
    rows = json.loads((root / "r" / "outliers.json").read_text())
    return recipe, rows, root / "r"


def test_report_alphas_and_unsmoothed_blocks_equal_quantize(both_runs):
    recipe, rows, _ = both_runs
    shown = {r["producer"]: r["alpha"] for r in rows if r["alpha"] is not None}
    assert shown == recipe["alphas"]  # same groups smoothed, same alphas
    unsmoothed = {b for b, why in recipe["block_choices"].items() if why.startswith("unsmoothed")}
    assert unsmoothed, "the shared model's default run leaves some blocks unsmoothed (the case the issue names)"
    for r in rows:
        if r["block"] in unsmoothed:
            assert r["alpha"] is None and "block objective" in r["decision"]
            assert r["absmax_after"] == r["absmax_before"]  # nothing was divided
    dynamic = {name for name, why in recipe["act_modes"].items() if why.startswith("dynamic")}
    assert {c for r in rows for c in r["dynamic"]} == dynamic & {c for r in rows for c in r["consumers"]}


def test_report_summary_and_plot_names_agree(both_runs):
    _, rows, folder = both_runs
    summary = (folder / "summary.txt").read_text()
    assert "smoothing as applied:" in summary and "the block objective chose no smoothing" in summary
    plots = sorted(folder.glob("outliers_*.png"))
    assert plots
    from tico.experimental.quantization.evaluation.outliers import plot_file, plot_title

    chosen = sorted(rows, key=lambda r: -r["before"]["max_over_median"])[: len(plots)]
    for i, (path, r) in enumerate(zip(plots, chosen)):
        assert path.name == plot_file(i, r)
        consumers = plot_title(r).split("  ")[0].removeprefix("input of ")
        parent, names = consumers.split(": ")
        assert path.name.startswith(f"outliers_{i:02d}_{parent}.") and all(n in path.name for n in names.split(", "))


def test_report_takes_quantizes_recipe_options_and_shows_what_they_decide(stories_dir, tinystories_text, tmp_path):
    """The options that change quantize's decisions are report's options too (they were refused: 'unrecognized')."""
    common = ["--model", str(stories_dir), "--dataset", str(tinystories_text), *OPTIONS, "--alpha", "0.65",
              "--no-block-objective", "--dynamic-fallback", "off", "--ignore", "model.layers.1.mlp.down_proj"]
    assert main(["quantize", *common, "--output", str(tmp_path / "q")]) == 0
    assert main(["report", *common, "--output", str(tmp_path / "r")]) == 0
    recipe = json.loads((tmp_path / "q" / "tico_recipe.json").read_text())
    rows = json.loads((tmp_path / "r" / "outliers.json").read_text())
    shown = {r["producer"]: r["alpha"] for r in rows if r["alpha"] is not None}
    assert shown == recipe["alphas"] and set(shown.values()) == {0.65}
    assert not any(r["dynamic"] for r in rows) and not recipe.get("block_choices")
