"""Every Python block of the README runs as written, and CI installs exactly as the README says.

The blocks run in order in one namespace (later blocks use the earlier ones' ``model``, ``tokenizer``, ``q_m``),
in a temporary working folder, with only the network-only lines replaced by the offline equivalents that the
README itself names (the test checks that the README names them, so the two cannot drift apart).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

HUB_MODEL = '"Maykeye/TinyLLama-v0"'
OFFLINE_MODEL = '"../shared/data/stories260K-hf"'
DATASET_IMPORT = "from datasets import load_dataset"
OFFLINE_DATASET = 'dataset = [{"text": t} for t in open("../shared/data/tinystories/validation_head.txt").read().split("\\n\\n")]'


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def offline(block: str) -> str:
    """The block with the README's own offline replacements, and ../shared/data resolved for this checkout."""
    block = block.replace(HUB_MODEL, OFFLINE_MODEL)
    block = block.replace(DATASET_IMPORT + "\n", "")
    block = re.sub(r"^dataset = load_dataset\(.*$", lambda _: OFFLINE_DATASET, block, flags=re.M)
    return block.replace("../shared/data", str(SHARED_DATA))


def test_readme_names_the_offline_replacements():
    for text in (HUB_MODEL, OFFLINE_MODEL, DATASET_IMPORT, OFFLINE_DATASET):
        assert text in README, text


def test_every_python_block_runs_offline(stories_dir, tinystories_text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(blocks, 1):
        code = offline(block)
        assert "Maykeye" not in code and "load_dataset" not in code
        try:
            exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - report which block failed
            pytest.fail(f"README python block {number} failed: {type(exc).__name__}: {exc}\n{block}")
    printed = capsys.readouterr().out
    assert "W8A8:" in printed and "kept in float" in printed  # the report summary after convert
    assert (tmp_path / "recipe.json").is_file() and (tmp_path / "out" / "w8a8" / "model.safetensors").is_file()


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
