"""Group discovery on hand-written patterns: what is provably foldable, what is refused and why."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

from algorithm.smoothquant.toys import (
    Block,
    MatmulBlock,
    PostNormBlock,
    RMSNorm,
    SharedLinearBlock,
    SplitChannelsBlock,
    Toy,
    ViewGatherBlock,
)


def _run(model: torch.nn.Module, x: torch.Tensor):
    """prepare -> calibrate -> convert; returns (plan, float output, smoothed output)."""
    with torch.no_grad():
        ref = model(x)
        model = prepare(model, SmoothQuantConfig(alpha=0.6), args=(x,))
        plan = get_quantizer(model).plan
        model(x * 3)  # calibrate on data of another scale than the probe
        model = convert(model)
        out = model(x)
    return plan, ref, out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("block", [Block, ViewGatherBlock, MatmulBlock, SplitChannelsBlock])
def test_foldable_patterns_are_smoothed_exactly(block):
    torch.manual_seed(0)
    model = Toy(block=block)
    before = {n: p.clone() for n, p in model.named_parameters()}
    plan, ref, out = _run(model, torch.randn(2, 5, 16))
    assert [g.status for g in plan.groups] == ["smooth", "smooth"]
    assert _rel(out, ref) < 1e-5
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "layers.0.norm.weight" in changed and "layers.0.b.weight" in changed
    assert not any(n.endswith("a.bias") for n in changed)  # consumer biases are untouched by the fold


@pytest.mark.parametrize(
    "block, reason",
    [
        (PostNormBlock, "read by add"),
        (SharedLinearBlock, "also used by linear"),
    ],
)
def test_unprovable_patterns_are_skipped_with_reason(block, reason, caplog):
    torch.manual_seed(0)
    model = Toy(block=block)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with caplog.at_level("WARNING"):
        plan, ref, out = _run(model, torch.randn(2, 5, 16))
    assert plan.groups and all(g.status == "skip" for g in plan.groups)
    assert all(reason in g.reason for g in plan.groups), [g.reason for g in plan.groups]
    assert "nothing to smooth" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("unit_offset, kind", [(False, "affine"), (True, "unit_offset")])
def test_producer_kind_is_probed(unit_offset, kind):
    torch.manual_seed(0)
    model = Toy(block=lambda d: Block(d, norm=RMSNorm(d, unit_offset=unit_offset)))
    plan, ref, out = _run(model, torch.randn(2, 5, 16))
    assert {g.kind for g in plan.groups} == {kind}
    assert _rel(out, ref) < 1e-5


def test_norm_of_unknown_form_is_refused():
    class Squash(torch.nn.Module):  # weight enters non-linearly: no fold rule fits
        def __init__(self, dim):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)

        def forward(self, x):
            return torch.tanh(x) * self.weight.pow(2)

    torch.manual_seed(0)
    model = Toy(block=lambda d: Block(d, norm=Squash(d)))
    plan, ref, out = _run(model, torch.randn(2, 5, 16))
    assert all(g.status == "skip" and "known per-channel affine form" in g.reason for g in plan.groups)
    assert torch.equal(out, ref)


def test_output_returned_from_model_is_not_folded():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.norm(x)
            return self.proj(h), h

    plan, _, _ = _run(Head(), torch.randn(3, 8))
    assert plan.groups[0].status == "skip" and "returned from the model" in plan.groups[0].reason
