"""Write an output folder all at once, readable like any ``save_pretrained`` folder.

:func:`check_output` only looks (it creates nothing), so it can run before any input is loaded and a failed
run leaves no empty folder behind. :func:`write_atomically` writes into a hidden staging folder beside the
target and renames it into place at the end; on any failure, Ctrl-C included, the staging folder and any
parent folder it had to create are removed. The staging folder comes from ``mkdtemp`` (mode 0700, so nobody
can read a half-written checkpoint); before the rename, folder and files get the modes the user's umask
gives to ordinary files (typically 0755 / 0644), so a serving account can read the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from tico.experimental.quantization.progress import stage

__all__ = ["OutputError", "check_output", "write_atomically", "RECIPE_FILE", "read_run_metadata"]

logger = logging.getLogger(__name__)

RECIPE_FILE = "tico_recipe.json"


class OutputError(Exception):
    """The output folder cannot be written (exists and is not empty, or no permission)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(output: str | os.PathLike[str]) -> Path:
    """Raise :class:`OutputError` unless ``output`` can be created (or is an empty folder); creates nothing."""
    out = Path(output).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {output} exists and is a file, not a folder")
        if any(out.iterdir()):
            raise OutputError(f"output folder {output} exists and is not empty")
    base = _nearest_existing(out.parent)
    if not base.is_dir():
        raise OutputError(f"output folder {output} is not writable: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {output} is not writable: no write permission in {base}")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir``/``open`` would have given."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)


def write_atomically(output: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(staging_folder)``, then move the folder to ``output``; nothing is left behind on failure."""
    out = check_output(output)
    missing = []
    parent = out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    staging: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
        with stage(f"writing {output}"):
            write(staging)
        _publish_modes(staging)
        if out.exists():
            out.rmdir()  # an empty folder, checked above
        staging.rename(out)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in missing:  # innermost first: only the folders this call created
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return out


def read_run_metadata(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``tico_recipe.json`` that ``tico-sq quantize`` wrote beside a checkpoint, or None if absent/unreadable."""
    path = Path(model_dir).expanduser() / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None
