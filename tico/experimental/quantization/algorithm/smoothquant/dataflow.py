"""Find, by watching one forward pass, who reads each candidate producer's output.

A producer's output may be scaled by ``1/s`` per channel only if *every* read of it is a contraction over
that channel axis with a parameter that can absorb ``s`` (``F.linear``, ``addmm``, ``matmul``, grouped mm), or
an op that carries the channel axis through unchanged (views, dtype casts, dropout, gathers of tokens).
Anything else (a residual add, RoPE, a norm, being returned from the model) is a *foreign* read, and the
producer is left alone with that read named as the reason.

The forward runs under a :class:`~torch.overrides.TorchFunctionMode`, so the proof comes from the model's
own code path, whatever its architecture; no per-model list of layer names is needed. The tables below say
how each torch function treats the channel axis: they are about torch, not about models.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# name -> (index of the activation operand, index of the weight operand, contracted axis of the weight operand)
_CONTRACTIONS: dict[str, tuple[int, int, int]] = {
    "linear": (0, 1, -1),  # x @ W.T, W: [out, in]
    "addmm": (1, 2, -2),  # bias + x @ W, W: [in, out] (GPT-2 Conv1D)
    "matmul": (0, 1, -2),
    "__matmul__": (0, 1, -2),
    "mm": (0, 1, -2),
    "bmm": (0, 1, -2),
    "baddbmm": (1, 2, -2),
    "grouped_mm": (0, 1, -2),  # MoE experts, W: [experts, in, out] (often a transposed view)
    "_grouped_mm": (0, 1, -2),
}
_CONTRACTION_ARG_NAMES = {"input": 0, "weight": 1, "mat1": 1, "mat2": 2, "other": 1, "batch1": 1, "batch2": 2}

# Ops whose outputs carry the channel (last) axis of their input through unchanged: views, copies, casts,
# token gathers, and elementwise masks that commute with a per-channel scale (dropout).
_CHANNEL_PRESERVING = frozenset(
    {
        "view", "reshape", "view_as", "reshape_as", "flatten", "contiguous", "clone", "detach", "to", "float",
        "half", "bfloat16", "double", "type", "type_as", "cpu", "cuda", "dropout", "alpha_dropout",
        "feature_alpha_dropout", "__getitem__", "index_select", "unsqueeze", "squeeze", "expand", "expand_as",
        "chunk", "split", "unbind", "narrow", "select", "transpose", "permute", "repeat_interleave",
    }
)
# Ops that read only the shape/dtype/device of their input, never its values.
_SHAPE_ONLY = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full"})
# Ops that return Python values computed from the data (a non-tensor result otherwise means metadata).
_DATA_READERS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "equal", "allclose"})
# Ops on a parameter that give a view of it (the view's later use is what matters).
_PARAM_VIEWS = frozenset(
    {"__getitem__", "transpose", "t", "permute", "select", "view", "unsqueeze", "squeeze", "expand", ".T", ".mT"}
)


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a tensor property such as .shape or .data
        owner = getattr(func, "__self__", None)
        return "." + getattr(owner, "__name__", "?")
    return name


@dataclass(frozen=True)
class ConsumerParam:
    """A parameter that contracts the producer's channel axis: ``s`` is multiplied into its ``axis``."""

    name: str  # fully qualified parameter name
    module: str  # the module that owns it
    axis: int  # the parameter axis indexed by the producer's channels (non-negative)


@dataclass
class ProducerReads:
    """Everything one forward showed about one producer's output."""

    channels: int | None = None
    consumers: dict[str, ConsumerParam] = field(default_factory=dict)  # by parameter name
    consumer_modules: list[str] = field(default_factory=list)  # in order of first read
    entries: list[tuple[str, int | str]] = field(default_factory=list)  # (module, arg position/kw) it entered
    foreign: list[str] = field(default_factory=list)  # reads that forbid folding, as readable reasons
    sample: tuple[tuple[Any, ...], dict[str, Any], torch.Tensor] | None = None  # (args, kwargs, output) of 1st call

    def add_foreign(self, reason: str) -> None:
        if reason not in self.foreign:
            self.foreign.append(reason)


@dataclass
class Dataflow:
    """The result of :func:`trace_dataflow`: reads per producer, and every use of every consumer parameter."""

    producers: dict[str, ProducerReads]
    # parameter name -> list of uses: ("consumer", producer, axis) or ("other", description)
    param_uses: dict[str, list[tuple[str, str, int | str]]]


