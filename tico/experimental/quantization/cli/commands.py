"""The four commands. Each checks its arguments, calls the library, and prints; no algorithm lives here.

Order inside every command: arguments that need no file (exit 2) -> the output folder, only looked at
(exit 4) -> model config, tokenizer and text (exit 3; the model's position limit checks --seq-len, exit 2)
-> the model's weights (exit 3) -> quantization (exit 5) -> writing (exit 4). A mistake is therefore
reported before any weight is loaded, and nothing is created before the inputs are known to be good.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tico.experimental.quantization.cli.checks import (
    apply_recipe, check_device, check_fit, check_ignore, check_packages, check_required, model_config, require)
from tico.experimental.quantization.cli.display import out, show_progress
from tico.experimental.quantization.cli.errors import EXIT_ARGS, EXIT_LOAD, EXIT_OUTPUT, EXIT_QUANT, CliError


def run(args: argparse.Namespace) -> int:
    """Dispatch to ``cmd_<command>`` with library errors mapped to exit codes."""
    handler = {"quantize": cmd_quantize, "eval": cmd_eval, "report": cmd_report, "demo": cmd_demo}[args.command_name]
    with show_progress(), _library_errors():
        return handler(args)


@contextmanager
def _library_errors() -> Iterator[None]:
    from tico.experimental.quantization.distributed import DistributedError
    from tico.experimental.quantization.export.publish import OutputError
    from tico.experimental.quantization.run.loading import InputError
    from tico.experimental.quantization.quantizer import QuantizationError

    try:
        yield
    except DistributedError as exc:  # another rank failed (under torchrun): its error is in the message
        raise CliError(str(exc), EXIT_QUANT) from exc
    except InputError as exc:
        raise CliError(str(exc), EXIT_LOAD) from exc
    except OutputError as exc:
        raise CliError(str(exc), EXIT_OUTPUT) from exc
    except QuantizationError as exc:
        raise CliError(f"quantization failed: {exc}", EXIT_QUANT) from exc


# -- shared by the commands ----------------------------------------------------------------------------------
def _before_loading(args: argparse.Namespace, command: str) -> None:
    """The checks that need no file: options that fit together, packages, device (all exit 2)."""
    check_fit(args)
    check_packages(args, command)
    check_device(args.device)


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """What identifies the text: a local file by its resolved path, a hub dataset by name, config, split, column."""
    path = Path(args.dataset).expanduser()
    if path.exists():
        column = args.text_column if path.suffix == ".jsonl" else None
        return {"dataset": str(path.resolve()), "dataset_config": None, "split": None, "text_column": column}
    return {"dataset": args.dataset, "dataset_config": args.dataset_config, "split": args.split,
            "text_column": args.text_column}


def _text(args: argparse.Namespace) -> str:
    from tico.experimental.quantization.run.loading import load_text

    return load_text(args.dataset, args.dataset_config, args.split, args.text_column)


def _too_short(args: argparse.Namespace, exc: ValueError, what: str) -> CliError:
    return CliError(f"--dataset {args.dataset}: {exc} (lower {what} or --seq-len, or use a longer text)", EXIT_LOAD)


# -- quantize -------------------------------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> int:
    from tico.experimental.quantization.distributed import together
    from tico.experimental.quantization.run.workflow import quantize_to_folder

    start = time.perf_counter()
    with _process_group(args) as rank:
        # Under torchrun a rank that fails alone here would leave the others waiting in the first collective:
        # the checks end with an exchange of "ok or error", so every rank stops (docs/distributed.md).
        with together("checking the arguments and inputs"):
            recorded, config, calibration, tokenizer = _quantize_inputs(args)
        try:
            result = quantize_to_folder(args.model, tokenizer, config, calibration, args.output, args.batch_size,
                                        args.dtype, args.device, args.trust_remote_code, _options(args, config),
                                        rotate=args.rotate, streaming=args.streaming)
        except (OSError, ValueError) as exc:
            # Raised while writing (export refusals, disk full): the staging folder is already removed.
            from tico.experimental.quantization.quantizer import QuantizationError

            if isinstance(exc, QuantizationError):
                raise
            raise CliError(f"cannot write {args.output}: {type(exc).__name__}: {exc}", EXIT_OUTPUT) from None
    if rank != 0:  # one rank reports; rank 0 wrote the folder
        return 0
    if result.notes:
        out(result.notes)
    out(result.summary())
    from tico.experimental.quantization.export.transforms import checkpoint_engines

    out(checkpoint_engines(args.output))  # which loaders/engines compute this checkpoint correctly
    source = " (the config of --recipe)" if recorded is not None else ""
    out(f"saved {args.scheme} checkpoint to {args.output}{source} in {time.perf_counter() - start:.1f}s "
        f"(calibrated on {calibration.windows.size(0)} windows spread over tokens 0-{calibration.end_token} of "
        f"{args.dataset}; recorded in tico_recipe.json)")
    return 0


def _quantize_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """quantize's checks, in the order of this module's docstring, and what they read: the config of --recipe
    (or None), the config, the calibration set and the tokenizer."""
    from tico.experimental.quantization.export.publish import check_output
    from tico.experimental.quantization.run.loading import load_tokenizer
    from tico.experimental.quantization.run.schemes import build_config
    from tico.experimental.quantization.run.workflow import SELECTION, calibration_set

    recorded = apply_recipe(args, build_config)
    check_required(args, "quantize", ("model", "dataset"))
    if _under_torchrun() and (not args.streaming or args.rotate != "none" or args.dtype != "auto"):
        raise CliError("under torchrun only the streamed path runs (no --in-memory, --rotate or --dtype)", EXIT_ARGS)
    if args.dist_timeout is not None and not _under_torchrun():
        raise CliError("--dist-timeout: this run has one process (WORLD_SIZE is not above 1): start it with torchrun "
                       "--nproc-per-node N, or leave the option out", EXIT_ARGS)
    _before_loading(args, "quantize")
    config = recorded if recorded is not None else _build_config(args, build_config)
    check_output(args.output)
    check_ignore(args, model_config(args.model, args))
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    text = _text(args)
    try:
        calibration = calibration_set(tokenizer, text, args.seq_len, args.samples, _source(args),
                                      getattr(args, "calibration_selection", SELECTION))  # a --recipe's own windows
    except ValueError as exc:
        raise _too_short(args, exc, "--samples") from None
    return recorded, config, calibration, tokenizer


def _under_torchrun() -> bool:
    """Started as one of several ranks (torchrun sets ``WORLD_SIZE``)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): a process group (``gloo`` on the CPU, ``nccl`` on CUDA, one device
    per rank) for the streamed pipeline, which splits the batches over the ranks and writes on rank 0; yields
    this rank. Started before quantize's checks, so that a check failing on one rank stops every rank; the
    in-memory path would calibrate every rank on every batch, so it is refused among those checks (exit 2)."""
    if not _under_torchrun():
        yield 0
        return
    import logging
    import os
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = str(args.device).startswith("cuda")
    if cuda:
        check_device("cuda")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        args.device = f"cuda:{torch.cuda.current_device()}"
    timeout = None if args.dist_timeout is None else timedelta(seconds=args.dist_timeout)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a store timeout or a refused connection: one line, exit 5
        raise CliError(f"the process group did not start (a rank missing, or MASTER_ADDR/MASTER_PORT unreachable): "
                       f"{type(exc).__name__}: {exc}", EXIT_QUANT) from exc
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger("tico").setLevel(logging.ERROR)  # rank 0 logs and draws the progress
    try:
        yield rank
        dist.barrier()  # every rank done before any tears down: gloo can abort a peer that is still closing
    finally:
        dist.destroy_process_group()


def _options(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """The options recorded in tico_recipe.json: what ``--recipe`` needs to run the same again."""
    from tico.experimental.quantization.run.schemes import DEFAULT_ALPHA

    smoothing = getattr(config, "smoothing", config)
    alpha = getattr(smoothing, "alpha", None)
    return {"scheme": args.scheme, "alpha": alpha if alpha is not None else DEFAULT_ALPHA[args.scheme],
            "act_range": args.act_range, "ignore": list(getattr(config, "ignore", ())),
            "linear_producers": bool(getattr(smoothing, "linear_producers", False)), "samples": args.samples,
            "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
            "rotate": args.rotate, "trust_remote_code": args.trust_remote_code,
            "dynamic_fallback": getattr(config, "dynamic_fallback", None),
            "block_objective": getattr(config, "block_objective", False)}


def _build_config(args: argparse.Namespace, build_config: Any) -> Any:
    """The scheme's config from the options (exit 2 naming the option when they do not fit together)."""
    check_fit(args)
    try:
        return build_config(args.scheme, args.alpha, getattr(args, "act_range", "mse"), getattr(args, "ignore", []),
                            getattr(args, "linear_producers", None), getattr(args, "dynamic_fallback", None),
                            getattr(args, "block_objective", None))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_ARGS) from None


