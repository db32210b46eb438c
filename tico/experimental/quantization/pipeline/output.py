"""Where converted units go, in the format the algorithm declares (``UnitScope.output_format``):
``"compressed-tensors"`` (int8 layers, ``quantization_config`` in ``config.json``) or ``"transformers"`` (a float
checkpoint as ``save_pretrained`` writes it). The preflight runs the same code with a :class:`DryWriter`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from tico.experimental.quantization.export.compressed_tensors import (
    build_quantization_config,
    check_exportable,
    checkpoint_tensors,
    layer_names,
    layer_scheme,
)
from tico.experimental.quantization.export.layers import source_tensors, w8a8_layers
from tico.experimental.quantization.nn.linear import W8A8Linear
from tico.experimental.quantization.pipeline.vocab import Passthrough

FORMATS = ("compressed-tensors", "transformers")


class Writer(Protocol):
    """What :class:`Output` needs of a writer (:class:`~tico.experimental.quantization.export.shards.ShardWriter`)."""

    def add(self, name: str, tensor: torch.Tensor) -> None: ...

    def add_chunks(self, name: str, dtype: torch.dtype, shape: list[int], chunks: Iterable[torch.Tensor]) -> None: ...

    def write_file(self, name: str, write: Callable[[Path], Any]) -> None: ...


class DryWriter:
    """Records the names and shapes that would be written; writes nothing (the preflight's writer)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.shapes[name] = tuple(tensor.shape)

    def add_chunks(self, name: str, dtype: torch.dtype, shape: list[int], chunks: Iterable[torch.Tensor]) -> None:
        self.shapes[name] = tuple(shape)

    def write_file(self, name: str, write: Callable[[Path], Any]) -> None:
        return None


class Output:
    """Converted units into ``writer`` (None: measuring only, nothing checked or written)."""

    def __init__(self, writer: Writer | None, output_format: str, dtype: torch.dtype, model: nn.Module) -> None:
        if output_format not in FORMATS:
            raise ValueError(f"unknown output format {output_format!r}; the pipeline writes {list(FORMATS)}")
        self.writer, self.dtype, self.model = writer, dtype, model
        self.compressed = output_format == "compressed-tensors"
        self.schemes: dict[str, tuple[str, str, bool]] = {}
        self.ignore: list[str] = []

    def add(self, unit: nn.Module, passthrough: Sequence[Passthrough] = ()) -> None:
        """Write ``unit``'s tensors; a :class:`Passthrough` stand-in is written as its checkpoint tensor."""
        if self.writer is None:
            return
        tensors = self._compressed(unit) if self.compressed else self._plain(unit)
        written = set()
        for name, tensor in tensors.items():
            p = next((p for p in passthrough if p.is_standin(tensor)), None)
            if p is None:
                self.writer.add(name, tensor)
                continue
            if tensor.shape != p.standin.shape:
                raise RuntimeError(f"{name}: the stand-in for {p.names[0]} was changed ({tuple(tensor.shape)}); not written")
            self.writer.add_chunks(name, p.dtype, list(p.source.shape), p.chunks())
            written.add(id(p))
        unwritten = [p.names[0] for p in passthrough if id(p) not in written]
        if unwritten:
            raise RuntimeError(f"{unwritten}: left as is, but not among the tensors to write")

    def _compressed(self, unit: nn.Module) -> dict[str, torch.Tensor]:
        """The unit's tensors and its layers' schemes and ignore entries, all under the source checkpoint's names,
        as :func:`~tico.experimental.quantization.export.compressed_tensors.save_compressed` writes them."""
        check_exportable(unit)
        tensors = checkpoint_tensors(self.model, unit, self.dtype)
        int8, floats = layer_names(self.model, unit)
        self.schemes.update({int8[n]: layer_scheme(m) for n, m in w8a8_layers(unit).items()})
        self.ignore += floats
        return tensors

    def _plain(self, unit: nn.Module) -> dict[str, torch.Tensor]:
        seen: set[int] = set()
        tensors = {}
        for k, v in unit.state_dict(keep_vars=True).items():
            if id(v) not in seen:  # a tied parameter is saved once, as save_pretrained does
                seen.add(id(v))
                tensors[k] = v.detach()
        return source_tensors(self.model, tensors)

    def finish(self, source: Path, config: Any) -> None:
        """``config.json`` (with the ``quantization_config`` of every layer written) and the generation config."""
        if self.writer is None:
            return
        if self.compressed:
            raw = config.to_dict()
            raw["quantization_config"] = build_quantization_config(self.schemes, self.ignore)
            self.writer.write_file("config.json", lambda p: p.write_text(json.dumps(raw, indent=2, default=str) + "\n"))
        else:
            self.writer.write_file("config.json", lambda p: config.save_pretrained(p.parent))
        if (source / "generation_config.json").is_file():
            self.writer.write_file("generation_config.json", lambda p: shutil.copyfile(source / "generation_config.json", p))


def summary(unit: nn.Module) -> str:
    """One line on a converted unit: how many int8 layers it has, or ``"float"``."""
    count = sum(isinstance(m, W8A8Linear) for m in unit.modules())
    return f"{count} W8A8 layers" if count else "float"
