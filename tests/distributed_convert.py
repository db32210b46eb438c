"""Parallel convert, as one rank of ``torchrun`` runs it (used by test_distributed_convert.py).

Run as a script with torchrun's environment and ``OUT``: the ``w8a8-static`` default (alpha search, mse ranges,
dynamic fallback, block objective) on a tiny Llama, calibrated on this rank's share, converted while counting the
units of planning work this rank computes (:func:`counting`); the state_dict goes to ``OUT/convert.rank<r>.pt``
and the counts to ``OUT/counts.rank<r>.json``; the recipes of :data:`RECIPES`, whose layers are rebuilt from
decisions made on the other rank (in-quantizer smoothing and rotations, output-error ranges, more block-objective
candidates), to ``OUT/<recipe>.rank<r>.pt``. Then two converts in which rank 1 fails, inside its share of the
alpha searches and between two exchanges, and ``split_work`` with tensors (``OUT/<name>.rank<r>.json``).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import distributed_calibration as calib  # noqa: E402

from tico.experimental.quantization import convert, distributed, prepare  # noqa: E402
from tico.experimental.quantization.algorithm.w8a8 import alphas, block_objective  # noqa: E402
from tico.experimental.quantization.algorithm.w8a8.planner import LayerPlanner  # noqa: E402

CASE = ("llama", "w8a8-static")


def _recipes() -> dict:
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig as SQ
    from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning

    auto = SQ(alpha="auto", linear_producers=True)
    return {
        "in-quantizer": W8A8Config(smoothing=SQ(alpha="auto"), activations="static", act_range="mse",
                                   tuning=W8A8Tuning(smooth_in_quantizer=True, rotate_in_quantizer=("down_proj",))),
        "output-mse": W8A8Config(smoothing=auto, activations="static", act_range="output_mse", dynamic_fallback=4.0,
                                 block_objective=True, tuning=W8A8Tuning(block_objective_alphas=(0.5,))),
    }


RECIPES = tuple(_recipes())


def convert_recipe(recipe: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """:data:`RECIPES` ``recipe`` on the tiny Llama, calibrated on this rank's contiguous share of the batches."""
    model = prepare(calib.zoo.build_model("llama"), _recipes()[recipe])
    with torch.no_grad():
        for ids in calib.share("w8a8-static", rank, world, calib.batches("llama")):
            model(ids)
    return {k: v.detach().clone() for k, v in convert(model).state_dict().items()}
UNITS = {"alpha searches": (alphas, "search_alpha"), "ranges": (LayerPlanner, "static_range"),
         "trials": (block_objective, "trial_error")}


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """How many alpha searches, layer ranges and block-objective trials run here (each is one unit's work)."""
    counts = {k: 0 for k in UNITS}
    saved = {k: getattr(owner, attr) for k, (owner, attr) in UNITS.items()}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    for key, (owner, attr) in UNITS.items():
        setattr(owner, attr, counted(key, saved[key]))
    try:
        yield counts
    finally:
        for key, (owner, attr) in UNITS.items():
            setattr(owner, attr, saved[key])


def counted_convert(rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The converted state_dict of :data:`CASE` and the units of work this process computed."""
    with counting() as counts:
        state = calib.convert_case(*CASE, rank, world)
    return state, dict(counts)


def _failing(rank: int, where: str) -> dict[str, str]:
    """Rank 1 raises inside one alpha search (``share``) or after the searches' exchange (``between``)."""
    from tico.experimental.quantization.algorithm.smoothquant.quantizer import SmoothQuantQuantizer

    model = prepare(calib.zoo.build_model("llama"), calib.config_of("w8a8-static"))
    with torch.no_grad():
        for ids in calib.share("w8a8-static", rank, 2, calib.batches("llama")):
            model(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = alphas.search_alpha, SmoothQuantQuantizer.plan_scales
    if rank == 1:
        def broken(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank 1 ({where})")

        if where == "share":
            alphas.search_alpha = broken
        else:
            SmoothQuantQuantizer.plan_scales = broken  # type: ignore[method-assign]
    try:
        convert(model)
        outcome = {"error": "", "message": ""}
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    finally:
        alphas.search_alpha, SmoothQuantQuantizer.plan_scales = saved
    outcome["unchanged"] = str(all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()))
    return outcome


def _tensors(rank: int) -> dict:
    """``split_work`` of 3 keys with tensor results, asked back on the meta device: who computed what, and where
    each result came back."""
    computed = []

    def compute(key: str) -> torch.Tensor:
        computed.append(key)
        return torch.full((2,), float(len(key)))

    got = distributed.split_work("tensors", ["a", "bbb", "cc"], [1.0, 3.0, 2.0], compute, device=torch.device("meta"))
    return {"computed": computed, "devices": {k: str(v.device) for k, v in got.items()},
            "values": {k: v.tolist() for k, v in got.items() if v.device.type == "cpu"}}


def main(out: Path) -> None:
    with calib.rank_group() as (rank, world):
        state, counts = counted_convert(rank, world)
        torch.save(state, out / f"convert.rank{rank}.pt")
        (out / f"counts.rank{rank}.json").write_text(json.dumps(counts))
        for recipe in RECIPES:
            torch.save(convert_recipe(recipe, rank, world), out / f"{recipe}.rank{rank}.pt")
        for where in ("share", "between"):
            (out / f"failure-{where}.rank{rank}.json").write_text(json.dumps(_failing(rank, where)))
        (out / f"tensors.rank{rank}.json").write_text(json.dumps(_tensors(rank)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(Path(sys.argv[1]))
