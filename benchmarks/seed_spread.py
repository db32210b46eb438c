"""How much the W8A8 defaults' figures depend on which calibration rows were sampled (``W8A8Tuning.sample_seed``).

The alpha search, the MSE ranges and the dynamic fallback score a sample of the calibration rows, so their
choices, and a quantized model's figures, move a little with the sample. This prints, per model and scheme, the
perplexity and mean KL to the float model for seeds 0..N-1 (seed 0 is the default), and their range: the noise
floor under which a change of figures between two versions, or two recipes, means nothing. Inputs are those of
``benchmarks/before_after.py`` (stories260K on TinyStories windows, the seeded outlier Llama), in memory.

    python benchmarks/seed_spread.py              # 5 seeds, w8a8-dynamic and w8a8-static
    python benchmarks/seed_spread.py --seeds 3 --schemes w8a8-static
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.run.schemes import build_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from before_after import make_inputs, reference_logits, scores  # noqa: E402


def quantized(folder: str, config, calibration: torch.Tensor) -> torch.nn.Module:
    model = prepare(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), config)
    with torch.no_grad():
        for batch in calibration.split(8):
            model(batch)
    return convert(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--schemes", default="w8a8-dynamic,w8a8-static")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as work:
        specs = torch.load(make_inputs(Path(work)))
        print(f"seeds 0..{args.seeds - 1} of W8A8Tuning.sample_seed (0: the default), in memory")
        print(f"{'model':14s} {'scheme':13s} {'ppl per seed':>48s} {'ppl range':>19s} {'KL range':>21s}")
        for name, spec in specs.items():
            reference = reference_logits(AutoModelForCausalLM.from_pretrained(spec["folder"]).eval(), spec["evaluation"])
            for scheme in args.schemes.split(","):
                base = build_config(scheme)
                figures = []
                for seed in range(args.seeds):
                    config = base.with_tuning(sample_seed=seed)
                    figures.append(scores(quantized(spec["folder"], config, spec["calibration"]), reference,
                                          spec["evaluation"]))
                ppl, kl = [f[0] for f in figures], [f[1] for f in figures]
                each = " ".join(f"{p:.4f}" if p < 100 else f"{p:.1f}" for p in ppl)
                print(f"{name:14s} {scheme:13s} {each:>48s} {min(ppl):9.4f}-{max(ppl):9.4f} "
                      f"{min(kl):.6f}-{max(kl):.6f}", flush=True)


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
