"""Save a W8A8 model as a compressed-tensors checkpoint (the int8 W8A8 format vLLM serves), and load one back.

Layout: every :class:`W8A8Linear` becomes ``<name>.weight`` (int8 ``[out, in]``), ``<name>.weight_scale``
(``[out, 1]`` per channel or ``[1]`` per tensor, in the model's float dtype) and, for static activations,
``<name>.input_scale``; everything else is saved as in ``save_pretrained``. A layer that replaced GPT-2's
``Conv1D`` keeps GPT-2's ``[in, out]`` weight layout (``weight_stored_transposed``): vLLM's GPT-2 loader transposes
every ``c_attn``/``c_proj``/``c_fc`` weight, whatever its dtype, into its Linear layers, so ``[out, in]`` would
reach them transposed; the scales stay ``[out, 1]``, which it does not transpose. ``config.json`` gets the
``quantization_config`` block, built with compressed-tensors' own ``QuantizationConfig`` /
``QuantizationScheme`` / ``QuantizationArgs`` classes (they validate it and follow the format's changes).
Weights go into sharded safetensors with an index, like transformers (see :mod:`.shards`).

Online Hadamard rotations of a layer's input (``add_online_rotations``) are written as a compressed-tensors
``transform_config`` (see :mod:`.transforms`). What the format cannot hold is refused before anything is
written: smoothing inside an activation quantizer (``smooth_in_quantizer=True``), other input rotations
(``W8A8Tuning.rotate_in_quantizer``), int8 embeddings. Layers vLLM fuses (q/k/v, gate/up) with different activation schemes
are saved with a warning: :func:`.fusion.unify_fused_activations` makes them servable as measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from tico.experimental.quantization.structure.producers import linear_output_axis
from tico.experimental.quantization.export import transforms
from tico.experimental.quantization.export.fusion import mixed_fused_groups
from tico.experimental.quantization.export.layers import float_matrix_layers, source_names, source_tensors, w8a8_layers
from tico.experimental.quantization.export.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, read_tensors, safetensors_files
from tico.experimental.quantization.nn.embedding import Int8Embedding
from tico.experimental.quantization.nn.linear import W8A8Linear

logger = logging.getLogger(__name__)

Scheme = tuple[str, str, bool]  # (weight strategy, activation strategy, dynamic activations)


def layer_scheme(layer: W8A8Linear) -> Scheme:
    """The compressed-tensors strategies of one layer."""
    state = layer.quantization_state()
    strategy = "channel" if state["weight_granularity"] == "per_channel" else "tensor"
    acts = "token" if state["dynamic"] else "tensor"
    return strategy, acts, bool(state["dynamic"])


def build_quantization_config(schemes: dict[str, Scheme], ignore: Iterable[str]) -> dict[str, Any]:
    """``quantization_config`` for ``config.json`` from ``{layer name: scheme}`` (one group per scheme)."""
    from compressed_tensors import CompressionFormat
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    config_groups = {}
    for i, ((strategy, acts, dynamic), names) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if len(groups) == 1 else [f"re:^{n}$" for n in names],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=False),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy=acts, dynamic=dynamic),
        )
    config = QuantizationConfig(
        config_groups=config_groups,
        format=CompressionFormat.int_quantized.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )
    return config.model_dump(mode="json", exclude_none=True)


def layer_names(model: nn.Module, unit: nn.Module | None = None) -> tuple[dict[str, str], list[str]]:
    """(each int8 layer's module name -> its source checkpoint name, the source names of the Linear layers that stay
    float) of ``unit`` (a part of ``model`` under its full names; default: all of ``model``).

    The float ones are compressed-tensors' ``ignore`` list: every Linear a loader builds from a float matrix, under
    the names that loader reads (the source checkpoint's, see :mod:`.layers`): float ``nn.Linear`` and GPT-2
    ``Conv1D`` layers, MoE routers (``block_sparse_moe.gate``), and float fused experts, one name per expert and
    projection (``block_sparse_moe.experts.E.w1``: vLLM quantizes an expert layer unless its names are ignored).
    """
    unit = model if unit is None else unit
    int8 = {}
    for name, sources in source_names(model, w8a8_layers(unit)).items():
        if len(sources) != 1:
            raise ValueError(f"{name}: transformers' key conversion for {type(model).__name__} turns this int8 layer's "
                             f"weight into {sources or 'no Linear weight'}; compressed-tensors holds one int8 layer per "
                             "Linear, so it cannot be saved (keep the layer in float with the config's ignore)")
        int8[name] = sources[0]
    floats = [n for sources in source_names(model, float_matrix_layers(unit)).values() for n in sources]
    return int8, floats


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` block of ``model`` (its W8A8Linear layers; other Linears are ignored), with a
    ``transform_config`` when layers carry an online Hadamard; every layer under its source checkpoint name."""
    layers = w8a8_layers(model)
    int8, floats = layer_names(model)
    config = build_quantization_config({int8[n]: layer_scheme(m) for n, m in layers.items()}, floats)
    online, _ = transforms.online_layers(model)
    if online:
        config["transform_config"] = transforms.transform_config([int8[n] for n in online])
    return transforms.mark_for_loaders(config)


def float_linears(model: nn.Module) -> list[str]:
    """The source checkpoint names of ``model``'s Linear layers that stay in float: compressed-tensors' ``ignore``
    list (see :func:`layer_names`)."""
    return layer_names(model)[1]


def check_exportable(model: nn.Module) -> None:
    """Refuse, naming the layers, what compressed-tensors' int8 format has no place for."""
    where = type(model).__name__
    if any(isinstance(m, Int8Embedding) for m in model.modules()):
        raise ValueError(f"{where}: compressed-tensors export of int8 embeddings is not supported; quantize with quantize_embeddings=False")
    _, rotated = transforms.online_layers(model)
    if rotated:
        raise ValueError(
            f"{where}: compressed-tensors has no place for these input rotations ({rotated[:3]}...): only one Hadamard "
            "block without smoothing is exported (add_online_rotations); quantize without W8A8Tuning.rotate_in_quantizer to export"
        )
    inner = [n for n, m in w8a8_layers(model).items() if m.quantization_state()["smooth_scale"] is not None]
    if inner:
        raise ValueError(
            f"{where}: compressed-tensors has no place for smoothing inside the activation quantizer ({inner[:3]}...); "
            "quantize with W8A8Tuning(smooth_in_quantizer=False) to export"
        )


def compressed_tensors_of(model: nn.Module, dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    """``model``'s checkpoint tensors in the compressed-tensors layout (scales in ``dtype``).

    A parameter shared by several names (a tied LM head) is written once, under its first name, as
    ``save_pretrained`` does.
    """
    layers = w8a8_layers(model)
    online, _ = transforms.online_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner in layers or owner in online or owner.removesuffix(".inner") in online:
            continue
        if id(value) in seen:  # tied: saved under its first name only
            continue
        seen.add(id(value))
        tensors[prefix + name] = value.detach()
    for name, layer in layers.items():
        state = layer.quantization_state()
        weight = state["weight"].to(torch.int8)
        tensors[f"{prefix}{name}.weight"] = weight.t().contiguous() if state["weight_stored_transposed"] else weight
        tensors[f"{prefix}{name}.weight_scale"] = state["weight_scale"].to(dtype)
        if state["bias"] is not None:
            tensors[f"{prefix}{name}.bias"] = state["bias"]
        if state["input_scale"] is not None:
            tensors[f"{prefix}{name}.input_scale"] = state["input_scale"].to(dtype)
    tensors.update({prefix + k: v for k, v in transforms.transform_tensors(online).items()})
    return tensors


def checkpoint_tensors(model: nn.Module, unit: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """:func:`compressed_tensors_of` ``unit`` (``model`` or a part of it under its full names) under the source
    checkpoint's names (:func:`.layers.source_tensors`). Each int8 layer's tensors must come out unchanged under
    its one source name, else nothing is returned: an error names the layer."""
    int8, _ = layer_names(model, unit)
    tensors = compressed_tensors_of(unit, dtype)
    renamed = source_tensors(model, tensors)
    for name, source in int8.items():
        for key in (k for k in tensors if k.rpartition(".")[0] == name):
            leaf = key.rpartition(".")[2]
            if renamed.get(f"{source}.{leaf}") is not tensors[key]:
                raise ValueError(f"{key}: transformers' key conversion for {type(model).__name__} does not keep this "
                                 f"int8 layer's tensors together under {source}; it cannot be saved in compressed-tensors")
    return renamed


def warn_mixed_fused(model: nn.Module) -> list[list[str]]:
    """Warn (and return them) about layer groups vLLM fuses into one GEMM whose activation schemes differ: vLLM
    would run them with one scheme, not as ``load_compressed`` does (see :mod:`.fusion`)."""


    mixed = mixed_fused_groups(w8a8_layers(model))
    if mixed:
        logger.warning(
            "%d groups that vLLM fuses into one layer (q/k/v, gate/up) mix activation schemes (e.g. %s); vLLM runs "
            "each with one scheme, so it would not compute what load_compressed computes. Call "
            "tico.experimental.quantization.export.fusion.unify_fused_activations(model) before evaluating and saving",
            len(mixed), mixed[0])
    return mixed


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def save_compressed(model: nn.Module, output_dir: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``model`` (after ``convert`` with a ``W8A8Config``) as a compressed-tensors checkpoint.

    ``output_dir`` must not exist or be empty; it appears only when complete (written beside it, then renamed).
    Shards hold at most ``max_shard_size`` (bytes or e.g. ``"2GB"``). The tokenizer is the caller's to save.
    """
    if not any(isinstance(m, W8A8Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no W8A8Linear layer: convert it with a W8A8Config first")
    check_exportable(model)
    warn_mixed_fused(model)
    qconfig = quantization_config(model)
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    generation = getattr(model, "generation_config", None)
    tensors = checkpoint_tensors(model, model, _model_dtype(model))
    with ShardWriter(output_dir, max_shard_size) as writer:
        writer.add_all(tensors)
        writer.write_file("config.json", lambda p: p.write_text(json.dumps(config, indent=2, default=str) + "\n"))
        if generation is not None:
            writer.write_file("generation_config.json", lambda p: generation.save_pretrained(p.parent))
        return writer.publish()


def load_compressed(path: str | Path, backend: str = "int8") -> nn.Module:
    """Load a compressed-tensors int8 W8A8 checkpoint (one file or sharded) into :class:`W8A8Linear` layers.

    Reads ``config.json`` and safetensors only (no unpickling). The model class comes from the config's
    ``architectures`` through ``AutoModelForCausalLM``. The checkpoint holds the source checkpoint's names: each
    int8 layer is found under its module's source name (:func:`.layers.source_names`), and the float tensors go
    through transformers' own key conversions, as ``from_pretrained`` loads them (renamed keys, per-expert
    tensors fused into 3-D expert weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qconfig = raw.pop("quantization_config", None)
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path / 'config.json'} has no compressed-tensors quantization_config")
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config).eval()
    tensors = dict(read_tensors(safetensors_files(path)))
    linears = {n: m for n, m in model.named_modules() if linear_output_axis(m) is not None}
    sources = {n: s[0] for n, s in source_names(model, linears).items() if len(s) == 1}
    int8_state: dict[str, torch.Tensor] = {}
    for name, module in linears.items():
        source = sources.get(name, name)
        if tensors.get(f"{source}.weight", torch.empty(0)).dtype == torch.int8:
            own = {leaf: tensors.pop(f"{source}.{leaf}") for leaf in INT8_TENSORS if f"{source}.{leaf}" in tensors}
            int8_state.update({f"{name}.{leaf}": t for leaf, t in _int8_layer(path, model, name, module, own, backend).items()})
    by_source = {s: n for n, s in sources.items()}
    online = [by_source.get(n, n) for n in transforms.online_names(qconfig.get("transform_config"))]
    rotations = {}
    for name in online:
        source = sources.get(name, name)
        for key in [k for k in tensors if k.startswith(source + ".") and k.endswith("_input.weight")]:
            rotations[name + key[len(source):]] = tensors.pop(key)
    missing, unexpected = _load_float(path, model, tensors)
    unexpected += model.load_state_dict(int8_state, strict=False).unexpected_keys
    missing = [k for k in missing if k not in int8_state and not k.endswith(("smooth_scale", "act_scale")) and "lm_head" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if online:
        transforms.wrap(model, online, rotations)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


INT8_TENSORS = ("weight", "weight_scale", "input_scale", "bias")  # an int8 layer's tensors in compressed-tensors


def _int8_layer(path: Path, model: nn.Module, name: str, module: nn.Module, own: dict[str, torch.Tensor],
                backend: str) -> dict[str, torch.Tensor]:
    """Put a :class:`W8A8Linear` in place of ``module`` (at ``name``); its state from its checkpoint tensors."""
    axis = linear_output_axis(module)  # 1: GPT-2's Conv1D, weight stored [in, out]
    stored = own["weight"]
    if stored.shape != module.weight.shape:
        raise ValueError(f"{path}: {name}.weight is int8 {tuple(stored.shape)}, but {type(module).__name__} {name} "
                         f"holds {tuple(module.weight.shape)} ([in, out] for Conv1D, [out, in] for Linear)")
    if axis == 1:
        own["weight"] = stored.t().contiguous()
    static = "input_scale" in own
    layer = W8A8Linear(
        module.weight.shape[1 - axis], module.weight.shape[axis], bias=module.bias is not None,
        weight_granularity="per_channel" if own["weight_scale"].dim() == 2 else "per_tensor",  # [out, 1] even when out == 1
        act_granularity="per_tensor" if static else "per_token",
        act_scale=float(own["input_scale"]) if static else None,
        backend=backend, dtype=module.weight.dtype,
    )
    layer.weight_stored_transposed = axis == 1
    model.set_submodule(name, layer)
    if static:
        own["act_scale"] = own.pop("input_scale").reshape(()).float()
    return own


def _load_float(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load the float tensors through transformers' key conversions for ``model``; (missing, unexpected) keys."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    from tico.experimental.quantization.progress import quiet_transformers

    with quiet_transformers():  # one model's load: no progress bar of transformers' own
        info, _ = convert_and_load_state_dict_in_model(
            model, tensors, LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model)))
    errors = [*info.error_msgs, *map(str, info.conversion_errors.items()), *map(str, info.mismatched_keys)]
    if errors:
        raise ValueError(f"{path}: checkpoint does not match the model: {errors[:5]}")
    return sorted(info.missing_keys), sorted(info.unexpected_keys)
