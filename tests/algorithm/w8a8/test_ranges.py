"""Static range choices: each minimises what it claims to, on data with a few extreme tokens."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization.algorithm.w8a8.ranges import (
    CLIP_RATIOS,
    RangeSketch,
    _clip_errors,
    coarse_to_fine,
    fake_quant_range,
    mse_range,
    output_mse_range,
    percentile_range,
    range_method,
)
from tico.experimental.quantization.nn.qscheme import fake_quant_weight


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    x[:3] *= 40  # a few extreme tokens
    w = torch.randn(16, 32, generator=gen)
    return x, w, float(x.abs().max())


def test_mse_range_clips_and_beats_absmax():
    x, _, absmax = _data()
    r = mse_range(x, absmax)
    assert r < absmax
    err = lambda c: float((fake_quant_range(x, c) - x).pow(2).sum())  # noqa: E731
    assert err(r) <= err(absmax)


def test_output_mse_range_minimises_output_error():
    x, w, absmax = _data()
    wq = fake_quant_weight(w, "per_channel")
    out_err = lambda c: float((fake_quant_range(x, c) @ wq.T - x @ w.T).pow(2).sum())  # noqa: E731
    r = output_mse_range(x, absmax, w, wq)
    assert out_err(r) <= min(out_err(mse_range(x, absmax)), out_err(absmax)) + 1e-6


def test_percentile_and_dispatch():
    x, w, absmax = _data()
    assert percentile_range(x, absmax, 100.0) == absmax
    assert percentile_range(x, absmax, 99.0) < absmax
    assert range_method("absmax").choose(x, absmax) == absmax
    assert range_method("mse").choose(x, absmax) == mse_range(x, absmax)
    assert range_method("percentile", 99.0).choose(x, absmax) == percentile_range(x, absmax, 99.0)
    assert range_method("mse").choose(None, absmax) == absmax  # no sample: nothing but the abs-max is known
    wq = fake_quant_weight(w, "per_channel")
    assert range_method("output_mse").choose(x, absmax, weight=w, weight_q=wq) == output_mse_range(x, absmax, w, wq)
    with pytest.raises(ValueError, match="output_mse.*weight"):  # never silently another method
        range_method("output_mse").choose(x, absmax)
    with pytest.raises(ValueError, match="unknown activation range method"):
        range_method("minmax")


def test_range_methods_cover_the_config_names():
    from typing import get_args

    from tico.experimental.quantization.algorithm.w8a8.ranges import RANGE_METHODS
    from tico.experimental.quantization.config.w8a8 import ActRange

    assert set(RANGE_METHODS) == set(get_args(ActRange))


# -- the fast clip search against the exhaustive one -------------------------------------------------------------


def _activations(seed: int, rows: int, channels: int) -> torch.Tensor:
    """Per-channel spreads, a few outlier channels and a few extreme tokens: a clip trades them off."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=gen) * (0.2 + 2 * torch.rand(channels, generator=gen))
    x[:, torch.randperm(channels, generator=gen)[:2]] *= 1 + 15 * seed % 4
    x[torch.randint(rows, (5,), generator=gen)] *= 30
    return x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rows, channels", [(256, 64), (2048, 256)])  # exact scoring / stratified scoring
def test_fast_mse_range_is_as_good_as_exhaustive(seed, rows, channels):
    x = _activations(seed, rows, channels)
    absmax = float(x.abs().max()) * 1.05  # the full-data abs-max exceeds the sample's
    err = lambda c: float((fake_quant_range(x, c) - x).double().pow(2).sum())  # noqa: E731
    exact = mse_range(x, absmax, exhaustive=True)
    fast = mse_range(x, absmax)
    assert err(fast) <= err(exact) * 1.005  # within 0.5% of the best clip's error, on every value
    best = min(err(absmax * float(r)) for r in CLIP_RATIOS)
    assert err(exact) == pytest.approx(best, rel=1e-6)  # exhaustive really is the minimum (up to fp32 sums)


def test_batched_clip_errors_use_the_deployed_integers():
    x = _activations(0, 64, 32).flatten()
    clips = [0.3, 1.7, 25.0]
    errors = _clip_errors(x, None, clips)
    assert errors.tolist() == [float((fake_quant_range(x, c) - x).pow(2).sum()) for c in clips]


def test_sketch_is_exact_in_the_tail_unbiased_and_commutes_with_smoothing():
    x = _activations(1, 2048, 256)
    sketch = RangeSketch.of(x, 1 << 12)
    assert sketch.values.numel() <= 1 << 12
    top = x.abs().amax(dim=0)
    assert bool(torch.isin(top, sketch.values.abs()).all())  # every channel's largest value is kept (weight 1)
    assert float(sketch.weights.sum()) == pytest.approx(x.numel(), rel=0.01)
    assert float((sketch.values.pow(2) * sketch.weights).sum()) == pytest.approx(float(x.pow(2).sum()), rel=0.05)
    s = 0.1 + torch.rand(256, generator=torch.Generator().manual_seed(5)) * 10
    smoothed = RangeSketch.of(x / s, 1 << 12)
    assert torch.equal(sketch.scaled(s).values, smoothed.values)  # built once, valid for every alpha


def test_coarse_to_fine_finds_the_narrower_of_two_basins():
    curve = torch.ones(96)
    curve[20], curve[70] = 0.5, 0.2  # two isolated minima, between coarse points
    curve[16], curve[72] = 0.6, 0.3
    assert coarse_to_fine(lambda idx: curve[idx], 96) == 70


@pytest.mark.parametrize("seed", range(3))
def test_fast_output_mse_range_is_as_good_as_exhaustive(seed):
    x = _activations(seed, 256, 32)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(seed))
    wq = fake_quant_weight(w, "per_channel")
    absmax = float(x.abs().max())
    out_err = lambda c: float((fake_quant_range(x, c) @ wq.T - x @ w.T).pow(2).sum())  # noqa: E731
    assert out_err(output_mse_range(x, absmax, w, wq)) <= out_err(output_mse_range(x, absmax, w, wq, exhaustive=True)) * 1.005


def test_thinned_sketch_keeps_the_exact_tail_and_stands_for_the_same_values():
    x = _activations(2, 2048, 256)
    sketch = RangeSketch.of(x)
    thin = sketch.thinned(1 << 12)
    assert thin.values.numel() == sketch.tail + (1 << 12) < sketch.values.numel()
    assert torch.equal(thin.values[: sketch.tail], sketch.values[: sketch.tail])  # the tail, whole and exact
    assert float(thin.weights.sum()) == pytest.approx(float(sketch.weights.sum()), rel=1e-5)
    assert thin.scaled(torch.full((256,), 2.0)).tail == sketch.tail
    assert sketch.thinned(1 << 20) is sketch and RangeSketch.of(x[:8]).thinned(4).weights is None


def test_sketch_cache_builds_one_sketch_per_sample_and_version():
    from tico.experimental.quantization.algorithm.w8a8.ranges import SketchCache

    x = _activations(3, 2048, 64)
    cache = SketchCache()
    first = cache.of(x)
    assert cache.of(x) is first and cache.of(x.clone()) is not first
    s = 0.5 + torch.rand(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.scaled(s).values, RangeSketch.of(x / s).values)  # what a smoothed layer deploys
    x.mul_(2)  # modified in place: a new sketch
    assert not torch.equal(cache.of(x).values, first.values)
