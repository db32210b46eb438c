"""Sanity checks of the tiny-model zoo (``tests/zoo.py``): models build and run, and the declared smoothing
groups match both the module tree and the real dataflow of a forward pass."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from transformers.pytorch_utils import Conv1D

from zoo import ARCHITECTURES, ArchSpec, build_model, input_ids, norm_modules

KEYS = list(ARCHITECTURES)


@functools.lru_cache(maxsize=None)
def _model(key: str) -> nn.Module:
    return build_model(key)  # shared by the tests below, which never modify it


def _blocks(key: str) -> nn.ModuleList:
    return _model(key).get_submodule(ARCHITECTURES[key].blocks)


def _linear_like(mod: nn.Module) -> bool:
    name = type(mod).__name__
    return isinstance(mod, (nn.Linear, Conv1D)) or name.endswith("Router") or name.endswith("Experts")


def test_table_is_well_formed():
    expected = {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
        "phi3", "phi", "opt", "bloom", "falcon_new", "falcon_parallel", "gpt2", "gpt_neox", "gptj",
        "starcoder2", "stablelm", "cohere", "granite", "bert", "olmo",
    }  # fmt: skip
    assert set(ARCHITECTURES) == expected
    for key, spec in ARCHITECTURES.items():
        assert isinstance(spec, ArchSpec) and spec.key == key
        assert bool(spec.groups) != bool(spec.why_none), key
        for norm, consumers in spec.groups.items():
            assert consumers == sorted(consumers) and len(set(consumers)) == len(consumers), (key, norm)
            assert norm not in consumers


@pytest.mark.parametrize("key", KEYS)
def test_builds_and_runs(key):
    spec = ARCHITECTURES[key]
    model = _model(key)
    assert not model.training
    ids = input_ids(key)
    assert ids.dtype == torch.long and ids.shape == (2, 8)
    assert 0 <= int(ids.min()) and int(ids.max()) < spec.config_kwargs["vocab_size"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 8, spec.config_kwargs["vocab_size"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert isinstance(_blocks(key), nn.ModuleList) and len(_blocks(key)) == 2


@pytest.mark.parametrize("key", KEYS)
def test_groups_resolve(key):
    spec = ARCHITECTURES[key]
    blocks = _blocks(key)
    for idx in (0, len(blocks) - 1):
        block = blocks[idx]
        for norm, consumers in spec.groups.items():
            producer = block.get_submodule(norm)
            assert producer.weight.ndim == 1 and producer.weight.shape[0] == spec.config_kwargs.get(
                "hidden_size", spec.config_kwargs.get("n_embd")
            ), (key, norm)
            for name in consumers:
                assert _linear_like(block.get_submodule(name)), (key, idx, name)


@pytest.mark.parametrize("key", KEYS)
def test_norms_are_non_trivial(key):
    spec = ARCHITECTURES[key]
    norms = list(norm_modules(_model(key)))
    if key == "olmo":
        assert norms == []  # OlmoLayerNorm owns no parameters
        return
    assert norms
    for name, mod in norms:
        scale = mod.weight.detach().float() + (1.0 if spec.unit_offset_norm else 0.0)
        assert scale.min() >= 0.5 - 1e-6, (key, name)
        assert scale.max() > 4.0, (key, name)  # outlier channels
        assert (scale < 1.5 + 1e-6).float().mean() > 0.8, (key, name)
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor):
            assert bias.abs().max() > 0, (key, name)


@pytest.mark.parametrize("key", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_experts_are_fused_3d(key):
    experts = _blocks(key)[0].get_submodule("mlp.experts")
    assert any(p.ndim == 3 for p in experts.parameters())
    router = _blocks(key)[0].get_submodule("mlp.gate")
    assert router.weight.ndim == 2 and router.weight.shape[0] == 4


def test_dtype_and_seed():
    a, b = build_model("llama", seed=3), build_model("llama", seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert next(build_model("llama", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


# --- dataflow: which modules actually read each norm's output -------------------------------------------

_VIEWS = {"view", "reshape", "contiguous", "flatten", "to", "float", "type_as"}  # same data, follow them


def _trace_norm_consumers(key: str, block_idx: int) -> dict[str, set[str]]:
    """For every norm in one block, the innermost modules (names relative to the block; "" = the block,
    "<outside>" = after it) in which a tensor-producing op reads that norm's output."""
    model = _model(key)
    block = _blocks(key)[block_idx]
    tagged: dict[int, tuple[str, torch.Tensor]] = {}
    readers: dict[str, set[str]] = {}
    stack: list[str] = []
    handles = []
    for name, mod in block.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))

        def post(m, a, out, name=name):
            stack.pop()
            if "norm" in type(m).__name__.lower() and isinstance(out, torch.Tensor):
                tagged[id(out)] = (name, out)  # keep the tensor alive so its id stays unique
                readers.setdefault(name, set())

        handles.append(mod.register_forward_hook(post))

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat, _ = tree_flatten((args, kwargs))
            for t in flat:
                if isinstance(t, torch.Tensor) and id(t) in tagged:
                    norm = tagged[id(t)][0]
                    if getattr(func, "__name__", "") in _VIEWS and isinstance(out, torch.Tensor):
                        tagged[id(out)] = (norm, out)
                    elif any(isinstance(o, torch.Tensor) for o in tree_flatten(out)[0]):  # not .shape/.size()
                        readers[norm].add(stack[-1] if stack else "<outside>")
            return out

    try:
        with torch.no_grad(), Mode():
            model(input_ids(key))
    finally:
        for h in handles:
            h.remove()
    return readers


@pytest.mark.parametrize("key", KEYS)
def test_groups_match_dataflow(key):
    spec = ARCHITECTURES[key]
    blocks = _blocks(key)
    for idx in (0, len(blocks) - 1):
        block = blocks[idx]
        readers = _trace_norm_consumers(key, idx)
        for norm, consumers in spec.groups.items():
            assert sorted(readers[norm]) == consumers, (key, idx, norm, sorted(readers[norm]))
        # Completeness: any other parametric norm whose output only reaches Linear-like layers would be a
        # missed group.
        for norm, seen in readers.items():
            if norm in spec.groups or not any(True for _ in block.get_submodule(norm).parameters()):
                continue
            only_linear = bool(seen) and all(
                r not in ("", "<outside>") and _linear_like(block.get_submodule(r)) for r in seen
            )
            assert not only_linear, (key, idx, norm, sorted(seen))
