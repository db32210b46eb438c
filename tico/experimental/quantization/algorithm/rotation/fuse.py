"""Fuse orthogonal rotations into a pre-norm model's weights (QuaRot / SpinQuant style), exactly in float.

**Residual stream.** Let every tensor written into the residual stream be multiplied by an orthogonal ``Q``:
embedding rows ``E Q``, attention/MLP output projections ``Q^T W`` (and their biases ``b Q``). A norm that
reads the stream computes ``rmsnorm(x Q) = rmsnorm(x) Q`` *if its weight is all ones* (``||x Q|| = ||x||``, so
the mean square and hence the ``eps`` term are unchanged), so its weight ``w`` is first absorbed into every
Linear that reads its output (``W diag(w)``, or ``W diag(1 + w)`` for Gemma's form) and set to the unit; then
each reader gets ``W Q`` and sees exactly the input it saw before. The LM head reads the final norm, so it gets
``W diag(w) Q``; with tied embeddings that differs from ``E Q`` unless the final norm's weight is already one,
in which case the tie is kept, otherwise the head is untied (and ``config.tie_word_embeddings`` set to False).

**Values.** Attention is linear in the values, so each KV head's value channels can be rotated by a head-size
``H`` (``v_proj`` rows ``H^T W_v``, bias ``b H``) and every query head that reads it gets ``W_o H`` on its
``o_proj`` input columns. With one ``H`` per layer shared by all heads, grouped-query attention needs nothing
more.

Rotated, the model is a plain checkpoint (only weights changed); its activations, in particular the Linear
inputs, have their outlier channels spread over all channels, which is what W8A8 wants.

**Proof.** The readers of each norm come from the traced dataflow (nothing else may read a norm's output); the
norm itself is probed on an input it saw (its folded form is recognised, and ``norm(x Q) = norm(x) Q`` checked
with the unit weight); the writers come from :data:`~.layouts.LAYOUTS`. After applying, the logits of a probe
forward are compared with the original ones; a mismatch restores every changed tensor and raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tico.experimental.quantization.algorithm.rotation.hadamard import Rotation, make_rotation
from tico.experimental.quantization.algorithm.rotation.layouts import LAYOUTS, REFUSED, ResidualLayout
from tico.experimental.quantization.algorithm.smoothquant.scales import scale_input_channels
from tico.experimental.quantization.quantizer import QuantizationError
from tico.experimental.quantization.structure.dataflow import trace_dataflow
from tico.experimental.quantization.structure.probe import ConsumerParam, example_inputs, run_probe
from tico.experimental.quantization.structure.producers import KINDS_BY_NAME, probe_kind, producer_params

__all__ = ["RotationError", "RotationReport", "fuse_rotations"]

logger = logging.getLogger(__name__)


class RotationError(QuantizationError):
    """The model cannot be rotated exactly; the message names the module and the reason. The model is unchanged."""


@dataclass
class RotationReport:
    """What :func:`fuse_rotations` did."""

    model_type: str
    residual: str  # description of Q
    heads: str | None  # description of the per-head rotation (one per layer), or None
    absorbed_norms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)  # parameters rotated on their input side
    writers: list[str] = field(default_factory=list)  # parameters rotated on their output side
    value_pairs: list[str] = field(default_factory=list)  # blocks whose v_proj / o_proj were rotated per head
    untied: str | None = None  # why the LM head was untied from the embedding, if it was
    max_rel_error: float | None = None  # max |logits' - logits| / max |logits| on the probe

    def summary(self) -> str:
        lines = [
            f"rotations fused into {self.model_type}: residual stream Q = {self.residual}"
            + (f", values per head H = {self.heads} in {len(self.value_pairs)} layers" if self.heads else ""),
            f"  {len(self.absorbed_norms)} norm weights absorbed into their readers and set to the unit",
            f"  {len(self.readers)} reader parameters (W Q), {len(self.writers)} writer parameters (Q^T W)",
        ]
        if self.untied:
            lines.append(f"  LM head untied from the embedding: {self.untied}")
        if self.max_rel_error is not None:
            lines.append(f"  verified: max relative logit change {self.max_rel_error:.2e}")
        return "\n".join(lines)


@dataclass
class _Plan:
    layout: ResidualLayout
    hidden: int
    embeddings: list[str]  # parameter names
    norms: dict[str, tuple[nn.Module, str, list[ConsumerParam]]]  # name -> (module, kind, readers)
    writers: list[tuple[str, int]]
    values: list[tuple[str, nn.Linear, nn.Linear]]  # (block, v_proj, o_proj)
    head_dim: int | None
    untie: str | None  # reason to untie, or None


def _rotate_axis(t: torch.Tensor, axis: int, q: torch.Tensor) -> torch.Tensor:
    """``t`` with its ``axis`` contracted against the first index of ``q`` (float64): ``W Q`` on columns,
    ``Q^T W`` on rows, ``b Q`` on a bias — all the same operation on the axis that indexes rotated channels."""
    moved = t.detach().to(torch.float64).movedim(axis, -1)
    return (moved @ q).movedim(-1, axis)


def _layout(model: nn.Module) -> tuple[str, ResidualLayout]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in LAYOUTS:
        return model_type, LAYOUTS[model_type]
    why = REFUSED.get(model_type, "no residual-stream layout is known for it (add one to rotation/layouts.py)")
    raise RotationError(
        f"cannot rotate {type(model).__name__} (model_type {model_type!r}) exactly: {why}. "
        f"Supported model types: {sorted(LAYOUTS)}"
    )


def _equivariant(module: nn.Module, kind: str, sample: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]) -> bool:
    """Whether ``module(x Q) == module(x) Q`` with its weight at the unit, on an input it saw (restored after)."""
    args, kwargs, _ = sample
    if not args or not isinstance(args[0], torch.Tensor):
        return False
    weight = module.weight
    saved = weight.detach().clone()
    x = args[0]
    q = make_rotation(x.shape[-1], seed=12345, kind="random").matrix.to(x.device)
    try:
        with torch.no_grad():
            weight.fill_(KINDS_BY_NAME[kind].unit)
            plain = module(x, *args[1:], **kwargs).to(torch.float64)
            turned = module((x.to(torch.float64) @ q).to(x.dtype), *args[1:], **kwargs).to(torch.float64)
    except Exception:  # noqa: BLE001 - a module that cannot be re-run alone is not proven
        return False
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    low = x.dtype in (torch.float16, torch.bfloat16)
    tol = 3e-2 if low else 1e-5
    return bool(torch.allclose(turned, plain @ q, rtol=tol, atol=tol * float(plain.abs().max() or 1.0)))


def _param(model: nn.Module, name: str) -> nn.Parameter | None:
    module_name, _, attr = name.rpartition(".")
    try:
        value = getattr(model.get_submodule(module_name), attr, None)
    except AttributeError:
        return None
    return value if isinstance(value, nn.Parameter) else None


def _plan(model: nn.Module, layout: ResidualLayout, probe: tuple[tuple[Any, ...], dict[str, Any]], own_probe: bool = False) -> _Plan:
    """Resolve names, trace the norms' readers, probe the norms: every check before any weight changes."""
    problems: list[str] = []
    try:
        blocks = model.get_submodule(layout.blocks)
    except AttributeError:
        raise RotationError(f"{type(model).__name__} has no decoder blocks at {layout.blocks!r}") from None
    prefixes = [f"{layout.blocks}.{i}" for i in range(len(blocks))]
    norm_names = [f"{p}.{n}" for p in prefixes for n in layout.norms] + [layout.final_norm]
    norms: dict[str, nn.Module] = {}
    for name in norm_names:
        try:
            norms[name] = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such norm")
    embeddings = [f"{e}.weight" for e in layout.embeddings]
    for e in embeddings:
        if _param(model, e) is None:
            problems.append(f"{e}: no such embedding weight")
    writers: list[tuple[str, int]] = []
    for p in prefixes:
        for rel, axis in layout.writers:
            name = f"{p}.{rel}"
            if _param(model, name) is not None:
                writers.append((name, axis))
            elif not rel.endswith(".bias"):
                problems.append(f"{name}: no such writer parameter")
    if problems:
        raise RotationError("cannot rotate: " + "; ".join(problems))

    hidden = _param(model, embeddings[0]).shape[-1]  # type: ignore[union-attr]
    flow = trace_dataflow(model, norms, lambda: run_probe(model, *probe, own_inputs=own_probe))
    planned: dict[str, tuple[nn.Module, str, list[ConsumerParam]]] = {}
    all_names = dict(model.named_parameters(remove_duplicate=False))
    for name, module in norms.items():
        reads = flow.producers[name]
        params = producer_params(module)
        if params is None or params[0] is None:
            problems.append(f"{name}: {type(module).__name__} has no 1-D weight to absorb")
            continue
        if params[1] is not None:
            problems.append(f"{name}: {type(module).__name__} has a bias (a LayerNorm-like form is not rotation-exact)")
            continue
        if reads.foreign or not reads.consumers:
            why = "; ".join(reads.foreign[:2]) or "no Linear-like reader"
            problems.append(f"{name}: its output is read by more than Linear layers ({why})")
            continue
        kind = probe_kind(module, reads.sample) if reads.sample else None
        if kind is None:
            problems.append(f"{name}: {type(module).__name__} is not of the form norm(x) * w or norm(x) * (1 + w)")
            continue
        if not _equivariant(module, kind.name, reads.sample):  # type: ignore[arg-type]
            problems.append(f"{name}: {type(module).__name__}(x Q) != {type(module).__name__}(x) Q with a unit weight "
                            "(mean subtraction or another non-rotation-invariant statistic)")
            continue
        for c in reads.consumers.values():
            if c.channel_map is not None or all_names[c.name].shape[c.axis] != hidden:
                problems.append(f"{c.name}: reads {name} through a channel map (not the whole hidden size)")
        planned[name] = (module, kind.name, list(reads.consumers.values()))
    if problems:
        raise RotationError("cannot rotate exactly: " + "; ".join(problems))

    untie = _untie_reason(model, layout, planned)
    values, head_dim = _value_pairs(model, layout, prefixes)
    return _Plan(layout, hidden, embeddings, planned, writers, values, head_dim, untie)


