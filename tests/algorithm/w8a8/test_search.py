"""alpha="auto": the fast search (row subsample, coarse-to-fine grid, shared inputs) against the exhaustive one."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import channel_absmax, smoothing_scales
from tico.experimental.quantization.algorithm.w8a8.search import (
    SCORE_CHANNELS,
    DeployedQuant,
    Term,
    output_error,
    score_rows,
    search_alpha,
)

GRID = tuple(round(0.05 * i, 2) for i in range(21))
TOLERANCE = 0.03
"""The fast search's alpha may differ from the exhaustive one only where its full-data error is within 3%."""


def _group(seed: int, rows: int = 2048, channels: int = 64, consumers: int = 3):
    """A norm-like input with a few outlier channels and extreme tokens, read by ``consumers`` Linears."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=gen) * (0.5 + torch.rand(channels, generator=gen))
    x[:, torch.randperm(channels, generator=gen)[:3]] *= 10 + 40 * torch.rand(3, generator=gen)
    x[torch.randint(rows, (4,), generator=gen)] *= 8
    weights = [torch.randn(32 + 16 * k, channels, generator=gen) * 0.1 for k in range(consumers)]
    absmax = x.abs().amax(dim=0) * 1.1  # the full-data abs-max exceeds the sample's
    w_absmax = torch.stack([channel_absmax(w, 1) for w in weights]).amax(dim=0)
    terms = [Term(x, absmax, w) for w in weights]
    return terms, (lambda a: smoothing_scales(absmax, w_absmax, a))


def _full_error(terms, scales_for, quant, alpha):
    refs = [t.sample @ t.weight.T for t in terms]
    return output_error(terms, refs, scales_for(alpha), quant)


QUANTS = [
    DeployedQuant("per_channel", "static", "mse", 99.99),
    DeployedQuant("per_channel", "static", "absmax", 99.99),
    DeployedQuant("per_channel", "dynamic", "mse", 99.99),
    DeployedQuant("per_tensor", "static", "percentile", 99.9),
]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q.weights}-{q.activations}-{q.act_range}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_search_is_as_good_as_exhaustive(quant, seed):
    terms, scales_for = _group(seed)
    exact_best, exact_errors = search_alpha(terms, scales_for, GRID, quant, exhaustive=True)
    assert set(exact_errors) == set(GRID)
    fast_best, fast_errors = search_alpha(terms, scales_for, GRID, quant)
    assert len(fast_errors) <= 11 and 0.5 in fast_errors
    # judged by the exhaustive search's own score (every row of the sample)
    assert exact_errors[fast_best] <= exact_errors[exact_best] * (1 + TOLERANCE)
    assert abs(fast_best - exact_best) <= 0.1


def test_exhaustive_scores_are_the_full_output_error():
    terms, scales_for = _group(3, rows=512)
    quant = QUANTS[0]
    _, errors = search_alpha(terms, scales_for, (0.2, 0.5, 0.8), quant, exhaustive=True)
    for a, e in errors.items():
        assert e == pytest.approx(_full_error(terms, scales_for, quant, a), rel=1e-4)


def test_readers_of_one_input_share_its_quantization_but_score_the_same():
    terms, scales_for = _group(4, rows=1024)
    copies = [Term(t.sample.clone(), t.act_absmax, t.weight) for t in terms]  # distinct objects: scored apart
    shared = search_alpha(terms, scales_for, GRID, QUANTS[0])
    apart = search_alpha(copies, scales_for, GRID, QUANTS[0])
    assert shared[0] == apart[0]
    assert shared[1] == pytest.approx(apart[1], rel=1e-5)


def test_score_rows_keep_the_extreme_tokens_and_weigh_the_rest():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, generator=gen)
    x[[10, 500, 990], 1] = 50.0  # extreme tokens: must be scored, whatever the subsample
    rows, weights = score_rows(x, 100)
    assert rows.shape == (100, 3) and weights.shape == (100,)
    again, _ = score_rows(x, 100)
    assert torch.equal(rows, again)  # seeded
    assert int((rows[:, 1] == 50.0).sum()) == 3 and bool((weights[rows[:, 1] == 50.0] == 1).all())
    assert float(weights.sum()) == pytest.approx(1000)  # the weights stand for every row once
    full, none = score_rows(x, 5000)
    assert none is None and torch.equal(full, x)


def test_search_scores_few_alphas_and_ties_go_to_one_half():
    calls = []

    def scales_for(a):
        calls.append(a)
        return torch.ones(8)

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    terms = [Term(x, x.abs().amax(0), torch.randn(4, 8))]
    best, errors = search_alpha(terms, scales_for, GRID, QUANTS[1])
    assert best == 0.5  # every alpha scores the same
    assert len(calls) == len(set(calls)) == len(errors) <= 11


def _wide_group(seed: int, outputs: int = 3072):
    """:func:`_group`'s input read by two consumers wider than ``SCORE_CHANNELS``, as an MLP's gate/up."""
    terms, _ = _group(seed, rows=1024)
    gen = torch.Generator().manual_seed(seed + 100)
    channels = terms[0].sample.shape[1]
    weights = [torch.randn(outputs, channels, generator=gen) * (0.05 + torch.rand(channels, generator=gen) * 0.1)
               for _ in range(2)]
    absmax = terms[0].act_absmax
    w_absmax = torch.stack([channel_absmax(w, 1) for w in weights]).amax(dim=0)
    return [Term(terms[0].sample, absmax, w) for w in weights], (lambda a: smoothing_scales(absmax, w_absmax, a))


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_consumers_are_scored_on_a_channel_subset(seed):
    """More outputs than SCORE_CHANNELS: each alpha is scored on a seeded subset of output channels, its error
    scaled to all of them; the estimate stays within 5% of scoring every channel and picks as good an alpha."""
    terms, scales_for = _wide_group(seed)
    quant = QUANTS[0]
    assert terms[0].weight.shape[0] > SCORE_CHANNELS
    sub_best, sub = search_alpha(terms, scales_for, GRID, quant)
    all_best, every = search_alpha(terms, scales_for, GRID, quant, max_channels=None)
    shared = sorted(set(sub) & set(every))
    assert shared and any(sub[a] != every[a] for a in shared)  # really a subset
    for a in shared:
        assert sub[a] == pytest.approx(every[a], rel=0.05)
    _, exact = search_alpha(terms, scales_for, GRID, quant, exhaustive=True)
    assert exact[sub_best] <= exact[all_best] * (1 + TOLERANCE)


def test_per_tensor_weights_score_every_channel():
    """A per-tensor weight scale depends on every channel: no subset (the scores equal max_channels=None)."""
    terms, scales_for = _wide_group(2)
    quant = QUANTS[3]
    assert search_alpha(terms, scales_for, GRID, quant)[1] == search_alpha(terms, scales_for, GRID, quant, max_channels=None)[1]
