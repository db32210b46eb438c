"""Progress of long library steps, reported to whoever shows it.

This is the library's one progress mechanism. The library never draws progress bars itself (a library that
prints is hard to embed); every long step reports ``(step, done, total)`` through :func:`track` or
:func:`stage` to a callback installed by the caller, and logs each step at DEBUG level. The command line
installs a callback that draws one tqdm bar per step on a terminal and writes plain lines to a log file; a
script can install its own, or none (then nothing is shown and nothing is slowed down).

>>> from tico.experimental.quantization.progress import progress_callback, track
>>> seen = []
>>> with progress_callback(lambda step, done, total: seen.append((step, done, total))):
...     for _ in track(range(2), "calibrating"):
...         pass
>>> seen
[('calibrating', 0, 2), ('calibrating', 1, 2), ('calibrating', 2, 2)]
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Optional, TypeVar

__all__ = ["ProgressCallback", "progress_callback", "track", "stage"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
ProgressCallback = Callable[[str, int, Optional[int]], None]
"""``callback(step, done, total)``: ``done == 0`` opens a step, ``done == total`` closes it (``total`` may be
None for a step whose length is unknown; it is closed by a final call with ``total == done``)."""

_callback: ContextVar[ProgressCallback | None] = ContextVar("tico_progress_callback", default=None)


@contextlib.contextmanager
def progress_callback(callback: ProgressCallback | None) -> Iterator[None]:
    """Report the progress of every library step run inside this block to ``callback``."""
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


def track(items: Iterable[T], step: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items``, reporting each one done to the installed callback (if any) under ``step``."""
    callback = _callback.get()
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if total == 0:  # nothing to do is no step: opening one would leave it open (done == total at once)
        callback = None
    start = time.perf_counter()
    if callback is not None:
        callback(step, 0, total)
    done = 0
    for item in items:
        yield item
        done += 1
        if callback is not None:
            callback(step, done, total)
        logger.debug("%s: %d/%s after %.1fs", step, done, total if total is not None else "?", time.perf_counter() - start)
    if callback is not None and total != done:
        callback(step, done, done)  # the real length was shorter (or unknown): close the step


@contextlib.contextmanager
def stage(step: str) -> Iterator[None]:
    """One step with no countable parts (loading a model, writing a checkpoint): reported as 0/1, then 1/1."""
    callback = _callback.get()
    start = time.perf_counter()
    if callback is not None:
        callback(step, 0, 1)
    yield
    if callback is not None:
        callback(step, 1, 1)
    logger.debug("%s: done after %.1fs", step, time.perf_counter() - start)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bar while we load parts of a model (ours, if any, is the one to show)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
