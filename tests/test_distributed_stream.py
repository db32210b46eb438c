"""The streamed pipeline under a process group: 2 ranks (gloo, CPU) given the same batches write the checkpoint
one process writes, byte for byte; a rank that fails stops both and nothing is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tico.experimental.quantization.pipeline.stream import rank_share

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distributed_stream as stream  # noqa: E402
import zoo  # noqa: E402
from test_distributed import run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "llama"
    zoo.build_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, source) -> Path:
    """distributed_stream.py as 2 ranks, with the environment torchrun would give them."""
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(HERE / "distributed_stream.py", str(source), str(out))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("scheme", stream.CASES)
def test_two_ranks_write_the_checkpoint_one_process_writes(two_ranks, source, tmp_path, scheme):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a matmul's bits may depend on the thread count
    try:
        stream.run_case(source, scheme, tmp_path / scheme)
    finally:
        torch.set_num_threads(threads)
    expected, got = _files(tmp_path / scheme), _files(two_ranks / scheme)
    assert list(got) == list(expected)
    assert [name for name in expected if got[name] != expected[name]] == []


def test_a_rank_that_fails_stops_every_rank_and_nothing_is_written(two_ranks):
    failed, other = (json.loads((two_ranks / f"failure.rank{r}.json").read_text()) for r in (1, 0))
    assert failed == {"error": "RuntimeError", "message": "injected failure on rank 1"}
    assert other["error"] == "DistributedError"
    assert "after block 0: rank 1 of 2 failed" in other["message"] and "injected failure on rank 1" in other["message"]
    assert not (two_ranks / "failure").exists()
    assert sorted(p.name for p in two_ranks.iterdir()) == sorted([*stream.CASES, "failure.rank0.json", "failure.rank1.json"])


def test_without_a_process_group_the_share_is_every_batch():
    assert rank_share([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="empty"):
        rank_share([])


def test_the_shares_are_contiguous_in_rank_order_and_none_is_empty(monkeypatch):
    from tico.experimental.quantization import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    shares = []
    for r in range(4):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(rank_share(list(range(6))))
    assert shares == [[0, 1], [2, 3], [4], [5]]
    with pytest.raises(ValueError, match="3 calibration batch.*4 ranks"):
        rank_share([0, 1, 2])
