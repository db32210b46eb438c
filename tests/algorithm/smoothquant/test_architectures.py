"""Every architecture of the zoo: smoothed groups match the expected norms/consumers, outputs are unchanged."""

from __future__ import annotations

import logging

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from zoo import ARCHITECTURES, build_model, input_ids

KEYS = sorted(ARCHITECTURES)


def _expected(spec, model):
    """{(producer, tuple(consumer modules))} over every block, from the zoo's table."""
    blocks = model.get_submodule(spec.blocks)
    out = set()
    for i in range(len(blocks)):
        prefix = f"{spec.blocks}.{i}."
        for norm, consumers in spec.groups.items():
            out.add((prefix + norm, tuple(sorted(prefix + c for c in consumers))))
    return out


def _smooth(model, ids, config=None):
    with torch.no_grad():
        ref = model(ids).logits.float()
        model = prepare(model, config or SmoothQuantConfig(alpha=0.6))
        plan = get_quantizer(model).plan
        model(ids)
        before = {n: p.clone() for n, p in model.named_parameters()}
        model = convert(model)
        out = model(ids).logits.float()
    return plan, before, ref, out


@pytest.mark.parametrize("key", KEYS)
def test_groups_and_equivalence_fp32(key, caplog):
    spec = ARCHITECTURES[key]
    model = build_model(key)
    ids = input_ids(key)
    with caplog.at_level(logging.WARNING):
        plan, before, ref, out = _smooth(model, ids)
    smoothed = {(g.producer, tuple(g.consumer_modules)) for g in plan.smoothed}
    # groups inside the blocks; BertForMaskedLM's last LayerNorm feeding only the MLM head is exact too
    in_blocks = {s for s in smoothed if all(n.startswith(spec.blocks + ".") for n in (s[0], *s[1]))}
    assert in_blocks == _expected(spec, model)
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 1e-4, f"{key}: relative logit change {rel:.2e}"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for producer, consumers in _expected(spec, model):
        assert any(n.startswith(producer + ".") for n in changed), f"{producer} not folded"
        for c in consumers:
            assert any(n.startswith(c + ".") for n in changed), f"{c} not scaled"
    if not spec.groups:  # BERT (post-LN), OLMo (weight-less norms): nothing in the blocks can be folded
        assert not in_blocks
        if not plan.smoothed:
            assert "nothing to smooth" in caplog.text


@pytest.mark.parametrize("key", ["llama", "mixtral", "gemma2", "gpt2", "falcon_parallel", "qwen2_moe"])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.08), (torch.float16, 0.02)])
def test_half_precision(key, dtype, tol):
    model = build_model(key, dtype=dtype)
    plan, _, ref, out = _smooth(model, input_ids(key))
    assert plan.smoothed and {p.dtype for p in model.parameters()} == {dtype}
    assert float((out - ref).abs().max() / ref.abs().max()) < tol


@pytest.mark.parametrize("key", KEYS)
def test_linear_producers_stay_exact(key):
    model = build_model(key)
    _, _, ref, out = _smooth(model, input_ids(key), SmoothQuantConfig(alpha=0.6, linear_producers=True))
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
