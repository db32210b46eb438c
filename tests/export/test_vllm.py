"""vLLM serves our compressed-tensors checkpoints and computes what ``load_compressed`` computes.

Runs ``benchmarks/vllm_check.py`` on its tiny model: static and dynamic W8A8 checkpoints, vLLM's offline API for
both and one request to its OpenAI-compatible server (127.0.0.1) for the static one; then the exportable rotations:
fused rotations (a plain checkpoint) and fused + an online Hadamard on ``down_proj`` (a ``transform_config``). vLLM pins its own torch, so
it normally lives in a separate virtual environment that this test drives as a subprocess:

    TICO_VLLM_PYTHON=/work/vllm-venv/bin/python python -m pytest tests/export/test_vllm.py

Skipped (with the reason) when no Python with vLLM is given and this one cannot import vLLM, or when the real
tokenizer/text in ``../shared/data`` is absent. Takes a few minutes: each vLLM engine start is 20-60 s here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LOGPROB_TOLERANCE = 1e-4  # the target; measured: 0 (static) and ~4e-6 (dynamic)


def _vllm_python() -> str:
    python = os.environ.get("TICO_VLLM_PYTHON")
    if python:
        probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=300,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        if probe.returncode != 0:
            pytest.skip(f"TICO_VLLM_PYTHON={python} cannot import vllm: {probe.stderr.strip()[-300:]}")
        return python
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not importable here and TICO_VLLM_PYTHON is not set (a Python that imports vllm; "
                    "see the README's 'Serving with vLLM')")
    return sys.executable


@pytest.fixture(scope="module")
def vllm_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vllm_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    return vllm_check


def test_vllm_matches_load_compressed(vllm_check, stories_dir, tinystories_text, tmp_path):
    python = _vllm_python()
    rows, margins = vllm_check.check(tmp_path, python, size="tiny", n_prompts=2, max_tokens=8,
                                     server_for=("static",))
    served = [r for r in rows if r.path != "ulp-ctl"]  # ulp-ctl: our model against itself, not vLLM
    seen = {(r.scheme, r.path) for r in served}
    assert seen == {("static", "offline"), ("dynamic", "offline"), ("static", "server")}, seen
    for r in served:
        where = f"{r.scheme}/{r.path} (logs in {tmp_path})"
        assert r.tokens_compared > 0, where
        assert r.max_abs_dlogprob <= LOGPROB_TOLERANCE, f"{where}: max |dlogp| {r.max_abs_dlogprob:.3e}"
        assert r.greedy_identical, f"{where}: greedy tokens differ (smallest margin {margins[r.scheme]:.3f})"
        if r.path == "offline":  # vLLM's decode steps (KV cache) give its tokens the log-probs we give them
            assert r.decode_max_abs_dlogprob <= LOGPROB_TOLERANCE, f"{where}: decode {r.decode_max_abs_dlogprob:.3e}"
        # vLLM ran the checkpoint through a real int8 W8A8 kernel (not a dequantized float fallback)
        assert any("Int8ScaledMM" in k for k in r.kernels), f"{where}: no int8 kernel in the log: {r.kernels}"


def test_vllm_rotated_checkpoints(vllm_check, stories_dir, tinystories_text, tmp_path):
    """Fused rotations and the online Hadamard (``transform_config``) served by vLLM, static and dynamic.

    vLLM 0.32 on CPU cannot run a ``transform_config``: its ``HadamardTransform`` calls the CPU GEMM dispatch
    without ever setting ``cpu_linear`` (``AttributeError`` at the first forward, the engine dies). The check
    then runs those checkpoints again with that one attribute patched in (``patched``): the numbers must match,
    which shows vLLM reads our transform (tensor name, +-1 matrix, scaling, direction) as we mean it.
    """
    python = _vllm_python()
    rows, margins = vllm_check.check(tmp_path, python, size="tiny", n_prompts=2, max_tokens=8, server_for=(),
                                     rotations=("fused", "online"))
    served = {(r.scheme, r.path): r for r in rows if r.path != "ulp-ctl"}
    expected = {("fused-static", "offline"), ("fused-dynamic", "offline"), ("online-static", "offline"),
                ("online-dynamic", "offline"), ("online-static", "patched"), ("online-dynamic", "patched")}
    assert set(served) == expected, set(served)
    for (name, path), r in served.items():
        where = f"{name}/{path} (logs in {tmp_path})"
        if name.startswith("online") and path == "offline" and r.error is not None:
            # vLLM's own bug (see the docstring); if a later vLLM fixes it, the row must then match like the rest
            assert "cpu_linear" in r.error, f"{where}: unexpected vLLM failure: {r.error}"
            continue
        assert r.error is None, f"{where}: {r.error}"
        assert r.tokens_compared > 0, where
        assert r.max_abs_dlogprob <= LOGPROB_TOLERANCE, f"{where}: max |dlogp| {r.max_abs_dlogprob:.3e}"
        assert r.greedy_identical, f"{where}: greedy tokens differ (smallest margin {margins[name]:.3f})"
        assert r.decode_max_abs_dlogprob <= LOGPROB_TOLERANCE, f"{where}: decode {r.decode_max_abs_dlogprob:.3e}"
        assert any("Int8ScaledMM" in k for k in r.kernels), f"{where}: no int8 kernel in the log: {r.kernels}"