def _untie_reason(model: nn.Module, layout: ResidualLayout, planned) -> str | None:
    """Why the LM head must get its own weight, or None (not tied, or the final norm is already the unit)."""
    module, kind, readers = planned[layout.final_norm]
    embedding_ids = {id(_param(model, f"{e}.weight")) for e in layout.embeddings}
    tied = [c.name for c in readers if id(_param(model, c.name)) in embedding_ids]
    if not tied:
        return None
    if torch.all(module.weight == KINDS_BY_NAME[kind].unit):
        return None
    return (f"{tied[0]} is the embedding matrix, but it reads {layout.final_norm}, whose weight is absorbed into it "
            "(E diag(w) Q for the head, E Q for the embedding)")


def _value_pairs(model: nn.Module, layout: ResidualLayout, prefixes: list[str]):
    if layout.values is None:
        return [], None
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    pairs, problems = [], []
    for p in prefixes:
        try:
            v, o = (model.get_submodule(f"{p}.{n}") for n in layout.values)
        except AttributeError as exc:
            problems.append(f"{p}: {exc}")
            continue
        if type(v) is not nn.Linear or type(o) is not nn.Linear:
            problems.append(f"{p}: {layout.values} are not plain nn.Linear layers")
        elif v.out_features != kv_heads * head_dim or o.in_features != heads * head_dim:
            problems.append(f"{p}: v_proj/o_proj sizes {v.out_features}/{o.in_features} do not match "
                            f"{kv_heads}/{heads} heads of {head_dim}")
        else:
            pairs.append((p, v, o))
    if problems:
        raise RotationError("cannot rotate values per head: " + "; ".join(problems))
    return pairs, head_dim


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output[0]


