"""The sampled observer: a uniform reservoir independent of the batches' order, shared by readers of one tensor,
and merged over ranks exactly as one process would have sampled."""

from __future__ import annotations

import torch

from tico.experimental.quantization.algorithm.smoothquant.scales import channel_absmax_of
from tico.experimental.quantization.algorithm.w8a8.observer import SampledChannelObserver, row_keys


def _batches(seed: int = 0, n: int = 6, rows: int = 40, channels: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, rows // 2, channels, generator=gen) for _ in range(n)]


def _reference_sample(batches: list[torch.Tensor], max_rows: int, seed: int = 0) -> torch.Tensor:
    """The rows with the ``max_rows`` largest keys over everything seen (keys drawn as the observer draws them:
    per batch, from the batch's abs-max)."""
    rows = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches])
    flats = [b.reshape(-1, b.shape[-1]) for b in batches]
    keys = torch.cat([row_keys(channel_absmax_of(f), f.shape[0], seed) for f in flats])
    return rows[torch.topk(keys, max_rows).indices]


def _as_set(t: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, t.tolist()))


def test_reservoir_keeps_the_rows_with_the_largest_keys_and_the_absmax():
    batches = _batches()
    obs = SampledChannelObserver(8, 50)
    for b in batches:
        obs.observe(b)
    assert obs.rows_sample.shape == (50, 8) and obs.rows == 240 and obs.calls == 6
    assert _as_set(obs.rows_sample) == _as_set(_reference_sample(batches, 50))
    assert torch.equal(obs.absmax, torch.cat(batches).abs().amax(dim=(0, 1)))


def test_readers_of_one_tensor_share_one_sample_equal_to_their_own():
    batches = _batches(1)
    q, k, v = (SampledChannelObserver(8, 50) for _ in range(3))
    alone = SampledChannelObserver(8, 50)
    for b in batches:
        for obs in (q, k, v):
            obs.observe(b)  # the same tensor object, as q/k/v_proj's pre-hooks see it
        alone.observe(b.clone())
    assert q.rows_sample is k.rows_sample is v.rows_sample  # one copy in memory
    assert torch.equal(q.rows_sample, alone.rows_sample) and torch.equal(q.absmax, alone.absmax)
    assert q.absmax is not k.absmax and k.calls == alone.calls == 6


def test_sharing_stops_when_the_streams_differ():
    batches = _batches(2)
    a, b = SampledChannelObserver(8, 30), SampledChannelObserver(8, 30)
    for x in batches[:3]:
        a.observe(x)
        b.observe(x)
    other = batches[3] * 2
    a.observe(batches[3])
    b.observe(other)  # a different tensor: b must compute its own state from here on
    for x in batches[4:]:
        a.observe(x)
        b.observe(x)
    assert _as_set(a.rows_sample) == _as_set(_reference_sample(batches, 30))
    assert _as_set(b.rows_sample) == _as_set(_reference_sample(batches[:3] + [other] + batches[4:], 30))


def test_modified_tensor_is_not_mistaken_for_the_same_data():
    x = _batches(3, n=1)[0]
    a, b = SampledChannelObserver(8, 100), SampledChannelObserver(8, 100)
    a.observe(x)
    x.mul_(3)  # in place: same object, new version
    b.observe(x)
    assert torch.equal(b.absmax, x.abs().amax(dim=(0, 1))) and not torch.equal(a.absmax, b.absmax)


def test_sample_keeps_the_input_dtype():
    obs = SampledChannelObserver(8, 16)
    for b in _batches(4):
        obs.observe(b.to(torch.bfloat16))
    assert obs.rows_sample.dtype == torch.bfloat16 and obs.absmax.dtype == torch.float32


