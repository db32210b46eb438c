"""The vocabulary matrices (input embedding, LM head) without holding them: at Llama-3.2-1B's shapes one is
128256x2048, 1 GB in fp32, more than a decoder block, so holding it would set the pipeline's peak memory.

* The blocks' inputs need only the rows of the calibration tokens: :func:`gathered_embedding` reads those rows
  from the checkpoint file and lets the embedding look them up (its input ids remapped), with the same values.
* Outside the blocks nothing usually changes them (the LM head stays float, embeddings are not quantized for
  export): :func:`passthrough_matrices` says when, and the rest of the model is then prepared and converted with
  tiny stand-ins in their place (the quantizers' plans and reports do not depend on the vocabulary size), while
  the output gets the checkpoint's tensors copied in row ranges (:meth:`Passthrough.chunks`).

An embedding holding such a subset has no ``padding_idx`` meanwhile: the config's pad id is a row of the full
vocabulary, which the subset may not have (torch refuses a ``padding_idx`` past the weight's rows), and it only
steers gradients, so no forward value depends on it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from tico.experimental.quantization.export.shards import StoredTensor
from tico.experimental.quantization.pipeline.source import Checkpoint
from tico.experimental.quantization.structure.names import within


COPY_CHUNK_BYTES = 64 * 1024**2  # a passed-through matrix is copied to the output in row ranges of this size



def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    def get(attr: str) -> nn.Module | None:
        getter = getattr(model, attr, None)
        try:
            module = getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):
            module = None
        return module if isinstance(module, nn.Module) else None

    return get("get_input_embeddings"), get("get_output_embeddings")


def _source(ckpt: Checkpoint, model: nn.Module, module: nn.Module) -> StoredTensor | None:
    """The checkpoint tensor holding ``module.weight`` as is (one key, ``<module>.weight``, same shape), else None
    (renamed, split or reshaped by transformers' conversions: then it is loaded the ordinary way)."""
    name = next((n for n, m in model.named_modules() if m is module), None)
    weight = getattr(module, "weight", None)
    if name is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    base = getattr(model, "base_model_prefix", "")
    accepted = {name + ".weight"} | ({name[len(base) + 1:] + ".weight"} if base and name.startswith(base + ".") else set())
    keys = ckpt.keys_under(name)
    if len(keys) != 1 or keys[0] not in accepted:
        return None
    stored = StoredTensor.locate(ckpt.files[keys[0]], keys[0])
    if stored.shape != tuple(weight.shape):
        return None
    return stored


def stored_keys(ckpt: Checkpoint, model: nn.Module, names: list[str]) -> list[str]:
    """The checkpoint keys of the weights ``names`` (a tied LM head's too, where the checkpoint stores it)."""
    keys = {k for n in names for k in ckpt.keys_under(n.rpartition(".")[0]) if k.rpartition(".")[2] == n.rpartition(".")[2]}
    return sorted(keys)


def _names_of(model: nn.Module, param: torch.Tensor) -> list[str]:
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


# -- the blocks' inputs: only the calibration tokens' rows ----------------------------------------------------
def _token_ids(batches: list[Any]) -> torch.Tensor | None:
    ids = []
    for batch in batches:
        t = batch if isinstance(batch, torch.Tensor) else (batch.get("input_ids") if isinstance(batch, Mapping) else None)
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or (isinstance(batch, Mapping) and "inputs_embeds" in batch):
            return None
        ids.append(t.reshape(-1).cpu())
    return torch.unique(torch.cat(ids)) if ids else None  # sorted


@contextlib.contextmanager
def gathered_embedding(ckpt: Checkpoint, model: nn.Module, batches: list[Any]) -> Iterator[tuple[list[str], list[str]]]:
    """While inside: the input embedding holds only the rows of the tokens in ``batches`` (read from the file)
    and its input ids are mapped to them, so the model computes the same embeddings. Yields the state-dict names
    to leave out of loading (its weight, and a tied LM head's), empty where it does not apply (no plain
    ``nn.Embedding``, ids not given as token ids, a converted checkpoint key): then the embedding is loaded whole.
    Also yields the checkpoint keys to leave out (the weight's, and a tied LM head's if stored).
    Afterwards the skeleton's own (meta) parameter is back in place."""
    embedding, _ = _embeddings(model)
    ids = _token_ids(batches)
    stored = None
    if isinstance(embedding, nn.Embedding) and embedding.max_norm is None and ids is not None and embedding.weight.is_meta:
        stored = _source(ckpt, model, embedding)
    if stored is None or (len(ids) and int(ids[-1]) >= stored.shape[0]) or (len(ids) and int(ids[0]) < 0):
        yield [], []
        return
    original, padding_idx = embedding.weight, embedding.padding_idx
    skipped = _names_of(model, original)
    embedding.weight = nn.Parameter(stored.rows(ids).to(original.dtype), requires_grad=False)
    embedding.padding_idx = None  # see the module docstring: a full-vocabulary row the subset may lack

    def remap(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (torch.searchsorted(ids.to(args[0].device), args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: torch.searchsorted(ids.to(kwargs[key].device), kwargs[key])}

    handle = embedding.register_forward_pre_hook(remap, with_kwargs=True)
    try:
        yield skipped, stored_keys(ckpt, model, skipped)
    finally:
        handle.remove()
        embedding.weight, embedding.padding_idx = original, padding_idx


def untied_head(ckpt: Checkpoint, model: nn.Module) -> tuple[list[str], list[str]]:
    """State-dict names and checkpoint keys of an LM head weight not tied to the input embedding: the blocks'
    inputs do not need it (the forward stops at the last block), so it is not loaded for the capture."""
    embedding, head = _embeddings(model)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight is getattr(embedding, "weight", None):
        return [], []
    names = _names_of(model, weight)
    return names, stored_keys(ckpt, model, names)


# -- the rest of the model: unchanged vocabulary matrices -----------------------------------------------------
@dataclass
class Passthrough:
    """A vocabulary matrix that the rest of the model's quantization leaves as is: a tiny stand-in takes its
    place in the model, and the output gets the checkpoint's tensor, copied in row ranges."""

    names: list[str]  # its state-dict names (two when tied)
    source: StoredTensor
    dtype: torch.dtype  # the model's (the checkpoint tensor is converted piece by piece if it differs)
    standin: nn.Parameter | None = None

    def install(self, model: nn.Module, device: torch.device) -> None:
        """Put the one-row stand-in in place; an embedding owning it forgets its ``padding_idx``, a row of the
        full vocabulary that the stand-in lacks (the skeleton is not used after the rest is written)."""
        self.standin = nn.Parameter(torch.zeros(1, *self.source.shape[1:], dtype=self.dtype, device=device), requires_grad=False)
        for name in self.names:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, attr, self.standin)
            if isinstance(module, nn.Embedding):
                module.padding_idx = None

    def is_standin(self, tensor: torch.Tensor) -> bool:
        s = self.standin
        return s is not None and tensor.device == s.device and tensor.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()

    def chunks(self) -> Iterator[torch.Tensor]:
        for chunk in self.source.row_chunks(COPY_CHUNK_BYTES):
            yield chunk.to(self.dtype)


def passthrough_matrices(ckpt: Checkpoint, model: nn.Module, leaves_vocabulary: bool, blocks_path: str) -> list[Passthrough]:
    """The input/output embedding weights that the rest of the model's ``prepare``/``convert`` cannot change
    (``leaves_vocabulary``: the algorithm's answer, see ``UnitScope.leaves_vocabulary``). Empty when it may change
    them, or the tensors are not stored as is in the checkpoint."""
    if not leaves_vocabulary:
        return []
    embedding, head = _embeddings(model)
    found: list[Passthrough] = []
    seen: set[int] = set()
    for module in (embedding, head):
        if not isinstance(module, (nn.Embedding, nn.Linear)) or getattr(module, "bias", None) is not None:
            continue
        if id(module.weight) in seen:
            continue  # tied: the input embedding's entry covers it
        seen.add(id(module.weight))
        names = _names_of(model, module.weight)
        if any(within(n, blocks_path) for n in names):
            continue
        tied = embedding is not None and embedding is not module and getattr(embedding, "weight", None) is module.weight
        source = _source(ckpt, model, embedding if tied else module)
        if source is not None:
            found.append(Passthrough(names, source, module.weight.dtype))
    return found
