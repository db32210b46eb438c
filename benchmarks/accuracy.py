"""W8A8 accuracy: float vs naive W8A8 vs textbook SmoothQuant vs our best recipe, side by side in one run.

1. The real model ``../shared/data/stories260K-hf``: calibration on 32 windows of 256 tokens of
   ``tinystories/validation_head.txt``, perplexity and mean KL to the float model on 16 later disjoint windows.
2. A seeded random Llama whose norms carry a few outlier channels (x20..x60, as in large LLMs): mean KL of
   static W8A8 to the float model on random token windows.

    python benchmarks/accuracy.py                 # both parts
    python benchmarks/accuracy.py --part real --backend fake
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tico.experimental.quantization import convert, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.evaluation.data import read_text, token_windows
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
from tico.experimental.quantization.evaluation.perplexity import perplexity

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def recipes(activations: str, backend: str) -> dict[str, W8A8Config]:
    """The rows of one table: naive, textbook SmoothQuant (alpha 0.5, abs-max ranges), and ours."""
    static = activations == "static"
    common = dict(activations=activations, tuning=W8A8Tuning(backend=backend))
    ours = W8A8Config(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True), act_range="mse",
                      activations=activations, tuning=W8A8Tuning(backend=backend, smooth_in_quantizer=True))
    rows = {
        "naive W8A8": W8A8Config(act_range="absmax", **common),
        "SmoothQuant a=0.5 (textbook)": W8A8Config(smoothing=SmoothQuantConfig(alpha=0.5), act_range="absmax", **common),
        "ours: auto alpha" + (" + MSE ranges" if static else ""): ours,
    }
    rows["ours + in-quantizer rotations (rotate_in_quantizer='all')"] = ours.with_tuning(rotate_in_quantizer=("all",))
    if static:  # the paper's setting also quantizes the attention matmul inputs
        rows["ours + int8 attention inputs"] = ours.with_tuning(quantize_attention=True)
    return rows


def quantize(load, calib: torch.Tensor, config: W8A8Config, batch: int = 8) -> torch.nn.Module:
    model = prepare(load(), config)
    with torch.no_grad():
        for b in calib.split(batch):
            model(b)
    return convert(model)


def stories_data():
    """``(load, calib, evaluation)`` of the real-model protocol: stories260K, the first 32 windows of 256 tokens
    of TinyStories validation for calibration, the next 16 for evaluation; None when ../shared is absent."""
    model_dir = SHARED / "stories260K-hf"
    if not model_dir.exists():
        print(f"skipping the real model: {model_dir} not found")
        return None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = token_windows(tokenizer, read_text(SHARED / "tinystories" / "validation_head.txt"), 256)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()

    return load, windows[:32], windows[32:48]


def print_row(activations: str, name: str, q, reference, evaluation, float_ppl: float, start: float, width: int = 40):
    """One table row: perplexity and its change, mean KL and top-1 agreement to the float model, time."""
    ppl = perplexity(q, None, evaluation.reshape(-1), seq_len=256).ppl
    fid = logit_fidelity(q, reference, evaluation)
    print(f"{activations:10s} {name:{width}s} {ppl:8.4f} {100 * (ppl / float_ppl - 1):+8.3f}% {fid.kl:9.5f} "
          f"{fid.top1_agreement:7.4f} {time.perf_counter() - start:5.1f}s", flush=True)


def real_model(backend: str) -> None:
    data = stories_data()
    if data is None:
        return
    load, calib, evaluation = data
    reference = load()
    float_ppl = perplexity(reference, None, evaluation.reshape(-1), seq_len=256).ppl
    print(f"\nstories260K: calibration 32x256, evaluation 16x256 tokens; float perplexity {float_ppl:.4f}")
    print(f"{'activations':10s} {'recipe':40s} {'ppl':>8s} {'vs float':>9s} {'mean KL':>9s} {'top-1':>7s} {'time':>6s}")
    for activations in ("static", "dynamic"):
        for name, config in recipes(activations, backend).items():
            start = time.perf_counter()
            print_row(activations, name, quantize(load, calib, config), reference, evaluation, float_ppl, start)


def outlier_llama(seed: int = 0, hidden: int = 128, layers: int = 4) -> LlamaForCausalLM:
    """A random Llama whose RMSNorm weights have 4 outlier channels scaled x20..x60 (persistent across layers)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 43 // 16,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    outliers = torch.randperm(config.hidden_size, generator=gen)[:4]
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "variance_epsilon") and module.weight.dim() == 1:
                module.weight.copy_(0.5 + torch.rand(config.hidden_size, generator=gen))
                module.weight[outliers] *= 20 + 40 * torch.rand(len(outliers), generator=gen)
    return model


def outlier_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded calibration (32x128) and evaluation (16x128) tokens for :func:`outlier_llama`."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (32, 128), generator=gen), torch.randint(0, 512, (16, 128), generator=gen)


def random_model(backend: str) -> None:
    calib, evaluation = outlier_data()
    reference = outlier_llama()
    print("\nrandom Llama with outlier norm channels (x20..x60): static per-tensor W8A8, mean KL to float")
    for name, config in recipes("static", backend).items():
        q = quantize(outlier_llama, calib, config)
        fid = logit_fidelity(q, reference, evaluation)
        print(f"  {name:40s} KL {fid.kl:.4f}  top-1 {fid.top1_agreement:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["real", "random", "all"], default="all")
    parser.add_argument("--backend", choices=["int8", "fake"], default="int8", help="default: int8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("real", "all"):
        real_model(args.backend)
    if args.part in ("random", "all"):
        random_model(args.backend)


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
