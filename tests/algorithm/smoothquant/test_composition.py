"""SmoothQuant's public composition API: plan_scales -> validate -> apply (its convert is exactly these three)."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.smoothquant import SmoothQuantError
from tico.experimental.quantization.algorithm.smoothquant import scales as scales_module
from tico.experimental.quantization.algorithm.smoothquant.quantizer import SmoothQuantQuantizer
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.quantizer import Transaction
from zoo import build_model, input_ids


def calibrated(key="llama", config=None, dtype=torch.float32):
    model = prepare(build_model(key, dtype=dtype), config or SmoothQuantConfig(linear_producers=True))
    with torch.no_grad():
        model(input_ids(key, batch=2, seq=12))
    return model


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("key", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_smoothed_parameter_previews_apply_bit_for_bit(key, dtype):
    model = calibrated(key, dtype=dtype)
    quantizer = get_quantizer(model)
    plan = quantizer.plan_scales(model)
    assert quantizer.validate(model, plan) == []
    preview = {n: quantizer.smoothed_parameter(model, plan, n) for n, _ in model.named_parameters()}
    before = params(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # previewing changed nothing
    with Transaction() as tx:
        quantizer.apply(model, plan, tx)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # something was smoothed, and every parameter is exactly as previewed
    assert all(torch.equal(p, preview[n]) for n, p in model.named_parameters())


def test_convert_is_plan_validate_apply():
    a, b = calibrated(), calibrated()
    convert(a)
    quantizer = get_quantizer(b)
    plan = quantizer.plan_scales(b)
    quantizer.fail(b, quantizer.validate(b, plan))
    with Transaction() as tx:
        quantizer.apply(b, plan, tx)
    assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in a.named_parameters())
    assert [g.alpha for g in quantizer.plan.smoothed] == list(plan.alphas.values())


def test_alphas_chosen_by_a_caller_replace_the_configs():
    model = calibrated()
    quantizer = get_quantizer(model)
    first = quantizer.plan.smoothed[0].producer
    plan = quantizer.plan_scales(model, alphas={first: 0.9})
    assert plan.alphas[first] == 0.9 and all(a == 0.5 for p, a in plan.alphas.items() if p != first)
    assert torch.equal(plan.scales[first], quantizer.scales_for(model, quantizer.plan.smoothed[0])(0.9))
    assert quantizer.plan.smoothed[0].alpha == 0.5  # planning records nothing in the groups


def test_bad_alphas_are_plan_errors():
    model = calibrated()
    quantizer = get_quantizer(model)
    plan = quantizer.plan_scales(model, alphas={"model.norm": 0.3, quantizer.plan.smoothed[0].producer: 1.5})
    errors = quantizer.validate(model, plan)
    assert any("not smoothed groups: ['model.norm']" in e for e in errors)
    assert any("alpha must be in [0, 1], got 1.5" in e for e in errors)


def test_auto_alpha_needs_every_group_chosen():
    model = build_model("llama")
    quantizer = SmoothQuantQuantizer(SmoothQuantConfig(alpha="auto"))
    quantizer.discover(model)
    quantizer.attach(model)
    with torch.no_grad():
        model(input_ids("llama"))
    quantizer.detach(model)
    chosen = {quantizer.plan.smoothed[0].producer: 0.4}
    errors = quantizer.validate(model, quantizer.plan_scales(model, alphas=chosen))
    missing = [g.producer for g in quantizer.plan.smoothed[1:]]
    assert errors == [f'alpha="auto" but no alpha was chosen for {missing}']
    all_chosen = {g.producer: 0.4 for g in quantizer.plan.smoothed}
    assert quantizer.validate(model, quantizer.plan_scales(model, alphas=all_chosen)) == []


def test_a_fault_during_the_folds_restores_every_weight(monkeypatch):
    model = calibrated()
    before = params(model)
    calls = {"n": 0}
    original = scales_module.scale_input_channels

    def fail_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected")
        original(*args, **kwargs)

    monkeypatch.setattr(scales_module, "scale_input_channels", fail_on_fifth)
    with pytest.raises(RuntimeError, match="injected"):
        convert(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(g.scales is None for g in get_quantizer(model).plan.smoothed)
    monkeypatch.undo()
    assert get_quantizer(model) is not None  # still prepared: convert can be retried
    convert(model)
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_probe_output_names_the_module(value):
    """Used to surface as ``RuntimeError: atol must be greater than or equal to zero`` (NaN) or pass silently (inf)."""
    model = build_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = value
    with pytest.raises(SmoothQuantError, match=r"model\.layers\.1\.post_attention_layernorm: its output on the probe input is NaN/inf"):
        prepare(model, SmoothQuantConfig())
    assert "_tico_quantizer" not in model.__dict__
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
