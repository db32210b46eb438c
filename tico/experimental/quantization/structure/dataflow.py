"""Find, by watching one forward pass, who reads each candidate producer's output, channel by channel.

Folding ``1/s`` into a producer scales every element of its output by ``1/s[c]``, where ``c`` is the output
channel the element came from. The fold is exact if *every* read of that output (and of whatever is derived
from it) is either

- **structural**: a view, reshape, transpose, gather, split, concat, cast or dropout, which moves elements
  around but keeps each one's channel (we move a *channel map* the same way, so head splits, GQA head
  repeats and token gathers are followed exactly);
- **homogeneous**: multiplication by a tensor that does not depend on the producer (``act(gate) * up``), ReLU,
  negation, or a matmul / attention in which the tracked tensor is the *value* operand; or
- a **consumer**: a contraction (``F.linear``, ``addmm``, ``matmul``, grouped mm) of the tracked tensor's last
  axis with a parameter, where every column of the parameter sees one channel. ``s[c]`` is multiplied into
  that parameter's column.

Anything else (a residual add, RoPE, softmax, a norm, being returned from the model) is a *foreign* read, and
the producer is left alone with that read named as the reason. The forward runs under a
:class:`~torch.overrides.TorchFunctionMode`, so the proof comes from the model's own code path, whatever its
architecture. The tables below are about torch functions, not about models. What the trace records
(:class:`~.probe.ProducerReads` per producer, in a :class:`~.probe.Dataflow`) and the probe forward it watches
live in :mod:`.probe`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from tico.experimental.quantization.structure.probe import ConsumerParam, Dataflow, ProducerReads, output_tensors

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

# Ops that keep every element's channel and the shape: the channel map passes through unchanged.
_SAME_MAP = frozenset(
    {
        "to", "float", "half", "bfloat16", "double", "type", "type_as", "cpu", "cuda", "contiguous", "clone",
        "detach", "dropout", "alpha_dropout", "feature_alpha_dropout", "relu", "leaky_relu", "neg", "__neg__",
        ".data",
    }
)
# Ops that move elements around: the same op applied to the channel map gives the output's map.
_MOVE_MAP = frozenset(
    {
        "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "__getitem__", "index_select",
        "unsqueeze", "squeeze", "expand", "expand_as", "chunk", "split", "tensor_split", "unbind", "narrow",
        "select", "transpose", "swapaxes", "permute", "movedim", "repeat_interleave", "repeat", "t", ".T", ".mT",
    }
)
_CONCAT = frozenset({"cat", "concat", "concatenate", "stack"})
# Elementwise ops linear in their first operand when the other one does not depend on the producer.
_SCALE_BY_OTHER = frozenset({"mul", "__mul__", "__rmul__", "multiply", "div", "__truediv__", "true_divide", "__div__"})
_ADD = frozenset({"add", "__add__", "__radd__", "sub", "__sub__"})
# Ops that read only the shape/dtype/device of their input, never its values.
_SHAPE_ONLY = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full"})
# Ops that return Python values computed from the data (a non-tensor result otherwise means metadata).
_DATA_READERS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "equal", "allclose"})
# Ops on a parameter that give a view of it (the view's later use is what matters).
_PARAM_VIEWS = frozenset(
    {"__getitem__", "transpose", "t", "permute", "select", "view", "unsqueeze", "squeeze", "expand", ".T", ".mT"}
)
# Reshaping ops applied to a channel map use their copying variant (maps are expanded, not contiguous).
_MAP_OP_ALIASES = {"view": "reshape", "view_as": "reshape_as"}


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a tensor property such as .shape or .data
        owner = getattr(func, "__self__", None)
        return "." + getattr(owner, "__name__", "?")
    return name


def _row_map(cmap: torch.Tensor, shape: torch.Size, channels: int | None) -> tuple[int, ...] | None | bool:
    """The channel of each index of the last axis, if it is the same along every other axis.

    Returns the map (None for the identity over all ``channels``) or False when the last axis mixes
    channels across rows.
    """
    full = cmap.expand(shape).reshape(-1, shape[-1]) if len(shape) else cmap.reshape(1, 1)
    row = full[0]
    if full.shape[0] > 1 and not bool((full == row).all()):
        return False
    values = tuple(int(v) for v in row.tolist())
    return None if len(values) == channels and values == tuple(range(channels)) else values


class _Tracer(TorchFunctionMode):
    def __init__(self, module_names: dict[int, str], param_names: dict[int, str], producers: list[str]) -> None:
        super().__init__()
        self.module_names = module_names
        self.param_names = param_names
        self.reads: dict[str, ProducerReads] = {p: ProducerReads() for p in producers}
        self.param_uses: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        self.tracked: dict[int, tuple[str, torch.Tensor]] = {}  # id(tensor) -> (producer, channel map on CPU)
        self._keepalive: list[torch.Tensor] = []  # so ids of tracked tensors are not reused
        self.stack: list[str] = []

    # -- module bookkeeping (called from global module hooks) -------------------------------------------
    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        name = self.module_names.get(id(module), f"<{type(module).__name__}>")
        self.stack.append(name)
        for pos, value in enumerate(args):
            hit = self.tracked.get(id(value)) if isinstance(value, torch.Tensor) else None
            if hit is not None:
                row = _row_map(hit[1], value.shape, self.reads[hit[0]].channels)
                if row is not False:
                    self.reads[hit[0]].entries.append((name, pos, row))  # type: ignore[arg-type]

    def leave(self) -> None:
        if self.stack:
            self.stack.pop()

    def where(self) -> str:
        return self.stack[-1] if self.stack else "the model's top level"

    def track(self, tensor: torch.Tensor, producer: str, cmap: torch.Tensor) -> None:
        self.tracked[id(tensor)] = (producer, cmap)
        self._keepalive.append(tensor)

    def track_output(self, tensor: torch.Tensor, producer: str) -> None:
        """Start tracking a producer's output: channel ``c`` at index ``c`` of the last axis."""
        channels = tensor.shape[-1]
        self.track(tensor, producer, torch.arange(channels).view(*([1] * (tensor.dim() - 1)), channels))

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
            self._on_contraction(name, args, kwargs, out, tracked, params)
        else:
            self._on_params(name, out, params)
            if tracked:
                self._on_tracked(func, name, args, kwargs, out, tracked)
        return out

    def _on_params(self, name: str, out: Any, params) -> None:
        where = self.where()
        for _t, (pname, _) in params:
            if name not in _PARAM_VIEWS and name not in _SHAPE_ONLY and isinstance(out, (torch.Tensor, tuple)):
                self.param_uses[pname].append(("other", f"{name} in {where}", -1))

    def _on_contraction(self, name, args, kwargs, out, tracked, params) -> None:
        x_idx, w_idx, w_axis = _CONTRACTIONS[name]
        operands: dict[int, Any] = dict(enumerate(args))
        for key, value in kwargs.items():
            if key in _CONTRACTION_ARG_NAMES:
                operands.setdefault(_CONTRACTION_ARG_NAMES[key], value)
        x, w = operands.get(x_idx), operands.get(w_idx)
        x_hit = self.tracked.get(id(x)) if isinstance(x, torch.Tensor) else None
        weight = self._param_of(w) if isinstance(w, torch.Tensor) else None
        where = self.where()
        for t, (pname, _) in params:
            if weight is None or t is not w:
                self.param_uses[pname].append(("other", f"{name} in {where}", -1))
        for t, (producer, cmap) in tracked:
            if t is x:
                continue
            if t is w and name in ("matmul", "__matmul__", "bmm", "mm"):
                # probs @ V is linear in V. If the other operand derives from this producer too, its channels
                # are pinned (scale 1) by its own foreign read below, so it does not change either.
                self._track_value_operand(out, producer, cmap, t)
            else:
                self.reads[producer].add_foreign(f"read by {name} in {where}", cmap)
        if x_hit is None:
            if weight is not None:
                self.param_uses[weight[0]].append(("other", f"{name} in {where} on an input we do not fold", -1))
            return
        producer, cmap = x_hit
        reads = self.reads[producer]
        if weight is None:
            reads.add_foreign(f"contracted by {name} in {where} with a tensor that is not a parameter", cmap)
            return
        row = _row_map(cmap, x.shape, reads.channels)
        pname, base = weight
        axis = self._param_axis(w, base, w_axis)
        if row is False or axis is None:
            why = "channels vary along rows" if row is False else f"cannot map the weight view to an axis of {pname}"
            reads.add_foreign(f"{name} in {where}: {why}", cmap)
            return
        module = pname.rsplit(".", 1)[0] if "." in pname else ""
        consumer = ConsumerParam(pname, module, axis, row)  # type: ignore[arg-type]
        previous = reads.consumers.setdefault(pname, consumer)
        if previous != consumer:
            reads.add_foreign(f"{pname} reads it twice with different channel orders")
        if where not in reads.consumer_modules:
            reads.consumer_modules.append(where)
        self.param_uses[pname].append(("consumer", producer, axis))

    def _track_value_operand(self, out: Any, producer: str, cmap: torch.Tensor, value: torch.Tensor) -> None:
        """``out = a @ value`` (or attention over ``value``): each output column keeps ``value``'s channel."""
        full = cmap.expand(value.shape)
        first = full.narrow(-2, 0, 1)
        if not bool((full == first).all()) or not isinstance(out, torch.Tensor):
            self.reads[producer].add_foreign(f"value operand with channels varying along its rows in {self.where()}", cmap)
            return
        heads_out = out.shape[-3] if out.dim() >= 3 else None
        if heads_out is not None and first.dim() >= 3 and first.shape[-3] not in (1, heads_out):
            first = first.repeat_interleave(heads_out // first.shape[-3], dim=-3)  # grouped-query attention
        self.track(out, producer, first.expand(out.shape))

    def _on_tracked(self, func, name, args, kwargs, out, tracked) -> None:
        where = self.where()
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        producers = {p for _, (p, _) in tracked}
        if not outs:
            if name in _DATA_READERS:
                for _t, (p, cmap) in tracked:
                    self.reads[p].add_foreign(f"its values are read by {name} in {where}", cmap)
            return  # metadata: shape, dtype, ...
        if name in _SHAPE_ONLY:
            return
        if name == "scaled_dot_product_attention":
            self._on_attention(args, kwargs, out, tracked)
            return
        rule = self._propagate(func, name, args, kwargs, out, tracked)
        if rule is None:
            for _t, (p, cmap) in tracked:
                self.reads[p].add_foreign(f"read by {name} in {where}", cmap)

    def _propagate(self, func, name, args, kwargs, out, tracked) -> bool | None:
        """Track ``out`` if ``name`` keeps channels; None if the read is foreign."""
        (x, (producer, cmap)), others = tracked[0], tracked[1:]
        if name in _CONCAT:
            seq = args[0] if args else kwargs.get("tensors")
            hits = [self.tracked.get(id(t)) for t in seq]
            if any(h is None or h[0] != producer for h in hits):
                return None
            maps = [h[1].expand(t.shape) for h, t in zip(hits, seq)]  # type: ignore[union-attr]
            self.track(out, producer, func(maps, *args[1:], **kwargs))
            return True
        if any(p != producer for _, (p, _) in others) or not isinstance(out, (torch.Tensor, tuple, list)):
            return None
        if x is not (args[0] if args else None):
            if name == "__rmul__" or (name in ("mul", "multiply") and len(args) > 1 and args[1] is x and not others):
                return self._track_same(out, producer, cmap, x, broadcast=True)
            return None
        if name in _SAME_MAP and not others:
            return self._track_same(out, producer, cmap, x)
        if name in _SCALE_BY_OTHER and not others:
            return self._track_same(out, producer, cmap, x, broadcast=True)
        if name in _ADD and others and len(tracked) == 2:
            other_t, (_, other_map) = others[0]
            a, b = cmap.expand(x.shape), other_map.expand(other_t.shape)
            shape = torch.broadcast_shapes(a.shape, b.shape)
            if torch.equal(a.expand(shape), b.expand(shape)) and kwargs.get("alpha", 1) == 1:
                return self._track_same(out, producer, cmap, x, broadcast=True)
            return None
        if name in _MOVE_MAP and not others:
            on_cpu = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, (args[1:], kwargs))
            map_func = getattr(torch.Tensor, _MAP_OP_ALIASES.get(name, name), None) if not name.startswith(".") else None
            full = cmap.expand(x.shape).contiguous()
            moved = getattr(full, name[1:]) if name.startswith(".") else map_func(full, *on_cpu[0], **on_cpu[1])
            o_list = list(out) if isinstance(out, (tuple, list)) else [out]
            m_list = list(moved) if isinstance(moved, (tuple, list)) else [moved]
            if len(o_list) != len(m_list) or any(o.shape != m.shape for o, m in zip(o_list, m_list)):
                return None
            for o, m in zip(o_list, m_list):
                self.track(o, producer, m)
            return True
        return None

    def _track_same(self, out, producer, cmap, x, broadcast: bool = False) -> bool | None:
        if not isinstance(out, torch.Tensor):
            return None
        full = cmap.expand(x.shape)
        if out.shape != x.shape:
            if not broadcast:
                return None
            try:
                full = full.expand(out.shape)
            except RuntimeError:
                return None
        self.track(out, producer, full)
        return True

    def _on_attention(self, args, kwargs, out, tracked) -> None:
        names = ("query", "key", "value")
        operands = {n: (args[i] if len(args) > i else kwargs.get(n)) for i, n in enumerate(names)}
        for t, (producer, cmap) in tracked:
            if t is operands["value"]:  # linear in the value; query/key channels (if any) are pinned below
                self._track_value_operand(out, producer, cmap, t)
            else:
                self.reads[producer].add_foreign(f"read by scaled_dot_product_attention in {self.where()}", cmap)


@contextlib.contextmanager
def _module_stack_hooks(tracer: _Tracer) -> Iterator[None]:
    pre = nn.modules.module.register_module_forward_pre_hook(lambda m, a: tracer.enter(m, a))
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
                if id(output) in tracer.tracked:  # e.g. an identity module: the tensor already has an owner
                    reads.add_foreign("its output is also another producer's output")
                    return
                tracer.track_output(output, name)
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
    for t in output_tensors(output):
        if id(t) in tracer.tracked:
            producer, cmap = tracer.tracked[id(t)]
            tracer.reads[producer].add_foreign("returned from the model as an output", cmap)
    return Dataflow(producers=tracer.reads, param_uses=dict(tracer.param_uses))
