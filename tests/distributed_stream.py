"""The streamed pipeline as one rank of ``torchrun`` runs it (used by test_distributed_stream.py).

Run as a script with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and
``SRC OUT``, ``SRC/<model>`` holding each model of :data:`MODELS` saved with ``save_pretrained``: every rank
calls ``quantize_checkpoint`` with the same arguments (all the batches, the same output folder) for each case of
:data:`CASES`, into ``OUT/<model>-<scheme>``; then one run, into ``OUT/failure``, in which rank 1 raises after its
first block, and one, into ``OUT/early``, in which reading rank 1's calibration batches raises before the first
collective; their outcomes per rank go to ``OUT/failure.rank<r>.json`` and ``OUT/early.rank<r>.json``.

``cli HOW ARGS...``: ``tico-sq ARGS`` as one rank of torchrun runs it, except on rank 1, which fails ``HOW``:
``model`` (its ``--model`` is a folder that does not exist), ``raise`` (a RuntimeError where
``quantize_checkpoint`` splits the batches, before the first collective) or ``die`` (it exits with code 3
before it starts, without a word to the others).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from tico.experimental.quantization.pipeline import quantize_checkpoint  # noqa: E402
from tico.experimental.quantization.run.schemes import build_config  # noqa: E402

MODELS = ("llama", "gemma", "mixtral")  # a Llama, a tied-embedding model, a fused-expert MoE
SCHEMES = ("smooth", "w8a8-dynamic", "w8a8-static")
CASES = [f"{m}-{s}" for m in MODELS for s in SCHEMES]
N_BATCHES = 4


def config_of(scheme: str):
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

    return SmoothQuantConfig() if scheme == "smooth" else build_config(scheme)


def batches(model_key: str) -> list[torch.Tensor]:
    return [zoo.input_ids(model_key, batch=2, seq=12, seed=10 + i) for i in range(N_BATCHES)]


def run_case(src: Path, case: str, out: Path) -> None:
    """``case`` (``<model>-<scheme>``) from ``src/<model>`` into ``out``."""
    model_key, scheme = case.split("-", 1)
    quantize_checkpoint(src / model_key, config_of(scheme), batches(model_key), out)


def _failing_run(src: Path, out: Path, rank: int) -> dict[str, str]:
    def fail(i: int) -> None:
        if rank == 1:
            raise RuntimeError("injected failure on rank 1")

    try:
        quantize_checkpoint(src / "llama", config_of("w8a8-static"), batches("llama"), out, on_block=fail)
        return {"error": "", "message": ""}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"error": type(exc).__name__, "message": str(exc)}


def _early_failure(src: Path, out: Path, rank: int) -> dict[str, str]:
    def calibration():
        yield from batches("llama")[:2]
        if rank == 1:
            raise RuntimeError("injected failure reading the calibration on rank 1")
        yield from batches("llama")[2:]

    try:
        quantize_checkpoint(src / "llama", config_of("smooth"), calibration(), out)
        return {"error": "", "message": ""}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"error": type(exc).__name__, "message": str(exc)}


def cli(how: str, argv: list[str]) -> int:
    from tico.experimental.quantization.cli import main as tico_sq
    from tico.experimental.quantization.pipeline import stream

    if os.environ["RANK"] == "1":
        if how == "die":
            os._exit(3)
        if how == "model":
            argv[argv.index("--model") + 1] = "/nonexistent/tico-test-model"
        if how == "raise":
            def fail(batches: list) -> list:
                raise RuntimeError("injected failure on rank 1 before the first collective")

            stream.rank_share = fail
    return tico_sq(argv)


def main(src: Path, out: Path) -> None:
    from distributed_calibration import rank_group

    with rank_group() as (rank, _):
        for case in CASES:
            run_case(src, case, out / case)
        (out / f"failure.rank{rank}.json").write_text(json.dumps(_failing_run(src, out / "failure", rank)))
        (out / f"early.rank{rank}.json").write_text(json.dumps(_early_failure(src, out / "early", rank)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1] == "cli":
        sys.exit(cli(sys.argv[2], sys.argv[3:]))
    main(Path(sys.argv[1]), Path(sys.argv[2]))