class _Tracer(TorchFunctionMode):
    def __init__(self, module_names: dict[int, str], param_names: dict[int, str], producers: list[str]) -> None:
        super().__init__()
        self.module_names = module_names
        self.param_names = param_names
        self.reads: dict[str, ProducerReads] = {p: ProducerReads() for p in producers}
        self.param_uses: dict[str, list[tuple[str, str, int | str]]] = defaultdict(list)
        self.tracked: dict[int, str] = {}  # id(tensor) -> producer
        self._keepalive: list[torch.Tensor] = []  # so ids of tracked tensors are not reused
        self.stack: list[str] = []

    # -- module bookkeeping (called from global module hooks) -------------------------------------------
    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self.module_names.get(id(module), f"<{type(module).__name__}>")
        self.stack.append(name)
        places: list[tuple[int | str, Any]] = list(enumerate(args)) + list(kwargs.items())
        for pos, value in places:
            producer = self.tracked.get(id(value)) if isinstance(value, torch.Tensor) else None
            if producer is not None:
                self.reads[producer].entries.append((name, pos))

    def leave(self) -> None:
        if self.stack:
            self.stack.pop()

    def where(self) -> str:
        return self.stack[-1] if self.stack else "the model's top level"

    def track(self, tensor: torch.Tensor, producer: str) -> None:
        self.tracked[id(tensor)] = producer
        self._keepalive.append(tensor)

    # -- parameters --------------------------------------------------------------------------------------
    def _param_of(self, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(name, parameter) if ``t`` is a registered parameter or a view of one."""
        base = t if isinstance(t, nn.Parameter) else t._base
        if base is None:
            return None
        name = self.param_names.get(id(base))
        return None if name is None else (name, base)

    @staticmethod
    def _param_axis(view: torch.Tensor, base: torch.Tensor, axis: int) -> int | None:
        """The axis of ``base`` that ``view``'s ``axis`` walks along, found from strides (views share storage)."""
        axis %= view.dim()
        if view is base:
            return axis
        size, stride = view.size(axis), view.stride(axis)
        hits = [j for j in range(base.dim()) if base.size(j) == size and base.stride(j) == stride and size > 1]
        return hits[0] if len(hits) == 1 else None

    # -- the mode ----------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat_in if isinstance(t, torch.Tensor)]
        tracked = [(t, self.tracked[id(t)]) for t in tensors if id(t) in self.tracked]
        params = [(t, p) for t in tensors if (p := self._param_of(t)) is not None]
        if not tracked and not params:
            return out
        name = _func_name(func)
        if name in _CONTRACTIONS:
            self._on_contraction(name, args, kwargs, tracked, params)
        else:
            self._on_other(name, args, kwargs, out, tracked, params)
        return out

    def _on_contraction(self, name, args, kwargs, tracked, params) -> None:
        x_idx, w_idx, w_axis = _CONTRACTIONS[name]
        operands: dict[int, Any] = dict(enumerate(args))
        for key, value in kwargs.items():
            if key in _CONTRACTION_ARG_NAMES:
                operands.setdefault(_CONTRACTION_ARG_NAMES[key], value)
        x, w = operands.get(x_idx), operands.get(w_idx)
        producer = self.tracked.get(id(x)) if isinstance(x, torch.Tensor) else None
        weight = self._param_of(w) if isinstance(w, torch.Tensor) else None
        where = self.where()
        for t, p in tracked:
            if t is not x:
                self.reads[p].add_foreign(f"used as the weight operand of {name} in {where}")
        for t, (pname, _) in params:
            if weight is None or t is not w:
                self.param_uses[pname].append(("other", f"{name} in {where}", -1))
        if producer is None or weight is None:
            if producer is not None:
                self.reads[producer].add_foreign(f"{name} in {where} with a weight that is not a parameter view")
            elif weight is not None:
                self.param_uses[weight[0]].append(("other", f"{name} in {where} on an input we do not fold", -1))
            return
        pname, base = weight
        axis = self._param_axis(w, base, w_axis)
        reads = self.reads[producer]
        if axis is None:
            reads.add_foreign(f"{name} in {where}: cannot map the weight view to an axis of {pname}")
            return
        module = pname.rsplit(".", 1)[0] if "." in pname else ""
        reads.consumers.setdefault(pname, ConsumerParam(pname, module, axis))
        if where not in reads.consumer_modules:
            reads.consumer_modules.append(where)
        self.param_uses[pname].append(("consumer", producer, axis))

    def _on_other(self, name, args, kwargs, out, tracked, params) -> None:
        where = self.where()
        for t, (pname, _) in params:
            if name not in _PARAM_VIEWS and name not in _SHAPE_ONLY and isinstance(out, torch.Tensor | tuple):
                self.param_uses[pname].append(("other", f"{name} in {where}", -1))
        if not tracked:
            return
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            if name in _DATA_READERS:
                for _, p in tracked:
                    self.reads[p].add_foreign(f"its values are read by {name} in {where}")
            return  # metadata: shape, dtype, ...
        if name in _SHAPE_ONLY:
            return
        producers = {p for _, p in tracked}
        if name in _CHANNEL_PRESERVING and len(tracked) == 1 and len(producers) == 1:
            (x, producer), = tracked
            channels = self.reads[producer].channels
            if (
                x is args[0]
                and not _touches_last_dim(name, x, args, kwargs)
                and all(o.dim() > 0 and o.shape[-1] == channels for o in outs)
            ):
                for o in outs:
                    self.track(o, producer)
                return
        for p in producers:
            self.reads[p].add_foreign(f"read by {name} in {where}")


# op -> (position of its ``dim`` argument, default dim); unsqueeze/squeeze are left to the shape check.
_DIM_ARG: dict[str, tuple[int, int | None]] = {
    "index_select": (1, None), "narrow": (1, None), "select": (1, None),
    "chunk": (2, 0), "split": (2, 0), "unbind": (1, 0), "repeat_interleave": (2, None),
}


def _touches_last_dim(name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a channel-preserving op indexes, moves or splits the last (channel) axis of ``x``."""
    last = x.dim() - 1

    def norm(d: int) -> int:
        return d % x.dim() if x.dim() else 0

    if name == "__getitem__":
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(i is Ellipsis for i in index):
            after = index[[i is Ellipsis for i in index].index(True) + 1 :]
            return any(i is not None for i in after)
        consumed = 0
        for i in index:
            if i is None:
                continue
            consumed += i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
        if consumed <= last:
            return False
        last_index = [i for i in index if i is not None][-1]
        return not (isinstance(last_index, slice) and last_index == slice(None))
    if name in _DIM_ARG:
        position, default = _DIM_ARG[name]
        dim = kwargs.get("dim", args[position] if len(args) > position else default)
        return dim is not None and norm(dim) == last
    if name == "transpose":
        d0, d1 = (args[1], args[2]) if len(args) > 2 else (kwargs.get("dim0"), kwargs.get("dim1"))
        return last in (norm(d0), norm(d1))
    if name == "permute":
        dims = kwargs.get("dims")
        if dims is None:
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return norm(dims[-1]) != last
    return False


@contextlib.contextmanager
def _module_stack_hooks(tracer: _Tracer) -> Iterator[None]:
    pre = nn.modules.module.register_module_forward_pre_hook(lambda m, a: tracer.enter(m, a, {}))
    post = nn.modules.module.register_module_forward_hook(lambda m, a, o: tracer.leave())
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def trace_dataflow(
    model: nn.Module,
    producers: dict[str, nn.Module],
    run_forward: Callable[[], Any],
) -> Dataflow:
    """Run ``run_forward`` once and report, for each producer, who reads its output.

    Args:
        model: the model (used for module and parameter names).
        producers: candidate producers by name; their outputs are tracked.
        run_forward: calls the model once (no gradients needed) and returns its output.
    """
    module_names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    tracer = _Tracer(module_names, param_names, list(producers))
    handles = []

    def on_output(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            reads = tracer.reads[name]
            if isinstance(output, torch.Tensor) and output.dim() > 0:
                reads.channels = output.shape[-1] if reads.channels is None else reads.channels
                tracer.track(output, name)
                if reads.sample is None:
                    reads.sample = (args, kwargs, output)
            else:
                reads.add_foreign("its output is not a single tensor")

        return hook

    for name, module in producers.items():
        handles.append(module.register_forward_hook(on_output(name), with_kwargs=True))
    try:
        with _module_stack_hooks(tracer), tracer:
            output = run_forward()
    finally:
        for h in handles:
            h.remove()
    for t in tree_flatten(_outputs_as_tree(output))[0]:
        if isinstance(t, torch.Tensor) and id(t) in tracer.tracked:
            tracer.reads[tracer.tracked[id(t)]].add_foreign("returned from the model as an output")
    return Dataflow(producers=tracer.reads, param_uses=dict(tracer.param_uses))


def _outputs_as_tree(output: Any) -> Any:
    """Model outputs as plain containers (HF ``ModelOutput`` is a dict subclass; tuples pass through)."""
    if isinstance(output, dict):
        return {k: _outputs_as_tree(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return [_outputs_as_tree(v) for v in output]
    return output
