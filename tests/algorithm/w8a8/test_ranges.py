"""Static range choices: each minimises what it claims to, on data with a few extreme tokens."""

from __future__ import annotations

import torch

from tico.experimental.quantization.algorithm.w8a8.ranges import (
    fake_quant_range,
    mse_range,
    output_mse_range,
    percentile_range,
    static_range,
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
    assert static_range("absmax", x, absmax, 99.9) == absmax
    assert static_range("output_mse", x, absmax, 99.9) == mse_range(x, absmax)  # no weight: falls back
