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


def test_an_empty_step_reports_nothing_rather_than_a_step_left_open():
    seen = []
    with progress_callback(lambda *event: seen.append(event)):
        assert list(track([], "choosing alphas")) == []
        assert list(track(iter([]), "unknown length")) == []  # opened (length unknown), closed at 0 of 0
    assert seen == [("unknown length", 0, None), ("unknown length", 0, 0)]


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


def test_one_publisher_a_shard_writer_inside_a_publisher_writes_in_place(tmp_path):
    """One staging folder and one rename per output: the checkpoint writer inside a whole-run writer does not
    stage a second time (issue 17: atomic publishing was written twice, nested)."""
    import torch

    from tico.experimental.quantization.export.shards import ShardWriter

    seen = []

    def write(folder):
        with ShardWriter(folder) as shards:
            shards.add("a", torch.zeros(4))
            seen.append(sorted(p.name for p in tmp_path.iterdir()))  # only the outer staging folder
            shards.publish()
        (folder / "extra.json").write_text("{}")

    out = write_atomically(tmp_path / "out", write)
    assert len(seen[0]) == 1 and seen[0][0].startswith(".out.partial-")
    assert sorted(p.name for p in out.iterdir()) == ["extra.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_publisher_errors_name_the_output_not_the_staging_folder(tmp_path):
    def fail(folder):
        raise PermissionError(13, "Permission denied", str(folder / "model.safetensors"))

    with pytest.raises(OutputError) as exc:
        write_atomically(tmp_path / "out", fail)
    assert str(exc.value) == f"cannot write {tmp_path / 'out' / 'model.safetensors'}: Permission denied"
    assert list(tmp_path.iterdir()) == []


def test_check_output_tries_to_create_not_only_permission_bits(tmp_path):
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    with pytest.raises(OutputError) as exc:  # root passes os.access on /proc, but nothing can be created there
        check_output("/proc/tico-out")
    assert "/proc/tico-out" in str(exc.value) and ".partial" not in str(exc.value)


def test_line_display_writes_plain_bounded_lines():
    import io

    from tico.experimental.quantization.cli.display import LineDisplay
    from tico.experimental.quantization.progress import progress_callback, stage, track

    now = [0.0]
    stream = io.StringIO()
    display = LineDisplay(stream, interval=10.0, clock=lambda: now[0])
    with progress_callback(display):
        for _ in track(range(50), "quantizing blocks"):
            for _ in track(range(4), "choosing alphas"):  # inner steps: no lines of their own
                now[0] += 0.5
        with stage("writing out"):
            now[0] += 1
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b[" not in stream.getvalue()
    assert lines[0] == "quantizing blocks ..." and lines[-1] == "writing out: done in 1.0s"
    assert "quantizing blocks: done (50 of 50) in 100.0s" in lines
    assert len(lines) <= 4 + 100 / 10  # start and end of the two outer steps, one line per interval at most
