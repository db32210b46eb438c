"""Streaming W8A8 at Llama-3.2-1B's shapes: peak resident memory, cost next to a float forward, time per block.

1. A seeded random Llama checkpoint is written to disk shard by shard (never the whole model in memory):
   hidden 2048, MLP 8192, 32 heads, 8 KV heads, 16 layers, vocab 128256, tied embeddings (~1.2B parameters,
   ~5 GB in fp32). Norm weights get a few outlier channels (x5..x10) so smoothing has work to do.
2. The float baseline (one plain float forward over the calibration tokens, streamed block by block: compute
   only; run before and again after the recipes, the ratios use the mean of the two and print both) and, for
   each recipe, ``quantize_checkpoint`` of the same tokens each run in a fresh process, so each peak RSS is its
   own (no memory left over from the other, e.g. freed but kept by the allocator).
   Peak RSS is sampled from /proc/self/status (VmRSS, every 10 ms): for the whole quantization, per block (the
   first block's includes the capture of the blocks' inputs) and for the rest of the model (embeddings, final
   norm, LM head, publishing), plus ru_maxrss for the process. ``--same-process`` measures the quantization
   after the float forward in one process instead (as this benchmark did before), both peaks printed.
3. The cost ratio is (capture + calibration forwards + convert) / the float forward; "+propagate" also counts
   the extra forward of each converted block (quantized propagation). A projection for 8B and 70B scales the
   time per block by the block's parameter count and multiplies by the layer count.

    python benchmarks/scale.py --small                      # smoke test (~1 min)
    python benchmarks/scale.py --layers 4                   # Llama-3.2-1B shapes, 4 layers
    python benchmarks/scale.py                              # the full 16 layers (5 GB on disk)
    python benchmarks/scale.py --layers 4 --depth-check     # also 2x the layers: memory must grow <= 10%
    python benchmarks/scale.py --layers 2 --same-process    # quantization after the float forward, one process
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPES = {  # name -> (hidden, intermediate, heads, kv heads, layers, vocab)
    "llama-3.2-1b": (2048, 8192, 32, 8, 16, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 8, 32, 128256),
    "llama-3.1-70b": (8192, 28672, 64, 8, 80, 128256),
    "small": (256, 1024, 8, 2, 4, 1024),
}
RECIPES = {
    "exportable": "W8A8Config(smoothing=SmoothQuantConfig(alpha='auto', linear_producers=True), activations='static', act_range='mse')",
    "accurate": "W8A8Config(smoothing=SmoothQuantConfig(alpha='auto', linear_producers=True), activations='static', act_range='mse', tuning=W8A8Tuning(smooth_in_quantizer=True, rotate_in_quantizer=('all',)))",
    # what `tico-sq quantize --scheme w8a8-static` applies: exportable + dynamic_fallback=16 + block_objective
    "default": "W8A8Config(smoothing=SmoothQuantConfig(alpha='auto', linear_producers=True), activations='static', act_range='mse', dynamic_fallback=16.0, block_objective=True)",
}


def block_params(hidden: int, inter: int, heads: int, kv: int) -> int:
    head_dim = hidden // heads
    return hidden * (2 * hidden + 2 * kv * head_dim) + 3 * hidden * inter + 2 * hidden


# -- 1. the checkpoint -----------------------------------------------------------------------------------------
def build_checkpoint(folder: Path, shape: tuple[int, ...], layers: int, dtype: torch.dtype, seed: int = 0) -> Path:
    """Write a random Llama checkpoint tensor by tensor (memory: the largest tensor, the embedding)."""
    from transformers import GenerationConfig, LlamaConfig

    from tico.experimental.quantization.export.shards import ShardWriter

    if (folder / "config.json").is_file():
        return folder
    hidden, inter, heads, kv, _, vocab = shape
    head_dim = hidden // heads
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                         num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=2048,
                         rope_theta=500000.0, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:
        w = torch.empty(n).uniform_(0.5, 1.5, generator=gen)
        idx = torch.randperm(n, generator=gen)[: max(1, n // 256)]
        w[idx] *= torch.empty(len(idx)).uniform_(5.0, 10.0, generator=gen)
        return w.to(dtype)

    with ShardWriter(folder, "2GB") as writer:
        writer.add("model.embed_tokens.weight", normal(vocab, hidden))
        for i in range(layers):
            p = f"model.layers.{i}."
            writer.add(p + "input_layernorm.weight", norm(hidden))
            writer.add(p + "self_attn.q_proj.weight", normal(heads * head_dim, hidden))
            writer.add(p + "self_attn.k_proj.weight", normal(kv * head_dim, hidden))
            writer.add(p + "self_attn.v_proj.weight", normal(kv * head_dim, hidden))
            writer.add(p + "self_attn.o_proj.weight", normal(hidden, heads * head_dim))
            writer.add(p + "post_attention_layernorm.weight", norm(hidden))
            writer.add(p + "mlp.gate_proj.weight", normal(inter, hidden))
            writer.add(p + "mlp.up_proj.weight", normal(inter, hidden))
            writer.add(p + "mlp.down_proj.weight", normal(hidden, inter))
        writer.add("model.norm.weight", norm(hidden))
        writer.write_file("config.json", lambda path: config.save_pretrained(path.parent))
        writer.write_file("generation_config.json", lambda path: GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path.parent))
        writer.publish()
    return folder


# -- 2. measurement (child process) ----------------------------------------------------------------------------
class RssSampler:
    """Peak VmRSS (bytes) since the last :meth:`reset`, sampled by a thread."""

    def __init__(self, period: float = 0.01) -> None:
        self.peak = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self, period: float) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(period)

    def reset(self) -> int:
        peak, self.peak = self.peak, self.rss()
        return max(peak, self.peak)


@torch.no_grad()
def float_forward(ckpt_dir: Path, batches: list[torch.Tensor]) -> dict[str, float]:
    """One plain float forward over ``batches``, streamed block by block; compute time only (not loading)."""
    from tico.experimental.quantization.pipeline.capture import capture_block_inputs
    from tico.experimental.quantization.pipeline.source import Checkpoint
    from tico.experimental.quantization.structure.blocks import find_blocks
    from tico.experimental.quantization.pipeline.rest_pass import release_rest

    ckpt = Checkpoint(ckpt_dir)
    model = ckpt.model
    path, blocks = find_blocks(model)
    names = list(model.state_dict(keep_vars=True))
    in_blocks = {k for i in range(len(blocks)) for k in ckpt.keys_under(f"{path}.{i}")}
    rest = [k for k in ckpt.files if k not in in_blocks]
    rest_expected = [n for n in names if not n.startswith(path + ".")]
    load = compute = blocks_compute = 0.0
    t = time.perf_counter()
    ckpt.load(rest, rest_expected)
    load += time.perf_counter() - t
    t = time.perf_counter()
    captured = capture_block_inputs(model, blocks, batches)
    compute += time.perf_counter() - t
    hidden = captured.hidden
    for i in range(len(blocks)):
        t = time.perf_counter()
        ckpt.load(ckpt.keys_under(f"{path}.{i}"), [n for n in names if n.startswith(f"{path}.{i}.")])
        load += time.perf_counter() - t
        t = time.perf_counter()
        out = [call(blocks[i], h) for h, call in zip(hidden, captured.calls[i])]
        hidden = [o[0] if isinstance(o, tuple) else o for o in out]
        blocks_compute += time.perf_counter() - t
        compute += time.perf_counter() - t
        Checkpoint.release(blocks[i])
    t = time.perf_counter()
    for h in hidden:  # final norm + LM head (logits), batch by batch
        model.lm_head(model.model.norm(h))
    compute += time.perf_counter() - t
    release_rest(model, path)
    return {"float_forward_s": compute, "float_blocks_s": blocks_compute, "float_load_s": load}


def measure(args: argparse.Namespace) -> None:
    import logging

    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig  # noqa: F401 - used by eval
    from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning  # noqa: F401
    from tico.experimental.quantization.pipeline import quantize_checkpoint

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    sampler = RssSampler()
    gen = torch.Generator().manual_seed(1)
    vocab = json.loads((Path(args.ckpt) / "config.json").read_text())["vocab_size"]
    batches = [torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen) for _ in range(args.samples // args.batch)]
    report: dict[str, float | list] = {"rss_start": sampler.reset()}
    if args.phase in ("float", "both"):
        report.update(float_forward(Path(args.ckpt), batches))
        report["rss_float"] = sampler.reset()
    if args.phase in ("quantize", "both"):
        config = eval(RECIPES[args.recipe])  # noqa: S307 - our own table above
        out = Path(args.output) if args.write else None
        per_block: list[int] = []
        result = quantize_checkpoint(args.ckpt, config, batches, out, progress=args.progress,
                                     on_block=lambda i: per_block.append(sampler.reset()))
        report["rss_rest"] = sampler.reset()
        report["rss_blocks"] = per_block
        report["rss_quantize"] = max([*per_block, report["rss_rest"]])
        phases = {k: sum(p.get(k, 0.0) for p in result.phases) for k in ("load", "calibrate", "convert", "propagate", "write")}
        report.update({f"q_{k}_s": v for k, v in phases.items()})
        report.update(q_capture_s=result.capture_s, q_rest_s=result.rest_s, q_total_s=result.total_s,
                      block_s=result.block_s, blocks=result.blocks)
    report["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(report))


# -- 3. driver -------------------------------------------------------------------------------------------------
def run_child(ckpt: Path, recipe: str, phase: str, args: argparse.Namespace, output: Path) -> dict:
    cmd = [sys.executable, __file__, "measure", "--ckpt", str(ckpt), "--recipe", recipe, "--phase", phase,
           "--samples", str(args.samples), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--threads", str(args.threads), "--output", str(output)]
    if recipe == "exportable":
        cmd.append("--write")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {recipe} ({phase}) failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(output, ignore_errors=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def summarize(name: str, r: dict, shape: tuple[int, ...]) -> None:
    gb = 1024**3
    calib = r["q_capture_s"] + r["q_calibrate_s"] + r["q_convert_s"]
    per_block = sorted(r["block_s"])[len(r["block_s"]) // 2]
    print(f"\n[{name}] {r['blocks']} blocks")
    where = "after the float forward, same process" if r.get("same_process") else "own process"
    # ru_maxrss of a child started by subprocess (vfork + exec) starts from the launching process's own peak
    # (here: building the checkpoint), so it is an upper bound only; VmRSS sampled in the child is the figure.
    print(f"  peak RSS: streamed quantization {r['rss_quantize'] / gb:.2f} GB ({where}; ru_maxrss {r['ru_maxrss'] / gb:.2f} GB, "
          f"which counts the launcher's peak too), "
          f"float forward {r['rss_float'] / gb:.2f} GB ({'same' if r.get('same_process') else 'own'} process)")
    print("  peak RSS per phase: " + ", ".join(f"block {i}{' (+capture)' if i == 0 else ''} {b / gb:.2f}"
                                            for i, b in enumerate(r["rss_blocks"])) + f", rest {r['rss_rest'] / gb:.2f} GB")
    runs = r.get("float_runs_s")
    spread = f" (mean of {', '.join(f'{t:.1f}s' for t in runs)}: before and after the recipes)" if runs else ""
    print(f"  float forward (compute) {r['float_forward_s']:.2f}s{spread}; quantization: capture {r['q_capture_s']:.2f}s, "
          f"calibrate {r['q_calibrate_s']:.2f}s, convert {r['q_convert_s']:.2f}s, propagate {r['q_propagate_s']:.2f}s, "
          f"load {r['q_load_s']:.2f}s, write {r['q_write_s']:.2f}s, rest {r['q_rest_s']:.2f}s, total {r['q_total_s']:.2f}s")
    print(f"  (calibration + convert) / float forward = {calib / r['float_forward_s']:.2f}x; "
          f"+ propagate = {(calib + r['q_propagate_s']) / r['float_forward_s']:.2f}x; "
          f"total wall / float forward = {r['q_total_s'] / r['float_forward_s']:.2f}x")
    blocks_only = (r["q_calibrate_s"] + r["q_convert_s"]) / r["float_blocks_s"]
    print(f"  blocks only (the LM head dominates a short model's forward): (calibrate + convert) / float block forwards "
          f"= {blocks_only:.2f}x ({r['float_blocks_s']:.2f}s of float block forwards)")
    print(f"  time per block (median) {per_block:.2f}s")
    base = block_params(*shape[:4])
    for model in ("llama-3.1-8b", "llama-3.1-70b"):
        h, inter, heads, kv, layers, _ = SHAPES[model]
        scale = block_params(h, inter, heads, kv) / base
        print(f"  projection {model}: {per_block * scale:.1f}s/block x {layers} = {per_block * scale * layers / 60:.1f} min "
              f"(block {scale:.1f}x this one's parameters; same tokens, same machine)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    m = sub.add_parser("measure")
    m.add_argument("--ckpt", required=True)
    m.add_argument("--recipe", choices=list(RECIPES), required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--write", action="store_true")
    m.add_argument("--progress", action="store_true")
    m.add_argument("--phase", choices=["float", "quantize", "both"], default="both")
    for p in (parser, m):
        p.add_argument("--samples", type=int, default=32)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/tico-scale")
    parser.add_argument("--layers", type=int, default=None, help="decoder blocks (default: the model's 16)")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--recipes", default="exportable,accurate")
    parser.add_argument("--depth-check", action="store_true", help="also twice the layers: peak RSS must grow <= 10%%")
    parser.add_argument("--same-process", action="store_true",
                        help="quantize after the float forward in the same process (default: each in its own)")
    args = parser.parse_args()
    if args.cmd == "measure":
        return measure(args)
    shape = SHAPES["small" if args.small else "llama-3.2-1b"]
    layers = args.layers or shape[4]
    dtype = getattr(torch, args.dtype)
    work = Path(args.workdir)
    depths = [layers, 2 * layers] if args.depth_check else [layers]
    results = {}
    for depth in depths:
        ckpt = work / f"{'small' if args.small else '1b'}-{args.dtype}-{depth}L"
        t = time.perf_counter()
        build_checkpoint(ckpt, shape, depth, dtype)
        print(f"checkpoint {ckpt} ready in {time.perf_counter() - t:.1f}s")
        base = None if args.same_process else run_child(ckpt, "exportable", "float", args, work / f"out-float-{depth}")
        done = {}
        for recipe in args.recipes.split(","):
            if depth != layers and recipe != "exportable":
                continue
            if args.same_process:
                r = {**run_child(ckpt, recipe, "both", args, work / f"out-{recipe}-{depth}"), "same_process": True}
                summarize(f"{recipe}, {depth} layers, {args.samples}x{args.seq_len} tokens, {args.dtype}", r, shape)
            else:
                r = run_child(ckpt, recipe, "quantize", args, work / f"out-{recipe}-{depth}")
            done[recipe] = results[(recipe, depth)] = r
        if not args.same_process:
            # the float forward again after the recipes: a shared machine's speed drifts (one float run measured
            # 125 s, the next 147 s), so the ratios use the mean of the two and print both
            again = run_child(ckpt, "exportable", "float", args, work / f"out-float-{depth}")
            floats = {k: (base[k] + again[k]) / 2 for k in base if k.startswith("float_")}
            floats["float_runs_s"] = [base["float_forward_s"], again["float_forward_s"]]
            for recipe, r in done.items():
                r.update(floats, rss_float=max(base["rss_float"], again["rss_float"]))
                summarize(f"{recipe}, {depth} layers, {args.samples}x{args.seq_len} tokens, {args.dtype}", r, shape)
    if args.depth_check:
        a, b = results[("exportable", layers)]["rss_quantize"], results[("exportable", 2 * layers)]["rss_quantize"]
        print(f"\npeak RSS {layers} -> {2 * layers} layers: {a / 1024**3:.2f} -> {b / 1024**3:.2f} GB ({(b / a - 1) * 100:+.1f}%, target <= +10%)")


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded(enabled=sys.argv[1:2] != ["measure"]):  # not the per-recipe child processes
        main()
