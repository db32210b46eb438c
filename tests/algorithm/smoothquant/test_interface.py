"""The public interface: config validation, bad input, transactions, inplace, dtypes, saving."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.smoothquant import SmoothQuantError
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "variance_epsilon"):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.weight[3] *= 8  # an outlier channel
    return model.to(dtype)


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def calibrated(model, config=None, **kw):
    model = prepare(model, config or SmoothQuantConfig(), **kw)
    with torch.no_grad():
        model(IDS)
    return model


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_params(model, saved):
    return all(torch.equal(p, saved[n]) for n, p in model.named_parameters())


def no_hooks(model):
    return not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# -- config ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf, "0.5", True, None])
def test_bad_alpha_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=alpha)


def test_bad_config_fields_rejected():
    with pytest.raises(ValueError, match="acts_from"):
        SmoothQuantConfig(acts_from="middle")
    with pytest.raises(ValueError, match=r"custom_alpha_map\['model.layers.0'\]"):
        SmoothQuantConfig(custom_alpha_map={"model.layers.0": 2.0})
    with pytest.raises(ValueError, match="mapping"):
        SmoothQuantConfig(custom_alpha_map=[("model.layers.0", 0.5)])


def test_config_copies_the_callers_map():
    amap = {"model.layers.0": 0.3}
    config = SmoothQuantConfig(custom_alpha_map=amap)
    amap["model.layers.0"] = 0.9
    assert config.custom_alpha_map == {"model.layers.0": 0.3}


# -- custom_alpha_map --------------------------------------------------------------------------------------
def test_custom_alpha_map_most_specific_name_wins():
    config = SmoothQuantConfig(
        alpha=0.5,
        custom_alpha_map={
            "model.layers.0": 0.8,
            "model.layers.0.mlp": 0.3,
            "model.layers.1.self_attn.q_proj": 0.1,
            "model.layers.1.post_attention_layernorm": 0.9,
        },
    )
    model = prepare(tiny_llama(), config)
    alphas = {g.producer: g.alpha for g in get_quantizer(model).plan.smoothed}
    assert alphas == {
        "model.layers.0.input_layernorm": 0.8,
        "model.layers.0.post_attention_layernorm": 0.3,  # the mlp entry is more specific than the block
        "model.layers.1.input_layernorm": 0.1,  # named through one of its consumers
        "model.layers.1.post_attention_layernorm": 0.9,
    }


def test_custom_alpha_map_unknown_names_are_listed_and_model_untouched():
    model = tiny_llama()
    saved = params(model)
    with pytest.raises(SmoothQuantError, match=r"not modules.*'model.layers.9'.*'mlp'"):
        prepare(model, SmoothQuantConfig(custom_alpha_map={"model.layers.9": 0.4, "mlp": 0.2}))
    with pytest.raises(SmoothQuantError, match=r"no smoothed group.*'model.layers.0.self_attn.o_proj'"):
        prepare(model, SmoothQuantConfig(custom_alpha_map={"model.layers.0.self_attn.o_proj": 0.4}))
    assert same_params(model, saved) and no_hooks(model) and "_tico_quantizer" not in model.__dict__


def test_alpha_changes_the_scales():
    scales = []
    for alpha in (0.2, 0.8):
        model = convert(calibrated(tiny_llama(), SmoothQuantConfig(alpha=alpha)))
        scales.append(model.model.layers[0].input_layernorm.weight.clone())
    assert not torch.allclose(scales[0], scales[1])


# -- transactions ------------------------------------------------------------------------------------------
def test_convert_without_calibration_raises_and_leaves_model_prepared():
    model = prepare(tiny_llama(), SmoothQuantConfig())
    saved = params(model)
    with pytest.raises(SmoothQuantError, match="no calibration forward"):
        convert(model)
    assert same_params(model, saved)
    with torch.no_grad():
        model(IDS)  # still prepared: calibrate and convert now works
    assert no_hooks(convert(model))


def test_nan_statistics_name_the_module_and_change_nothing():
    model = calibrated(tiny_llama())
    quantizer = get_quantizer(model)
    group = quantizer.plan.smoothed[2]
    quantizer.observers[group.producer].absmax[5] = float("nan")
    saved = params(model)
    with pytest.raises(SmoothQuantError, match=rf"{group.producer}.*NaN/inf in channels \[5\]"):
        convert(model)
    assert same_params(model, saved)


def test_wrong_shape_statistics_are_reported():
    model = calibrated(tiny_llama())
    quantizer = get_quantizer(model)
    quantizer.observers[quantizer.plan.smoothed[0].producer].observe(torch.randn(3, 7))  # e.g. a custom forward
    with pytest.raises(SmoothQuantError, match=r"shape \[3, 7\], expected 32 channels"):
        convert(model)


def test_overflow_in_half_precision_is_refused():
    model = calibrated(tiny_llama(torch.float16))
    quantizer = get_quantizer(model)
    quantizer.observers["model.layers.0.input_layernorm"].absmax.fill_(1e30)
    saved = params(model)
    with pytest.raises(SmoothQuantError, match="overflow torch.float16"):
        convert(model)
    assert same_params(model, saved)


def test_prepare_twice_and_convert_unprepared_are_errors():
    model = prepare(tiny_llama(), SmoothQuantConfig())
    with pytest.raises(RuntimeError, match="already prepared"):
        prepare(model, SmoothQuantConfig())
    with pytest.raises(RuntimeError, match="has not been prepared"):
        convert(tiny_llama())


def test_model_without_vocab_needs_example_inputs():
    with pytest.raises(ValueError, match="pass example inputs"):
        prepare(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)), SmoothQuantConfig())
    model = prepare(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)), SmoothQuantConfig(),
                    args=(torch.randn(2, 4),))
    assert [g.producer for g in get_quantizer(model).plan.smoothed] == ["0"]



def test_a_failed_probe_blames_the_inputs_only_when_the_caller_gave_them():
    def boom(module, args):
        raise ValueError("boom")

    model = tiny_llama()
    model.get_output_embeddings().register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="LlamaForCausalLM failed on its default probe inputs") as own:
        prepare(model, SmoothQuantConfig())
    assert "ValueError: boom" in str(own.value) and "pass inputs the model accepts" not in str(own.value)
    with pytest.raises(RuntimeError, match=r"failed on the given inputs \(ValueError: boom\); pass inputs the model accepts"):
        prepare(model, SmoothQuantConfig(), args=(IDS,))

# -- equivalence, inplace, dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("acts_from", ["input", "output"])
def test_llama_equivalent_and_clean(acts_from, caplog):
    model = tiny_llama()
    ref = logits(model)
    with caplog.at_level(logging.INFO, logger="tico"):
        out_model = convert(calibrated(model, SmoothQuantConfig(acts_from=acts_from)))
    assert out_model is model and type(out_model) is LlamaForCausalLM
    assert float((logits(out_model) - ref).abs().max() / ref.abs().max()) < 1e-5
    assert no_hooks(out_model) and "_tico_quantizer" not in out_model.__dict__
    assert "model.layers.1: smoothed input_layernorm -> [self_attn.k_proj, self_attn.q_proj, self_attn.v_proj]" in caplog.text


def test_input_and_output_statistics_agree_for_norms():
    scales = []
    for acts_from in ("input", "output"):
        model = calibrated(tiny_llama(), SmoothQuantConfig(acts_from=acts_from))
        quantizer = get_quantizer(model)
        assert {g.observe.where for g in quantizer.plan.smoothed} == {acts_from}
        convert(model)
        scales.append(torch.cat([g.scales for g in quantizer.plan.smoothed]))
    assert torch.equal(scales[0], scales[1])


def test_prepare_not_inplace_leaves_the_original_untouched():
    model = tiny_llama()
    saved = params(model)
    prepared = calibrated(model, inplace=False)
    assert prepared is not model and no_hooks(model) and "_tico_quantizer" not in model.__dict__
    convert(prepared)
    assert same_params(model, saved)


def test_convert_not_inplace_keeps_the_prepared_model():
    model = calibrated(tiny_llama())
    saved = params(model)
    converted = convert(model, inplace=False)
    assert converted is not model and no_hooks(converted) and "_tico_quantizer" not in converted.__dict__
    assert same_params(model, saved) and not no_hooks(model)  # still prepared, observers attached
    assert not torch.equal(converted.model.layers[0].input_layernorm.weight, saved["model.layers.0.input_layernorm.weight"])
    again = convert(model)  # the original can still be converted with the same statistics
    assert torch.equal(again.model.layers[0].input_layernorm.weight, converted.model.layers[0].input_layernorm.weight)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_models_stay_in_dtype_and_close(dtype, tol):
    model = tiny_llama(dtype)
    ref = logits(model)
    model = convert(calibrated(model))
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert float((logits(model) - ref).abs().max() / ref.abs().max()) < tol


def test_save_pretrained_generate_and_reload(tmp_path):
    model = convert(calibrated(tiny_llama()))
    ref = logits(model)
    generated = model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is LlamaForCausalLM
    assert torch.equal(logits(reloaded), ref)


def test_auto_alpha_needs_a_quantizer_to_score_against():
    config = SmoothQuantConfig(alpha="auto")
    assert config.alpha_is_auto
    with pytest.raises(ValueError, match="W8A8Config"):
        prepare(tiny_llama(), config)
