"""Evaluation tools on the real stories260K Llama and TinyStories text: windows, perplexity, fidelity.

The perplexity figures are the ones measured independently in ``../shared/data/README.md`` (one BOS at
the start of the text, windows of 256 tokens): 5.12 with disjoint windows. Partial figures are checked
against hand computations that use the model's own Hugging Face loss (``labels=``), written the way the
Hugging Face perplexity guide does it, so the windowing and the token weighting are checked independently.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tico.experimental.quantization.evaluation import (
    calibration_windows,
    cut_windows,
    logit_fidelity,
    perplexity,
    read_text,
    token_windows,
    tokenize_text,
    window_picks,
    windows_outside,
)

SEQ = 256


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: this model is tiny, and on a shared 2-core machine two OpenMP threads that
    wait for each other at every op are 10-100x slower than one thread whenever another job holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def model(stories_dir):
    return AutoModelForCausalLM.from_pretrained(stories_dir).eval()


@pytest.fixture(scope="module")
def text(tinystories_text):
    return read_text(tinystories_text)


@pytest.fixture(scope="module")
def stream(tokenizer, text):
    return tokenize_text(tokenizer, text)


# --------------------------------------------------------------------------------------------- data


def test_read_text_names_the_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(missing)
    with pytest.raises(FileNotFoundError, match="directory"):
        read_text(tmp_path)


def test_stream_has_one_bos_and_no_length_warning(tokenizer, text, stream):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        ids = tokenize_text(tokenizer, text)  # ~393k tokens, far beyond model_max_length=512
    finally:
        hf_logger.removeHandler(handler)
    assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]
    assert torch.equal(ids, stream)
    assert ids[0] == tokenizer.bos_token_id == 1
    assert int((ids == 1).sum()) == 1  # one BOS for the whole text, none per line or story
    assert torch.equal(tokenize_text(tokenizer, text, add_bos=False), ids[1:])
    assert abs(ids.numel() - 393_000) < 1_000  # the README's "393k tokens"


def test_token_windows_are_bos_plus_disjoint_cuts_of_the_stream(tokenizer, text, stream):
    head = text[:20_000]
    ids = tokenize_text(tokenizer, head, add_bos=False)  # the stream without BOS
    body = SEQ - 1  # each window is the BOS (this tokenizer adds one) and SEQ - 1 tokens of the stream
    windows = token_windows(tokenizer, head, SEQ)
    assert windows.dtype == torch.long and windows.shape == (ids.numel() // body, SEQ)
    assert (windows[:, 0] == 1).all() and int((windows == 1).sum()) == windows.size(0)  # one BOS per window
    assert torch.equal(windows[:, 1:].reshape(-1), ids[: windows.size(0) * body])  # adjacent, disjoint, in order
    assert torch.equal(windows[:, 1:], stream[1 : 1 + windows.size(0) * body].view(-1, body))  # a prefix tokenizes the same

    no_bos = token_windows(tokenizer, head, SEQ, num_windows=3, add_bos=False)
    assert torch.equal(no_bos.reshape(-1), ids[: 3 * SEQ]) and not (no_bos == 1).any()

    strided = token_windows(tokenizer, head, SEQ, num_windows=4, start=10, stride=100)
    for k in range(4):
        assert strided[k, 0] == 1 and torch.equal(strided[k, 1:], ids[10 + 100 * k : 10 + 100 * k + body])
    flat = torch.cat([ids[None, :1], ids[None, 1 : 1 + SEQ]], dim=1)[0]
    assert torch.equal(token_windows(None, flat, SEQ), flat[None, :SEQ])  # pre-tokenized streams are cut as they are
    assert torch.equal(cut_windows(ids[None], SEQ, num_windows=2), ids[: 2 * SEQ].view(2, SEQ))


def test_too_short_text_is_refused_with_the_numbers(tokenizer):
    short = "Once upon a time there was a cat."
    n = tokenize_text(tokenizer, short, add_bos=False).numel()
    with pytest.raises(ValueError, match=rf"{n} tokens.*needs at least {SEQ - 1}.*seq_len={SEQ} is the BOS and {SEQ - 1}"):
        token_windows(tokenizer, short, SEQ)
    ids = torch.arange(1000) % 500
    with pytest.raises(ValueError, match=r"4 windows .* need 1024 tokens, but the text has 1000 \(room for 3"):
        cut_windows(ids, SEQ, num_windows=4)
    with pytest.raises(ValueError, match="text too short"):
        perplexity(torch.nn.Identity(), None, ids[:100], seq_len=SEQ)


def test_spread_picks_cover_the_whole_text_evenly_and_without_a_seed():
    picks = window_picks(1000, 8, "spread")
    assert picks.tolist() == [0, 125, 250, 375, 500, 625, 750, 875]  # evenly over the text, from its first window
    assert torch.equal(picks, window_picks(1000, 8, "spread", seed=7))  # deterministic: no seed involved
    assert window_picks(5, 5, "spread").tolist() == [0, 1, 2, 3, 4]  # as many as there are: every window, once
    assert window_picks(10, 3, "first").tolist() == [0, 1, 2]
    random = window_picks(1000, 8, "random", seed=1)
    assert random.tolist() == sorted(set(random.tolist())) and torch.equal(random, window_picks(1000, 8, "random", seed=1))
    with pytest.raises(ValueError, match="selection must be one of"):
        window_picks(10, 2, "middle")
    with pytest.raises(ValueError, match="room for only 3"):
        window_picks(3, 4)


def test_spread_calibration_windows_are_grid_windows_over_the_whole_text(tokenizer, text):
    head = text[:60_000]
    grid = token_windows(tokenizer, head, SEQ)
    spread = calibration_windows(tokenizer, head, SEQ, num_windows=4, selection="spread")
    assert torch.equal(spread, grid[window_picks(grid.size(0), 4, "spread")])
    assert torch.equal(spread[0], grid[0]) and not torch.equal(spread[-1], grid[3])  # from the start to the end


def test_windows_outside_leave_out_every_window_that_shares_a_token_with_the_ranges(tokenizer, text):
    head = text[:60_000]
    grid = token_windows(tokenizer, head, SEQ)
    step = SEQ - 1  # stream tokens per window (each begins with the BOS)
    kept = windows_outside(tokenizer, head, SEQ, [(0, step), (3 * step + 10, 3 * step + 11), (5 * step, 7 * step)])
    left = [k for k in range(grid.size(0)) if k not in (0, 3, 5, 6)]
    assert torch.equal(kept, grid[left])  # a range touching one token of window 3 removes window 3, not 2 or 4
    assert torch.equal(windows_outside(tokenizer, head, SEQ, []), grid)
    shifted = windows_outside(tokenizer, head, SEQ, [(0, 2 * step)], start=step)  # windows from token step on
    assert torch.equal(shifted, token_windows(tokenizer, head, SEQ, start=2 * step))
    with pytest.raises(ValueError, match="overlaps the 1 excluded"):
        windows_outside(tokenizer, head, SEQ, [(0, 10**9)])


def test_calibration_windows_are_reproducible_disjoint_grid_windows(tokenizer, text):
    head = text[:60_000]
    grid = token_windows(tokenizer, head, SEQ)
    picked = calibration_windows(tokenizer, head, SEQ, num_windows=5, seed=1)
    assert torch.equal(picked, calibration_windows(tokenizer, head, SEQ, num_windows=5, seed=1))
    rows = [next(k for k in range(grid.size(0)) if torch.equal(grid[k], row)) for row in picked]
    assert rows == sorted(set(rows)) and rows != list(range(5))  # distinct, in text order, not just the head
    assert torch.equal(calibration_windows(tokenizer, head, SEQ, 2, seed=None), grid[:2])
    with pytest.raises(ValueError, match=f"room for only {grid.size(0)}"):
        calibration_windows(tokenizer, head, SEQ, grid.size(0) + 1)


# --------------------------------------------------------------------------------------- perplexity


def _hand_disjoint(model, stream, windows):
    """Mean NLL of the first ``windows`` disjoint windows, from the model's own loss (255 tokens each)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(windows):
            x = stream[k * SEQ : (k + 1) * SEQ][None]
            total += model(x, labels=x).loss.double().item() * (SEQ - 1)
            count += SEQ - 1
    return total / count, count


