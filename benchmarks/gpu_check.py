"""The CUDA path on one GPU, in one run: CUDA tests, streamed quantization at Llama-3.2-1B's shapes, int8 Linear
speed, and GPU == CPU checkpoints.

Meant for a bare GPU machine with PyTorch installed (packages it lacks travel as wheels); every part that needs
CUDA is skipped, with the reason, where there is none, so the script also runs here on a CPU (``--smoke`` then
runs parts 3 and 4 on the CPU with small shapes, to check the script itself).

1. ``pytest -k cuda``: the CUDA-parametrized tests (streamed quantization on ``device="cuda"``, ``_int_mm`` shapes).
2. int8 W8A8Linear (dynamic per-token and static per-tensor activations) against bf16 ``F.linear`` at
   4096x4096 and 4096x14336 (in x out) for 1, 16, 512 and 4096 tokens, timed with CUDA events.
3. A seeded random bf16 checkpoint with Llama-3.2-1B's shapes (``scale.py``'s builder), quantized by
   ``quantize_checkpoint(device="cuda")`` with the command line's static and dynamic defaults: time per block,
   peak GPU memory, (calibration + convert) / one float forward of the same tokens on the GPU (same run), and the
   projection for 8B and 70B (time per block scaled by the block's parameters).
4. A tiny model (the shared stories260K when ``../shared/data`` is there, else a seeded random Llama) quantized
   on the CPU and on the GPU: the checkpoints must hold the same integers.

    python benchmarks/gpu_check.py                 # on the GPU machine (about 5-8 minutes)
    python benchmarks/gpu_check.py --smoke         # here: parts 3-4 on the CPU at small shapes
    python benchmarks/gpu_check.py --json out.json # also the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import scale  # noqa: E402 - benchmarks/scale.py: the checkpoint builder, shapes and block sizes

SCHEMES = ("w8a8-static", "w8a8-dynamic")


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def cuda_tests() -> dict:
    section("1. CUDA tests (pytest -k cuda)")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", "-rs",
                           str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-15:]
    print("\n".join(tail))
    return {"rc": proc.returncode, "summary": tail[-1] if tail else ""}


def _time_cuda(fn, repeat: int = 20) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def linear_speed() -> list[dict]:
    section("2. int8 W8A8Linear vs bf16 F.linear")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return []
    from tico.experimental.quantization.nn import W8A8Linear

    rows = []
    gen = torch.Generator().manual_seed(0)
    for fan_in, fan_out in ((4096, 4096), (4096, 14336)):
        linear = torch.nn.Linear(fan_in, fan_out, bias=False)
        linear.weight.data = torch.randn(fan_out, fan_in, generator=gen) * 0.02
        dynamic = W8A8Linear.from_linear(linear).cuda()
        static = W8A8Linear.from_linear(linear, act_granularity="per_tensor", act_scale=torch.tensor(4.0 / 127)).cuda()
        weight = linear.weight.to("cuda", torch.bfloat16)
        for tokens in (1, 16, 512, 4096):
            x = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
            bf16 = _time_cuda(lambda: torch.nn.functional.linear(x, weight))
            dyn = _time_cuda(lambda: dynamic(x))
            sta = _time_cuda(lambda: static(x))
            row = {"shape": f"{fan_in}x{fan_out}", "tokens": tokens, "bf16_ms": bf16, "w8a8_dynamic_ms": dyn,
                   "w8a8_static_ms": sta, "kernel": dynamic.active_kernel(torch.device("cuda"))}
            rows.append(row)
            print(f"  {row['shape']:>10} {tokens:>5} tokens: bf16 {bf16:.3f} ms, W8A8 dynamic {dyn:.3f} ms "
                  f"({bf16 / dyn:.2f}x), static {sta:.3f} ms ({bf16 / sta:.2f}x), kernel {row['kernel']}")
    return rows


@torch.no_grad()
def float_forward_s(ckpt: Path, batches: list[torch.Tensor], device: str) -> float:
    """One float forward over ``batches``, block by block on ``device`` (compute only, as the baseline)."""
    from transformers import AutoModelForCausalLM

    # The whole model on the device (a 1B model fits): the baseline is the forward's compute, not its transfers.
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval().to(device)
    _sync(device)
    start = time.perf_counter()
    for ids in batches:
        model(ids.to(device))
    _sync(device)
    elapsed = time.perf_counter() - start
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def streamed(args: argparse.Namespace, device: str, work: Path) -> list[dict]:
    section(f"3. streamed quantization at {'small' if args.smoke else 'Llama-3.2-1B'} shapes, bf16, on {device}")
    from tico.experimental.quantization.pipeline import quantize_checkpoint
    from tico.experimental.quantization.run.schemes import build_config

    shape = scale.SHAPES["small" if args.smoke else "llama-3.2-1b"]
    layers = args.layers or shape[4]
    ckpt = work / f"ckpt-{layers}L"
    t = time.perf_counter()
    scale.build_checkpoint(ckpt, shape, layers, torch.bfloat16)
    print(f"  checkpoint ({layers} blocks) written in {time.perf_counter() - t:.1f}s")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(3, shape[5], (args.batch, args.seq_len), generator=gen)
               for _ in range(args.samples // args.batch)]
    float_s = float_forward_s(ckpt, batches, device)
    print(f"  float forward over {args.samples}x{args.seq_len} tokens: {float_s:.2f}s")
    rows = []
    for scheme in SCHEMES:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = quantize_checkpoint(ckpt, build_config(scheme), batches, work / f"out-{scheme}", device=device)
        peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else float("nan")
        phases = {k: sum(p.get(k, 0.0) for p in result.phases) for k in ("calibrate", "convert", "propagate")}
        per_block = sorted(result.block_s)[len(result.block_s) // 2]
        ratio = (result.capture_s + phases["calibrate"] + phases["convert"]) / float_s
        base = scale.block_params(*shape[:4])
        projection = {}
        for model in () if args.smoke else ("llama-3.1-8b", "llama-3.1-70b"):  # small shapes project nothing
            h, inter, heads, kv, n, _ = scale.SHAPES[model]
            projection[model] = per_block * scale.block_params(h, inter, heads, kv) / base * n / 60
        row = {"scheme": scheme, "blocks": result.blocks, "per_block_s": per_block, "peak_gpu_gb": peak,
               "calib_convert_over_float": ratio, "total_s": result.total_s, "float_forward_s": float_s,
               "projection_min": projection}
        rows.append(row)
        print(f"  {scheme}: {per_block:.2f}s per block (median), peak GPU memory {peak:.2f} GB, "
              f"(calibration + convert) / float forward {ratio:.2f}x, total {result.total_s:.1f}s"
              + "".join(f"; projected {m} {v:.1f} min" for m, v in projection.items()))
    return rows


def tiny_model(work: Path) -> Path:
    shared = Path(os.environ.get("TICO_SHARED_DATA", ROOT.parent / "shared" / "data")) / "stories260K-hf"
    if (shared / "config.json").is_file():
        return shared
    return scale.build_checkpoint(work / "tiny", scale.SHAPES["small"], 2, torch.float32)


def same_integers(args: argparse.Namespace, devices: tuple[str, str], work: Path) -> dict:
    section(f"4. the checkpoint written on {devices[1]} equals the one written on {devices[0]}")
    from safetensors.torch import load_file

    from tico.experimental.quantization.pipeline import quantize_checkpoint
    from tico.experimental.quantization.run.schemes import build_config

    model = tiny_model(work)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(3, vocab, (4, 64), generator=gen) for _ in range(4)]
    tensors = []
    for device in devices:
        out = work / f"tiny-{device}-{len(tensors)}"
        quantize_checkpoint(model, build_config("w8a8-static"), batches, out, device=device)
        merged: dict[str, torch.Tensor] = {}
        for f in sorted(out.glob("*.safetensors")):
            merged.update(load_file(f))
        tensors.append(merged)
    a, b = tensors
    ints = [k for k, v in a.items() if not v.is_floating_point()]
    int_diff = [k for k in ints if not torch.equal(a[k], b[k])]
    floats = [k for k in a if a[k].is_floating_point()]
    scale_err = max((float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in floats),
                    default=0.0)
    ok = set(a) == set(b) and not int_diff
    print(f"  {model.name}: {len(ints)} integer tensors, {len(int_diff)} differ {int_diff[:5]}; "
          f"largest relative difference of the float tensors (scales, norms) {scale_err:.2e}; "
          f"{'SAME INTEGERS' if ok else 'DIFFERENT'}")
    return {"integer_tensors": len(ints), "differ": int_diff, "float_rel_diff": scale_err, "same": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="parts 3-4 on the CPU at small shapes (no GPU needed)")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the shape's)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--skip-tests", action="store_true", help="leave out part 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {name}")
    figures: dict = {"device": name, "torch": torch.__version__}
    if not args.skip_tests:
        figures["cuda_tests"] = cuda_tests()
    figures["linear"] = linear_speed()
    with tempfile.TemporaryDirectory(prefix="tico-gpu-check-") as tmp:
        work = Path(tmp)
        if cuda or args.smoke:
            figures["streamed"] = streamed(args, "cuda" if cuda else "cpu", work)
            figures["same_integers"] = same_integers(args, ("cpu", "cuda" if cuda else "cpu"), work)
        else:
            section("3-4. streamed quantization and GPU == CPU checkpoints")
            print("skipped: no CUDA device (--smoke runs them on the CPU at small shapes)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    failed = figures.get("cuda_tests", {}).get("rc", 0) not in (0, 5) or not figures.get(
        "same_integers", {"same": True})["same"]
    return 1 if failed else 0


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded(enabled=torch.cuda.is_available()):  # a run without a GPU measures nothing worth keeping
        code = main()
    sys.exit(code)
