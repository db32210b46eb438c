"""The streamed pipeline under a process group: 2 ranks (gloo, CPU) given the same batches write the checkpoint
one process writes, byte for byte (a Llama, a tied-embedding Gemma, a fused-expert Mixtral; smoothing and the
W8A8 dynamic and static defaults); a rank that fails stops both and nothing is written."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tico.experimental.quantization.pipeline.stream import rank_share

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distributed_stream as stream  # noqa: E402
import zoo  # noqa: E402
from test_distributed import launch_ranks, run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """One folder per model of ``stream.MODELS``, as ``save_pretrained`` writes it."""
    root = tmp_path_factory.mktemp("src")
    for key in stream.MODELS:
        zoo.build_model(key).save_pretrained(root / key)
    return root


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, source) -> Path:
    """distributed_stream.py as 2 ranks, with the environment torchrun would give them."""
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(HERE / "distributed_stream.py", str(source), str(out))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _different(expected: Path, got: Path) -> list[str]:
    """The files that differ byte for byte; for a safetensors file, which of its tensors (names, dtypes, bytes)."""
    from safetensors.torch import load_file

    names = []
    for name, data in _files(expected).items():
        if (got / name).read_bytes() == data:
            continue
        if not name.endswith(".safetensors"):
            names.append(name)
            continue
        a, b = load_file(expected / name), load_file(got / name)
        names += [f"{name}:{k}" for k in sorted(a.keys() | b.keys())
                  if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] or [name]
    return names


@pytest.mark.parametrize("case", stream.CASES)
def test_two_ranks_write_the_checkpoint_one_process_writes(two_ranks, source, tmp_path, case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: a matmul's bits may depend on the thread count
    try:
        stream.run_case(source, case, tmp_path / case)
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in (two_ranks / case).iterdir()) == sorted(p.name for p in (tmp_path / case).iterdir())
    assert _different(tmp_path / case, two_ranks / case) == []


@pytest.mark.parametrize("model_key", stream.MODELS)
def test_the_compared_checkpoints_are_transformed(two_ranks, source, model_key):
    """Not a copy of the source: smoothing changed the norms that feed the attention and the MLP (the experts and
    their router for the MoE), W8A8 wrote int8 weights; a tied head is saved once, as the embedding."""
    from safetensors.torch import load_file

    src = load_file(source / model_key / "model.safetensors")
    smooth = load_file(two_ranks / f"{model_key}-smooth" / "model.safetensors")
    norms = [k for k in src if k.endswith(("input_layernorm.weight", "post_attention_layernorm.weight"))]
    assert len(norms) == 4 and not any(torch.equal(src[k], smooth[k]) for k in norms)
    for scheme in ("w8a8-dynamic", "w8a8-static"):
        quantized = load_file(two_ranks / f"{model_key}-{scheme}" / "model.safetensors")
        assert any(t.dtype == torch.int8 for t in quantized.values())
        assert ("lm_head.weight" in quantized) == ("lm_head.weight" in src)
    assert ("lm_head.weight" in src) == (model_key != "gemma")


def test_a_rank_that_fails_stops_every_rank_and_nothing_is_written(two_ranks):
    failed, other = (json.loads((two_ranks / f"failure.rank{r}.json").read_text()) for r in (1, 0))
    assert failed == {"error": "RuntimeError", "message": "injected failure on rank 1"}
    assert other["error"] == "DistributedError"
    assert "after block 0: rank 1 of 2 failed" in other["message"] and "injected failure on rank 1" in other["message"]
    assert not (two_ranks / "failure").exists()
    written = [*stream.CASES, *(f"{run}.rank{r}.json" for run in ("failure", "early") for r in (0, 1))]
    assert sorted(p.name for p in two_ranks.iterdir()) == sorted(written)


def test_a_rank_that_fails_before_the_first_collective_stops_every_rank(two_ranks):
    """Reading rank 1's calibration batches raises while rank 0 goes on: rank 0 learns it, and from whom, at its
    first exchange. Were the reading outside that exchange, rank 0 would wait in its first collective until rank
    1's process is gone (gloo then reports a reset connection, naming nobody) or the process group's timeout."""
    failed, other = (json.loads((two_ranks / f"early.rank{r}.json").read_text()) for r in (1, 0))
    assert failed == {"error": "RuntimeError", "message": "injected failure reading the calibration on rank 1"}
    assert other["error"] == "DistributedError"
    assert other["message"].startswith("preparing the streamed run: rank 1 of 2 failed")
    assert not (two_ranks / "early").exists()


# -- tico-sq quantize, 2 ranks started as torchrun starts them, without its agent (which would stop the others) --
def _cli(how: str, stories_dir: Path, text: Path, out: Path, *extra: str) -> tuple[list[tuple[int, str]], float]:
    argv = ["quantize", "--model", str(stories_dir), "--dataset", str(text), "--samples", "4", "--batch-size", "2",
            "--seq-len", "32", "--output", str(out), *extra]
    start = time.perf_counter()
    ended = launch_ranks(HERE / "distributed_stream.py", "cli", how, *argv, timeout=120)
    return ended, time.perf_counter() - start


def _error(log: str) -> str:
    return next(line for line in log.splitlines() if line.startswith("tico-sq: error:"))


def test_cli_a_rank_that_cannot_read_the_model_stops_every_rank(stories_dir, tinystories_text, tmp_path):
    (rank0, log0), (rank1, log1) = _cli("model", stories_dir, tinystories_text, tmp_path / "out")[0]
    assert rank1 == 3 and "/nonexistent/tico-test-model" in _error(log1) and "does not exist" in _error(log1)
    assert rank0 == 5, log0
    assert "checking the arguments and inputs: rank 1 of 2 failed" in _error(log0)
    assert "/nonexistent/tico-test-model" in _error(log0)
    assert not (tmp_path / "out").exists()


def test_cli_a_rank_that_raises_before_the_first_collective_ends_both_with_exit_5(stories_dir, tinystories_text,
                                                                                   tmp_path):
    (rank0, log0), (rank1, log1) = _cli("raise", stories_dir, tinystories_text, tmp_path / "out")[0]
    assert (rank0, rank1) == (5, 5), log0 + log1
    assert "injected failure on rank 1 before the first collective" in _error(log1)
    assert "preparing the streamed run: rank 1 of 2 failed" in _error(log0) and "injected failure" in _error(log0)
    assert not (tmp_path / "out").exists()


def test_cli_dist_timeout_bounds_the_wait_for_a_rank_that_never_starts(stories_dir, tinystories_text, tmp_path):
    """Rank 1 exits before the process group starts (nothing tells rank 0): rank 0 stops after --dist-timeout,
    exit 5, instead of torch's default timeout."""
    ((rank0, log0), (rank1, _)), took = _cli("die", stories_dir, tinystories_text, tmp_path / "out", "--dist-timeout", "2")
    assert (rank0, rank1) == (5, 3), log0
    assert "the process group did not start" in _error(log0)
    assert took < 100  # the launch timeout is 120 s; torch's default process group timeout is far longer
    assert not (tmp_path / "out").exists()


def test_cli_dist_timeout_without_torchrun_is_refused(capsys, tmp_path):
    from tico.experimental.quantization.cli import main

    assert main(["quantize", "--model", "m", "--dataset", "d", "--output", str(tmp_path / "o"), "--dist-timeout", "5"]) == 2
    assert "--dist-timeout" in capsys.readouterr().err and not (tmp_path / "o").exists()


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
