"""What SmoothQuant's calibration and convert cost next to plain forwards, measured side by side.

A random Llama of about 100M parameters on CPU. Each round times, in alternating order,
  - ``plain``: N forward batches of the float model,
  - ``calib``: ``prepare`` + the same N forward batches on a fresh copy of that model,
  - ``convert``: ``convert`` of that calibrated copy, divided by the time of one plain forward batch.
It prints the per-round ratios and their medians (the machine is noisy: only ratios from one run are compared).

    python benchmarks/calibration_overhead.py               # defaults below
    python benchmarks/calibration_overhead.py --rounds 7 --batches 8 --batch-size 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig


def build_model(seed: int = 0) -> LlamaForCausalLM:
    """A ~100M-parameter Llama (12 layers, hidden 768, 32k vocab, tied embeddings) with random weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="measurement rounds (default 5)")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches per round (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32000, (args.batch_size, args.seq_len), generator=gen) for _ in range(args.batches)]
    print(f"Llama, {n_params / 1e6:.1f}M parameters, {args.batches} batches of {args.batch_size}x{args.seq_len}, "
          f"{args.threads} threads")

    def forwards(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for b in batches:
                m(b)

    forwards(model)  # warm-up
    calib_ratios, convert_ratios = [], []
    for r in range(args.rounds):
        work = copy.deepcopy(model)
        plain_first = r % 2 == 0
        t_plain = timed(lambda: forwards(model)) if plain_first else None
        t_calib = timed(lambda: (prepare(work, SmoothQuantConfig()), forwards(work)))
        if not plain_first:
            t_plain = timed(lambda: forwards(model))
        t_convert = timed(lambda: convert(work))
        per_batch = t_plain / args.batches  # type: ignore[operator]
        calib_ratios.append(t_calib / t_plain)  # type: ignore[operator]
        convert_ratios.append(t_convert / per_batch)
        print(f"round {r}: plain {t_plain:.3f}s  prepare+calib {t_calib:.3f}s  convert {t_convert * 1e3:.1f}ms  "
              f"ratios {calib_ratios[-1]:.3f} / {convert_ratios[-1]:.3f}")
        del work
    print(f"median (prepare + calibration) / plain forwards: {statistics.median(calib_ratios):.3f}  (target <= 1.03)")
    print(f"median convert / one forward batch:             {statistics.median(convert_ratios):.3f}  (target <= 0.05)")


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
