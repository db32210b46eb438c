"""What W8A8 calibration and convert cost next to one plain float forward over the same calibration tokens.

A seeded random Llama (4 layers, hidden 256, RMSNorm weights with a few x20..x60 outlier channels, as in
``benchmarks/accuracy.py``), calibrated on 32 sequences of 256 random tokens (batches of 8). Per recipe it
prints the time of calibration (prepare + the calibration forwards), of ``convert``, of one plain float forward
over the same 32x256 tokens (measured right before, on the same model), and ``(calib + convert) / forward``;
calibration includes ``prepare`` (its one-off probe forward is also shown alone). CPU seconds are the honest
measure on a loaded machine with ``--threads 1`` (with more threads, OpenMP's spinning inflates them).

Recipes: ``naive`` (static abs-max ranges, no smoothing), ``exportable`` (auto alpha, linear producers, MSE
ranges: what compressed-tensors can store) and ``accurate`` (+ smoothing inside the quantizer, rotations).

    python benchmarks/convert_cost.py                      # all recipes
    python benchmarks/convert_cost.py --recipe exportable --profile   # where convert's time goes (cProfile)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import outlier_llama  # noqa: E402  (the same seeded builder, wider and deeper here)

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.run.schemes import build_config


def recipes(backend: str) -> dict[str, W8A8Config]:
    exportable = dict(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True), activations="static",
                      act_range="mse")
    return {
        "naive": W8A8Config(activations="static", act_range="absmax", tuning=W8A8Tuning(backend=backend)),
        "exportable": W8A8Config(**exportable, tuning=W8A8Tuning(backend=backend)),
        "accurate": W8A8Config(**exportable, tuning=W8A8Tuning(backend=backend, smooth_in_quantizer=True,
                                                               rotate_in_quantizer=("all",))),
        # what `tico-sq quantize --scheme w8a8-static` applies: exportable + dynamic_fallback + block_objective
        "default": build_config("w8a8-static").with_tuning(backend=backend),
    }


class Clock:
    """Wall and process CPU time between construction and :meth:`stop`."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def forward_all(model: torch.nn.Module, calib: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for b in calib.split(batch):
            model(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["naive", "exportable", "accurate", "default", "all"], default="all")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", choices=["int8", "fake"], default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile convert; print the top functions")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile (default 25)")
    parser.add_argument("--sort", default="cumulative", help="pstats sort key for --profile (default cumulative)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    calib = torch.randint(0, 512, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    chosen = recipes(args.backend)
    if args.recipe != "all":
        chosen = {args.recipe: chosen[args.recipe]}
    print(f"random outlier Llama: {args.layers} layers, hidden {args.hidden}; calibration {args.samples}x{args.seq_len}"
          f" tokens in batches of {args.batch}; {args.threads} threads")
    print("wall seconds, then CPU seconds of this process (steadier on a shared machine); ratio = (calib + convert) / forward")
    print(f"{'recipe':12s} {'forward':>8s} {'calib':>8s} {'convert':>8s} {'ratio':>6s}   {'cpu fwd':>8s} {'calib':>8s} "
          f"{'convert':>8s} {'ratio':>6s}")
    for name, config in chosen.items():
        model = outlier_llama(hidden=args.hidden, layers=args.layers)
        forward_all(model, calib[: args.batch], args.batch)  # warm-up
        fwd = Clock()
        forward_all(model, calib, args.batch)
        fwd.stop()

        cal = Clock()
        prep = Clock()
        model = prepare(model, config)
        prep.stop()
        forward_all(model, calib, args.batch)
        cal.stop()

        profiler = cProfile.Profile() if args.profile else None
        conv = Clock()
        if profiler is not None:
            profiler.enable()
        convert(model)
        if profiler is not None:
            profiler.disable()
        conv.stop()
        print(f"{name:12s} {fwd.wall:7.2f}s {cal.wall:7.2f}s {conv.wall:7.2f}s {(cal.wall + conv.wall) / fwd.wall:6.2f}   "
              f"{fwd.cpu:7.2f}s {cal.cpu:7.2f}s {conv.cpu:7.2f}s {(cal.cpu + conv.cpu) / fwd.cpu:6.2f}   "
              f"(prepare {prep.wall:.2f}s wall, {prep.cpu:.2f}s cpu)", flush=True)
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(args.sort).print_stats(args.top)
            print(out.getvalue())


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
