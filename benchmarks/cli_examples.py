"""Time the README's command-line examples, in the README's order, as a user runs them.

Reads the ``tico-sq`` commands of README.md's "Run the main job" and "Command line" sections, runs each in a
fresh temporary folder standing in for ``/tmp/tico-out`` (so earlier outputs never block later runs), and prints
per command its wall seconds and the CPU seconds it used (user + system of the child process: steadier than wall
time on a shared machine), and its exit code. Run from the repository root, with ``../shared/data`` beside it.

    python benchmarks/cli_examples.py                       # every example
    python benchmarks/cli_examples.py --only quantize,eval  # some commands
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = "/tmp/tico-out"


def readme_commands(sections: tuple[str, ...] = ("## Run the main job", "## Command line")) -> list[list[str]]:
    """The ``tico-sq`` commands of the README's given sections, in order, as argv lists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for heading in sections:
        section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words and words[0] == "tico-sq":
                    commands.append(words)
    return commands


def run(argv: list[str], out: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and exit code of one command, ``/tmp/tico-out`` replaced by ``out``."""
    argv = [sys.executable, "-m", "tico.experimental.quantization.cli"] + [w.replace(OUT, str(out)) for w in argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        print(f"  {shlex.join(argv)} failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
    return wall, cpu, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated tico-sq commands to run (default: all)")
    args = parser.parse_args()
    wanted = None if args.only is None else set(args.only.split(","))
    commands = [c for c in readme_commands() if wanted is None or c[1] in wanted]
    print(f"README command-line examples on {os.cpu_count()} CPUs; wall and CPU seconds (user + system)")
    print(f"| command | wall s | CPU s | exit |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tico-out-") as out:
        for argv in commands:
            wall, cpu, code = run(argv, Path(out))
            shown = shlex.join(argv).replace("../shared/data/", "")
            print(f"| `{shown}` | {wall:.1f} | {cpu:.1f} | {code} |", flush=True)


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
