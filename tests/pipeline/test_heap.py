"""trim_heap: freed heap memory goes back to the OS (glibc); test_stream checks the pipeline trims per block."""

from __future__ import annotations

import pytest
import torch

from tico.experimental.quantization.pipeline import heap


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(heap._malloc_trim() is None, reason="no malloc_trim in this C library (glibc only)")
def test_trim_returns_freed_heap_pages():
    # 192 MB of 64 KB tensors (below glibc's mmap threshold: from the heap), all freed but the last, which pins
    # the heap's top so that malloc cannot shrink it by itself
    chunks = [torch.ones(16 * 1024) for _ in range(3072)]
    last = chunks[-1]
    del chunks
    before = _rss()
    assert heap.trim_heap()
    after = _rss()
    assert before - after > 96 * 2**20, (before, after)
    assert float(last.sum()) == 16 * 1024

