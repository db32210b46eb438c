"""Text loading and tokenization shared by calibration, perplexity, fidelity checks and benchmarks.

All evaluation in this package follows one convention, so numbers from different tools can be compared:
the whole text is tokenized **once** as one stream (no per-line or per-chunk tokenization, which would
insert a BOS / dummy-prefix space at every boundary and change the token sequence). Windows are then cut
from that stream by token position, and each window begins the way the model's tokenizer begins a text:
with its BOS when it adds one (see :func:`leading_bos`), followed by ``seq_len - 1`` tokens of the stream.
A model runs every prompt from its BOS; a window without one puts it in a regime it never runs in, and the
massive activations that sit on the first token would be calibrated on the wrong token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = [
    "read_text",
    "tokenize_text",
    "cut_windows",
    "token_windows",
    "calibration_windows",
    "window_picks",
    "windows_outside",
    "SELECTIONS",
    "bos_token_id",
    "leading_bos",
    "text_tokens_per_window",
]

logger = logging.getLogger(__name__)


def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 contents of ``path``, unchanged (no stripping, no line joining).

    Every way a data file can be wrong gets its own message naming the file, because these are the first
    errors a new user meets: a missing file names the resolved path (a relative path resolved against an
    unexpected working directory is the usual cause), a folder says it is a folder, bytes that are not UTF-8
    name the offset and how to convert, and a file with no text says it is empty (rather than "too short"
    further down the line). Raises :class:`FileNotFoundError` for the first two and :class:`ValueError`
    for the others.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise FileNotFoundError(f"text file {str(path)!r} is a folder (a directory), not a text file (resolved to {p.resolve()})")
    if not p.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist (resolved to {p.resolve()})")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"text file {str(path)!r} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}"
        ) from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty" + (" (only whitespace)" if text else ""))
    return text


def bos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's BOS id, or ``None`` when it has none; whether it is added is :func:`leading_bos`."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id the tokenizer begins every text with, or ``None`` when it begins a text without one.

    Asked of the tokenizer itself (``tokenizer("a")``), because a declared BOS is not always added (GPT-2's
    ``<|endoftext|>`` is its BOS but it is never prepended) and ``add_bos_token`` is not always set where a
    post-processor adds it. ``add_bos_token`` decides only when the tokenizer returns no ids for ``"a"``.
    """
    bos = bos_token_id(tokenizer)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    if len(ids):
        return bos if int(ids[0]) == bos else None
    return bos if getattr(tokenizer, "add_bos_token", False) else None


def text_tokens_per_window(tokenizer: Any, seq_len: int, add_bos: bool = True) -> int:
    """How many tokens of the text's stream one window of ``seq_len`` holds (one fewer when it begins with BOS).

    Disjoint windows from :func:`token_windows` advance through the stream by this much, so the first ``k``
    of them end at stream token ``k * text_tokens_per_window(...)``: where scoring may start without reusing
    calibration tokens.
    """
    return seq_len - 1 if add_bos and leading_bos(tokenizer) is not None else seq_len


def tokenize_text(tokenizer: Any, text: str, add_bos: bool = True) -> torch.Tensor:
    """Tokenize ``text`` as one stream; returns a 1-D ``LongTensor``.

    Special tokens are not added by the tokenizer (its post-processor might add BOS and/or EOS, and
    only one BOS at the very start is wanted); when ``add_bos`` is true and the tokenizer begins a text
    with a BOS (:func:`leading_bos`), it is prepended once. ``verbose=False`` silences the "sequence length is longer than the
    specified maximum" warning, which is irrelevant here: the stream is cut into windows afterwards.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = leading_bos(tokenizer) if add_bos else None
    if bos is not None:
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)


def _as_stream(ids: torch.Tensor) -> torch.Tensor:
    """Accept a 1-D token stream or the ``[1, N]`` tensor a tokenizer returns with ``return_tensors='pt'``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"expected a LongTensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.size(0) == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(
            f"expected a token stream of shape [N] or [1, N], got shape {list(ids.shape)}; "
            "to score pre-cut windows, flatten them or pass them one at a time"
        )
    if ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
    return ids.long()


def cut_windows(
    ids: torch.Tensor,
    seq_len: int,
    num_windows: int | None = None,
    start: int = 0,
    stride: int | None = None,
) -> torch.Tensor:
    """Cut full windows of ``seq_len`` tokens from a token stream; returns ``[n, seq_len]``.

    Window ``k`` is ``ids[start + k * stride : start + k * stride + seq_len]``. ``stride`` defaults to
    ``seq_len`` (disjoint, adjacent windows); a smaller stride gives overlapping windows, a larger one
    leaves gaps. Only full windows are cut: the tail shorter than ``seq_len`` is left out, so every row has
    the same length and can be batched. With ``num_windows=None`` every full window is returned.

    Raises :class:`ValueError` naming the numbers when the stream is too short for even one window, or for
    the ``num_windows`` asked for, so a wrong file or a wrong ``seq_len`` is caught at once.
    """
    ids = _as_stream(ids)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stride = seq_len if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if num_windows is not None and num_windows < 1:
        raise ValueError(f"num_windows must be >= 1 or None, got {num_windows}")
    total = ids.numel()
    available = 0 if total - start < seq_len else (total - start - seq_len) // stride + 1
    if available == 0:
        raise ValueError(
            f"text too short: {total} tokens, but a window of seq_len={seq_len} starting at token {start} "
            f"needs at least {start + seq_len}"
        )
    if num_windows is None:
        num_windows = available
    elif num_windows > available:
        needed = start + (num_windows - 1) * stride + seq_len
        raise ValueError(
            f"text too short: {num_windows} windows of seq_len={seq_len} with stride={stride} from token "
            f"{start} need {needed} tokens, but the text has {total} (room for {available} windows)"
        )
    # unfold gives a view into the stream; clone so windows can be modified or moved independently.
    return ids[start:].unfold(0, seq_len, stride)[:num_windows].clone()


