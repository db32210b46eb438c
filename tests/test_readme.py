"""The README can be followed in order: its Python runs, its commands parse, and its examples write only their own
folders under /tmp/tico-out (never into the repository). CI installs exactly as the README says.

The Python blocks run in order in one namespace (later blocks use the earlier ones' ``model``, ``tokenizer``,
``q_m``), in a temporary working folder, with ``../shared/data`` resolved for this checkout and ``/tmp/tico-out``
moved into the test's temporary folder: nothing else is replaced.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
OUT = "/tmp/tico-out"
WRITERS = r"(?:save_compressed|quantize_checkpoint|save_recipe|makedirs|save_pretrained)"


def python_blocks(text: str = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def bash_commands(text: str = README) -> list[list[str]]:
    """Every command of the text's bash blocks, continuation lines joined, comments dropped, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def local(code: str, out: Path) -> str:
    return code.replace("../shared/data", str(SHARED_DATA)).replace(OUT, str(out))


def written_folders(example: str, argv: list[str] | None = None) -> set[str]:
    """The folders an example writes: ``--output`` of a command, or the paths a Python block saves to."""
    if argv is not None:
        return {argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--output"}
    paths = re.findall(WRITERS + r"\((?:[^()\"]|\([^()]*\))*?\"([^\"]+)\"", example)
    return {p if Path(p).suffix == "" else str(Path(p).parent) for p in paths}


def test_readme_is_short_and_carries_no_measured_figure():
    assert len(README.splitlines()) <= 250
    figures = re.findall(r"[+-]?\d+(?:\.\d+)?\s?(?:%|s\b|ms\b|min\b|minutes?\b|seconds?\b|hours?\b|h\b|GB\b|GiB\b|MB\b|×)",
                         README)
    assert figures == [], f"figures belong to benchmarks/RESULTS.md, linked from the README: {figures}"
    assert "benchmarks/RESULTS.md" in README and "most accurate" not in README


def test_every_python_block_runs_as_written(stories_dir, tinystories_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tico-out"
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(blocks, 1):
        assert "load_dataset" not in block and "import datasets" not in block  # no install line provides it
        try:
            exec(compile(local(block, out), f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - report which block failed
            pytest.fail(f"README python block {number} failed: {type(exc).__name__}: {exc}\n{block}")
    printed = capsys.readouterr().out
    assert "W8A8:" in printed and "kept in float" in printed  # the report summary after convert
    assert (out / "python-w8a8" / "model.safetensors").is_file()
    assert list(tmp_path.iterdir()) == [out]  # nothing written beside the declared output folder


def test_docs_python_blocks_compile():
    for name, text in DOCS.items():
        for number, block in enumerate(python_blocks(text), 1):
            compile(block, f"docs/{name} python block {number}", "exec")


def test_every_example_writes_its_own_folder_outside_the_repository():
    examples = [(f"README python block {i}", written_folders(b)) for i, b in enumerate(python_blocks(), 1)]
    examples += [(" ".join(argv), written_folders("", argv)) for argv in bash_commands()]
    for name, text in DOCS.items():
        examples += [(f"docs/{name} python block {i}", written_folders(b)) for i, b in enumerate(python_blocks(text), 1)]
        examples += [(" ".join(argv), written_folders("", argv)) for argv in bash_commands(text)]
    seen: dict[str, str] = {}
    for example, folders in examples:
        for folder in folders:
            assert folder.startswith(OUT + "/"), f"{example} writes {folder}, not under {OUT}"
            assert not Path(folder).resolve().is_relative_to(ROOT)
            assert folder not in seen, f"{example} and {seen[folder]} both write {folder}"
            seen[folder] = example
    assert len(seen) >= 4


def test_cli_examples_parse_and_scripts_exist():
    from tico.experimental.quantization.cli.main import build_parser

    commands = bash_commands()
    tico = [argv for argv in commands if argv[0] == "tico-sq"]
    assert {argv[1] for argv in tico} >= {"demo", "quantize", "eval", "report"}
    for argv in tico:
        build_parser().parse_args(argv[1:])  # exits 2 on an unknown option or a bad value
    for argv in commands:
        if argv[0] in ("python", "python3") and argv[1].endswith(".py"):
            script = argv[1]
            assert (ROOT / script).is_file() or f"pending: {script}" in README, f"{script} does not exist"
        for word in argv:
            if word.startswith("../shared/data"):
                assert (SHARED_DATA / word.removeprefix("../shared/data/")).exists() or not SHARED_DATA.exists(), word


def test_cli_quantize_then_eval_examples_run(stories_dir, tinystories_text, tmp_path):
    """The command-line section's quantize and eval, run in order (shared data, /tmp/tico-out moved).

    Their order and folders as written; fewer calibration and evaluation windows than written (a later option
    wins in argparse) keep this test to seconds; TICO_README_AS_WRITTEN=1 runs them exactly as written.
    """
    out = tmp_path / "tico-out"
    section = README.split("## Command line", 1)[1].split("\n## ", 1)[0]
    commands = [argv for argv in bash_commands(section) if argv[:2] in (["tico-sq", "quantize"], ["tico-sq", "eval"])]
    assert [argv[1] for argv in commands] == ["quantize", "eval"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for argv in commands:
        argv = [sys.executable, "-m", "tico.experimental.quantization.cli"] + shlex.split(local(shlex.join(argv[1:]), out))
        if not os.environ.get("TICO_README_AS_WRITTEN"):
            argv += ["--samples", "4"] if argv[3] == "quantize" else ["--max-windows", "2"]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-2000:]}"
    assert (out / "w8a8-static" / "tico_recipe.json").is_file() and "perplexity" in result.stdout.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tico-out"]


def install_block() -> list[str]:
    """The commands of the README's install block (comments and blank lines left out)."""
    section = README.split("## Install", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_install_block_pins_torch_first_and_installs_the_tested_versions():
    commands = install_block()
    torch_at = next(i for i, c in enumerate(commands) if c.startswith("pip install torch"))
    project_at = next(i for i, c in enumerate(commands) if "-e '.[test]'" in c)
    tested = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert torch_at < project_at and f"torch=={tested['torch']}" in commands[torch_at].split()
    assert "-c constraints.txt" in commands[project_at]


def test_ci_latest_installs_without_the_constraints():
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--latest", "--print-install"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and "constraints.txt" not in result.stdout and "-e '.[test]'" in result.stdout
    assert subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--bogus"], capture_output=True, cwd=ROOT).returncode == 2


def test_ci_runs_the_readme_install_block_and_fails_without_tests(tmp_path):
    script = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in script and "python -m pytest -q" in script
    assert "rc\" -eq 5" in script  # pytest collected nothing: CI fails
    # the script's own extraction of the block gives the same commands as this test's
    result = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-install"], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    assert [line.strip() for line in result.stdout.splitlines() if line.strip()] == install_block()
