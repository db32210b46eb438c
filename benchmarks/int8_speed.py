"""Speed of one W8A8 Linear next to fp32 ``nn.Linear`` on CPU, measured side by side.

One ``[tokens, features] x [features, features]`` layer. Every round times each candidate once (in a rotated
order, so none always runs first or right after a given other one), as the mean of ``--iters`` calls after one
warm-up call; the speedup of a candidate is the median over rounds of ``fp32 time / candidate time`` taken in the
same round (the machine is shared and noisy: only ratios measured together are compared). Activation
quantization and dequantization are included in every "ours" and "torchao" row.

Rows:
  fp32 nn.Linear                       the reference
  raw torch._int_mm                    int8 x int8 -> int32 on pre-quantized ints, no quant/dequant
  raw oneDNN int8 matmul               the kernel W8A8Linear uses on CPU, pre-quantized u8 input, fused scales
  ours eager, per-token / per-tensor   W8A8Linear, dynamic per-token or static per-tensor activations
  ours eager, per-token + smoothing    with a smoothing divisor inside the activation quantizer
  ours eager, per-token, int_mm        the same with the torch._int_mm kernel (the fallback/CUDA path)
  ours compiled                        torch.compile(W8A8Linear) (its traceable torch._int_mm path)
  torchao eager / compiled             Int8DynamicActivationInt8Weight, if torchao is importable

    python benchmarks/int8_speed.py                         # 512 tokens, 4096 features, 7 rounds
    python benchmarks/int8_speed.py --rounds 11 --tokens 2048 --features 4096 --no-compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

from tico.experimental.quantization.nn import W8A8Linear
from tico.experimental.quantization.nn.kernels import onednn_int8_available, onednn_qlinear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (what a checkpoint holds; kernel caches excluded)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total


def model_prefill_benchmark(rounds: int, batch: int = 4, seq_len: int = 256) -> None:
    """Prefill of a ~100M-parameter random Llama, float32 vs W8A8 (dynamic per-token, int8 backend).

    Also prints the converted model's weight memory next to float32's.
    """
    from calibration_overhead import build_model  # the same ~100M Llama as the calibration benchmark

    from tico.experimental.quantization import convert, prepare
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning

    fp32 = build_model()
    ids = torch.randint(0, 32000, (batch, seq_len))
    def w8a8(**kw):
        m = prepare(copy.deepcopy(fp32), W8A8Config(smoothing=SmoothQuantConfig(), **kw))
        with torch.no_grad():
            m(ids[:1, :64])
        return convert(m)

    q, q_rot = w8a8(), w8a8(tuning=W8A8Tuning(rotate_in_quantizer=("all",)))
    # Prefill as a server runs it: the whole prompt through the blocks, logits for the last position only
    # (the next token), for both models alike.
    candidates = {
        "fp32 Llama prefill": lambda: fp32(ids, logits_to_keep=1),
        "W8A8 Llama prefill": lambda: q(ids, logits_to_keep=1),
        "W8A8 + rotations": lambda: q_rot(ids, logits_to_keep=1),
    }
    times = measure(candidates, rounds, 1)
    ratios = [a / b for a, b in zip(times["fp32 Llama prefill"], times["W8A8 Llama prefill"])]
    rot_ratios = [a / b for a, b in zip(times["fp32 Llama prefill"], times["W8A8 + rotations"])]
    n = sum(p.numel() for p in fp32.parameters())
    print(f"\nprefill, Llama {n / 1e6:.0f}M parameters (tied embeddings), batch {batch}x{seq_len}, logits of the "
          f"last position, {rounds} rounds:")
    for name, ts in times.items():
        print(f"  {name:<20} {statistics.median(ts):7.3f} s")
    print(f"  speedup W8A8 vs fp32: {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    print(f"  speedup W8A8 + rotations (rotate='all') vs fp32: {statistics.median(rot_ratios):.2f}x")
    f_bytes, q_bytes = weight_bytes(fp32), weight_bytes(q)
    print(f"  weight memory: fp32 {f_bytes / 2**20:.1f} MiB, W8A8 {q_bytes / 2**20:.1f} MiB, ratio {q_bytes / f_bytes:.3f} "
          "(embedding and LM head stay float)")
    e_bytes = weight_bytes(w8a8(quantize_embeddings=True))
    print(f"  weight memory with quantize_embeddings=True (int8 rows, tied head shares them): {e_bytes / 2**20:.1f} MiB, "
          f"ratio {e_bytes / f_bytes:.3f}")


def torchao_candidates(linear: nn.Linear, compile_too: bool) -> tuple[dict[str, Callable], str | None]:
    """torchao's int8 dynamic-activation / int8-weight Linear (eager, and compiled), or a note why not."""
    try:
        import torchao.quantization as tq  # optional: only the benchmark uses it
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip the rows
        return {}, f"torchao rows skipped: torchao is not importable ({type(exc).__name__}: {exc})"
    model = nn.Sequential(copy.deepcopy(linear))
    if hasattr(tq, "Int8DynamicActivationInt8WeightConfig"):
        tq.quantize_(model, tq.Int8DynamicActivationInt8WeightConfig())
    elif hasattr(tq, "int8_dynamic_activation_int8_weight"):  # older torchao
        tq.quantize_(model, tq.int8_dynamic_activation_int8_weight())
    else:
        return {}, "torchao rows skipped: no int8 dynamic-activation/int8-weight config in this torchao"
    rows: dict[str, Callable] = {"torchao eager": model}
    if compile_too:
        rows["torchao compiled"] = torch.compile(copy.deepcopy(model))
    return rows, None


