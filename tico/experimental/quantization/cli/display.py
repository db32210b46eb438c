"""What the command line shows while the library works: progress, log lines, errors.

The library reports progress through :mod:`~tico.experimental.quantization.progress` (it draws nothing
itself); this module is the one place that shows it. On a terminal each step is a tqdm bar on stderr: a step
with a known length gets a bar with elapsed and remaining time; a step without one (loading a model,
converting) gets a line whose elapsed time ticks every second, so no step is ever silent. When stderr is a file
or a pipe (a log, CI), redrawing would fill it with carriage returns and escape codes, so :class:`LineDisplay`
writes plain lines instead: the start and end of each outermost step, and at most one line per interval about
the steps inside it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import IO, Any, Callable, Iterator

__all__ = ["ProgressDisplay", "LineDisplay", "show_progress", "configure_logging", "out"]


def out(line: str = "") -> None:
    """Results go to stdout (progress and errors go to stderr), so ``tico-sq ... > result.txt`` keeps them apart."""
    print(line, flush=True)


class ProgressDisplay:
    """A :data:`~tico.experimental.quantization.progress.ProgressCallback` that draws tqdm bars (terminals)."""

    def __init__(self, tick_seconds: float | None = None) -> None:
        self.bars: dict[str, Any] = {}
        self.tick_seconds = tick_seconds if tick_seconds is not None else 1.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None

    def __call__(self, step: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        with self._lock:
            bar = self.bars.get(step)
            if done == 0 and bar is None:
                if total == 1:  # a stage: elapsed time only, refreshed by the ticker
                    bar = tqdm(total=1, desc=step, file=sys.stderr, leave=True, bar_format="{desc}: {elapsed}")
                else:
                    bar = tqdm(total=total, desc=step, file=sys.stderr, leave=True, dynamic_ncols=True)
                self.bars[step] = bar
                self._start_ticker()
                return
            if bar is None:
                return
            bar.n = done
            if total is not None and done >= total:
                if bar.total != total:
                    bar.total = total
                if total == 1:
                    bar.bar_format = "{desc}: done in {elapsed}"
                bar.close()
                del self.bars[step]
            else:
                bar.refresh()

    def _start_ticker(self) -> None:
        if self._ticker is None or not self._ticker.is_alive():
            self._ticker = threading.Thread(target=self._tick, name="tico-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            with self._lock:
                for bar in self.bars.values():
                    bar.refresh()

    def close(self) -> None:
        """Stop the ticker and close open bars (after an error or Ctrl-C, so the error line starts clean)."""
        self._stop.set()
        with self._lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()


class LineDisplay:
    """A progress callback for logs: plain lines, no carriage returns, no escape codes, a bounded count.

    An outermost step (opened while no other is open) gets a line when it starts and one when it ends; any
    step's progress gets a line only when ``interval`` seconds have passed since the last line, so a run
    writes about two lines per outermost step plus one per interval, however many inner steps it has.
    """

    def __init__(self, stream: IO[str] | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.open: dict[str, tuple[float, bool]] = {}  # step -> (start time, outermost)
        self._last = clock()

    def __call__(self, step: str, done: int, total: int | None) -> None:
        now = self.clock()
        if done == 0 and step not in self.open:
            outermost = not self.open
            self.open[step] = (now, outermost)
            if outermost:
                self._line(f"{step} ...", now)
            return
        if step not in self.open:
            return
        start, outermost = self.open[step]
        if total is not None and done >= total:
            del self.open[step]
            if outermost:
                count = "" if total == 1 else f" ({done} of {total})"
                self._line(f"{step}: done{count} in {now - start:.1f}s", now)
        elif now - self._last >= self.interval:
            self._line(f"{step}: {done} of {total if total is not None else '?'} after {now - start:.1f}s", now)

    def _line(self, text: str, now: float) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()
        self._last = now

    def close(self) -> None:
        self.open.clear()


@contextlib.contextmanager
def show_progress() -> Iterator[ProgressDisplay | LineDisplay]:
    """Show the progress of every library step run inside the block: bars on a terminal, lines otherwise."""
    from tico.experimental.quantization.progress import progress_callback

    terminal = _is_terminal(sys.stderr)
    display: ProgressDisplay | LineDisplay = ProgressDisplay() if terminal else LineDisplay()
    try:
        with progress_callback(display), (contextlib.nullcontext() if terminal else _upstream_bars_off()):
            yield display
    finally:
        display.close()


@contextlib.contextmanager
def _upstream_bars_off() -> Iterator[None]:
    """transformers' and huggingface_hub's own tqdm bars (loading weights, downloads) off while lines are written:
    the library's ``loading ...`` step already says what is happening, without redraws."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    hub_off, transformers_on = hub.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
        if not hub_off:
            hub.enable_progress_bars()


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def configure_logging(verbose: bool, debug: bool) -> None:
    """Library warnings always; its INFO lines (per-block plans) with ``--verbose``; everything with ``--debug``."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not debug:
        for noisy in ("urllib3", "filelock", "huggingface_hub", "fsspec", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