# -- eval -----------------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from tico.experimental.quantization.export.publish import read_run_metadata
    from tico.experimental.quantization.evaluation import perplexity, tokenize_text, windows_outside
    from tico.experimental.quantization.run.loading import load_model, load_tokenizer

    _before_loading(args, "eval")
    names = [("model", args.model)] + ([("reference", args.reference)] if args.reference else [])
    for _, name in names:
        if model_config(name, args).get("quantization_config", {}).get("quant_method") == "compressed-tensors":
            require(["compressed_tensors"], f"{name} (a compressed-tensors checkpoint)")
    text = _text(args)
    skip, excluded, note = _eval_start(args, read_run_metadata(args.model) if Path(args.model).expanduser().is_dir() else None)
    out(note)
    rows = []
    for label, name in names:
        tokenizer = load_tokenizer(name, args.trust_remote_code)
        stream = tokenize_text(tokenizer, text, add_bos=False)
        if skip >= stream.numel():
            raise CliError(f"--dataset {args.dataset}: only {stream.numel()} tokens, none left after skipping {skip}; "
                           "evaluate on another text or lower --skip-tokens", EXIT_LOAD)
        model = load_model(name, args.dtype, args.device, args.trust_remote_code, causal_lm=True)
        try:  # each window begins as the tokenizer begins a text (its BOS, if it adds one), as calibration did
            windows = windows_outside(tokenizer, text, args.seq_len, excluded, start=skip)
            result = perplexity(model, None, windows.reshape(-1), seq_len=args.seq_len, max_windows=args.max_windows,
                                device=args.device, progress=True)
        except ValueError as exc:
            raise _too_short(args, exc, "--skip-tokens") from None
        rows.append((label, name, result))
    out(f"{'':10s} {'perplexity':>11s} {'tokens':>9s}  model")
    for label, name, r in rows:
        out(f"{label:10s} {r.ppl:11.4f} {r.num_tokens:9d}  {name}")
    if len(rows) == 2:
        out(f"change vs reference: {100 * (rows[0][2].ppl / rows[1][2].ppl - 1):+.3f}%")
    return 0


