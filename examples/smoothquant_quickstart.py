"""SmoothQuant a causal LM end to end: prepare -> calibrate -> convert, then check it is still the same model.

Offline (defaults): the real tiny Llama in ../shared/data/stories260K-hf, calibrated on WikiText-2 lines.
Online: any Hugging Face model id and the hub's WikiText-2, e.g.

    python examples/smoothquant_quickstart.py --model Maykeye/TinyLLama-v0 --text hub:wikitext
    python examples/smoothquant_quickstart.py --model ./my-model --text ./calib.txt --samples 64 --alpha 0.6 --output ./smoothed
    python examples/smoothquant_quickstart.py --w8a8 static      # then int8 W8A8, with perplexity before/after
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config
from tico.experimental.quantization.evaluation import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_MODEL = SHARED / "stories260K-hf"
DEFAULT_TEXT = SHARED / "wikitext-2" / "valid.txt"


def calibration_texts(source: str, samples: int) -> list[str]:
    """Non-empty lines of a local text file, or ``hub:wikitext`` (wikitext-2-raw-v1 train, needs network)."""
    if source == "hub:wikitext":
        from datasets import load_dataset  # optional dependency, only for the online path

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
    else:
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"calibration text file not found: {path}")
        rows = path.read_text(encoding="utf-8").splitlines()
    texts = [r for r in rows if len(r.split()) > 8][:samples]
    if not texts:
        raise SystemExit(f"no usable calibration lines in {source}")
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="hub id or local folder (default: %(default)s)")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="calibration .txt file, or hub:wikitext (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=10, help="calibration lines (default: %(default)s)")
    parser.add_argument("--alpha", default="0.5", help="migration strength in [0, 1], or auto with --w8a8 (default: %(default)s)")
    parser.add_argument("--output", help="folder to save the smoothed model to (save_pretrained)")
    parser.add_argument("--w8a8", choices=["static", "dynamic"],
                        help="also quantize to int8 W8A8 with these activations (alpha may then be 'auto')")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    device = next(model.parameters()).device
    texts = calibration_texts(args.text, args.samples)
    check = tokenizer(texts[-1], return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        reference = model(check).logits

    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)
    smoothing = SmoothQuantConfig(alpha=alpha, linear_producers=args.w8a8 is not None)
    if args.w8a8:
        return quantize_w8a8(model, tokenizer, texts, smoothing, args.w8a8, args.output)
    model = prepare(model, smoothing)
    plan = get_quantizer(model).plan
    with torch.no_grad():
        for text in texts:
            model(tokenizer(text, return_tensors="pt").input_ids.to(device))
    q_m = convert(model)

    with torch.no_grad():
        out = q_m(check).logits
    rel = float((out - reference).abs().max() / reference.abs().max())
    print(f"smoothed {len(plan.smoothed)} groups, skipped {len(plan.skipped)}; "
          f"max |logit change| / max |logit| = {rel:.2e} (smoothing alone is exact up to float rounding)")
    if args.output:
        q_m.save_pretrained(args.output)
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output}")


def quantize_w8a8(model, tokenizer, texts: list[str], smoothing: SmoothQuantConfig, activations: str, output) -> None:
    """Smooth + int8 W8A8 in one calibration pass; perplexity on the calibration text's held-out tail."""
    split = max(1, len(texts) * 3 // 4)
    ids = tokenizer("\n".join(texts[:split]), return_tensors="pt").input_ids
    held_out = tokenizer("\n".join(texts[split:] or texts[-1:]), return_tensors="pt").input_ids
    before = perplexity(model, None, held_out[0], seq_len=min(256, held_out.shape[1])).ppl
    model = prepare(model, W8A8Config(smoothing=smoothing, activations=activations, smooth_in_quantizer=True))
    quantizer = get_quantizer(model)
    with torch.no_grad():
        for chunk in ids[0].split(256):
            model(chunk[None])
    q_m = convert(model)
    after = perplexity(q_m, None, held_out[0], seq_len=min(256, held_out.shape[1])).ppl
    print(quantizer.report.summary())
    print(f"perplexity on held-out text: float {before:.4f} -> W8A8 {after:.4f} ({100 * (after / before - 1):+.2f}%)")
    if output:
        print("(saving int8 checkpoints is not supported yet: only smoothed float models are saved)")


if __name__ == "__main__":
    main()
