"""Streamed quantization on 1 rank vs 2 ranks (gloo, CPU): wall time, time per block by phase, and 8 ranks projected.

The checkpoint is benchmarks/scale.py's seeded random Llama (``build_checkpoint``, ``SHAPES``): Llama-3.2-1B's
shapes with ``--layers`` blocks (2 by default; ``--small``: tiny shapes, a smoke test). The recipe is what
``tico-sq quantize --scheme w8a8-static`` runs (alpha search, mse ranges, dynamic fallback, block objective);
nothing is written (``output_dir=None``: writing is rank 0's alone and not what is compared here).

Three runs of ``quantize_checkpoint``, each in fresh processes, on the same batches: 1 rank with 1 thread, 1 rank
with 2 threads, and 2 ranks with 1 thread each (the ranks started with torchrun's environment, ``gloo``). On a
2-core machine the 2-rank run has the same cores as "1 rank, 2 threads": that row is the fair comparison, the
1-thread row shows the scaling of the ranks' own work.

Per block, the pipeline's own clock (``StreamResult.phases``: load, calibrate, convert, propagate) and, inside
convert, what ``distributed.recording()`` saw: the seconds spent on the split units of planning (alpha searches,
layer decisions, block-objective trials; in one process the same units, all of them) and in the exchanges.

Projection for N ranks, from the 1-rank, 1-thread run: calibrate / N and propagate / N (each rank runs its share of
the batches), load as measured (every rank loads the block), convert = its serial part (convert - split units) +
split units / N + the collectives, from the 2-rank run's exchange seconds (per exchange the smallest over the
ranks: the transfer without the wait for a slower rank): the statistics reduction x 2(N-1)/N (every rank receives
the merged row samples, (N-1)/N of them from the others), the planning exchanges x (N - 1). It assumes a free core
(or GPU) per rank. The same formula at N = 2 is printed beside the measured 2-rank numbers, to show how far to
trust it.

    python benchmarks/distributed.py --small        # smoke test (tiny shapes, a few seconds per run)
    python benchmarks/distributed.py                # Llama-3.2-1B shapes, 2 layers
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

RUNS = {"1x1": ("1 rank, 1 thread", 1, 1), "1x2": ("1 rank, 2 threads", 1, 2), "2x1": ("2 ranks, 1 thread each", 2, 1)}
"""``--runs`` key (ranks x threads per rank) -> (label, ranks, threads per rank)."""
PHASES = ("load", "calibrate", "convert", "propagate")


# -- one rank (child process) ----------------------------------------------------------------------------------
def measure(args: argparse.Namespace) -> None:
    import logging

    import torch.distributed as dist

    from tico.experimental.quantization import distributed
    from tico.experimental.quantization.pipeline import quantize_checkpoint
    from tico.experimental.quantization.run.schemes import build_config

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    vocab = json.loads((Path(args.ckpt) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen) for _ in range(args.samples // args.batch)]
    marks: list[int] = []
    with distributed.recording() as log:
        result = quantize_checkpoint(args.ckpt, build_config("w8a8-static"), batches, None,
                                     on_block=lambda i: marks.append(len(log)))
    blocks, start = [], 0
    for i, end in enumerate(marks):  # the exchanges between two blocks' ends belong to the later block's convert
        part, start = log[start:end], end
        blocks.append({**{k: result.phases[i].get(k, 0.0) for k in PHASES},
                       "units_s": sum(e.compute_s for e in part if e.kind == "planning"),
                       "units": sum(e.units for e in part), "mine": sum(e.mine for e in part),
                       "exchanges": [(e.kind, e.exchange_s) for e in part]})
    report = {"blocks": blocks, "total_s": result.total_s, "capture_s": result.capture_s, "rest_s": result.rest_s}
    reports = distributed.gather_objects(report)
    if distributed.rank() == 0:
        print("RESULT " + json.dumps(reports))
    if dist.is_initialized():
        dist.barrier()  # every rank done before any tears down (gloo can abort a peer still closing)
        dist.destroy_process_group()


# -- driver ----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ckpt: Path, world: int, threads: int, args: argparse.Namespace) -> list[dict]:
    """``world`` ranks of :func:`measure` with torchrun's environment; every rank's report, in rank order."""
    cmd = [sys.executable, __file__, "measure", "--ckpt", str(ckpt), "--threads", str(threads),
           "--samples", str(args.samples), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"a rank of the {world}-rank run failed:\n{err[-3000:]}")
    line = next(l for l in outs[0][0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def mean_block(report: dict) -> dict[str, float]:
    """Seconds per block, averaged over the blocks, of one rank's report."""
    blocks = report["blocks"]
    keys = (*PHASES, "units_s")
    return {k: sum(b[k] for b in blocks) / len(blocks) for k in keys}


def collectives(reports: list[dict], kind: str) -> float:
    """Seconds per block in the exchanges of ``kind``, per exchange the smallest over the ranks (the transfer
    itself, without the wait for a slower rank)."""
    blocks = [r["blocks"] for r in reports]
    total = 0.0
    for i in range(len(blocks[0])):
        for j, (k, _) in enumerate(blocks[0][i]["exchanges"]):
            if k == kind:
                total += min(b[i]["exchanges"][j][1] for b in blocks)
    return total / len(blocks[0])


