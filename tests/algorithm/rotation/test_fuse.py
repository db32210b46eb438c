"""fuse_rotations on the zoo: fp32 logits unchanged, refusals that leave the model untouched, plain checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from tico.experimental.quantization.algorithm.rotation import layouts
from tico.experimental.quantization.algorithm.rotation.fuse import RotationError, fuse_rotations

SUPPORTED = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3", "granite"]
REFUSED = sorted(set(zoo.ARCHITECTURES) - set(SUPPORTED))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("key", SUPPORTED)
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_logits_unchanged(key: str, kind: str) -> None:
    model = zoo.build_model(key)
    ids = zoo.input_ids(key, batch=2, seq=12, seed=7)  # not the probe's tokens
    with torch.no_grad():
        ref = model(ids).logits
    before = _state(model)
    report = fuse_rotations(model, seed=1, kind=kind)
    with torch.no_grad():
        got = model(ids).logits
    assert _rel(got, ref) < 2e-5, report.summary()
    assert report.max_rel_error is not None and report.max_rel_error < 2e-5
    # the weights really changed: every norm is at its unit, the embedding is rotated
    after = model.state_dict()
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    unit = 0.0 if key == "gemma" else 1.0
    for name in report.absorbed_norms:
        assert torch.all(model.get_submodule(name).weight == unit)
    assert report.heads is not None or key == "phi3"


@pytest.mark.parametrize("key", REFUSED)
def test_refused_untouched(key: str) -> None:
    model = zoo.build_model(key)
    before = _state(model)
    with pytest.raises(RotationError, match="cannot rotate"):
        fuse_rotations(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_layernorm_refused_by_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LayerNorm model forced through a layout is still refused: the norm probe sees the mean subtraction."""
    layout = layouts.ResidualLayout(writers=layouts._ATTN_OUT + (("mlp.c_proj.weight", 0),))
    monkeypatch.setitem(layouts.LAYOUTS, "starcoder2", layout)
    model = zoo.build_model("starcoder2")
    before = _state(model)
    with pytest.raises(RotationError, match="bias|not rotation-exact|!="):
        fuse_rotations(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mean_centred_norm_refused_by_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cohere's weight-only, mean-centred LayerNorm has the form x_hat * w but fails norm(x Q) = norm(x) Q."""
    layout = layouts.ResidualLayout(writers=layouts._ATTN_OUT + layouts._MLP_OUT, norms=("input_layernorm",))
    monkeypatch.setitem(layouts.LAYOUTS, "cohere", layout)
    model = zoo.build_model("cohere")
    before = _state(model)
    with pytest.raises(RotationError, match=r"input_layernorm: CohereLayerNorm\(x Q\) != "):
        fuse_rotations(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_writer_fails_verification_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A table that forgets down_proj is caught by the logit check; every tensor and the tie flag come back."""
    monkeypatch.setitem(layouts.LAYOUTS, "gemma", layouts.ResidualLayout(writers=layouts._ATTN_OUT))
    model = zoo.build_model("gemma")
    before = _state(model)
    with pytest.raises(RotationError, match="restored"):
        fuse_rotations(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings


def test_unknown_model_type_refused() -> None:
    model = zoo.build_model("llama")
    model.config.model_type = "my_llama"
    with pytest.raises(RotationError, match="no residual-stream layout"):
        fuse_rotations(model)


def test_tied_head_kept_when_final_norm_is_unit() -> None:
    model = zoo.build_model("gemma")
    with torch.no_grad():
        model.model.norm.weight.zero_()  # Gemma's unit: x * (1 + 0)
    ids = zoo.input_ids("gemma")
    with torch.no_grad():
        ref = model(ids).logits
    report = fuse_rotations(model)
    assert report.untied is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 2e-5


@pytest.mark.parametrize("key", ["gemma", "qwen2_moe"])
def test_plain_checkpoint_round_trip(key: str, tmp_path) -> None:
    """save_pretrained / from_pretrained of the rotated model: same logits, nothing but ordinary weights."""
    model = zoo.build_model(key)
    ids = zoo.input_ids(key)
    with torch.no_grad():
        ref = model(ids).logits
    report = fuse_rotations(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert set(loaded.state_dict()) >= set(model.state_dict())
    with torch.no_grad():
        assert _rel(loaded(ids).logits, ref) < 2e-5
    if key == "gemma":
        assert report.untied and loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def test_stories260k_exact(stories_dir) -> None:
    """The real pretrained Llama with tied embeddings: logits unchanged, head untied (its final norm is not 1)."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report = fuse_rotations(model)
    assert report.untied is not None and report.residual.startswith("hadamard(64")
    with torch.no_grad():
        assert _rel(model(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_rounding(dtype: torch.dtype) -> None:
    """The maths runs in float64; only the final cast to bf16/fp16 rounds (logits move by ~1e-2 relative)."""
    model = zoo.build_model("llama", dtype=dtype)
    ids = zoo.input_ids("llama")
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = fuse_rotations(model)
    assert model.model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        assert _rel(model(ids).logits.float(), ref) < 3e-2, report.summary()
