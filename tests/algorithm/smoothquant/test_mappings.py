"""Explicit smoothing groups (``SmoothQuantConfig(mappings=...)``): exact where the trace refuses, refused when wrong."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.smoothquant import SmoothQuantError
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

from tests.algorithm.smoothquant.toys import Block, CumsumBlock, NormThenActBlock, PostNormBlock, Toy
from tests.zoo import build_model, input_ids

CUMSUM_MAP = (("re:layers\\.\\d+\\.norm", ("re:layers\\.\\d+\\.a", "re:layers\\.\\d+\\.b")),)


def toy(block) -> Toy:
    torch.manual_seed(0)
    return Toy(block=block).eval()


def example() -> torch.Tensor:
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    x[..., 3] *= 20  # an outlier channel, so the scales are far from 1
    return x


def untouched(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    same = all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    return same and not hooks and "_tico_quantizer" not in model.__dict__


def test_the_trace_refuses_the_cumsum_group():
    model = prepare(toy(CumsumBlock), SmoothQuantConfig(), args=(example(),))
    assert not get_quantizer(model).plan.groups  # the Linears read cumsum's output, which the trace does not follow
    convert(model)


def test_a_mapping_smooths_what_the_trace_refuses_and_the_outputs_stay_the_same():
    model, x = toy(CumsumBlock), example()
    with torch.no_grad():
        before = model(x)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = prepare(model, SmoothQuantConfig(alpha=0.5, mappings=CUMSUM_MAP), args=(x,))
    plan = get_quantizer(model).plan
    assert [(g.producer, g.consumer_modules) for g in plan.smoothed] == [
        ("layers.0.norm", ["layers.0.a", "layers.0.b"]), ("layers.1.norm", ["layers.1.a", "layers.1.b"])]
    assert all(g.mapped and "cumsum" in g.reason for g in plan.smoothed)
    assert "[mapped" in plan.summary()
    with torch.no_grad():
        model(x)
    convert(model)
    with torch.no_grad():
        after = model(x)
    assert not torch.equal(model.layers[0].a.weight, saved["layers.0.a.weight"])
    scales = plan.smoothed[0].scales
    assert scales is not None and float(scales.max() / scales.min()) > 2
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))


def test_a_mapping_restating_the_traced_groups_gives_the_same_scales():
    llama_map = (
        ("re:.*input_layernorm", ("re:.*q_proj", "re:.*k_proj", "re:.*v_proj")),
        ("re:.*post_attention_layernorm", ("re:.*gate_proj", "re:.*up_proj")),
    )
    scales = []
    for config in (SmoothQuantConfig(), SmoothQuantConfig(mappings=llama_map)):
        model = prepare(build_model("llama"), config)
        with torch.no_grad():
            model(input_ids("llama"))
        plan = get_quantizer(model).plan
        convert(model)
        scales.append({g.producer: g.scales for g in plan.smoothed})
    assert scales[0].keys() == scales[1].keys() and len(scales[0]) == 4
    assert all(torch.equal(scales[0][p], scales[1][p]) for p in scales[0])


@pytest.mark.parametrize(
    "block, mappings, message",
    [
        (PostNormBlock, (("layers.0.norm", "layers.0.a"),),
         r"layers\.0\.norm: folding random scales into this mapped group changes the model's outputs"),
        (NormThenActBlock, (("layers.1.norm", ("layers.1.a", "layers.1.b")),),
         r"layers\.1\.norm: folding random scales .* not exact.*read by sigmoid"),
        (Block, (("layers.0.norm", "layers.0.a"),),
         r"layers\.0\.norm: the trace shows its output also read by \['layers\.0\.b'\], which the mapping does not list"),
        (Block, (("layers.0.norm", "layers.0.norm"),), r"consumer 'layers\.0\.norm' matches no module inside layers\.0"),
        (Block, (("layers.0.norm", "re:layers\\.0"),), r"consumer 're:layers\\\\\.0' matches no module inside layers\.0"),
        (Block, (("re:.*ln", "re:.*a"),), r"mappings\[0\]: producer 're:\.\*ln' matches no module of Toy"),
        (Block, (("layers", "re:.*a"),), r"producer layers \(ModuleList\) cannot absorb 1/s"),
        (Block, (("layers.0.a", "layers.0.norm"),), r"consumer layers\.0\.norm is a LayerNorm, not Linear-like"),
        (Block, (("layers.0.norm", ("layers.0.a", "layers.0.b")), ("layers.0.a", "layers.0.b")),
         r"layers\.0\.b\.weight would be scaled by both layers\.0\.norm and layers\.0\.a"),
        (Block, (("layers.0.norm", "re:["),), r"'re:\[' is not a valid regular expression"),
    ],
)
def test_a_wrong_mapping_is_refused_by_name_and_the_model_is_untouched(block, mappings, message):
    model = toy(block)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(SmoothQuantError, match=message):
        prepare(model, SmoothQuantConfig(mappings=mappings), args=(example(),))
    assert untouched(model, saved)


def test_a_pattern_alpha_map_key_covers_what_it_matches():
    config = SmoothQuantConfig(alpha=0.5, custom_alpha_map={"re:model\\.layers\\.\\d+\\.mlp": 0.8, "model.layers.1": 0.2})
    model = prepare(build_model("llama"), config)
    alphas = {g.producer: g.alpha for g in get_quantizer(model).plan.smoothed}
    assert alphas == {
        "model.layers.0.input_layernorm": 0.5,
        "model.layers.0.post_attention_layernorm": 0.8,
        "model.layers.1.input_layernorm": 0.2,  # an exact name wins over a pattern
        "model.layers.1.post_attention_layernorm": 0.2,
    }
    with pytest.raises(SmoothQuantError, match=r"not modules of .*\['re:.*\\\\.mlpx'\]"):
        prepare(build_model("llama"), SmoothQuantConfig(custom_alpha_map={"re:.*\\.mlpx": 0.3}))