def test_smoothing_and_w8a8_observers_of_one_tensor_share_the_abs_max_but_not_its_storage():
    from tico.experimental.quantization.algorithm.smoothquant.scales import ChannelAbsMaxObserver

    batches = _batches(5)
    sq, w8 = ChannelAbsMaxObserver(8), SampledChannelObserver(8, 16)
    for b in batches:
        sq.observe(b)  # a norm's output hook, then q_proj's input hook: the same tensor object
        w8.observe(b)
    expected = torch.cat(batches).abs().amax(dim=(0, 1))
    assert torch.equal(sq.absmax, expected) and torch.equal(w8.absmax, expected)
    assert sq.absmax.data_ptr() != w8.absmax.data_ptr() and sq.rows == w8.rows == 240


def _merged(parts: list[list[torch.Tensor]], max_rows: int) -> SampledChannelObserver:
    """What convert installs when ranks calibrated ``parts`` (rank r saw ``parts[r]``), without processes: the
    reduction's two exchanges done by hand."""
    ranks = [SampledChannelObserver(8, max_rows) for _ in parts]
    for obs, batches in zip(ranks, parts):
        for b in batches:
            obs.observe(b)
    summaries, memo = [o.summary() for o in ranks], {}
    contributions = [o.contribution(summaries, r, memo) for r, o in enumerate(ranks)]
    ranks[0].merge(summaries, contributions, {})
    return ranks[0]


def test_the_merged_sample_does_not_depend_on_how_batches_were_split_or_ordered():
    batches = _batches(6, n=8)
    one = _merged([batches], 50)
    assert _as_set(one.rows_sample) == _as_set(_reference_sample(batches, 50))
    for parts in ([batches[::2], batches[1::2]], [batches[5:], batches[:5][::-1]], [[], batches[3:], batches[:3]]):
        merged = _merged(parts, 50)
        assert torch.equal(merged.rows_sample, one.rows_sample) and torch.equal(merged._keys, one._keys)
        assert torch.equal(merged.absmax, one.absmax) and (merged.rows, merged.calls) == (one.rows, one.calls)


def test_calibrating_after_a_merge_goes_back_to_this_ranks_own_statistics(monkeypatch):
    from tico.experimental.quantization import distributed

    monkeypatch.setattr(distributed, "active", lambda: True)  # as under a process group (no collective is run here)
    batches = _batches(7, n=4)
    obs = SampledChannelObserver(8, 30)
    for b in batches[:2]:
        obs.observe(b)
    other = SampledChannelObserver(8, 30)
    other.observe(batches[3])
    summaries = [obs.summary(), other.summary()]
    memo: dict = {}
    obs.merge(summaries, [obs.contribution(summaries, 0, memo), other.contribution(summaries, 1, memo)], {})
    assert obs.calls == 3
    obs.observe(batches[2])  # this rank's own three batches, not the merged ones plus one
    assert obs.calls == 3 and _as_set(obs.rows_sample) == _as_set(_reference_sample(batches[:3], 30))


def test_sample_seed_picks_other_rows_and_keeps_every_statistic_but_the_sample():
    """W8A8Tuning.sample_seed reaches every layer's observer: another seed, another sample of the same rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from zoo import build_model, input_ids

    from tico.experimental.quantization import get_quantizer, prepare
    from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning

    def observers(seed):
        model = prepare(build_model("llama"), W8A8Config(activations="static", tuning=W8A8Tuning(calibration_rows=8,
                                                                                               sample_seed=seed)))
        with torch.no_grad():
            model(input_ids("llama", batch=2, seq=16))
        return get_quantizer(model).observers

    first, again, other = observers(0), observers(0), observers(7)
    assert first.keys() == other.keys() and all(o.seed == 7 for o in other.values())
    differ = 0
    for name in first:
        assert torch.equal(first[name].absmax, other[name].absmax)
        assert torch.equal(first[name].rows_sample, again[name].rows_sample)  # a seed is reproducible
        differ += not torch.equal(first[name].rows_sample, other[name].rows_sample)
    assert differ == len(first)  # 32 rows, 8 kept: another seed keeps other rows in every layer


def test_sample_seed_must_be_a_non_negative_integer():
    import pytest

    from tico.experimental.quantization.config.w8a8 import W8A8Tuning

    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="sample_seed"):
            W8A8Tuning(sample_seed=bad)
