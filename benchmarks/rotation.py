"""Fused rotations (a plain checkpoint) + W8A8, side by side with the same recipe without rotation.

Rotations are fused into the float weights first (``fuse_rotations``: residual stream Q and per-head value
rotations, randomized Hadamard), then the model is quantized as usual. Everything stays exportable to
compressed-tensors (no in-quantizer smoothing, no in-quantizer rotation), except the reference row that uses the
in-quantizer rotations of ``W8A8Tuning(rotate_in_quantizer=("all",))``, and "online Hadamard down_proj": ``down_proj``'s input,
which no weight can absorb, rotated at run time by a Hadamard (``add_online_rotations``), which compressed-tensors
describes as a ``transform_config`` (``save_compressed`` writes it).

1. The real model ``../shared/data/stories260K-hf``: the protocol of ``benchmarks/accuracy.py`` (calibration on
   32 windows of 256 tokens of ``tinystories/validation_head.txt``, perplexity and mean KL to the float model on
   16 later disjoint windows).
2. The random Llama with outlier norm channels of ``benchmarks/accuracy.py``: mean KL to float.

    python benchmarks/rotation.py                 # both parts
    python benchmarks/rotation.py --part real --backend fake
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import outlier_data, outlier_llama, print_row, quantize, stories_data  # noqa: E402

from tico.experimental.quantization.algorithm.rotation.fuse import fuse_rotations  # noqa: E402
from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations  # noqa: E402
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig  # noqa: E402
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning  # noqa: E402
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity  # noqa: E402
from tico.experimental.quantization.evaluation.perplexity import perplexity  # noqa: E402


def rows(activations: str, backend: str) -> list[tuple[str, str, W8A8Config]]:
    """(name, rotations before quantizing: "" / "fused" / "fused+online" / "online", config) for one activation
    mode."""
    common = dict(activations=activations, act_range="mse", tuning=W8A8Tuning(backend=backend))
    smooth = SmoothQuantConfig(alpha="auto", linear_producers=True)
    return [
        ("naive W8A8", "", W8A8Config(**common)),
        ("fused rotations + naive W8A8", "fused", W8A8Config(**common)),
        ("SmoothQuant auto, linear producers", "", W8A8Config(smoothing=smooth, **common)),
        ("fused rotations + SmoothQuant", "fused", W8A8Config(smoothing=smooth, **common)),
        ("fused + online Hadamard down_proj + SmoothQuant", "fused+online", W8A8Config(smoothing=smooth, **common)),
        ("online Hadamard down_proj (no fused) + SmoothQuant", "online", W8A8Config(smoothing=smooth, **common)),
        ("(ref) in-quantizer smooth+rotate, not exportable", "",
         W8A8Config(smoothing=smooth, **common).with_tuning(smooth_in_quantizer=True, rotate_in_quantizer=("all",))),
        ("SmoothQuant + block_objective", "", W8A8Config(smoothing=smooth, block_objective=True, **common)),
    ] + ([("SmoothQuant + dynamic_fallback=16", "", W8A8Config(smoothing=smooth, dynamic_fallback=16.0, **common)),
          ("SmoothQuant + dynamic_fallback=16 + block_objective", "",
           W8A8Config(smoothing=smooth, dynamic_fallback=16.0, block_objective=True, **common)),
          ("online Hadamard down_proj + SmoothQuant + dynamic_fallback=16 + block_objective", "online",
           W8A8Config(smoothing=smooth, dynamic_fallback=16.0, block_objective=True, **common))]
         if activations == "static" else [])


def selected(all_rows: list[tuple[str, str, W8A8Config]], only: str | None) -> list[tuple[str, str, W8A8Config]]:
    """The rows whose name is one of the ``;``-separated ``only`` names (all rows when None)."""
    if only is None:
        return all_rows
    names = set(only.split(";"))
    return [r for r in all_rows if r[0] in names]


def loader(load: Callable[[], torch.nn.Module], rotate: str, seed: int) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        model = load()
        if rotate.startswith("fused"):
            fuse_rotations(model, seed=seed)
        if rotate.endswith("online"):
            add_online_rotations(model, seed=seed)
        return model

    return make


def real_model(backend: str, seed: int, only: str | None = None) -> None:
    data = stories_data()
    if data is None:
        return
    load, calib, evaluation = data
    reference = load()
    float_ppl = perplexity(reference, None, evaluation.reshape(-1), seq_len=256).ppl
    rotated = loader(load, "fused", seed)()
    rot_ppl = perplexity(rotated, None, evaluation.reshape(-1), seq_len=256).ppl
    print(f"\nstories260K: calibration 32x256, evaluation 16x256 tokens; float perplexity {float_ppl:.4f} "
          f"(rotated float {rot_ppl:.4f})")
    print(f"{'activations':10s} {'recipe':50s} {'ppl':>8s} {'vs float':>9s} {'mean KL':>9s} {'top-1':>7s} {'time':>6s}")
    for activations in ("static", "dynamic"):
        for name, rotate, config in selected(rows(activations, backend), only):
            start = time.perf_counter()
            q = quantize(loader(load, rotate, seed), calib, config)
            print_row(activations, name, q, reference, evaluation, float_ppl, start, width=50)


def random_model(backend: str, seed: int, only: str | None = None) -> None:
    calib, evaluation = outlier_data()
    reference = outlier_llama()
    print("\nrandom Llama with outlier norm channels (x20..x60): mean KL to float")
    for activations in ("static", "dynamic"):
        for name, rotate, config in selected(rows(activations, backend), only):
            q = quantize(loader(outlier_llama, rotate, seed), calib, config)
            fid = logit_fidelity(q, reference, evaluation)
            print(f"  {activations:8s} {name:50s} KL {fid.kl:.4f}  top-1 {fid.top1_agreement:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["real", "random", "all"], default="all")
    parser.add_argument("--backend", choices=["int8", "fake"], default="int8", help="default: int8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fused rotations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default=None, help="';'-separated row names to run (default: every row)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("real", "all"):
        real_model(args.backend, args.seed, args.rows)
    if args.part in ("random", "all"):
        random_model(args.backend, args.seed, args.rows)


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