def project(base: dict[str, float], statistics_2: float, planning_2: float, n: int) -> dict[str, float]:
    """Seconds per block on ``n`` ranks from the 1-rank run (see the module docstring for the formula)."""
    collective = statistics_2 * 2 * (n - 1) / n + planning_2 * (n - 1)
    convert = base["convert"] - base["units_s"] + base["units_s"] / n + collective
    return {"load": base["load"], "calibrate": base["calibrate"] / n, "convert": convert,
            "propagate": base["propagate"] / n, "units_s": base["units_s"] / n}


def row(label: str, t: dict[str, float], extra: str = "") -> str:
    total = sum(t[k] for k in PHASES)
    return (f"| {label} | {t['load']:.2f} | {t['calibrate']:.2f} | {t['convert']:.2f} ({t['units_s']:.2f}) | "
            f"{t['propagate']:.2f} | {total:.2f} | {extra} |")


def summarize(results: dict[str, list[dict]], header: str) -> None:
    """The table; the comparisons and the projections need the 1x1 and 2x1 runs."""
    print(header)
    print("\nseconds per block (mean over the blocks; 2 ranks: rank 0's clock, the ranks meet at every phase's end)\n")
    print("| run | load | calibrate | convert (of which split units) | propagate | block | whole run |")
    print("|---|---|---|---|---|---|---|")
    means = {key: mean_block(reports[0]) for key, reports in results.items()}
    for key, reports in results.items():
        whole = max(r["total_s"] for r in reports)
        print(row(RUNS[key][0], means[key], f"{whole:.1f} s (capture {reports[0]['capture_s']:.1f}, rest "
                                            f"{reports[0]['rest_s']:.1f})"))
    if "1x1" not in results or "2x1" not in results:
        return
    base, two = means["1x1"], results["2x1"]
    stats, planning = collectives(two, "statistics"), collectives(two, "planning")
    print(row("projected 2 ranks (formula below)", project(base, stats, planning, 2)))
    print(row("projected 8 ranks", project(base, stats, planning, 8)))
    block2, whole2 = sum(means["2x1"][k] for k in PHASES), max(r["total_s"] for r in two)
    print()
    for key in (k for k in ("1x1", "1x2") if k in results):
        print(f"2 ranks (1 thread each) vs {RUNS[key][0]}: {sum(means[key][k] for k in PHASES) / block2:.2f}x per "
              f"block, {max(r['total_s'] for r in results[key]) / whole2:.2f}x whole run (above 1: 2 ranks faster)")
    frac = base["units_s"] / base["convert"] if base["convert"] else 0.0
    b0 = two[0]["blocks"][0]
    shares = " / ".join(f"{mean_block(r)['units_s']:.2f}" for r in two)
    print(f"convert's split units: {frac:.0%} of 1-rank convert ({b0['units']} units in block 0; rank 0 computed "
          f"{b0['mine']}, rank 1 {two[1]['blocks'][0]['mine']}; seconds per block on rank 0 / rank 1: {shares})")
    print(f"collectives on 2 ranks, per block (per exchange the smallest over the ranks): statistics reduction "
          f"{stats:.3f} s, planning exchanges {planning:.3f} s")
    print("projection from the 1-rank, 1-thread run: calibrate/N, propagate/N, load unchanged (every rank loads the "
          "block), convert = (convert - split units) + split units/N + collectives; the statistics reduction as on 2 "
          "ranks x 2(N-1)/N (each rank receives the merged samples' rows from the others: (N-1)/N of them), the "
          "planning exchanges (small, latency-bound) as on 2 ranks x (N-1); it assumes a free core (or GPU) per rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    m = sub.add_parser("measure")
    m.add_argument("--ckpt", required=True)
    m.add_argument("--threads", type=int, default=1)
    for p in (parser, m):
        p.add_argument("--samples", type=int, default=None, help="calibration sequences (default 32; --small 8)")
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256; --small 32)")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks of the checkpoint")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--workdir", default="/tmp/tico-distributed")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is called hung")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"which runs, of {list(RUNS)} (ranks x threads)")
    args = parser.parse_args()
    args.samples = args.samples or (8 if args.small else 32)
    args.seq_len = args.seq_len or (32 if args.small else 256)
    if args.cmd == "measure":
        return measure(args)
    from scale import SHAPES, build_checkpoint  # benchmarks/scale.py, beside this script

    name = "small" if args.small else "llama-3.2-1b"
    ckpt = Path(args.workdir) / f"{name}-float32-{args.layers}L"
    t = time.perf_counter()
    build_checkpoint(ckpt, SHAPES[name], args.layers, torch.float32)
    print(f"checkpoint: {name} shapes, {args.layers} blocks, float32 (ready in {time.perf_counter() - t:.1f} s)")
    unknown = [k for k in args.runs.split(",") if k not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    results = {k: launch(ckpt, RUNS[k][1], RUNS[k][2], args) for k in args.runs.split(",")}
    summarize(results, f"recipe: tico-sq quantize --scheme w8a8-static; {args.samples} sequences x {args.seq_len} "
                       f"tokens in batches of {args.batch}; nothing written; {os.cpu_count()} CPU cores")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded(enabled=sys.argv[1:2] != ["measure"]):  # not the ranks' child processes
        main()
