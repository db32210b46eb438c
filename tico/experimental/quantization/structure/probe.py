"""The probe forward: its inputs, how it is run, and what the dataflow tracer records while it runs.

``prepare`` learns the model's structure from one short forward on a few token ids (or on the caller's example
inputs): :mod:`.dataflow` watches it and fills in one :class:`ProducerReads` per candidate producer. The same
probe checks that a transformation left the model's outputs unchanged (explicit smoothing groups, rotations).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

PROBE_TOKENS = 8


def vocab_size(model: nn.Module) -> int | None:
    """``model.config.vocab_size`` when it is a positive int (None otherwise)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def probe_token_ids(vocab: int) -> torch.Tensor:
    """``[1, PROBE_TOKENS]`` seeded token ids below ``vocab``: the default probe input."""
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


def example_inputs(
    model: nn.Module, args: tuple[Any, ...] | None, kwargs: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs of the probe forward: the caller's, or a few token ids for a model with ``config.vocab_size``."""
    if args is not None or kwargs is not None:
        return tuple(args or ()), dict(kwargs or {})
    vocab = vocab_size(model)
    if vocab is None:
        raise ValueError(
            f"{type(model).__name__} has no config.vocab_size to build probe token ids from; pass example inputs "
            "for one forward: prepare(model, config, args=(example_input,)) or kwargs={...}"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (), {"input_ids": probe_token_ids(vocab).to(device)}


class ProbeError(RuntimeError):
    """The probe forward raised ``cause``; the message says whose inputs it ran on."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


def run_probe(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], own_inputs: bool = False) -> Any:
    """A forward in eval mode without gradients; the caller's training flags are restored afterwards.

    A KV cache is turned off where the model has one: the cache stores values that only the same attention
    reads back (so a transformed model stays consistent), but the trace would count its concatenation as a read.
    ``own_inputs``: the inputs are the library's default probe token ids, not the caller's, so a failure is not
    blamed on the caller's inputs.
    """
    if "use_cache" in inspect.signature(model.forward).parameters or hasattr(getattr(model, "config", None), "use_cache"):
        kwargs = {"use_cache": False, **kwargs}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as exc:
        where = f"the probe forward of {type(model).__name__}"
        if own_inputs:
            raise ProbeError(
                f"{where} failed on its default probe inputs ({PROBE_TOKENS} token ids below config.vocab_size) "
                f"({type(exc).__name__}: {exc}); if the model needs other inputs than token ids, pass them: "
                "prepare(model, config, args=..., kwargs=...)", exc
            ) from exc
        raise ProbeError(
            f"{where} failed on the given inputs ({type(exc).__name__}: {exc}); pass inputs the model accepts: "
            "prepare(model, config, args=..., kwargs=...)", exc
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (HF ``ModelOutput`` is a dict subclass; tuples and lists pass through)."""
    return [t for t in tree_flatten(_as_tree(output))[0] if isinstance(t, torch.Tensor)]


def _as_tree(output: Any) -> Any:
    if isinstance(output, dict):
        return {k: _as_tree(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return [_as_tree(v) for v in output]
    return output


@dataclass(frozen=True)
class ConsumerParam:
    """A parameter that contracts the producer's channels: ``s[channel_map]`` is multiplied into its ``axis``.

    ``channel_map[j]`` is the producer channel read by index ``j`` of ``axis``; None means the identity.
    """

    name: str  # fully qualified parameter name
    module: str  # the module that owns it
    axis: int  # the parameter axis indexed by the producer's channels (non-negative)
    channel_map: tuple[int, ...] | None = None


@dataclass
class ProducerReads:
    """Everything one forward showed about one producer's output."""

    channels: int | None = None
    consumers: dict[str, ConsumerParam] = field(default_factory=dict)  # by parameter name
    consumer_modules: list[str] = field(default_factory=list)  # in order of first read
    # (module, arg position, channel map of that argument's last axis) where a tracked tensor entered a module
    entries: list[tuple[str, int, tuple[int, ...] | None]] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # reads that forbid folding, as readable reasons
    pinned: set[int] | None = None  # channels a foreign read touched (must keep s = 1); None: none yet
    all_pinned: bool = False
    sample: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor] | None = None  # (args, kwargs, output) of 1st call

    def add_foreign(self, reason: str, cmap: torch.Tensor | None = None) -> None:
        """Record a read that cannot absorb ``s``: it pins the channels in ``cmap`` (all channels if None).

        A fused ``qkv`` output whose query/key part goes to RoPE pins only those channels; its value part can
        still be smoothed into the output projection.
        """
        if reason not in self.foreign:
            self.foreign.append(reason)
        if cmap is None:
            self.all_pinned = True
        else:
            self.pinned = (self.pinned or set()) | set(torch.unique(cmap).tolist())

    @property
    def pinned_channels(self) -> set[int]:
        """Every channel that must keep scale 1."""
        if self.all_pinned:
            return set(range(self.channels or 0))
        return set(self.pinned or ())


@dataclass
class Dataflow:
    """The result of :func:`trace_dataflow`: reads per producer, and every use of every consumer parameter."""

    producers: dict[str, ProducerReads]
    # parameter name -> list of uses: ("consumer", producer, axis) or ("other", description, -1)
    param_uses: dict[str, list[tuple[str, str, int]]]
