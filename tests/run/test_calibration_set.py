"""The calibration windows of a run: spread evenly over the whole text, deterministic, their tokens recorded."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tico.experimental.quantization.evaluation import read_text, tokenize_text
from tico.experimental.quantization.run.workflow import SELECTION, calibration_set


@pytest.fixture(scope="module")
def tokenizer(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def text(wikitext_valid):
    return read_text(wikitext_valid)[:200_000]  # many WikiText articles


def test_the_default_spreads_the_windows_over_the_whole_text(tokenizer, text):
    assert SELECTION == "spread"
    stream = tokenize_text(tokenizer, text, add_bos=False)
    calib = calibration_set(tokenizer, text, 64, 8, {"dataset": "valid.txt"})
    ranges = calib.token_ranges
    assert len(ranges) == 8 and ranges[0] == (0, 63) and all(b - a == 63 for a, b in ranges)
    assert ranges[-1][0] > stream.numel() * 3 // 4  # the last window comes from the last quarter of the text
    gaps = {ranges[i + 1][0] - ranges[i][0] for i in range(7)}
    assert max(gaps) - min(gaps) <= 63  # evenly spaced, up to one window of rounding
    for window, (a, b) in zip(calib.windows, ranges):  # each window is the BOS and the recorded tokens
        assert window[0] == tokenizer.bos_token_id and torch.equal(window[1:], stream[a:b])
    again = calibration_set(tokenizer, text, 64, 8)
    assert torch.equal(again.windows, calib.windows)  # deterministic: the same text gives the same windows
    recorded = calib.to_dict()
    assert recorded["selection"] == "spread" and recorded["seed"] is None and recorded["dataset"] == "valid.txt"
    assert recorded["token_ranges"] == [list(r) for r in ranges] and recorded["end_token"] == ranges[-1][1]


def test_first_windows_remain_available_and_too_short_texts_are_refused(tokenizer, text):
    first = calibration_set(tokenizer, text, 64, 3, selection="first")
    assert first.token_ranges == [(0, 63), (63, 126), (126, 189)] and first.to_dict()["selection"] == "first"
    with pytest.raises(ValueError, match="text too short: 10 disjoint windows of seq_len=64 .* room for only [1-9]$"):
        calibration_set(tokenizer, text[:300], 64, 10)  # a few windows long
