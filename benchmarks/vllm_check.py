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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TOLERANCE = 1e-4  # the target for |delta log-prob|
INT8_KERNEL = re.compile(r"\b(\w*Int8ScaledMM\w*Kernel|CompressedTensorsW8A8Int8)\b")
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
    from tico.experimental.quantization.evaluation.data import read_text, token_windows

    text = read_text(SHARED / "tinystories" / "validation_head.txt")
    calib = token_windows(tokenizer, text, seq_len, num_windows=n_calib)
    start = n_calib * seq_len
    later = token_windows(tokenizer, text, prompt_len - 1, num_windows=n_prompts, start=start, stride=4 * prompt_len)
    bos = tokenizer.bos_token_id
    prompts = [[bos] + row.tolist() for row in later]  # each prompt starts with BOS, as a fresh request would
    return calib, prompts


def export_checkpoints(out: Path, size: str, n_calib: int = 16, seq_len: int = 128, n_prompts: int = 4,
                       prompt_len: int = 24, seed: int = 0, init_std: float = 0.1,
                       ) -> tuple[dict[str, Path], list[list[int]]]:
    """Calibrate one random model per scheme and save ``out/static`` and ``out/dynamic`` (tokenizer included)."""
    import torch
    from transformers import AutoTokenizer

    from tico.experimental.quantization import convert, prepare
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.config.w8a8 import W8A8Config
    from tico.experimental.quantization.export.compressed_tensors import save_compressed

    stories = SHARED / "stories260K-hf"
    tokenizer = AutoTokenizer.from_pretrained(stories)
    calib, prompts = calibration_and_prompts(tokenizer, n_calib, seq_len, n_prompts, prompt_len)
    dirs = {}
    for scheme in ("static", "dynamic"):
        config = W8A8Config(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True), activations=scheme,
                            act_range="mse", smooth_in_quantizer=False)
        model = prepare(build_model(size, seed, init_std), config)
        with torch.no_grad():
            for batch in calib.split(4):
                model(batch)
        model = convert(model)
        target = out / scheme
        save_compressed(model, target)
        for name in TOKENIZER_FILES:
            if (stories / name).exists():
                shutil.copy(stories / name, target / name)
        dirs[scheme] = target
    return dirs, prompts


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
    """Our log-probs of vLLM's own greedy tokens (one forward over prompt + continuation), and where our greedy
    choice first differs from vLLM's: the step and our logit margin between the two choices there.

    This compares vLLM's decode path (KV cache, one token a step) with ours even after the greedy texts diverge.
    """
    import torch

    from tico.experimental.quantization.export.compressed_tensors import load_compressed

    model = load_compressed(checkpoint)
    logprobs, divergence = [], []
    with torch.no_grad():
        for prompt, cont in zip(prompts, continuations):
            x = torch.tensor([prompt + cont])
            logits = model(x).logits[0, len(prompt) - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            logprobs.append(logp.gather(1, torch.tensor(cont)[:, None])[:, 0].tolist())
            first = next((k for k, tok in enumerate(cont) if int(logits[k].argmax()) != tok), None)
            if first is not None:
                ours = int(logits[first].argmax())
                divergence.append((first, float(logits[first, ours] - logits[first, cont[first]])))
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


def load_nudged(checkpoint: Path):
    """``load_compressed(checkpoint)`` with each RMSNorm weight one ulp larger (``torch.nextafter``)."""
    import torch

    from tico.experimental.quantization.export.compressed_tensors import load_compressed

    model = load_compressed(checkpoint)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    return model


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


def offline(checkpoint: str, prompts: list[list[int]], max_tokens: int, dtype: str) -> dict[str, Any]:
    """vLLM's offline ``LLM`` API: prompt log-probs and greedy tokens for token-id prompts."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=checkpoint, dtype=dtype, max_model_len=256, enforce_eager=True, seed=0, max_num_seqs=8)
    print(f"[vllm_check] offline engine ready in {time.perf_counter() - start:.1f} s", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=1, logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    print(f"[vllm_check] offline generate done at {time.perf_counter() - start:.1f} s", flush=True)
    llm.llm_engine.engine_core.shutdown()  # stop the engine process now, not at interpreter exit
    print(f"[vllm_check] offline engine stopped at {time.perf_counter() - start:.1f} s", flush=True)
    result: dict[str, Any] = {"prompt_logprobs": [], "greedy": [], "sample_logprobs": []}
    for prompt, out in zip(prompts, outputs):
        gen = out.outputs[0]  # logprob vLLM's decode steps gave each token they chose (KV-cache path)
        result["sample_logprobs"].append([step[tok].logprob for step, tok in zip(gen.logprobs, gen.token_ids)])
        # entry i is the distribution at prompt position i (None for the first token), keyed by token id
        result["prompt_logprobs"].append([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(prompt) if i])
        result["greedy"].append(list(out.outputs[0].token_ids))
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
    result: dict[str, dict[str, Any]] = {}
    for job in request["jobs"]:
        result[job["name"]] = {}
        if job["offline"]:
            print(f"[vllm_check] begin {job['name']} offline", flush=True)
            result[job["name"]]["offline"] = offline(job["checkpoint"], request["prompts"], request["max_tokens"],
                                                     request["dtype"])
        if job["server"]:
            print(f"[vllm_check] begin {job['name']} server", flush=True)
            result[job["name"]]["server"] = server(job["checkpoint"], request["prompts"][0], request["max_tokens"],
                                                   request["dtype"], Path(job["server_log"]))
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


def run_vllm(python: str, checkpoints: dict[str, Path], prompts: list[list[int]], max_tokens: int, dtype: str,
             workdir: Path, server_for: tuple[str, ...] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run the ``vllm-side`` of this file in ``python`` for every checkpoint (offline API, and the server for the
    names in ``server_for``, default all); returns ``{name: {path: result}}`` with the int8 kernels each path's
    vLLM log names."""
    server_for = tuple(checkpoints) if server_for is None else server_for
    jobs = [{"name": name, "checkpoint": str(path), "offline": True, "server": name in server_for,
             "server_log": str(workdir / f"server-{name}.log")} for name, path in checkpoints.items()]
    request = {"jobs": jobs, "prompts": prompts, "max_tokens": max_tokens, "dtype": dtype}
    (workdir / "request.json").write_text(json.dumps(request))
    log = workdir / "vllm.log"
    cmd = [python, str(Path(__file__).resolve()), "vllm-side", "--request", str(workdir / "request.json"),
           "--out", str(workdir / "result.json")]
    with open(log, "w") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=vllm_env(), timeout=timeout,
                              cwd=workdir)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM side failed (exit {proc.returncode}); last lines of {log}:\n{text[-3000:]}")
    result = json.loads((workdir / "result.json").read_text())
    for name, paths in result.items():
        if "offline" in paths:
            part = text.split(f"[vllm_check] begin {name} offline", 1)[1].split("[vllm_check] begin", 1)[0]
            paths["offline"]["kernels"] = sorted(set(INT8_KERNEL.findall(part)))
        if "server" in paths:
            server_log = Path(workdir / f"server-{name}.log").read_text(errors="replace")
            paths["server"]["kernels"] = sorted(set(INT8_KERNEL.findall(server_log)))
    return result


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
          ) -> tuple[list[Row], dict[str, float]]:
    """Export, reference, vLLM, compare: the rows of the table and the smallest greedy margin per scheme."""
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dirs, prompts = export_checkpoints(work, size, n_prompts=n_prompts, init_std=init_std)
    print(f"exported {', '.join(str(d) for d in dirs.values())} ({time.perf_counter() - start:.0f} s); "
          f"{len(prompts)} prompts of {len(prompts[0])} tokens, {max_tokens} greedy tokens", flush=True)
    ours = {scheme: reference(path, prompts, max_tokens) for scheme, path in dirs.items()}
    (work / "reference.json").write_text(json.dumps(ours))
    start = time.perf_counter()
    theirs = run_vllm(vllm_python, dirs, prompts, max_tokens, dtype, work, server_for=server_for)
    print(f"vLLM side took {time.perf_counter() - start:.0f} s (logs in {work})", flush=True)
    rows = []
    for scheme, path in dirs.items():
        control = ulp_control(path, prompts, max_tokens, ours[scheme])
        rows.append(Row(scheme, "ulp-ctl", control["max_abs_dlogprob"], control["greedy_identical"], [],
                        sum(len(p) - 1 for p in prompts), tokens_within=control["tokens_within"]))
    for scheme, paths in theirs.items():
        tokenizer = AutoTokenizer.from_pretrained(dirs[scheme])
        for path, result in paths.items():
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
    parser.add_argument("--no-server", action="store_true", help="skip the OpenAI-compatible server request")
    parser.add_argument("--workdir", help="keep checkpoints and vLLM logs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.command == "vllm-side":
        vllm_side(args)
        return []
    if not args.vllm_python:
        parser.error("no Python with vLLM: pass --vllm-python or set TICO_VLLM_PYTHON (see the README)")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tico-vllm-"))
    server_for = () if args.no_server else ("static", "dynamic")
    rows, margins = check(work, args.vllm_python, args.size, args.prompts, args.max_tokens, args.dtype, server_for,
                          init_std=args.init_std)
    print(f"\nvLLM ({args.dtype}) vs load_compressed (int8 kernels), model size {args.size!r}, "
          f"init std {args.init_std}")
    print(f"{'scheme':8s} {'path':8s} {'prompt max|dlogp|':>18s} {'<=1e-4':>8s} {'greedy same':>12s} "
          f"{'decode max|dlogp|':>18s}  int8 kernel in vLLM log")
    for r in rows:
        decode = "-" if r.decode_max_abs_dlogprob is None else f"{r.decode_max_abs_dlogprob:.3e}"
        text = "" if r.text_identical is None else f" (text {'same' if r.text_identical else 'differs'})"
        print(f"{r.scheme:8s} {r.path:8s} {r.max_abs_dlogprob:18.3e} {f'{r.tokens_within}/{r.tokens_compared}':>8s} "
              f"{'yes' if r.greedy_identical else 'NO':>12s} {decode:>18s}  {', '.join(r.kernels) or '-'}{text}")
        for step, margin in r.divergence:
            print(f"{'':17s} greedy differs from step {step}: our logit margin between the two choices {margin:.4f}")
    print("smallest top-1/top-2 logit margin on our greedy paths: "
          + ", ".join(f"{k} {v:.3f}" for k, v in margins.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "margins": margins}, indent=2))
    return rows


if __name__ == "__main__":
    main()
