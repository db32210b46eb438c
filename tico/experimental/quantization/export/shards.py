"""Sharded safetensors checkpoints, written tensor by tensor and published atomically.

Why a writer of our own: ``safetensors.torch.save_file`` needs every tensor of a file in memory at once, so a
5 GB shard would cost 5 GB of RAM. :class:`ShardWriter` appends each tensor's bytes to a data file as it
arrives and, when a shard is full, writes the small JSON header and copies the data behind it in chunks, so
memory holds one tensor whatever the shard size. The layout is transformers': ``model.safetensors`` when one
shard suffices, else ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(``metadata.total_size``, ``weight_map``).

The folder is published by :class:`~tico.experimental.quantization.export.publish.Publisher` (staged beside
the output, renamed into place when complete, removed on failure, Ctrl-C or SIGTERM), so an output folder
exists only when complete and has the permissions ``save_pretrained`` would give.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from tico.experimental.quantization.export.publish import Publisher

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # transformers' usual 5GB shards

_DTYPES = {  # torch dtype -> safetensors dtype string
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """``5GB``/``500MiB``/an int of bytes -> bytes (transformers' ``max_shard_size`` spellings)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
        if not match:
            raise ValueError(f"max_shard_size must be bytes or a size like '5GB' or '500MiB', got {size!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a buffer over its own memory (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes tensors into size-bounded safetensors shards inside a staging folder, then publishes it.

    Use as a context manager: leaving the ``with`` block by an exception removes everything written.
    ``publish()`` (inside the block) finishes the last shard, writes the index and renames the staging folder
    to ``output_dir``, which must not exist or be an empty folder. Staging, clean-up and the rename are
    :class:`~tico.experimental.quantization.export.publish.Publisher`'s, the one publisher of every output
    folder (inside another publisher's staging folder, the shards are written in place).
    """

    def __init__(self, output_dir: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 metadata: dict[str, str] | None = None) -> None:
        self.output_dir = Path(output_dir)
        if self.output_dir.exists() and (not self.output_dir.is_dir() or any(self.output_dir.iterdir())):
            raise FileExistsError(f"{self.output_dir} exists and is not an empty folder: choose a new output folder")
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._publisher = Publisher(self.output_dir)
        self._shards: list[dict[str, dict]] = []  # per shard: name -> {dtype, shape, data_offsets}
        self._data = None  # open data file of the current shard
        self._size = 0
        self.total_size = 0

    @property
    def staging(self) -> Path:
        """The folder being written (inside the ``with`` block)."""
        if self._publisher.staging is None:
            raise RuntimeError("ShardWriter.staging is known inside its with block only")
        return self._publisher.staging

    # -- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        self._publisher.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        self._publisher.__exit__(exc_type, exc, tb)

    # -- tensors -------------------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (moved to CPU, made contiguous); a new shard starts when this one would overflow."""
        if any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        self._open_for(nbytes)
        if nbytes:
            self._data.write(_bytes_of(t))  # the tensor's own memory, not a copy (tobytes would double it)
        self._record(name, t.dtype, list(t.shape), nbytes)

    def add_chunks(self, name: str, dtype: torch.dtype, shape: list[int], chunks: Iterable[torch.Tensor]) -> None:
        """Append one tensor given as consecutive pieces of its flat data (e.g. row ranges of a tensor copied from
        another file): memory holds one piece, not the tensor."""
        if any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._open_for(nbytes)
        written = 0
        for chunk in chunks:
            c = chunk.detach().to("cpu").contiguous()
            if c.dtype != dtype:
                raise TypeError(f"{name}: a piece of dtype {c.dtype}, expected {dtype}")
            written += c.numel() * c.element_size()
            if c.numel():
                self._data.write(_bytes_of(c))
        if written != nbytes:
            raise ValueError(f"{name}: pieces hold {written} bytes, shape {shape} needs {nbytes}")
        self._record(name, dtype, list(shape), nbytes)

    def _open_for(self, nbytes: int) -> None:
        """Start a shard if none is open, or if ``nbytes`` more would overflow the current one."""
        if self._data is None or (self._size > 0 and self._size + nbytes > self.max_shard_size):
            self._close_shard()
            self._shards.append({})
            self._data = open(self.staging / f"shard-{len(self._shards)}.data", "wb")
            self._size = 0

    def _record(self, name: str, dtype: torch.dtype, shape: list[int], nbytes: int) -> None:
        self._shards[-1][name] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes
        self.total_size += nbytes

    def add_all(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def _close_shard(self) -> None:
        """Header + data -> ``shard-k.safetensors`` (the data is copied in chunks, never held in memory)."""
        if self._data is None:
            return
        self._data.close()
        self._data = None
        k = len(self._shards)
        header = dict(self._shards[-1])
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        data_path = self.staging / f"shard-{k}.data"
        with open(self.staging / f"shard-{k}.safetensors", "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        data_path.unlink()

    # -- publishing ----------------------------------------------------------------------------------------
    def write_file(self, name: str, write: Callable[[Path], None]) -> None:
        """Let ``write(path)`` create one more file (config.json, ...) inside the staging folder."""
        write(self.staging / name)

    def publish(self) -> Path:
        """Finish the last shard, name the shards, write the index and rename the folder into place."""
        self._close_shard()
        n = len(self._shards)
        if n == 0:
            raise ValueError(f"{self.output_dir}: no tensor was written")
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(self._shards, start=1):
            final = SINGLE_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.staging / f"shard-{k}.safetensors", self.staging / final)
            weight_map.update({name: final for name in shard})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self._publisher.publish()
        logger.info("wrote %d shard(s), %.1f MB, to %s", n, self.total_size / 1e6, self.output_dir)
        return self.output_dir


# -- reading -------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint folder whose weights cannot be read (none, pickle only, a shard missing or damaged); the
    message names the file and what to do."""


def safetensors_files(folder: str | Path) -> dict[str, Path]:
    """``tensor name -> shard path`` of a (sharded or single-file) safetensors checkpoint folder.

    Every shard's header is read here, so a missing, truncated or foreign file is refused before any work starts
    (not when its block comes). A folder with only pickle weights (``pytorch_model.bin``) is refused on purpose:
    unpickling runs code.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        files = {name: folder / file for name, file in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {missing[:3]}")
        for path in dict.fromkeys(files.values()):
            _shard_names(path)
        return files
    single = folder / SINGLE_NAME
    if single.is_file():
        return {name: single for name in _shard_names(single)}
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin")) if folder.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({pickles[0]}), which are refused on purpose: unpickling runs "
            "arbitrary code. Convert it once in a trusted environment: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path_out, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no {SINGLE_NAME} or {INDEX_NAME}")


def _shard_names(path: Path) -> list[str]:
    """The tensor names in one shard's header; a file safetensors cannot open (truncated, not safetensors) is
    refused by name."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); download "
                              "or save the checkpoint again") from None


def read_tensors(files: dict[str, Path], names: list[str] | None = None, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for ``names`` (default: all), opening each shard once."""
    from safetensors import safe_open

    wanted = list(files) if names is None else names
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for path, group in by_file.items():
        with safe_open(str(path), "pt", device=str(device)) as f:
            for name in group:
                yield name, f.get_tensor(name)


_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file, read with plain file reads (no memory map: the page cache
    is not counted in the process's resident memory, and only the bytes asked for are read)."""

    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    @classmethod
    def locate(cls, path: str | Path, name: str) -> "StoredTensor":
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            entry = json.loads(f.read(n))[name]
        if entry["dtype"] not in _TORCH_DTYPES:
            raise TypeError(f"{path}: {name} has dtype {entry['dtype']}, which torch cannot read here")
        return cls(Path(path), name, _TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + entry["data_offsets"][0])

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()

    def _read_into(self, fd: int, first: int, out: torch.Tensor) -> None:
        """Rows ``first ..`` into ``out`` (contiguous, this tensor's dtype, as many rows as it has)."""
        view = _bytes_of(out) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], self.offset + first * self.row_bytes + done)
            if got <= 0:
                raise EOFError(f"{self.path}: {self.name} is truncated")
            done += got

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) of the tensor, reading runs of consecutive rows at once."""
        index = index.tolist()
        if any(b <= a for a, b in zip(index, index[1:])) or (index and not 0 <= index[0] <= index[-1] < self.shape[0]):
            raise ValueError(f"{self.name}: row indices must be sorted, unique and below {self.shape[0]}")
        out = torch.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            start = 0
            while start < len(index):  # a run of consecutive rows: one read
                end = start + 1
                while end < len(index) and index[end] == index[end - 1] + 1:
                    end += 1
                self._read_into(fd, index[start], out[start:end])
                start = end
        finally:
            os.close(fd)
        return out

    def row_chunks(self, max_bytes: int = 64 * 1024**2) -> Iterator[torch.Tensor]:
        """The whole tensor, as consecutive row ranges of at most ``max_bytes`` (at least one row)."""
        step = max(1, max_bytes // max(1, self.row_bytes))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for first in range(0, self.shape[0], step):
                out = torch.empty((min(step, self.shape[0] - first), *self.shape[1:]), dtype=self.dtype)
                self._read_into(fd, first, out)
                yield out
        finally:
            os.close(fd)
