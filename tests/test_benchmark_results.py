"""benchmarks/RESULTS.md is written by the benchmark scripts: one section per command, replaced when rerun."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def results():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import results
    finally:
        sys.path.remove(str(BENCHMARKS))
    return results


def test_write_section_replaces_only_its_own_section(results, tmp_path):
    path = tmp_path / "RESULTS.md"
    results.write_section("a.py", "first a", "python benchmarks/a.py", path=path)
    results.write_section("b.py", "only b", "python benchmarks/b.py", path=path)
    results.write_section("a.py", "second a", "python benchmarks/a.py", path=path)
    text = path.read_text()
    assert "second a" in text and "first a" not in text and "only b" in text
    assert text.count("## `python benchmarks/a.py`") == 1 and text.index("second a") < text.index("only b")
    assert re.search(r"Printed on \d{4}-\d\d-\d\d at commit \S+\.", text)


def test_recorded_writes_what_a_successful_run_printed(results, tmp_path, monkeypatch, capsys):
    path = tmp_path / "RESULTS.md"
    monkeypatch.setenv("TICO_RESULTS", str(path))
    with results.recorded(command="python benchmarks/x.py --fast"):
        print("ratio 1.00")
    assert "ratio 1.00" in path.read_text() and "<!-- results: benchmarks/x.py --fast -->" in path.read_text()
    with pytest.raises(RuntimeError):
        with results.recorded(command="python benchmarks/y.py"):
            print("half a table")
            raise RuntimeError("interrupted")
    assert "half a table" not in path.read_text()
    monkeypatch.setenv("TICO_RESULTS", "off")
    with results.recorded(command="python benchmarks/z.py"):
        print("not written")
    assert "not written" not in path.read_text() and not (Path.cwd() / "off").exists()


def test_every_benchmark_script_records_its_results():
    scripts = [p for p in BENCHMARKS.glob("*.py") if p.name != "results.py"]
    assert scripts
    for script in scripts:
        main = script.read_text().split('if __name__ == "__main__":', 1)[1]
        assert "recorded(" in main, f"{script.name} does not write its figures to RESULTS.md"
    text = (BENCHMARKS / "RESULTS.md").read_text()
    named = set(re.findall(r"<!-- results: benchmarks/(\w+)\.py", text))
    assert {s.stem for s in scripts} <= named, {s.stem for s in scripts} - named
