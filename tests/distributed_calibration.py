"""A user's own data-parallel calibration loop, as one rank of ``torchrun`` runs it (used by test_distributed.py).

Run as a script with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): every
case of :data:`CASES` is prepared, calibrated on this rank's share of the batches and converted, and the
converted ``state_dict`` is saved to ``OUT/<case>.rank<r>.pt``; then one convert in which rank 1 fails, whose
outcome per rank goes to ``OUT/failure.rank<r>.json``. The test compares the files with :func:`convert_case` run
in one process on all the batches.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402

from tico.experimental.quantization import convert, prepare  # noqa: E402
from tico.experimental.quantization.run.schemes import build_config  # noqa: E402

MODELS = ("llama", "gemma", "mixtral")  # a Llama, a tied-embedding model, a fused-expert MoE
SCHEMES = ("smooth", "w8a8-dynamic", "w8a8-static")
CASES = [(m, s) for m in MODELS for s in SCHEMES]
N_BATCHES = 4


def config_of(scheme: str):
    """``smooth``: the plain ``SmoothQuantConfig()``; the W8A8 schemes: the command line's defaults."""
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

    return SmoothQuantConfig() if scheme == "smooth" else build_config(scheme)


def batches(model_key: str) -> list[torch.Tensor]:
    return [zoo.input_ids(model_key, batch=2, seq=12, seed=10 + i) for i in range(N_BATCHES)]


def share(scheme: str, rank: int, world: int, items: list) -> list:
    """This rank's batches: interleaved for smoothing and dynamic (any split gives the same model); contiguous in
    rank order for static, whose block objective keeps the first calls in rank order (docs/distributed.md)."""
    if scheme == "w8a8-static":
        per = -(-len(items) // world)
        return items[rank * per:(rank + 1) * per]
    return items[rank::world]


def convert_case(model_key: str, scheme: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    model = prepare(zoo.build_model(model_key), config_of(scheme))
    with torch.no_grad():
        for ids in share(scheme, rank, world, batches(model_key)):
            model(ids)
    return {k: v.detach().clone() for k, v in convert(model).state_dict().items()}


def _failing_convert(rank: int) -> dict[str, str]:
    """Rank 1 raises while planning; what each rank ends with, and whether its model stayed unchanged."""
    from tico.experimental.quantization.algorithm.smoothquant.quantizer import SmoothQuantQuantizer

    model = prepare(zoo.build_model("llama"), config_of("smooth"))
    with torch.no_grad():
        for ids in share("smooth", rank, 2, batches("llama")):
            model(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if rank == 1:
        def broken(self, *args, **kwargs):
            raise RuntimeError("injected failure on rank 1")

        SmoothQuantQuantizer.plan_scales = broken  # type: ignore[method-assign]
    try:
        convert(model)
        outcome = {"error": "", "message": ""}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome["unchanged"] = str(all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()))
    return outcome


def _helpers(rank: int) -> dict[str, list]:
    """The collectives of ``distributed`` on 2 ranks: rank r holds r + 1 rows of value r."""
    from tico.experimental.quantization import distributed

    rows = torch.full((rank + 1, 2), float(rank))
    return {
        "rows": distributed.gather_rows_in_rank_order(rows).tolist(),
        "max": distributed.all_reduce_max(torch.tensor([float(rank), -float(rank)])).tolist(),
        "sum": distributed.all_reduce_sum(torch.tensor([rank + 1])).tolist(),
        "broadcast": [distributed.broadcast_object({"from": rank}, src=1)["from"]],
    }


@contextmanager
def rank_group() -> Iterator[tuple[int, int]]:
    """This rank's gloo process group (one thread, as the one-process reference runs): yields (rank, world)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()  # every rank done before any tears down (gloo can abort a peer still closing)
    finally:
        dist.destroy_process_group()


def main(out: Path) -> None:
    with rank_group() as (rank, world):
        (out / f"helpers.rank{rank}.json").write_text(json.dumps(_helpers(rank)))
        for model_key, scheme in CASES:
            torch.save(convert_case(model_key, scheme, rank, world), out / f"{model_key}-{scheme}.rank{rank}.pt")
        (out / f"failure.rank{rank}.json").write_text(json.dumps(_failing_convert(rank)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