def _hand_sliding(model, stream, stride, windows):
    """The Hugging Face perplexity guide's loop (labels=-100 on the context part), for ``windows`` windows."""
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, stream.numel(), stride)[:windows]:
            end = min(begin + SEQ, stream.numel())
            trg_len = end - prev_end
            x = stream[begin:end][None]
            labels = x.clone()
            labels[:, :-trg_len] = -100
            scored = int((labels[:, 1:] != -100).sum())  # the loss is a mean over the shifted labels
            total += model(x, labels=labels).loss.double().item() * scored
            count += scored
            prev_end = end
            if end == stream.numel():
                break
    return total / count, count


def test_full_text_perplexity_matches_readme(model, stream):
    # the protocol of ../shared/data/README.md: the token stream with one BOS at its start, cut in windows
    result = perplexity(model, None, stream, seq_len=SEQ, batch_size=32)
    assert round(result.ppl, 2) == 5.12
    assert result.num_windows == 393_013 // SEQ == 1535 and result.num_tokens == 1535 * (SEQ - 1)
    assert result.seq_len == SEQ and result.stride is None
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_disjoint_subset_matches_hand_computation(model, tokenizer, text, stream):
    nll, count = _hand_disjoint(model, stream, 10)
    by_ids = perplexity(model, None, stream, seq_len=SEQ, max_windows=10, batch_size=4)  # batches 4+4+2
    assert by_ids.num_windows == 10 and by_ids.num_tokens == count and by_ids.nll == pytest.approx(nll, rel=1e-6)
    # text: every window begins as the tokenizer begins a text (stories260K: its BOS, then 255 text tokens)
    windows = token_windows(tokenizer, text, SEQ, num_windows=10)
    assert bool((windows[:, 0] == tokenizer.bos_token_id).all())
    nll, count = _hand_disjoint(model, windows.reshape(-1), 10)
    by_text = perplexity(model, tokenizer, text, seq_len=SEQ, max_windows=10)
    assert by_text.num_windows == 10 and by_text.num_tokens == count and by_text.nll == pytest.approx(nll, rel=1e-6)
    assert by_text.ppl == pytest.approx(math.exp(nll), rel=1e-6)