def _eval_start(args: argparse.Namespace, metadata: dict[str, Any] | None) -> tuple[int, list[tuple[int, int]], str]:
    """The first token to score, the token ranges never to score (the calibration windows), and one line saying
    why (so calibration tokens are never scored unknowingly)."""
    if args.skip_tokens is not None:
        return args.skip_tokens, [], f"scoring from token {args.skip_tokens} (--skip-tokens)"
    calibration = (metadata or {}).get("calibration")
    if not isinstance(calibration, dict):
        return 0, [], (f"note: {args.model} has no tico_recipe.json, so which text calibrated it is unknown; scoring "
                       "from token 0 (--skip-tokens N skips the first N tokens)")
    keys = ("dataset", "dataset_config", "split", "text_column")
    if not all(calibration.get(k) == _source(args).get(k) for k in keys):
        return 0, [], f"{args.model} was calibrated on other text ({calibration.get('dataset')}); scoring from token 0"
    ranges = calibration.get("token_ranges")
    if isinstance(ranges, list):
        return 0, [(int(a), int(b)) for a, b in ranges], (
            f"scoring only windows that share no token with the {len(ranges)} calibration windows of this text "
            f"(tokens {calibration.get('first_token')}-{calibration.get('end_token')}, tico_recipe.json)")
    end = int(calibration.get("end_token", 0))  # a recipe written before calibration windows were spread
    return end, [], f"scoring from token {end}: tokens 0-{end} of this text calibrated {args.model} (tico_recipe.json)"