def token_windows(
    tokenizer: Any,
    text: str | torch.Tensor,
    seq_len: int,
    num_windows: int | None = None,
    start: int = 0,
    stride: int | None = None,
    add_bos: bool = True,
) -> torch.Tensor:
    """Tokenize ``text`` once and cut windows that begin as the tokenizer begins a text; returns ``[n, seq_len]``.

    When ``add_bos`` is true and the tokenizer begins a text with a BOS (:func:`leading_bos`), every window
    is that BOS followed by ``seq_len - 1`` tokens of the stream; otherwise it is ``seq_len`` tokens of the
    stream. ``start`` and ``stride`` count tokens of the stream (no BOS in it); ``stride`` defaults to the
    stream tokens per window (:func:`text_tokens_per_window`), so disjoint windows cover the text without
    gaps. ``text`` may also be an already tokenized stream (a ``[N]`` or ``[1, N]`` LongTensor), which is
    cut as it is: ``tokenizer`` and ``add_bos`` are not used. See :func:`cut_windows` for the errors.
    """
    if isinstance(text, torch.Tensor):
        return cut_windows(text, seq_len, num_windows=num_windows, start=start, stride=stride)
    ids = tokenize_text(tokenizer, text, add_bos=False)
    bos = leading_bos(tokenizer) if add_bos else None
    if bos is None:
        windows = cut_windows(ids, seq_len, num_windows=num_windows, start=start, stride=stride)
    else:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 when each window begins with the BOS (id {bos}), got {seq_len}")
        try:
            body = cut_windows(ids, seq_len - 1, num_windows=num_windows, start=start, stride=stride)
        except ValueError as exc:
            raise ValueError(f"{exc} (each window of seq_len={seq_len} is the BOS and {seq_len - 1} tokens of the text)") from None
        windows = torch.cat([torch.full((body.size(0), 1), bos, dtype=torch.long), body], dim=1)
    logger.debug("cut %d windows of %d tokens from a stream of %d tokens (BOS %s)", windows.size(0), seq_len, ids.numel(), bos)
    return windows


SELECTIONS = ("spread", "random", "first")


def window_picks(available: int, num_windows: int, selection: str = "spread", seed: int = 0) -> torch.Tensor:
    """Which ``num_windows`` of ``available`` disjoint windows calibrate, as sorted indices into the grid.

    ``"spread"``: evenly spaced over the whole text (window ``k * available // num_windows``), so a text that is
    many documents (WikiText's articles, a concatenated dataset) is sampled across its documents rather than in
    its first one, deterministically and without a seed; ``"random"``: drawn without replacement with ``seed``
    (what llm-compressor's shuffled dataset samples do); ``"first"``: the first ``num_windows``.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    if num_windows > available:
        raise ValueError(f"{num_windows} windows are asked for, but the text has room for only {available}")
    if selection == "first":
        return torch.arange(num_windows)
    if selection == "spread":
        return torch.arange(num_windows) * available // num_windows
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=gen)[:num_windows].sort().values


def calibration_windows(
    tokenizer: Any,
    text: str | torch.Tensor,
    seq_len: int,
    num_windows: int,
    seed: int | None = 0,
    add_bos: bool = True,
    selection: str = "random",
) -> torch.Tensor:
    """``num_windows`` disjoint windows of ``seq_len`` tokens for calibration; returns ``[n, seq_len]``.

    Calibration statistics (activation abs-max) should see the whole corpus, not only its first pages: the
    windows are picked from the grid of disjoint windows by :func:`window_picks` (``selection``: ``"random"``
    with ``seed``, ``"spread"`` evenly over the text, or ``"first"``) and returned in text order. ``seed=None``
    takes the first ``num_windows`` windows (as ``selection="first"``). Raises :class:`ValueError` when the text
    has fewer disjoint windows than asked for.
    """
    grid = token_windows(tokenizer, text, seq_len, add_bos=add_bos)
    if num_windows > grid.size(0):
        raise ValueError(
            f"text too short: {num_windows} disjoint windows of seq_len={seq_len} are asked for, "
            f"but the text has room for only {grid.size(0)}"
        )
    picks = window_picks(grid.size(0), num_windows, "first" if seed is None else selection, seed or 0)
    return grid[picks].clone()


def windows_outside(
    tokenizer: Any,
    text: str,
    seq_len: int,
    excluded: Iterable[tuple[int, int]],
    start: int = 0,
    add_bos: bool = True,
) -> torch.Tensor:
    """The disjoint windows of ``text`` from stream token ``start`` on that share no token with ``excluded``.

    ``excluded`` holds ``[first, end)`` ranges of the text's token stream (no BOS counted), e.g. the tokens a
    model was calibrated on (``tico_recipe.json``), so that evaluation on the calibration text never scores them
    whichever windows calibration picked. Raises :class:`ValueError` when no window is left.
    """
    windows = token_windows(tokenizer, text, seq_len, start=start, add_bos=add_bos)
    step = text_tokens_per_window(tokenizer, seq_len, add_bos)
    ranges = [(int(a), int(b)) for a, b in excluded]
    keep = [k for k in range(windows.size(0))
            if not any(a < start + (k + 1) * step and start + k * step < b for a, b in ranges)]
    if not keep:
        raise ValueError(f"text too short: every window of seq_len={seq_len} from token {start} overlaps the "
                         f"{len(ranges)} excluded (calibration) token ranges")
    return windows[keep]
