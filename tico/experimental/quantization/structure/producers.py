"""Producers: the modules whose output ``X`` can absorb ``1/s`` per channel, and how to fold it into them.

A producer is recognised by its parameters (a leaf module with a 1-D ``weight``, optionally a 1-D ``bias``) and
its *kind* by a numerical probe on an input it really saw: fold a random ``s`` under each kind's rule and keep
the kind whose output becomes exactly ``y / s``. So LayerNorm, RMSNorm, Gemma's ``x * (1 + w)`` norm or any
custom norm of the same form are handled without naming their classes, and anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ProducerKind:
    """A producer form ``y = norm(x) * factor(w) + b``: how its weight ``w`` gives the per-channel factor, and back.

    Folding a divisor ``s`` sets the factor to ``factor(w) / s`` (:meth:`fold_weight`); the bias, if any, becomes
    ``b / s``. The *unit* weight (factor 1) is what a rotation leaves in a norm after absorbing its factor.
    """

    name: str
    formula: str
    factor: Callable[[torch.Tensor], torch.Tensor]  # w -> the per-channel factor
    weight_of: Callable[[torch.Tensor], torch.Tensor]  # factor -> w

    def fold_weight(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The weight whose factor is ``factor(w) / s``."""
        return self.weight_of(self.factor(w) / s)

    @property
    def unit(self) -> float:
        """The weight value whose factor is 1."""
        return float(self.weight_of(torch.tensor(1.0)))


# The table of producer forms. Adding a form is one line; the probe decides which one a module has.
PRODUCER_KINDS: tuple[ProducerKind, ...] = (
    ProducerKind("affine", "y = norm(x) * w + b", lambda w: w, lambda f: f),
    ProducerKind("unit_offset", "y = norm(x) * (1 + w) + b", lambda w: 1.0 + w, lambda f: f - 1.0),
)
KINDS_BY_NAME = {k.name: k for k in PRODUCER_KINDS}


def producer_params(module: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None] | None:
    """``(weight, bias)`` if ``module`` has the shape of a producer, else None.

    A producer is a leaf module with a 1-D ``weight`` and at most a 1-D ``bias`` of the same size, or a
    weight-less norm (``(None, None)``), which is traced only so that the reason it is skipped can be reported.
    """
    if next(module.children(), None) is not None:
        return None
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if weight is not None:
        if weight.dim() != 1 or set(params) - {"weight", "bias"}:
            return None
        if bias is not None and bias.shape != weight.shape:
            return None
        return weight, bias
    if not params and "Norm" in type(module).__name__:
        return None, None
    return None


try:  # GPT-2 style layers: y = x @ W + b with W stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

# Linear-like producers: the weight axis that indexes output channels. Folding 1/s divides those rows (and
# the bias); exact by construction, so no probe is needed. MoE expert tensors are not producers (yet).
LINEAR_OUTPUT_AXIS: dict[type, int] = {nn.Linear: 0, **({Conv1D: 1} if Conv1D is not None else {})}
LINEAR_KIND = "linear"


def linear_output_axis(module: nn.Module) -> int | None:
    """The output-channel axis of a Linear-like producer's weight, or None if ``module`` is not one.

    Subclasses (e.g. Falcon's ``FalconLinear``) count too; :func:`probe_linear` checks their forward.
    """
    for cls in type(module).__mro__:
        if cls in LINEAR_OUTPUT_AXIS:
            return LINEAR_OUTPUT_AXIS[cls]
    return None


