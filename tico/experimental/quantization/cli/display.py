"""What the command line shows while the library works: tqdm bars for progress, log lines, errors.

The library reports progress through :mod:`~tico.experimental.quantization.progress`; this module turns each
step into a tqdm bar on stderr. A step with a known length gets a bar with elapsed and remaining time; a step
without one (loading a model, converting) gets a line whose elapsed time ticks every second, so no step is
ever silent.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import Any, Iterator

__all__ = ["ProgressDisplay", "show_progress", "configure_logging", "out"]


def out(line: str = "") -> None:
    """Results go to stdout (progress and errors go to stderr), so ``tico-sq ... > result.txt`` keeps them apart."""
    print(line, flush=True)


class ProgressDisplay:
    """A :data:`~tico.experimental.quantization.progress.ProgressCallback` that draws tqdm bars."""

    def __init__(self, tick_seconds: float | None = None) -> None:
        self.bars: dict[str, Any] = {}
        # A terminal redraws one line in place every second; a log file (CI) gets a line every 30 s instead.
        self.tick_seconds = tick_seconds if tick_seconds is not None else 1.0 if sys.stderr.isatty() else 30.0
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


@contextlib.contextmanager
def show_progress() -> Iterator[ProgressDisplay]:
    """Show the progress of every library step run inside the block."""
    from tico.experimental.quantization.progress import progress_callback

    display = ProgressDisplay()
    try:
        with progress_callback(display):
            yield display
    finally:
        display.close()


def configure_logging(verbose: bool, debug: bool) -> None:
    """Library warnings always; its INFO lines (per-block plans) with ``--verbose``; everything with ``--debug``."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not debug:
        for noisy in ("urllib3", "filelock", "huggingface_hub", "fsspec", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
