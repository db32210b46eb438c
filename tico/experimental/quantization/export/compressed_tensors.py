"""Save a W8A8 model as a compressed-tensors checkpoint (the int8 W8A8 format vLLM serves).

Layout: every :class:`W8A8Linear` becomes ``<name>.weight`` (int8 ``[out, in]``), ``<name>.weight_scale``
(``[out, 1]`` per channel or ``[1]`` per tensor) and, for static activations, ``<name>.input_scale``;
everything else is saved as in ``save_pretrained``. ``config.json`` gets the ``quantization_config`` block
(``quant_method: compressed-tensors``, format ``int-quantized``). Smoothing that lives inside an activation
quantizer (``smooth_in_quantizer=True``) has no place in that format, so such models are refused: fold the
smoothing into producers instead (``linear_producers=True``) or keep those layers in float. Online Hadamard
rotations of a layer's input (``add_online_rotations``) are written as a compressed-tensors ``transform_config``
(see :mod:`.transforms`); other in-quantizer rotations (``W8A8Config.rotate``) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tico.experimental.quantization.export import transforms
from tico.experimental.quantization.nn.embedding import Int8Embedding
from tico.experimental.quantization.nn.linear import W8A8Linear


def _w8a8_layers(model: nn.Module) -> dict[str, W8A8Linear]:
    """Every int8 layer by its checkpoint name: the layer behind an exportable online rotation takes the rotation's
    name (``<name>.inner`` -> ``<name>``), so the checkpoint has the model's own module names."""
    online, _ = transforms.online_layers(model)
    inner = {id(m.inner): name for name, m in online.items()}
    return {inner.get(id(m), n): m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}


def _scheme(layer: W8A8Linear) -> tuple[str, str, bool]:
    state = layer.quantization_state()
    strategy = "channel" if state["weight_granularity"] == "per_channel" else "tensor"
    acts = "token" if state["dynamic"] else "tensor"
    return strategy, acts, state["dynamic"]


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` block for ``config.json`` (one config group per distinct scheme)."""
    groups: dict[tuple[str, str, bool], list[str]] = {}
    layers = _w8a8_layers(model)
    for name, layer in layers.items():
        groups.setdefault(_scheme(layer), []).append(name)
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, W8A8Linear)]
    config_groups = {}
    for i, ((strategy, acts, dynamic), names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(groups) == 1 else [f"re:^{n}$" for n in names],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": acts, "dynamic": dynamic},
        }
    config = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
    }
    online, _ = transforms.online_layers(model)
    if online:
        config["transform_config"] = transforms.transform_config(list(online))
    return config


def save_compressed(model: nn.Module, output_dir: str | Path) -> Path:
    """Write ``model`` (after ``convert`` with a ``W8A8Config``) as a compressed-tensors checkpoint."""
    layers = _w8a8_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no W8A8Linear layer: convert it with a W8A8Config first")
    if any(isinstance(m, Int8Embedding) for m in model.modules()):
        raise ValueError("compressed-tensors export of int8 embeddings is not supported; quantize with quantize_embeddings=False")
    online, rotated = transforms.online_layers(model)
    if rotated:
        raise ValueError(
            f"compressed-tensors has no place for these input rotations ({rotated[:3]}...): only one Hadamard block "
            "without smoothing is exported (add_online_rotations); quantize without W8A8Config.rotate to export"
        )
    inner = [n for n, m in layers.items() if m.quantization_state()["smooth_scale"] is not None]
    if inner:
        raise ValueError(
            f"compressed-tensors has no place for smoothing inside the activation quantizer ({inner[:3]}...); "
            "quantize with smooth_in_quantizer=False to export"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, value in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers or owner.removesuffix(".inner") in online or owner in online:
            continue
        tensors[name] = value
    tensors.update(transforms.transform_tensors(online))
    for name, layer in layers.items():
        state = layer.quantization_state()
        tensors[f"{name}.weight"] = state["weight"].to(torch.int8)
        tensors[f"{name}.weight_scale"] = state["weight_scale"].to(dtype)
        if state["bias"] is not None:
            tensors[f"{name}.bias"] = state["bias"]
        if state["input_scale"] is not None:
            tensors[f"{name}.input_scale"] = state["input_scale"].to(dtype)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if tied and head is not None:  # the head is the embedding: save it once, as save_pretrained does
        for n, m in model.named_modules():
            if m is head:
                tensors.pop(f"{n}.weight", None)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    return out


def load_compressed(path: str | Path, backend: str = "int8") -> nn.Module:
    """Load a compressed-tensors int8 W8A8 checkpoint into this library's :class:`W8A8Linear` layers.

    Reads ``config.json`` and ``model.safetensors`` only (no unpickling). The model class comes from the
    config's ``architectures`` through ``AutoModelForCausalLM``.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qconfig = raw.pop("quantization_config", None)
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path / 'config.json'} has no compressed-tensors quantization_config")
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config).eval()
    tensors = load_file(str(path / "model.safetensors"))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and tensors.get(f"{name}.weight", torch.empty(0)).dtype == torch.int8:
            scale = tensors[f"{name}.weight_scale"]
            static = f"{name}.input_scale" in tensors
            layer = W8A8Linear(
                module.in_features, module.out_features, bias=module.bias is not None,
                weight_granularity="per_channel" if scale.numel() > 1 else "per_tensor",
                act_granularity="per_tensor" if static else "per_token",
                act_scale=float(tensors[f"{name}.input_scale"]) if static else None,
                backend=backend, dtype=module.weight.dtype,
            )
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    online = transforms.online_names(qconfig.get("transform_config"))
    transform_keys = {k for k in tensors for n in online if k.startswith(n + ".") and k.endswith("_input.weight")}
    state = {k: v for k, v in tensors.items() if k not in transform_keys}
    for name, module in model.named_modules():
        if isinstance(module, W8A8Linear) and f"{name}.input_scale" in state:
            state[f"{name}.act_scale"] = state.pop(f"{name}.input_scale").reshape(()).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("smooth_scale", "act_scale")) and "lm_head" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if online:
        transforms.wrap(model, online, tensors)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
