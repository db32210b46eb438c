"""Parallel convert: under a process group the units of planning work (alpha searches, layer decisions,
block-objective trials) are split over the ranks, each computed once, and every rank applies the plan one process
makes; a failure in one rank's share, or between two exchanges, stops every rank with one error each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tico.experimental.quantization import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distributed_convert as dc  # noqa: E402
from test_distributed import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(HERE / "distributed_convert.py", str(out))
    return out


@pytest.fixture(scope="module")
def one_process() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a matmul's bits may depend on the thread count
    try:
        return dc.counted_convert()
    finally:
        torch.set_num_threads(threads)


def test_each_rank_computes_only_its_share_of_the_planning(two_ranks, one_process):
    _, total = one_process
    counts = [json.loads((two_ranks / f"counts.rank{r}.json").read_text()) for r in range(2)]
    for unit, n in total.items():
        assert n >= 2, (unit, n)  # something to split
        shares = [c[unit] for c in counts]
        assert sum(shares) == n and min(shares) > 0, (unit, shares, n)


def _same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rank: int) -> None:
    assert list(got) == list(expected)
    different = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not different, f"rank {rank}: {different[:5]}"


def test_the_split_convert_is_the_one_process_convert(two_ranks, one_process):
    expected, _ = one_process
    for rank in range(2):
        _same(torch.load(two_ranks / f"convert.rank{rank}.pt"), expected, rank)


@pytest.mark.parametrize("recipe", dc.RECIPES)
def test_layers_built_from_the_other_ranks_decisions_are_the_one_process_layers(two_ranks, recipe):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = dc.convert_recipe(recipe)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        _same(torch.load(two_ranks / f"{recipe}.rank{rank}.pt"), expected, rank)


@pytest.mark.parametrize("where, step", [("share", "choosing alphas"), ("between", "planning int8 layers")])
def test_a_failure_in_planning_stops_every_rank_once_and_leaves_the_models_unchanged(two_ranks, where, step):
    failed, other = (json.loads((two_ranks / f"failure-{where}.rank{r}.json").read_text()) for r in (1, 0))
    assert failed["error"] == "RuntimeError" and f"injected failure on rank 1 ({where})" in failed["message"]
    assert other["error"] == "DistributedError" and other["message"].startswith(step)
    assert "rank 1 of 2 failed" in other["message"] and "injected failure on rank 1" in other["message"]
    assert failed["unchanged"] == other["unchanged"] == "True"


def test_split_results_come_back_on_the_asked_device(two_ranks):
    got = [json.loads((two_ranks / f"tensors.rank{r}.json").read_text()) for r in range(2)]
    assert [g["computed"] for g in got] == [["bbb"], ["a", "cc"]]  # the costliest first, onto the least loaded rank
    for r, g in enumerate(got):
        mine = set(g["computed"])
        assert g["devices"] == {k: "cpu" if k in mine else "meta" for k in ("a", "bbb", "cc")}
        assert g["values"] == {k: [float(len(k))] * 2 for k in mine}


def test_owners_is_a_deterministic_greedy_bin_packing():
    assert distributed.owners([5.0, 1.0, 4.0, 3.0, 3.0], 2) == [0, 1, 1, 1, 0]  # loads 8 and 8
    assert distributed.owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]
    assert distributed.owners([2.0, 2.0, 2.0, 2.0], 1) == [0, 0, 0, 0]
    assert distributed.owners([], 3) == []


def test_without_a_process_group_every_unit_is_computed_here_in_order():
    seen = []
    got = distributed.split_work("units", ["b", "a"], [1.0, 9.0], lambda k: seen.append(k) or k.upper())
    assert seen == ["b", "a"] and got == {"b": "B", "a": "A"}
    with pytest.raises(ValueError, match="2 keys but 1 costs"):
        distributed.split_work("units", ["b", "a"], [1.0], str.upper)