def test_sliding_window_subset_matches_hf_protocol(model, stream):
    nll, count = _hand_sliding(model, stream, 128, 12)
    result = perplexity(model, None, stream, seq_len=SEQ, stride=128, max_windows=12, batch_size=5)
    assert result.num_windows == 12 and result.num_tokens == count == (SEQ - 1) + 11 * 128
    assert result.nll == pytest.approx(nll, rel=1e-6)
    # more context per scored token than disjoint windows of the same size on the same span
    assert result.ppl < perplexity(model, None, stream[: 13 * 128], seq_len=SEQ).ppl


def test_sliding_window_scores_every_token_once_up_to_the_end(model, stream):
    ids = stream[:1000]
    for stride in (100, 128, SEQ):
        nll, count = _hand_sliding(model, ids, stride, None)
        result = perplexity(model, None, ids, seq_len=SEQ, stride=stride, batch_size=3)
        assert result.num_tokens == count
        # every token but the first once; with stride == seq_len, windows start without context (4 of them)
        assert count == ids.numel() - (1 if stride < SEQ else 4)
        assert result.nll == pytest.approx(nll, rel=1e-6)
    # with stride == seq_len and no tail, the sliding window is exactly the disjoint protocol
    exact = stream[: 4 * SEQ]
    a = perplexity(model, None, exact, seq_len=SEQ, stride=SEQ)
    b = perplexity(model, None, exact, seq_len=SEQ)
    assert (a.num_tokens, a.num_windows) == (b.num_tokens, b.num_windows) and a.nll == pytest.approx(b.nll, rel=1e-9)


def test_perplexity_refuses_bad_requests_and_restores_mode(model, tokenizer, stream, capsys):
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(model, None, "some text", seq_len=SEQ)
    with pytest.raises(ValueError, match="seq_len=1024 exceeds the model's 512 positions"):
        perplexity(model, tokenizer, stream, seq_len=1024)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, None, stream, seq_len=SEQ, stride=SEQ + 1)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 512"):
        perplexity(model, None, torch.full((600,), 700), seq_len=SEQ)
    model.train()
    try:
        perplexity(model, None, stream, seq_len=SEQ, max_windows=1)
        assert model.training  # evaluated in eval mode, then put back
    finally:
        model.eval()
    assert capsys.readouterr().out == ""  # the library logs, never prints
    from tico.experimental.quantization.progress import progress_callback

    seen = []
    with progress_callback(lambda *event: seen.append(event)):
        perplexity(model, None, stream, seq_len=SEQ, max_windows=2, progress=True)
    captured = capsys.readouterr()
    # progress goes to the installed callback (progress.py), never drawn by the library itself
    assert captured.out == "" and captured.err == "" and seen[0] == ("perplexity", 0, 2) and seen[-1] == ("perplexity", 2, 2)


# ----------------------------------------------------------------------------------------- fidelity


def test_fidelity_of_model_against_itself_and_a_perturbed_copy(model, stream):
    windows = cut_windows(stream, SEQ, num_windows=6)
    same = logit_fidelity(model, model, windows, batch_size=4)
    assert same.kl == 0.0 and same.max_kl == 0.0
    assert same.top1_agreement == 1.0 and same.max_abs_logit_diff == 0.0
    assert same.num_positions == 6 * SEQ

    perturbed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.abs().mean())
    off = logit_fidelity(perturbed, model, windows)
    assert 0 < off.kl <= off.max_kl
    assert 0.5 < off.top1_agreement < 1.0 and off.max_abs_logit_diff > 0
    # KL is not symmetric, and the order is KL(reference || model)
    assert logit_fidelity(model, perturbed, windows).kl != pytest.approx(off.kl, rel=1e-9)

    # a single row is accepted; per-position quantities do not depend on batching
    one = logit_fidelity(perturbed, model, windows[0], batch_size=1)
    assert one.num_positions == SEQ