def build_candidates(args: argparse.Namespace) -> tuple[dict[str, Callable[[], torch.Tensor]], list[str]]:
    torch.manual_seed(0)
    k = n = args.features
    linear = nn.Linear(k, n).eval()
    x = torch.randn(args.tokens, k)
    notes: list[str] = []
    # A static scale as calibration would give it: the abs-max of the input, over 127.
    static_scale = float(x.abs().max()) / 127.0
    smooth = torch.rand(k) + 0.5

    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    xq = torch.randint(-127, 128, (args.tokens, k), dtype=torch.int8)
    rows: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 nn.Linear": lambda: linear(x),
        "raw torch._int_mm (pre-quantized)": lambda: torch._int_mm(xq, wq.t()),
    }
    if onednn_int8_available():
        packed = torch.ops.onednn.qlinear_prepack(wq, None)
        xu8 = xq.view(torch.uint8) ^ 128
        w_scale, zp, bias = torch.rand(n) * 1e-3, torch.zeros(n, dtype=torch.long), linear.bias.detach()
        rows["raw oneDNN int8 matmul (pre-quantized)"] = lambda: onednn_qlinear(
            xu8, 0.02, packed, w_scale, zp, bias, torch.float32
        )
    else:
        notes.append("raw oneDNN row skipped: oneDNN's fast int8 matmul is not available here")

    dyn = W8A8Linear.from_linear(linear)
    static = W8A8Linear.from_linear(linear, act_granularity="per_tensor", act_scale=static_scale)
    smoothed = W8A8Linear.from_linear(linear, smooth_scale=smooth)
    dyn_int_mm = W8A8Linear.from_linear(linear, kernel="int_mm")
    rows[f"ours eager, per-token ({dyn.active_kernel()})"] = lambda: dyn(x)
    rows[f"ours eager, per-tensor static ({static.active_kernel()})"] = lambda: static(x)
    rows[f"ours eager, per-token + smoothing ({smoothed.active_kernel()})"] = lambda: smoothed(x)
    if dyn.active_kernel() != "int_mm":
        rows["ours eager, per-token (int_mm)"] = lambda: dyn_int_mm(x)
    if args.compile:
        dyn_c = torch.compile(copy.deepcopy(dyn))
        static_c = torch.compile(copy.deepcopy(static))
        rows["ours compiled, per-token"] = lambda: dyn_c(x)
        rows["ours compiled, per-tensor static"] = lambda: static_c(x)
    else:
        notes.append("compiled rows skipped (--no-compile)")

    ao_rows, note = torchao_candidates(linear, args.compile)
    if note:
        notes.append(note)
    for name, module in ao_rows.items():
        rows[name] = lambda module=module: module(x)
    return rows, notes


def measure(rows: dict[str, Callable[[], torch.Tensor]], rounds: int, iters: int) -> dict[str, list[float]]:
    names = list(rows)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # first calls: compilation, oneDNN weight packing, allocator warm-up
        rows[name]()
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = rows[name]
            fn()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - start) / iters)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="measurement rounds (default 7)")
    parser.add_argument("--iters", type=int, default=3, help="calls averaged per candidate and round (default 3)")
    parser.add_argument("--tokens", type=int, default=512, help="rows of the input (default 512)")
    parser.add_argument("--features", type=int, default=4096, help="in = out features (default 4096)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    parser.add_argument("--no-model", dest="model", action="store_false", help="skip the model prefill/memory part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    with torch.inference_mode():
        rows, notes = build_candidates(args)
        times = measure(rows, args.rounds, args.iters)

    ref = times["fp32 nn.Linear"]
    ao = times.get("torchao compiled")
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; x [{args.tokens}, {args.features}] @ W "
        f"[{args.features}, {args.features}]^T + b; {args.rounds} rounds x {args.iters} calls, interleaved\n"
    )
    width = max(len(name) for name in rows)
    header = f"{'candidate':<{width}}  {'median ms':>9}  {'vs fp32':>8}  {'(min, max over rounds)':<22}"
    print(header + ("  vs torchao compiled" if ao else ""))
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ref, ts)]
        line = (
            f"{name:<{width}}  {1e3 * statistics.median(ts):9.2f}  {statistics.median(ratios):7.2f}x"
            f"  ({min(ratios):5.2f}x, {max(ratios):5.2f}x)      "
        )
        if ao:
            line += f"  {statistics.median([a / b for a, b in zip(ao, ts)]):7.2f}x"
        print(line)
    print("speedups are medians over rounds of per-round time ratios (time of the reference / time of the row)")
    for note in notes:
        print(f"note: {note}")
    if args.model:
        with torch.inference_mode():
            model_prefill_benchmark(max(3, args.rounds // 2))


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
