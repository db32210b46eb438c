"""Two commits of this repository side by side on the same inputs: does a change keep every figure?

A restructuring must keep what the library computes. This script checks it like for like: the same models, the
same calibration and evaluation windows (token tensors cut once, here, and handed to both), the same configs (the
command line's schemes, built by each commit's own ``build_config``), each commit's library imported from a git
worktree of it, in fresh processes that alternate between the commits (so a noisy machine slows both alike).
Per model, path and scheme it prints perplexity and mean KL to the float model, whether the quantized weights
are bit-identical, and calibration / convert seconds.

* models: the shared real ``stories260K-hf`` (TinyStories windows) and the seeded random Llama with outlier norm
  channels of ``benchmarks/accuracy.py`` (written once as a checkpoint folder);
* paths: in memory (``prepare``, the calibration forwards, ``convert``) and streamed (``quantize_checkpoint``
  into a folder, read back with ``load_compressed``; ``smooth`` with ``from_pretrained``).

    python benchmarks/before_after.py 1c13c3a                  # against HEAD
    python benchmarks/before_after.py A B C --rounds 2 --paths memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ("smooth", "w8a8-dynamic", "w8a8-static")


def scores(model, reference, evaluation) -> tuple[float, float]:
    """Perplexity on ``evaluation`` and the mean KL of the model's next-token distribution to the reference's."""
    import torch

    logp = torch.log_softmax(reference_logits(model, evaluation)[:, :-1], -1)
    nll = -logp.gather(-1, evaluation[:, 1:, None]).mean()
    ref = torch.log_softmax(reference[:, :-1], -1)
    kl = (ref.exp() * (ref - logp)).sum(-1).mean()
    return float(nll.exp()), float(kl)


def reference_logits(model, evaluation):
    """The model's fp32 logits on each evaluation window."""
    import torch

    with torch.no_grad():
        return torch.cat([model(w[None]).logits.float() for w in evaluation])