# -- report ---------------------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from tico.experimental.quantization.export.publish import check_output, write_atomically
    from tico.experimental.quantization.run.loading import load_tokenizer
    from tico.experimental.quantization.run.report import report_run, write_report_folder
    from tico.experimental.quantization.run.schemes import build_config
    from tico.experimental.quantization.run.workflow import calibration_set

    _before_loading(args, "report")
    config = _build_config(args, build_config)
    check_output(args.output)
    check_ignore(args, model_config(args.model, args))
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    try:
        calibration = calibration_set(tokenizer, _text(args), args.seq_len, args.samples, _source(args))
    except ValueError as exc:
        raise _too_short(args, exc, "--samples") from None
    # quantize's own path and options (see run/report.py): the decisions shown are the ones quantize takes
    run = report_run(args.model, tokenizer, config, calibration, batch_size=args.batch_size, dtype=args.dtype,
                     device=args.device, trust_remote_code=args.trust_remote_code,
                     rotate=args.rotate, streaming=args.streaming)
    summary: list[str] = []
    write_atomically(args.output, lambda folder: summary.append(write_report_folder(run, folder, args.plots)))
    out(summary[0])
    out(f"wrote outliers.json, summary.txt and {min(args.plots, len(run.rows))} plots to {args.output}")
    return 0


# -- demo -----------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: prepare -> calibrate -> convert -> W8A8 -> a fidelity table, offline by default."""
    from tico.experimental.quantization.run.calibration import quantize_model
    from tico.experimental.quantization.evaluation.compare import compare_to_reference
    from tico.experimental.quantization.evaluation.data import token_windows
    from tico.experimental.quantization.run.loading import (
        embedded_demo_model, embedded_demo_text, is_causal_lm, load_model, load_tokenizer)
    from tico.experimental.quantization.progress import stage
    from tico.experimental.quantization.run.schemes import demo_recipes

    _before_loading(args, "demo")
    name = args.model or embedded_demo_model()
    causal = is_causal_lm(model_config(name, args))
    tokenizer = load_tokenizer(name, args.trust_remote_code)
    text = _text(args) if args.dataset else embedded_demo_text()
    try:
        windows = token_windows(tokenizer, text, args.seq_len, num_windows=args.samples + args.eval_windows,
                                add_bos=causal)
    except ValueError as exc:
        raise _too_short(args, exc, "--samples/--eval-windows") from None
    calib, evaluation = windows[: args.samples].to(args.device), windows[args.samples:].to(args.device)
    out(f"model {name} ({'causal LM' if causal else 'encoder'}); calibration {args.samples}x{args.seq_len} tokens, "
        f"evaluation on the next {args.eval_windows}x{args.seq_len}")

    def load() -> Any:
        return load_model(name, args.dtype, args.device, args.trust_remote_code, causal_lm=causal)

    reference = load()
    recipes = demo_recipes()
    header: list[str] | None = None
    for i, (label, recipe) in enumerate(recipes.items(), 1):
        start = time.perf_counter()
        model = reference if recipe is None else quantize_model(load(), recipe, calib, args.batch_size, args.device).model
        with stage(f"[{i}/{len(recipes)}] scoring {label}"):
            row = compare_to_reference(model, reference, evaluation, causal)
        if header is None:
            header = list(row)
            out(f"{'recipe':28s}" + "".join(f"{k:>12s}" for k in header) + f"{'time':>9s}")
        out(f"{label:28s}" + "".join(f"{row[k]:12.5f}" for k in header) + f"{time.perf_counter() - start:8.1f}s")
    return 0
