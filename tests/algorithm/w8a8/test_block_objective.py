"""block_objective: per decoder block, the candidate recipe (searched smoothing / none) whose quantized block
reproduces the float block's recorded output best.

The candidates are checked independently: "searched" is the same config without ``block_objective``, "unsmoothed"
the same config without smoothing (a fold by 1 changes nothing, so that model's blocks are the candidate's).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_dynamic_fallback import CALIB, EVAL, massive_llama  # noqa: E402

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.w8a8.block_objective import block_output_error
from tico.experimental.quantization.structure.blocks import decoder_blocks
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed
from zoo import build_model, input_ids

SQ = SmoothQuantConfig(alpha="auto", linear_producers=True)
OBJECTIVE = W8A8Config(smoothing=SQ, activations="static", act_range="mse", dynamic_fallback=16.0, block_objective=True,
                       tuning=W8A8Tuning(backend="fake"))
# alpha fixed at 1 moves the massive token of layer 0 into down_proj's weights: there smoothing hurts the block
# (measured: block error 0.2 smoothed vs 0.002 unsmoothed), while layer 1 still gains from it: a mixed choice.
HARSH = OBJECTIVE.with_tuning(alpha_grid=(1.0,))
# dynamic, with fixed-alpha candidates besides "searched" (alpha 1: poor) and "unsmoothed": alpha=0.5 wins a block
ALPHAS = W8A8Config(smoothing=SQ, activations="dynamic", block_objective=True,
                    tuning=W8A8Tuning(block_objective_alphas=(0.5, 0.9), alpha_grid=(1.0,), backend="fake"))


def _models():
    return {"massive_llama": (massive_llama, [CALIB[i:i + 4] for i in range(0, 16, 4)]),
            "zoo_llama": (lambda: build_model("llama"), [input_ids("llama", batch=2, seq=16, seed=s) for s in range(3)]),
            # GPT-2's blocks get the KV cache positionally (calls with use_cache on): recorded without it
            "zoo_gpt2": (lambda: build_model("gpt2"), [input_ids("gpt2", batch=2, seq=16, seed=s) for s in range(3)])}


def _quantize(build, batches, config):
    model = prepare(build(), config)
    quantizer = get_quantizer(model)
    calls = None
    with torch.no_grad():
        for b in batches:
            model(b)
    if quantizer.recorder is not None:
        calls = {k: list(v) for k, v in quantizer.recorder.calls.items()}
    return convert(model), quantizer, calls


def _errors(model, calls) -> dict[str, float]:
    """Each block's error on the recorded calls (token-weighted over calls, as the choice measures it)."""
    out = {}
    with torch.no_grad():
        for block, cs in calls.items():
            module = model.get_submodule(block)
            n = [c.hidden.numel() // c.hidden.shape[-1] for c in cs]
            out[block] = sum(block_output_error(c(module), c.output, c.hidden) * k for c, k in zip(cs, n)) / sum(n)
    return out


@pytest.mark.parametrize("key,config", [("massive_llama", OBJECTIVE), ("massive_llama", HARSH), ("zoo_llama", OBJECTIVE),
                                        ("zoo_gpt2", OBJECTIVE), ("massive_llama", ALPHAS)])
def test_each_block_gets_the_candidate_with_the_smallest_measured_block_output_error(key, config):
    build, batches = _models()[key]
    chosen, quantizer, calls = _quantize(build, batches, config)
    searched, _, _ = _quantize(build, batches, dataclasses.replace(config, block_objective=False))
    unsmoothed, _, _ = _quantize(build, batches, dataclasses.replace(config, block_objective=False, smoothing=None))
    measured = {"searched": _errors(searched, calls), "unsmoothed": _errors(unsmoothed, calls)}
    for a in config.tuning.block_objective_alphas:  # a fixed-alpha candidate is the recipe with that alpha everywhere
        fixed = SmoothQuantConfig(alpha=a, linear_producers=True)
        model, _, _ = _quantize(build, batches, dataclasses.replace(config, block_objective=False, smoothing=fixed))
        measured[f"alpha={a:g}"] = _errors(model, calls)
    final = _errors(chosen, calls)
    report = quantizer.report
    assert set(report.block_errors) == set(calls) == set(decoder_blocks(build()))
    assert all(set(e) == set(measured) for e in report.block_errors.values())
    for block, errors in report.block_errors.items():
        for cand, e in errors.items():  # the reported numbers are the candidates' real block errors
            assert e == pytest.approx(measured[cand][block], rel=1e-4, abs=1e-9), (block, cand)
        best = min(errors, key=errors.get)
        assert report.block_choices[block].startswith(best)
        assert final[block] == pytest.approx(min(errors.values()), rel=1e-4, abs=1e-9)  # the converted block is it
        if best.startswith("alpha="):  # the block's groups report the fixed alpha they got
            groups = [p for p in report.alphas if p.startswith(block + ".")]
            assert groups and all(report.alphas[p] == float(best[6:]) for p in groups)
    if config is ALPHAS:  # the fixed-alpha path is exercised
        assert report.block_choices["model.layers.1"].startswith("alpha=0.5")


def test_choices_are_reported_and_a_harmful_smoothing_is_dropped_where_it_hurts():
    build, batches = _models()["massive_llama"]
    chosen, quantizer, _ = _quantize(build, batches, HARSH)
    searched, _, _ = _quantize(build, batches, dataclasses.replace(HARSH, block_objective=False))
    report = quantizer.report
    assert report.block_choices["model.layers.0"].startswith("unsmoothed")
    assert report.block_choices["model.layers.1"].startswith("searched")
    assert all("searched" in e and "unsmoothed" in e for e in report.block_errors.values())
    assert "model.layers.0: unsmoothed" in report.summary()
    assert not any(p.startswith("model.layers.0.") for p in report.alphas)  # its groups are not smoothed
    assert any(p.startswith("model.layers.1.") for p in report.alphas)
    groups = {g.producer: g for g in quantizer.plan.smoothed}
    assert torch.equal(groups["model.layers.0.post_attention_layernorm"].scales,
                       torch.ones_like(groups["model.layers.0.post_attention_layernorm"].scales))
    kl_chosen = logit_fidelity(chosen, massive_llama(), EVAL).kl
    kl_searched = logit_fidelity(searched, massive_llama(), EVAL).kl
    assert kl_chosen < kl_searched, (kl_chosen, kl_searched)


def test_chosen_recipe_exports_and_reloads(tmp_path):
    build, batches = _models()["massive_llama"]
    model, quantizer, _ = _quantize(build, batches, HARSH.with_tuning(backend="int8"))
    assert any(v.startswith("unsmoothed") for v in quantizer.report.block_choices.values())
    save_compressed(model, tmp_path)
    reloaded = load_compressed(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(EVAL).logits, model(EVAL).logits)


def test_recorder_is_bounded_and_a_copy_convert_can_be_repeated():
    build, batches = _models()["massive_llama"]
    model = prepare(build(), HARSH.with_tuning(block_objective_tokens=100))
    quantizer = get_quantizer(model)
    with torch.no_grad():
        for b in batches:
            model(b)
    assert all(len(v) == 1 for v in quantizer.recorder.calls.values())  # one call of 4x32 tokens reaches 100
    first = convert(model, inplace=False)
    choices = dict(quantizer.report.block_errors)
    second = convert(model, inplace=False)  # the original stays prepared, its recorded calls kept
    assert quantizer.report.block_errors == choices
    with torch.no_grad():
        assert torch.equal(first(EVAL[:2]).logits, second(EVAL[:2]).logits)


def test_block_objective_needs_smoothing():
    with pytest.raises(ValueError, match="block_objective"):
        W8A8Config(block_objective=True)
    with pytest.raises(ValueError, match="block_objective_tokens"):
        W8A8Config(smoothing=SQ, block_objective=True, tuning=W8A8Tuning(block_objective_tokens=0))


def test_blocks_that_keep_the_searched_recipe_are_bit_identical_to_the_option_off():
    """The trial forwards leave nothing behind: every block kept "searched" -> the same model as without it."""
    build, batches = _models()["zoo_llama"]
    chosen, quantizer, _ = _quantize(build, batches, OBJECTIVE)
    assert all(v.startswith("searched") for v in quantizer.report.block_choices.values())
    plain, _, _ = _quantize(build, batches, dataclasses.replace(OBJECTIVE, block_objective=False))
    with torch.no_grad():
        assert torch.equal(chosen(batches[0]).logits, plain(batches[0]).logits)


def test_fixed_alpha_candidates_are_validated():
    with pytest.raises(ValueError, match="block_objective_alphas"):
        W8A8Config(smoothing=SQ, block_objective=True, tuning=W8A8Tuning(block_objective_alphas=(1.5,)))
