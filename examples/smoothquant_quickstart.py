"""SmoothQuant a causal LM end to end: prepare -> calibrate -> convert, then check what it did to the model.

Offline (defaults): the real tiny Llama in ../shared/data/stories260K-hf, calibrated on the TinyStories text it
was trained on (calibrating a model on text unlike its training text makes any perplexity look broken).
Perplexity is measured on windows that share no token with the calibration windows (which are spread
over the text). Online: any Hugging Face model id.

    python examples/smoothquant_quickstart.py                              # smoothing only: outputs unchanged
    python examples/smoothquant_quickstart.py --w8a8 static --output /tmp/tico-out/example-w8a8   # int8, saved
    python examples/smoothquant_quickstart.py --model ./my-model --text ./calib.txt --samples 64 --alpha 0.6

Nothing is written unless --output is given (a folder that must not exist, or be empty).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from tico.experimental.quantization.run.calibration import quantize_model
from tico.experimental.quantization.evaluation import perplexity, read_text, windows_outside
from tico.experimental.quantization.evaluation.outliers import decisions_summary
from tico.experimental.quantization.run.loading import load_model, load_tokenizer
from tico.experimental.quantization.run.schemes import build_config
from tico.experimental.quantization.run.workflow import calibration_set, run_metadata, save_quantized

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_MODEL = SHARED / "stories260K-hf"
DEFAULT_TEXT = SHARED / "tinystories" / "validation_head.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="hub id or local folder (default: %(default)s)")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="calibration/evaluation .txt file (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: %(default)s)")
    parser.add_argument("--alpha", default=None, help="migration strength in [0, 1], or auto with --w8a8 "
                                                      "(default: 0.5 for smoothing, auto with --w8a8)")
    parser.add_argument("--w8a8", choices=["static", "dynamic"], help="also quantize to int8 W8A8 with these activations")
    parser.add_argument("--output", help="folder to save to: the smoothed model, or with --w8a8 a compressed-tensors "
                                         "int8 checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    text = read_text(args.text)
    calibration = calibration_set(tokenizer, text, args.seq_len, args.samples, {"dataset": str(Path(args.text).resolve())})
    held_out = windows_outside(tokenizer, text, args.seq_len, calibration.token_ranges)[:8].reshape(-1)
    before = perplexity(model, None, held_out, seq_len=args.seq_len, max_windows=8).ppl
    with torch.no_grad():
        reference = model(calibration.windows[:1]).logits

    alpha = None if args.alpha is None else args.alpha if args.alpha == "auto" else float(args.alpha)
    scheme = f"w8a8-{args.w8a8}" if args.w8a8 else "smooth"
    config = build_config(scheme, alpha)
    result = quantize_model(model, config, calibration.windows, batch_size=4)
    # per block, what convert did with each group: its alpha, or unsmoothed/skipped and why (from its own report)
    print(decisions_summary(result.plan, result.report))
    print(result.summary())               # alphas, static ranges, layers kept in float

    after = perplexity(result.model, None, held_out, seq_len=args.seq_len, max_windows=8).ppl
    print(f"perplexity on {held_out.numel() // args.seq_len} windows held out from calibration: float {before:.4f} -> "
          f"{scheme} {after:.4f} ({100 * (after / before - 1):+.2f}%)")
    if not args.w8a8:
        with torch.no_grad():
            out = result.model(calibration.windows[:1]).logits
        rel = float((out - reference).abs().max() / reference.abs().max())
        print(f"max |logit change| / max |logit| = {rel:.2e} (smoothing alone is exact up to float rounding)")
    if args.output:
        save_quantized(result, tokenizer, args.output, run_metadata(result, config, calibration, {"scheme": scheme}))
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