@torch.no_grad()
def _apply(model: nn.Module, plan: _Plan, q: torch.Tensor, head_rotations: list[Rotation], report: RotationReport) -> None:
    if plan.untie:
        head_name = plan.layout.final_norm
        _, _, readers = plan.norms[head_name]
        for c in readers:
            module = model.get_submodule(c.module)
            module.weight = nn.Parameter(module.weight.detach().clone())
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            cfg.tie_word_embeddings = False
        report.untied = plan.untie
    done: set[int] = set()

    def rotate(name: str, axis: int, matrix: torch.Tensor, into: list[str]) -> None:
        p = _param(model, name)
        if id(p) in done:
            return  # a tensor shared by two names (tied head and embedding) is rotated once
        done.add(id(p))
        p.copy_(_rotate_axis(p, axis, matrix.to(p.device)).to(p.dtype))
        into.append(name)

    for name, (module, kind, readers) in plan.norms.items():
        factor = KINDS_BY_NAME[kind].factor(module.weight.detach().to(torch.float64))
        for c in readers:  # the norm's factor moves into its readers' input columns, as a smoothing fold would
            scale_input_channels(_param(model, c.name), c.axis, factor, compute_dtype=torch.float64)  # type: ignore[arg-type]
        module.weight.fill_(KINDS_BY_NAME[kind].unit)
        report.absorbed_norms.append(name)
    for name in plan.embeddings:
        rotate(name, 1, q, report.writers)
    for name, axis in plan.writers:
        rotate(name, axis, q, report.writers)
    for _, (_, _, readers) in plan.norms.items():
        for c in readers:
            rotate(c.name, c.axis, q, report.readers)
    hd = plan.head_dim
    for (block, v, o), rot in zip(plan.values, head_rotations):
        h = rot.matrix.to(v.weight.device)
        w = v.weight.view(-1, hd, v.in_features)
        v.weight.copy_(_rotate_axis(w, 1, h).reshape(v.weight.shape).to(v.weight.dtype))
        if v.bias is not None:
            v.bias.copy_(_rotate_axis(v.bias.view(-1, hd), 1, h).reshape(-1).to(v.bias.dtype))
        wo = o.weight.view(o.out_features, -1, hd)
        o.weight.copy_(_rotate_axis(wo, 2, h).reshape(o.weight.shape).to(o.weight.dtype))
        report.value_pairs.append(block)


