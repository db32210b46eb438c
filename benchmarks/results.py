"""Benchmark figures go to ``benchmarks/RESULTS.md``, written by the scripts that measured them.

Each benchmark command owns one section of RESULTS.md, between two markers named after the command
(``python benchmarks/accuracy.py --threads 1``). Running that command again replaces its section with what it
printed, headed by the command, the date and the commit it ran on; other commands' sections stay as they are.
So a figure in RESULTS.md always says which command printed it, and when, and nobody copies numbers by hand.

    with recorded():          # in a benchmark's ``if __name__ == "__main__":``
        main()                # its printed output becomes its section when it finishes without an error

Set ``TICO_RESULTS=off`` to run a benchmark without touching RESULTS.md (or ``TICO_RESULTS=PATH`` to write
elsewhere).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# Benchmark results

Written by the scripts in `benchmarks/` (see `benchmarks/results.py`): each command owns the section named after
it and replaces it when run again, with the date and the commit it ran on. Machines differ and shared machines are
noisy: compare ratios measured in one run, and rerun a command to check a figure on your own machine.
"""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- results: {name} -->", f"<!-- end results: {name} -->"


def commit() -> str:
    """The short commit of the checkout, with ``+changes`` when tracked files differ from it (or ``unknown``)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def write_section(name: str, markdown: str, command: str, path: Path | None = None,
                  provenance: str | None = None) -> Path:
    """Replace (or append) the section ``name`` of RESULTS.md with ``markdown``, headed by ``command`` and the date.

    The heading line says when and at which commit the command printed it (today, this checkout);
    ``provenance`` replaces that line for figures recorded earlier, which must then say where they came from.
    """
    target = os.environ.get("TICO_RESULTS", "")
    path = Path(path or (target if target and target.lower() != "off" else RESULTS))
    begin, end = _markers(name)
    provenance = provenance or f"Printed on {datetime.date.today().isoformat()} at commit {commit()}."
    section = f"{begin}\n## `{command}`\n\n_{provenance}_\n\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), flags=re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def this_command(argv: list[str] | None = None) -> str:
    """How this script was run, as a user would type it from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script_name = str(script.relative_to(ROOT))
    except ValueError:
        script_name = str(argv[0])
    return shlex.join(["python", script_name, *argv[1:]])


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recorded(name: str | None = None, command: str | None = None, enabled: bool = True) -> Iterator[None]:
    """Print as usual; on success, write what was printed to RESULTS.md as this command's section.

    A run that fails, is interrupted or only prints its help (``SystemExit``) writes nothing; neither do the
    scripts' internal child modes (``enabled=False``) or ``TICO_RESULTS=off``.
    """
    if not enabled:
        yield
        return
    command = command or this_command()
    name = name or command.removeprefix("python ")
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
    if os.environ.get("TICO_RESULTS", "").lower() == "off":
        return
    printed = tee.copy.getvalue().strip()
    if printed:
        where = write_section(name, f"```\n{printed}\n```", command)
        print(f"results written to {where} (section: {name})")
