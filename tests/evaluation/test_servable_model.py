"""examples/make_servable_model.py: the shared stories260K widened to a head size vLLM accepts, outputs unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "make_servable_model.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_servable_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def source(stories_dir):
    return AutoModelForCausalLM.from_pretrained(stories_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("head_dim", [32, 128])
def test_widening_is_exact_in_real_arithmetic(script, source, head_dim):
    """In float64 the widened model's logits equal the original's to float64 rounding: the widening is an identity."""
    wide = script.widen_heads(source, head_dim).double()
    wide.config._attn_implementation = "eager"
    original = source.double()
    try:
        ids = torch.randint(0, source.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            a, b = wide(ids).logits, original(ids).logits
        assert wide.config.head_dim == head_dim and wide.model.layers[0].self_attn.q_proj.out_features == 8 * head_dim
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    finally:
        source.float()


def test_widening_refuses_head_sizes_that_would_not_be_exact(script, source):
    with pytest.raises(ValueError, match="power of 4"):
        script.widen_heads(source, 64)  # query factor sqrt(8): not exact in float


def test_script_saves_a_folder_from_pretrained_loads(script, source, stories_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert script.main(["--source", str(stories_dir), "--head-dim", "32", "--output", str(first)]) == 0
    assert script.main(["--source", str(stories_dir), "--head-dim", "32", "--output", str(second)]) == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()  # reproducible
    assert (first / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(first).eval()
    assert loaded.config.head_dim == 32
    ids = torch.randint(0, source.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = loaded(ids).logits, source(ids).logits
        assert float((a - b).abs().max() / b.abs().max()) < script.TOLERANCE
        prompt = torch.tensor([[1, 403, 407, 261]])
        greedy = dict(max_new_tokens=24, do_sample=False)
        assert torch.equal(loaded.generate(prompt, **greedy), source.generate(prompt, **greedy))
    assert script.main(["--source", str(stories_dir), "--output", str(first)]) == 2  # not over an existing folder
