"""W8A8 convert is all-or-nothing: a failure anywhere leaves the model exactly as prepared, and a retry works.

"Exactly" is checked on everything convert may touch: every parameter and buffer (bit for bit), which module
object sits at every name, the hooks, the attention implementation and per-module attention state, and the
quantizer's own record (smoothing plan alphas/scales, report).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.w8a8 import attention
from tico.experimental.quantization.algorithm.w8a8 import apply
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.nn.embedding import Int8Embedding
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.quantizer import QuantizationError, Transaction
from zoo import build_model, input_ids

IDS = input_ids("llama", batch=4, seq=16)

# Every apply step has something to do with this config: folds (norms and v_proj/up_proj), layer swaps
# (plain, in-quantizer smoothing, rotated), the int8 embedding and the attention scales.
FULL = W8A8Config(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True), activations="static",
                  quantize_embeddings=True,
                  tuning=W8A8Tuning(smooth_in_quantizer=True, rotate_in_quantizer=("down_proj",),
                                    quantize_attention=True, backend="fake", alpha_grid=(0.3, 0.5, 0.8),
                                    calibration_rows=128))
APPLY_STEPS = ("fold_smoothing", "swap_layers", "swap_embeddings", "fix_attention_scales")


def calibrated(config=FULL, dtype=torch.float32, model=None):
    model = prepare(model if model is not None else build_model("llama", dtype=dtype), config)
    with torch.no_grad():
        model(IDS)
        model(IDS.flip(0))
    return model


def snapshot(model) -> dict:
    """Everything convert may change, copied."""
    quantizer = get_quantizer(model)
    states = {}
    for name in quantizer.attention_modules:
        s = getattr(model.get_submodule(name), attention.STATE_ATTR)
        states[name] = (dict(s.absmax), s.scales)
    plan = quantizer.plan
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "modules": {n: m for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
        "attn_impl": model.config._attn_implementation,
        "attn_state": states,
        "groups": [] if plan is None else [(g.alpha, g.scales) for g in plan.groups],
        "report": copy.deepcopy(quantizer.report),
    }


def assert_unchanged(model, before: dict, record: bool = True) -> None:
    """``record``: also the quantizer's plan and report (a converted *copy* records its result there)."""
    after = snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][n] is m for n, m in before["modules"].items())
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(after["tensors"][k], v)]
    assert not changed, changed
    assert after["hooks"] == before["hooks"] and any(h != (0, 0) for h in after["hooks"].values())
    assert after["attn_impl"] == before["attn_impl"] == attention.ATTN_NAME
    assert after["attn_state"] == before["attn_state"]
    assert all(scales is None for _, scales in after["attn_state"].values())
    if record:
        assert after["groups"] == before["groups"]
        assert after["report"] == before["report"]
    assert not any(isinstance(m, (W8A8Linear, Int8Embedding)) for m in model.modules())


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def reference_logits():
    """What an undisturbed convert of the same calibrated model gives."""
    return logits(convert(calibrated()))


@pytest.mark.parametrize("step", APPLY_STEPS)
def test_fault_after_each_apply_step_restores_everything_and_retry_works(step, monkeypatch, reference_logits):
    model = calibrated()
    before = snapshot(model)
    original = getattr(apply, step)

    def step_then_fail(*args, **kwargs):
        original(*args, **kwargs)  # the step's changes are made, then the next line fails
        raise RuntimeError(f"injected failure after {step}")

    monkeypatch.setattr(apply, step, step_then_fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert(model)
    assert_unchanged(model, before)
    monkeypatch.undo()  # "fixed": the same prepared model converts, with the same result as if nothing happened
    assert torch.equal(logits(convert(model)), reference_logits)


@pytest.mark.parametrize("nth", [1, 12, 30])
def test_fault_in_the_middle_of_a_step_is_undone(nth, monkeypatch, reference_logits):
    """A failure between two journaled changes of one step (e.g. the 3rd of many module swaps)."""
    model = calibrated()
    before = snapshot(model)
    calls = {"n": 0}
    original = Transaction.setattr

    def failing(self, obj, name, value):
        calls["n"] += 1
        if calls["n"] == nth:
            raise MemoryError("injected")
        original(self, obj, name, value)

    monkeypatch.setattr(Transaction, "setattr", failing)
    with pytest.raises(MemoryError):
        convert(model)
    assert calls["n"] == nth
    assert_unchanged(model, before)
    monkeypatch.undo()
    assert torch.equal(logits(convert(model)), reference_logits)


class WrappedEmbedding(nn.Module):
    """An input embedding that is not an ``nn.Embedding`` (as some custom and multimodal models have)."""

    def __init__(self, inner: nn.Embedding) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids)


