"""The example scripts run end to end on the real model and do what their help says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_w8a8_saves_a_checkpoint_and_prints_the_plan_once(stories_dir, tinystories_text, tmp_path):
    out = tmp_path / "w8a8"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "smoothquant_quickstart.py"), "--model", str(stories_dir),
         "--text", str(tinystories_text), "--samples", "2", "--seq-len", "128", "--alpha", "0.5", "--w8a8", "static",
         "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout
    assert printed.count("SmoothQuant plan") <= 1 and printed.count("W8A8:") == 1
    assert "not supported" not in printed and f"saved to {out}" in printed
    assert (out / "model.safetensors").is_file() and (out / "tico_recipe.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8"]  # only the --output folder is written
    line = next(line for line in printed.splitlines() if line.startswith("perplexity on"))
    change = float(line.rsplit("(", 1)[1].split("%")[0])
    assert abs(change) < 10  # TinyStories text for a TinyStories model: no "broken" ppl


def test_example_usage_writes_outside_the_repository():
    doc = (ROOT / "examples" / "smoothquant_quickstart.py").read_text()
    outputs = [line.split("--output", 1)[1].split()[0] for line in doc.splitlines()
               if "python examples/" in line and "--output " in line]
    assert outputs and all(o.startswith("/tmp/tico-out/") for o in outputs), outputs
