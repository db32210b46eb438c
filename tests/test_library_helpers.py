"""The small library modules behind the command line: progress reports, atomic outputs, input checks."""

from __future__ import annotations

import pytest

from tico.experimental.quantization.export.publish import OutputError, check_output, write_atomically
from tico.experimental.quantization.run.loading import InputError, load_text, max_positions
from tico.experimental.quantization.progress import progress_callback, stage, track


def test_track_and_stage_report_open_each_step_and_close():
    seen = []
    with progress_callback(lambda *event: seen.append(event)):
        assert list(track(iter("ab"), "letters")) == ["a", "b"]  # unknown length: closed with the real count
        with stage("loading"):
            pass
    assert seen == [("letters", 0, None), ("letters", 1, None), ("letters", 2, None), ("letters", 2, 2),
                    ("loading", 0, 1), ("loading", 1, 1)]
    assert list(track([1, 2], "quiet")) == [1, 2]  # no callback installed: nothing reported, nothing breaks


def test_write_atomically_removes_everything_it_created_on_failure(tmp_path):
    out = tmp_path / "x" / "y" / "out"

    def fail(folder):
        (folder / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(out, fail)
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_fills_an_existing_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_atomically(out, lambda folder: (folder / "a.txt").write_text("x"))
    assert [p.name for p in out.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it


def test_check_output_creates_nothing_and_names_the_problem(tmp_path):
    check_output(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "file")


def test_load_text_jsonl_names_the_line_without_the_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(InputError, match="line 2 has no 'text' field"):
        load_text(str(path))


def test_max_positions_reads_the_usual_config_keys():
    assert max_positions({"max_position_embeddings": 512}) == 512
    assert max_positions({"n_positions": 1024}) == 1024
    assert max_positions({}) is None


def test_static_scheme_defaults_to_measured_fallback_and_block_choice_and_each_can_be_turned_off():
    from tico.experimental.quantization.run.schemes import build_config

    static = build_config("w8a8-static")
    assert static.dynamic_fallback == 16.0 and static.block_objective
    plain = build_config("w8a8-static", dynamic_fallback="off", block_objective=False)
    assert plain.dynamic_fallback is None and not plain.block_objective
    dynamic = build_config("w8a8-dynamic")
    assert dynamic.dynamic_fallback is None and not dynamic.block_objective
    assert build_config("w8a8-dynamic", dynamic_fallback="off").dynamic_fallback is None
    with pytest.raises(ValueError, match="dynamic_fallback applies to w8a8-static"):
        build_config("w8a8-dynamic", dynamic_fallback=16.0)