def fuse_rotations(
    model: nn.Module,
    seed: int = 0,
    kind: str = "hadamard",
    heads: bool = True,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    tolerance: float | None = None,
) -> RotationReport:
    """Rotate ``model``'s residual stream (and, if ``heads``, its values per head) in place, exactly.

    Args:
        model: a pre-norm decoder of a ``model_type`` in :data:`~.layouts.LAYOUTS` (Hugging Face).
        seed: seeds the rotations (the residual ``Q`` uses ``seed``, layer ``i``'s head rotation ``seed + 1 + i``).
        kind: ``"hadamard"`` (randomized Hadamard, random orthogonal where no Hadamard order exists) or ``"random"``.
        heads: also rotate ``v_proj`` / ``o_proj`` per head.
        args, kwargs: inputs of the probe forward (default: a few token ids).
        tolerance: allowed max relative change of the probe's logits (default 1e-4 in fp32, 5e-2 in fp16/bf16).

    Every parameter is copied once (on its device) so that a failed verification can restore the model: peak
    memory is about twice the model's.

    Returns:
        A :class:`RotationReport`. Raises :class:`RotationError`, with the model unchanged, if any part of the
        rotation cannot be proven exact or the verification fails.
    """
    model_type, layout = _layout(model)
    probe = example_inputs(model, args, kwargs)
    own_probe = args is None and kwargs is None  # the default token ids: a failure is not the caller's inputs'
    plan = _plan(model, layout, probe, own_probe)
    q_rot = make_rotation(plan.hidden, seed, kind)
    head_rots = [make_rotation(plan.head_dim, seed + 1 + i, kind) for i in range(len(plan.values))] if heads else []
    if not heads:
        plan.values = []
    heads_text = f"{head_rots[0].kind}({plan.head_dim}), seed {seed} + 1 + layer" if head_rots else None
    report = RotationReport(model_type, q_rot.describe(), heads_text)
    dtype = next(model.parameters()).dtype
    if tolerance is None:
        tolerance = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4

    reference = _logits(run_probe(model, *probe, own_inputs=own_probe)).detach().to(torch.float64)
    saved = {id(p): (p, p.detach().clone()) for p in model.parameters()}
    modules = {name: m.weight for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    tie_flags = [(c, getattr(c, "tie_word_embeddings", None)) for c in (model.config, model.config.get_text_config())]
    try:
        _apply(model, plan, q_rot.matrix, head_rots, report)
        got = _logits(run_probe(model, *probe, own_inputs=own_probe)).detach().to(torch.float64)
        err = float((got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
        report.max_rel_error = err
        if not err <= tolerance:
            raise RotationError(
                f"rotating {model_type} changed the probe's logits by {err:.2e} (relative, > {tolerance:.0e}): some "
                "reader or writer of the residual stream is missing from rotation/layouts.py; the model was restored"
            )
    except BaseException:
        with torch.no_grad():
            for p, original in saved.values():
                p.copy_(original)
            for name, weight in modules.items():  # undo an untie
                module = model.get_submodule(name)
                if module.weight is not weight:
                    module.weight = weight
            for cfg, flag in tie_flags:
                if flag is not None:
                    cfg.tie_word_embeddings = flag
        raise
    logger.info("%s", report.summary())
    return report
