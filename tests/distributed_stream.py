"""The streamed pipeline as one rank of ``torchrun`` runs it (used by test_distributed_stream.py).

Run as a script with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and
``SRC OUT``: every rank calls ``quantize_checkpoint`` with the same arguments (all the batches, the same output
folder) for each case of :data:`CASES`, into ``OUT/<case>``; then one run, into ``OUT/failure``, in which rank 1
raises after its first block, whose outcome per rank goes to ``OUT/failure.rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from tico.experimental.quantization.pipeline import quantize_checkpoint  # noqa: E402
from tico.experimental.quantization.run.schemes import build_config  # noqa: E402

CASES = ("smooth", "w8a8-dynamic", "w8a8-static")
N_BATCHES = 4


def config_of(scheme: str):
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

    return SmoothQuantConfig() if scheme == "smooth" else build_config(scheme)


def batches() -> list[torch.Tensor]:
    return [zoo.input_ids("llama", batch=2, seq=12, seed=10 + i) for i in range(N_BATCHES)]


def run_case(src: Path, scheme: str, out: Path) -> None:
    quantize_checkpoint(src, config_of(scheme), batches(), out)


def _failing_run(src: Path, out: Path, rank: int) -> dict[str, str]:
    def fail(i: int) -> None:
        if rank == 1:
            raise RuntimeError("injected failure on rank 1")

    try:
        quantize_checkpoint(src, config_of("w8a8-static"), batches(), out, on_block=fail)
        return {"error": "", "message": ""}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        return {"error": type(exc).__name__, "message": str(exc)}


def main(src: Path, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        for scheme in CASES:
            run_case(src, scheme, out / scheme)
        (out / f"failure.rank{rank}.json").write_text(json.dumps(_failing_run(src, out / "failure", rank)))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