def digest(tensors) -> str:
    """A short hash of named tensors (names and bytes): equal digests, bit-identical weights."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# -- the child: runs inside one commit's worktree (PYTHONPATH), imports only what both commits have -------------
def child(inputs: Path, paths: list[str], threads: int, out: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import tico
    from tico.experimental.quantization import convert, prepare
    from tico.experimental.quantization.export.compressed_tensors import load_compressed
    try:
        from tico.experimental.quantization.run.schemes import build_config
    except ImportError:  # before the run/ package
        from tico.experimental.quantization.schemes import build_config
    from tico.experimental.quantization.pipeline.stream import quantize_checkpoint

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    data = torch.load(inputs)
    rows = []

    for name, spec in data.items():
        load = lambda: AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval()  # noqa: E731
        reference = reference_logits(load(), spec["evaluation"])
        batches = list(spec["calibration"].split(8))
        for scheme in SCHEMES:
            if "memory" in paths:
                model = prepare(load(), build_config(scheme))
                start = time.perf_counter()
                with torch.no_grad():
                    for b in batches:
                        model(b)
                calib = time.perf_counter() - start
                model = convert(model)
                conv = time.perf_counter() - start - calib
                ppl, kl = scores(model, reference, spec["evaluation"])
                rows.append(dict(model=name, path="memory", scheme=scheme, ppl=ppl, kl=kl, calib=calib, convert=conv,
                                 weights=digest(model.state_dict())))
            if "stream" in paths:
                folder = out.parent / f"stream-{out.stem}-{name}-{scheme}"
                shutil.rmtree(folder, ignore_errors=True)
                start = time.perf_counter()
                quantize_checkpoint(spec["folder"], build_config(scheme), batches, folder)
                total = time.perf_counter() - start
                model = load_compressed(folder) if scheme != "smooth" else \
                    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                ppl, kl = scores(model, reference, spec["evaluation"])
                tensors = {}
                for f in sorted(folder.glob("*.safetensors")):
                    tensors.update(load_file(f))
                rows.append(dict(model=name, path="stream", scheme=scheme, ppl=ppl, kl=kl, calib=None, convert=total,
                                 weights=digest(tensors)))
                shutil.rmtree(folder, ignore_errors=True)
    out.write_text(json.dumps(dict(tico=tico.__file__, rows=rows)))


# -- the parent: worktrees, inputs, alternating runs, the table ---------------------------------------------------
def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def make_inputs(work: Path) -> Path:
    """The models' folders and the token windows both commits get, cut once here with this checkout's helpers."""
    import torch
    from transformers import AutoTokenizer

    from accuracy import SHARED, outlier_data, outlier_llama
    from tico.experimental.quantization.evaluation.data import read_text, token_windows

    specs = {}
    stories = SHARED / "stories260K-hf"
    if stories.exists():
        windows = token_windows(AutoTokenizer.from_pretrained(stories),
                                read_text(SHARED / "tinystories" / "validation_head.txt"), 256)
        specs["stories260K"] = dict(folder=str(stories), calibration=windows[:32], evaluation=windows[32:48])
    else:
        print(f"skipping the real model: {stories} not found")
    folder = work / "outlier-llama"
    outlier_llama().save_pretrained(folder)
    calibration, evaluation = outlier_data()
    specs["outlier Llama"] = dict(folder=str(folder), calibration=calibration, evaluation=evaluation)
    path = work / "inputs.pt"
    torch.save(specs, path)
    return path


def worktree(work: Path, commit: str) -> Path:
    sha = git("rev-parse", "--short", commit)
    tree = work / f"tree-{sha}"
    if not tree.exists():
        git("worktree", "add", "--detach", str(tree), sha)
    return tree


def run_child(tree: Path, inputs: Path, args: argparse.Namespace, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), TICO_RESULTS="off")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(inputs), "--out", str(out),
           "--threads", str(args.threads), "--paths", args.paths]
    subprocess.run(cmd, env=env, cwd=tree, check=True)
    result = json.loads(out.read_text())
    if not result["tico"].startswith(str(tree)):
        raise SystemExit(f"the child imported tico from {result['tico']}, not from {tree}")
    return result


def table(labels: list[str], runs: dict[str, list[dict]]) -> None:
    """One line per model, path and scheme: each commit's ppl, KL and fastest convert time; weights vs the first."""
    head = "".join(f" {'ppl ' + c:>14s} {'KL ' + c:>12s}" for c in labels)
    same = "".join(f" {'= ' + c:>9s}" for c in labels[1:])
    print(f"{'model':14s} {'path':6s} {'scheme':12s}{head}{same}  convert s ({', '.join(labels)})")
    for i, row in enumerate(runs[labels[0]][0]["rows"]):
        mine = {c: [r["rows"][i] for r in runs[c]] for c in labels}
        figures = "".join(f" {mine[c][0]['ppl']:14.4f} {mine[c][0]['kl']:12.6f}" for c in labels)
        ref = mine[labels[0]][0]["weights"]
        equal = "".join(f" {'same' if mine[c][0]['weights'] == ref else 'DIFFER':>9s}" for c in labels[1:])
        times = " ".join(f"{min(r['convert'] for r in mine[c]):6.2f}" for c in labels)
        print(f"{row['model']:14s} {row['path']:6s} {row['scheme']:12s}{figures}{equal}  {times}")
    print("(= c: the quantized weights are bit-identical to the first commit's; convert s: the fastest of the rounds, "
          "streamed rows time the whole quantize_checkpoint)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commits", nargs="*", help="commits to compare, the first is the reference (HEAD is added "
                        "when only one is given)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per commit, alternating (default 1)")
    parser.add_argument("--paths", default="memory,stream", help="memory, stream or both (default both)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/tico-before-after")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child), args.paths.split(","), args.threads, Path(args.out))
    if not args.commits:
        parser.error("name at least one commit to compare with HEAD")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    labels = [git("rev-parse", "--short", c) for c in args.commits + ["HEAD"] * (len(args.commits) == 1)]
    trees = {label: worktree(work, label) for label in labels}
    inputs = make_inputs(work)
    print(f"{' vs '.join(labels)}: the same inputs, {args.rounds} round(s) alternating the commits, "
          f"{args.threads} threads")
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        for r in range(args.rounds):
            for label in labels:
                runs[label].append(run_child(trees[label], inputs, args, work / f"{label}-{r}.json"))
    finally:
        for tree in trees.values():
            git("worktree", "remove", "--force", str(tree))
    table(labels, runs)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--child" in sys.argv:
        sys.path.remove(str(ROOT))  # the child imports tico from its commit's worktree (PYTHONPATH)
        main()
    else:
        from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

        with recorded():
            main()
