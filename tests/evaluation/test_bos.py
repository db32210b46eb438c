"""Windows begin the way the model's tokenizer begins a text: its BOS where it adds one, nothing where it adds none."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tico.experimental.quantization.evaluation import (
    calibration_windows,
    leading_bos,
    text_tokens_per_window,
    token_windows,
    tokenize_text,
)

TEXT = " ".join(f"w{i % 40}" for i in range(400))


@pytest.fixture(scope="module")
def stories(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


def _word_tokenizer(bos: str | None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a declared BOS it never adds (as GPT-2's ``<|endoftext|>``), or no BOS."""
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": 2 + i for i in range(40)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token=bos)


def test_stories_tokenizer_adds_bos_and_every_window_begins_with_it(stories):
    assert stories("a").input_ids[0] == stories.bos_token_id == 1 and leading_bos(stories) == 1
    assert text_tokens_per_window(stories, 16) == 15 and text_tokens_per_window(stories, 16, add_bos=False) == 16
    stream = tokenize_text(stories, TEXT, add_bos=False)
    windows = token_windows(stories, TEXT, 16)
    assert windows.shape == (stream.numel() // 15, 16)
    assert (windows[:, 0] == 1).all() and not (windows[:, 1:] == 1).any()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[: windows.size(0) * 15])
    picked = calibration_windows(stories, TEXT, 16, num_windows=3, seed=0)
    assert picked.shape == (3, 16) and (picked[:, 0] == 1).all()
    assert all(any(torch.equal(row, w) for w in windows) for row in picked)  # rows of the same grid


def test_a_declared_bos_the_tokenizer_does_not_add_is_not_added():
    tok = _word_tokenizer("<s>")
    assert tok.bos_token_id == 1 and tok("w3").input_ids == [5]  # declared, never prepended
    assert leading_bos(tok) is None and text_tokens_per_window(tok, 16) == 16
    windows = token_windows(tok, TEXT, 16)
    assert windows.shape == (400 // 16, 16) and not (windows == 1).any()
    assert torch.equal(windows.reshape(-1), tokenize_text(tok, TEXT)[: windows.numel()])
    assert tokenize_text(tok, TEXT)[0] == 2  # no BOS in the stream either


def test_a_tokenizer_without_bos_cuts_plain_windows():
    tok = _word_tokenizer(None)
    assert leading_bos(tok) is None
    assert torch.equal(token_windows(tok, TEXT, 16, num_windows=2), torch.tensor([2 + i % 40 for i in range(32)]).view(2, 16))


def test_seq_len_one_cannot_hold_bos_and_text(stories):
    with pytest.raises(ValueError, match="seq_len must be >= 2 when each window begins with the BOS"):
        token_windows(stories, TEXT, 1)