def find_producers(model: nn.Module, linear: bool = False) -> dict[str, nn.Module]:
    """Norm-like modules (see :func:`producer_params`) and, if ``linear``, Linear-like layers, by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if name and (producer_params(m) is not None or (linear and linear_output_axis(m) is not None))
    }


# An in-place change of one parameter tensor: computed in fp32, cast back to the tensor's dtype.
ParamOp = Callable[[torch.Tensor], None]


def producer_fold_ops(module: nn.Module, kind: str, scales: torch.Tensor) -> dict[str, ParamOp]:
    """The fold of ``1/s`` into a producer, as one in-place op per parameter (by local name: ``weight``, ``bias``).

    The one place this rule is written: a Linear's output rows and a norm's weight (by its :class:`ProducerKind`)
    are divided by ``s``, and so is a bias. ``scales`` are fp32, one per output channel.
    """
    if kind == LINEAR_KIND:
        shape = [1, 1]
        shape[linear_output_axis(module)] = -1  # type: ignore[index]
        ops = {"weight": _divide(scales, shape)}
    else:
        fold = KINDS_BY_NAME[kind].fold_weight

        def fold_norm(t: torch.Tensor) -> None:
            t.copy_(fold(t.float(), scales.to(t.device)).to(t.dtype))

        ops = {"weight": fold_norm}
    if dict(module.named_parameters(recurse=False)).get("bias") is not None:
        ops["bias"] = _divide(scales, [-1])
    return ops


def _divide(scales: torch.Tensor, shape: list[int]) -> ParamOp:
    def op(t: torch.Tensor) -> None:
        t.copy_((t.float() / scales.to(t.device).view(shape)).to(t.dtype))

    return op


@torch.no_grad()
def fold_into_producer(module: nn.Module, kind: str, scales: torch.Tensor) -> None:
    """Divide the producer's output by ``scales`` (fp32, one per output channel), in place."""
    params = dict(module.named_parameters(recurse=False))
    for name, op in producer_fold_ops(module, kind, scales).items():
        op(params[name])


class ProbeOutputNotFinite(ValueError):
    """A producer's recorded probe output is NaN/inf, so no fold can be checked against it.

    ``module`` is the offending module; the quantizer, which knows the model, names it in the error it raises.
    """

    def __init__(self, module: nn.Module, reference: torch.Tensor) -> None:
        bad = int((~torch.isfinite(reference)).sum())
        super().__init__(f"{bad} of {reference.numel()} values of its {type(module).__name__} output are NaN/inf")
        self.module = module


@torch.no_grad()
def _folds_exactly(
    module: nn.Module, kind: str, sample: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]
) -> bool:
    """Re-run ``module`` on a recorded input with a random ``s`` folded in under ``kind``; True if its output
    became exactly ``reference / s``. The parameters are restored bit for bit afterwards.

    Raises :class:`ProbeOutputNotFinite` if ``reference`` is not finite: a tolerance cannot be scaled by it,
    and refusing the module quietly would hide that the probe forward itself went wrong."""
    args, kwargs, reference = sample
    if not torch.isfinite(reference).all():
        raise ProbeOutputNotFinite(module, reference)
    params = [p for p in (module.weight, getattr(module, "bias", None)) if isinstance(p, torch.Tensor)]
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    s = (0.5 + 1.5 * torch.rand(reference.shape[-1], generator=gen)).to(reference.device)
    try:
        fold_into_producer(module, kind, s)
        got = module(*args, **kwargs)
    except Exception:  # a module that cannot be re-run on its own is simply not a producer we can prove
        return False
    finally:
        for p, original in zip(params, saved):
            p.copy_(original)
    expected = reference.float() / s
    low = reference.dtype in (torch.float16, torch.bfloat16) or params[0].dtype in (torch.float16, torch.bfloat16)
    rtol, atol = (3e-2, 3e-2) if low else (1e-4, 1e-5)
    atol *= float(expected.abs().max()) or 1.0
    return (
        isinstance(got, torch.Tensor)
        and got.shape == reference.shape
        and torch.allclose(got.float(), expected, rtol=rtol, atol=atol)
    )


@torch.no_grad()
def probe_linear(module: nn.Module, sample: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor] | None) -> bool:
    """Whether dividing the weight's output rows (and the bias) by ``s`` divides ``module``'s output by ``s``.

    True without running anything for the exact built-in types; subclasses with their own forward are
    re-run once on an input they saw, with the parameters restored bit for bit afterwards.
    """
    if type(module) in LINEAR_OUTPUT_AXIS:
        return True
    return sample is not None and _folds_exactly(module, LINEAR_KIND, sample)


@torch.no_grad()
def probe_kind(module: nn.Module, sample: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]) -> ProducerKind | None:
    """The :data:`PRODUCER_KINDS` entry under which folding ``1/s`` divides ``module``'s output by ``s`` exactly.

    Runs the module on an input it saw during tracing, with a random positive ``s``, once per kind, and restores
    the parameters bit for bit afterwards. Returns None if no kind fits.
    """
    return next((kind for kind in PRODUCER_KINDS if _folds_exactly(module, kind.name, sample)), None)
