"""benchmarks/distributed.py --small: 1 rank and 2 ranks run, the table and the projection are printed, and the
output is recorded as the command's section of RESULTS.md."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_distributed_benchmark_smoke(tmp_path):
    results = tmp_path / "RESULTS.md"
    env = dict(os.environ, TICO_RESULTS=str(results))
    cmd = [sys.executable, str(BENCHMARKS / "distributed.py"), "--small", "--runs", "1x1,2x1", "--workdir",
           str(tmp_path / "work"), "--timeout", "300"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("| 1 rank, 1 thread |", "| 2 ranks, 1 thread each |", "| projected 8 ranks |",
                 "2 ranks (1 thread each) vs 1 rank, 1 thread:", "convert's split units:"):
        assert line in out, (line, out)
    assert "rank 0 computed 0" not in out and "rank 1 0)" not in out  # both ranks planned a share
    text = results.read_text()
    assert "<!-- results: benchmarks/distributed.py --small --runs 1x1,2x1" in text and "| projected 8 ranks |" in text