def test_quantize_embeddings_refused_at_prepare_when_the_embedding_is_not_an_nn_embedding():
    model = build_model("llama")
    model.model.embed_tokens = WrappedEmbedding(model.model.embed_tokens)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="WrappedEmbedding, not an nn.Embedding"):
        prepare(model, W8A8Config(smoothing=SmoothQuantConfig(), quantize_embeddings=True))
    assert "_tico_quantizer" not in model.__dict__
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, W8A8Linear) for m in model.modules())


def test_quantize_embeddings_refused_at_prepare_for_a_model_without_input_embedding():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="Sequential's input embedding is none"):
        prepare(model, W8A8Config(quantize_embeddings=True), args=(torch.randn(2, 8),))
    assert "_tico_quantizer" not in model.__dict__


def test_embedding_that_stops_being_an_nn_embedding_after_prepare_is_caught_before_any_swap():
    """The reproduced case: the Linears used to be swapped (and stayed swapped) before the embedding check."""
    model = calibrated(W8A8Config(smoothing=SmoothQuantConfig(), quantize_embeddings=True))
    model.model.embed_tokens = WrappedEmbedding(model.model.embed_tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match="WrappedEmbedding, not an nn.Embedding"):
        convert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, W8A8Linear) for m in model.modules())
    model.model.embed_tokens = model.model.embed_tokens.inner  # fixed: convert now succeeds
    q = convert(model)
    assert isinstance(q.model.embed_tokens, Int8Embedding)


def test_smoothing_error_leaves_attention_observing_and_retry_works():
    """The reproduced case: attention was frozen before an fp16 overflow in smoothing was detected."""
    config = W8A8Config(smoothing=SmoothQuantConfig(), activations="static",
                        tuning=W8A8Tuning(quantize_attention=True, backend="fake"))
    model = calibrated(config, dtype=torch.float16)
    quantizer = get_quantizer(model)
    obs = quantizer.sq.observers["model.layers.0.input_layernorm"]
    good = obs.absmax.clone()
    obs.absmax.fill_(1e30)
    before = snapshot(model)
    with pytest.raises(QuantizationError, match="overflow torch.float16"):
        convert(model)
    assert_unchanged(model, before)
    obs.absmax.copy_(good)
    q = convert(model)
    states = [getattr(q.get_submodule(n), attention.STATE_ATTR) for n in quantizer.attention_modules]
    assert states and all(set(s.scales) == set(attention.ROLES) for s in states)
    assert torch.isfinite(logits(q)).all()


def test_every_statistics_problem_is_listed_in_one_error():
    model = calibrated(W8A8Config(smoothing=SmoothQuantConfig(), activations="static"))
    quantizer = get_quantizer(model)
    quantizer.observers["model.layers.1.mlp.down_proj"].absmax[7] = float("inf")
    quantizer.sq.observers["model.layers.0.post_attention_layernorm"].absmax[2] = float("nan")
    quantizer.observers["model.layers.0.self_attn.o_proj"].observe(torch.randn(2, 5))
    with pytest.raises(QuantizationError) as err:
        convert(model)
    text = str(err.value)
    assert "model.layers.1.mlp.down_proj: activation statistics are NaN/inf in channels [7]" in text
    assert "model.layers.0.post_attention_layernorm (observed at input of" in text and "channels [2]" in text
    assert "model.layers.0.self_attn.o_proj: saw a tensor of shape [2, 5], expected 32 channels" in text


def test_attention_left_on_a_converted_model_is_what_the_docstring_says():
    config = W8A8Config(activations="static", tuning=W8A8Tuning(quantize_attention=True, backend="fake"))
    model = build_model("llama")
    implementation = model.config._attn_implementation
    q = convert(calibrated(config, model=model))
    with_state = [n for n, m in q.named_modules() if attention.STATE_ATTR in m.__dict__]
    assert with_state == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert q.config._attn_implementation == attention.ATTN_NAME
    names, previous = with_state, implementation
    attention.uninstall(q, names, previous)  # what prepare does when it fails after installing
    assert q.config._attn_implementation == implementation
    assert not any(attention.STATE_ATTR in m.__dict__ for m in q.modules())


def test_convert_not_inplace_leaves_the_prepared_model_and_matches_inplace():
    model = calibrated()
    before = snapshot(model)
    copy_q = convert(model, inplace=False)
    assert_unchanged(model, before, record=False)
    assert torch.equal(logits(copy_q), logits(convert(model)))
