"""The one way an output folder is written: whole, or not at all.

Every output folder (a checkpoint, its shards, a report) goes through :class:`Publisher`: it writes into a
hidden staging folder beside the target (``.<name>.partial-<pid>-<random>``) and renames it into place when
complete. On any failure, Ctrl-C or ``kill`` (SIGTERM) included, the staging folder and any parent folder it
had to create are removed. A publisher opened for a folder that an enclosing publisher is already staging (a
checkpoint writer called inside a whole-run writer) writes in place and leaves publishing to the enclosing
one, so there is one staging folder and one rename per output, never two nested.

:func:`check_output` only looks (it creates nothing that it does not remove at once), so it can run before any
input is loaded. The staging folder comes from ``mkdtemp`` (mode 0700, so nobody can read a half-written
checkpoint); before the rename, folder and files get the modes the user's umask gives to ordinary files
(typically 0755 / 0644), so a serving account can read the result. Errors name the output the user asked for,
never the staging folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from tico.experimental.quantization.progress import stage

__all__ = ["OutputError", "Publisher", "check_output", "write_atomically", "RECIPE_FILE", "read_run_metadata"]

logger = logging.getLogger(__name__)

RECIPE_FILE = "tico_recipe.json"
_ACTIVE: list[Path] = []  # staging folders this process is writing now


class OutputError(Exception):
    """The output folder cannot be written (exists and is not empty, no permission, disk full)."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(output: str | os.PathLike[str]) -> Path:
    """Raise :class:`OutputError` unless ``output`` can be created (or is an empty folder); leaves nothing behind.

    Permission bits do not say everything (root ignores them; ``/proc`` refuses anyway), so a folder is
    created and removed at once in the nearest existing parent to prove that it can be.
    """
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
    try:
        os.rmdir(tempfile.mkdtemp(dir=base, prefix=".tico-write-check-"))
    except OSError as exc:
        raise OutputError(f"output folder {output} is not writable: cannot create a folder in {base} "
                          f"({exc.strerror or exc})") from None
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


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _pid_of(staging: Path) -> int | None:
    pid = staging.name.partition(".partial-")[2].split("-")[0]
    return int(pid) if pid.isdigit() else None


class Publisher:
    """Context manager around one output folder: write into :attr:`staging`, then call :meth:`publish`.

    Leaving the ``with`` block without :meth:`publish` (an exception, Ctrl-C, SIGTERM) removes everything it
    created. An ``OSError`` about a file inside the staging folder is re-raised as :class:`OutputError` naming
    the same file under the output folder.
    """

    def __init__(self, output: str | os.PathLike[str]) -> None:
        self.shown = str(output)
        self.output = Path(output).expanduser().absolute()
        self.staging: Path | None = None
        self.nested = False
        self._created: list[Path] = []
        self._published = False
        self._sigterm: Any = None

    def __enter__(self) -> "Publisher":
        if any(self.output == s or s in self.output.parents for s in _ACTIVE):
            self.nested = True  # the enclosing publisher removes or publishes it
            self.output.mkdir(parents=True, exist_ok=True)
            self.staging = self.output
            return self
        check_output(self.shown)
        parent = self.output.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale_staging()
            prefix = f".{self.output.name}.partial-{os.getpid()}-"
            self.staging = Path(tempfile.mkdtemp(dir=self.output.parent, prefix=prefix))
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"cannot write {self.shown}: {exc.strerror or exc}") from None
        _ACTIVE.append(self.staging)
        if threading.current_thread() is threading.main_thread():  # `kill` cleans up like Ctrl-C does
            self._sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        return self

    def publish(self) -> Path:
        """Rename the staging folder to the output (done by the enclosing publisher when nested)."""
        if self.staging is None:
            raise RuntimeError("Publisher.publish() outside its with block")
        if not self.nested:
            _publish_modes(self.staging)
            try:
                if self.output.exists():
                    self.output.rmdir()  # an empty folder, checked on entry
                os.replace(self.staging, self.output)
            except OSError as exc:
                raise OutputError(f"cannot write {self.shown}: {exc.strerror or exc}") from None
        self._published = True
        return self.output

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.nested:
            return
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
        if self.staging in _ACTIVE:
            _ACTIVE.remove(self.staging)
        if not self._published and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._remove_created()
            logger.info("nothing written to %s (stopped before completion)", self.shown)
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
            where = self._shown_path(exc.filename)
            if where is not None:
                raise OutputError(f"cannot write {where}: {exc.strerror or exc}") from None

    def _shown_path(self, filename: Any) -> str | None:
        """``filename`` inside the staging folder as the user will know it (under the output), else None."""
        if self.staging is None or not isinstance(filename, (str, os.PathLike)):
            return None
        path = Path(filename).absolute()
        if path != self.staging and self.staging not in path.parents:
            return None
        relative = path.relative_to(self.staging)
        return self.shown if str(relative) == "." else str(Path(self.shown) / relative)

    def _remove_created(self) -> None:
        for folder in self._created:  # innermost first: only the folders this publisher created
            try:
                folder.rmdir()
            except OSError:
                break

    def _remove_stale_staging(self) -> None:
        """Staging folders of this output left by processes that no longer run (killed with SIGKILL)."""
        for path in self.output.parent.glob(f".{self.output.name}.partial-*"):
            pid = _pid_of(path)
            if pid is None or path in _ACTIVE:
                continue
            if pid == os.getpid() or not _alive(pid):
                shutil.rmtree(path, ignore_errors=True)


def write_atomically(output: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(staging_folder)``, then move the folder to ``output``; nothing is left behind on failure."""
    with Publisher(output) as publisher:
        with stage(f"writing {output}"):
            write(publisher.staging)  # type: ignore[arg-type]
        return publisher.publish()


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
