"""In-memory prepare/convert under a process group: 2 ranks (gloo, CPU) that split the calibration batches convert
the same model as one process calibrated on all of them, bit for bit; a rank that fails stops both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tico.experimental.quantization import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distributed_calibration as calib  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: Path, *args: str, world: int = 2, timeout: float = 240) -> list[tuple[int, str]]:
    """Run ``script`` as ``world`` ranks with the environment torchrun would give them (but no agent that stops
    the others when one exits); each rank's exit code and log, in rank order. Fails the test if a rank is still
    running after ``timeout`` seconds (a collective or the process group's start waiting for a rank)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the ranks did not finish in {timeout}s: a collective hangs")
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def run_ranks(script: Path, *args: str, world: int = 2) -> list[str]:
    """:func:`launch_ranks`, every rank expected to exit 0; their logs, in rank order."""
    ended = launch_ranks(script, *args, world=world)
    logs = [log for _, log in ended]
    assert all(code == 0 for code, _ in ended), "\n".join(logs[-1].splitlines()[-30:] + logs[0].splitlines()[-30:])
    return logs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run distributed_calibration.py as 2 ranks, with the environment torchrun would give them."""
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(HERE / "distributed_calibration.py", str(out))
    return out


@pytest.fixture(scope="module")
def one_process() -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a matmul's bits may depend on the thread count
    try:
        return {case: calib.convert_case(*case) for case in calib.CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", calib.CASES, ids=lambda c: "-".join(c))
def test_each_rank_converts_the_model_one_process_converts(two_ranks, one_process, case):
    expected = one_process[case]
    for rank in range(2):
        got = torch.load(two_ranks / f"{case[0]}-{case[1]}.rank{rank}.pt")
        assert list(got) == list(expected)
        different = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
        assert not different, f"rank {rank}: {different[:5]}"


def test_a_rank_that_fails_stops_every_rank_with_an_error_and_the_models_unchanged(two_ranks):
    failed, other = (json.loads((two_ranks / f"failure.rank{r}.json").read_text()) for r in (1, 0))
    assert failed["error"] == "RuntimeError" and "injected failure on rank 1" in failed["message"]
    assert other["error"] == "DistributedError"
    assert "rank 1 of 2 failed" in other["message"] and "injected failure on rank 1" in other["message"]
    assert failed["unchanged"] == other["unchanged"] == "True"


def test_collectives_on_two_ranks(two_ranks):
    for rank in range(2):
        got = json.loads((two_ranks / f"helpers.rank{rank}.json").read_text())
        assert got == {"rows": [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], "max": [1.0, 0.0], "sum": [3], "broadcast": [1]}


def test_without_a_process_group_the_helpers_are_the_identity():
    x = torch.arange(6.0).reshape(3, 2)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    assert torch.equal(distributed.all_reduce_max(x), x) and torch.equal(distributed.all_reduce_sum(x), x)
    assert torch.equal(distributed.gather_rows_in_rank_order(x), x)
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_object(3) == 3
    with pytest.raises(ValueError, match="kept"):
        with distributed.together("a block"):
            raise ValueError("kept as it is")
