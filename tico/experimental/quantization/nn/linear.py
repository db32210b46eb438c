"""``W8A8Linear``: a Linear layer that runs with int8 weights and int8 activations.

``y = dequant(int8(x / s) @ int8(W * s)^T) + b``: activations are quantized at run time (per token, or per tensor
with a static scale), multiplied with the int8 weight into int32 accumulators, and dequantized with the activation
scale (per row) times the weight scale (per output column). ``s`` is an optional SmoothQuant divisor applied
inside the activation quantizer (see :mod:`.qscheme`).

Backends:

* ``"int8"``: real integer arithmetic. On CPU the matmul runs, when available, in oneDNN's u8 x s8 kernel with a
  prepacked weight and the weight scales (and, for static activations, the activation scale and the bias) fused
  into its epilogue (``kernel="onednn"``); otherwise in ``torch._int_mm`` (``kernel="int_mm"``, also the CUDA
  path); where ``torch._int_mm`` does not support a shape or device, an exact fallback multiplies the integer
  values in fp32 chunks small enough that every partial sum is an exactly representable integer.
* ``"fake"``: the same integers, quantized and dequantized in floating point, then a float matmul. It agrees with
  ``"int8"`` up to float summation order.

Under ``torch.compile`` the forward takes the ``torch._int_mm`` path, built from plain tensor ops that inductor
fuses around the matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from tico.experimental.quantization.nn.kernels import (
    U8_ZERO_POINT,
    col_scale,
    int8_matmul,
    onednn_int8_available,
    onednn_qlinear,
    row_scale,
)
from tico.experimental.quantization.nn.qscheme import (
    ACT_GRANULARITIES,
    WEIGHT_GRANULARITIES,
    ActGranularity,
    WeightGranularity,
    check_granularity,
    check_smooth_scale,
    check_static_scale,
    dequantize,
    fake_quant_activation,
    fake_quant_static,
    multiplier_of,
    quantize_per_tensor,
    quantize_per_token,
    quantize_static,
    quantize_weight,
    static_multiplier,
)

Backend = Literal["int8", "fake"]
Kernel = Literal["auto", "onednn", "int_mm"]
BACKENDS: tuple[str, ...] = get_args(Backend)
KERNELS: tuple[str, ...] = get_args(Kernel)
BITS = 8


def _drop_runtime(module: "W8A8Linear", incompatible_keys: Any) -> None:
    module._rt = None


# -- the module -------------------------------------------------------------------------------------------------


@dataclass
class _Runtime:
    """What forward needs, derived from the buffers for one device (rebuilt when a buffer changes)."""

    key: tuple
    w_scale: torch.Tensor  # [out] fp32
    bias: torch.Tensor | None  # [out] fp32
    smooth: torch.Tensor | None  # [in] fp32
    act_scale: float | None
    multiplier: torch.Tensor | None  # static: [1] or [in] fp32
    static_dequant: torch.Tensor | None  # static: act_scale * w_scale, [out] fp32
    packed: torch.Tensor | None  # oneDNN prepacked weight (CPU, kernel "onednn")
    w_zero_point: torch.Tensor | None


_FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16)


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    """Identity and in-place-change counter of a buffer (inference tensors have no counter: 0)."""
    if t is None:
        return None
    return (t.data_ptr(), t.device, 0 if t.is_inference() else t._version)


class W8A8Linear(nn.Module):
    """Linear layer with int8 weights (per output channel or per tensor) and int8 activations.

    Activations are quantized dynamically per token, or statically per tensor with ``act_scale``; an optional
    per-input-channel smoothing divisor ``smooth_scale`` is applied inside the activation quantizer (the stored
    weight already carries it). Inputs of any leading shape ``[..., in_features]`` and any float dtype; the output
    has the input's dtype.

    State (what an exporter writes, e.g. as a compressed-tensors checkpoint):
        ``weight``: int8 ``[out, in]`` in ``[-127, 127]`` (the smoothing, if any, multiplied in).
        ``weight_scale``: fp32, ``[out, 1]`` per channel or ``[1]`` per tensor; ``W ~= weight * weight_scale``.
        ``bias``: ``[out]`` in the original dtype, or ``None``.
        ``act_scale``: fp32 ``[]`` static activation scale (``None`` for per-token).
        ``smooth_scale``: fp32 ``[in]`` divisor applied to the input before quantization, or ``None``.
    See :meth:`quantization_state`. Scale buffers stay fp32 when the module is cast to another dtype.

    With the oneDNN kernel, the first CPU forward also caches a prepacked copy of the int8 weight (not saved,
    not copied; rebuilt when a buffer changes), so the layer holds its weight twice in int8: half of fp32.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    act_scale: torch.Tensor | None
    smooth_scale: torch.Tensor | None
    # Set when the layer replaces one that stores its weight as [in, out] (GPT-2's Conv1D): that model's
    # checkpoints keep that layout, which its loaders expect (vLLM's transposes it), so an exporter writes it so.
    weight_stored_transposed: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_granularity: WeightGranularity = "per_channel",
        act_granularity: ActGranularity = "per_token",
        act_scale: float | torch.Tensor | None = None,
        smooth: bool = False,
        backend: Backend = "int8",
        kernel: Kernel = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """An empty (all-zero weight) layer to load a state dict into; use :meth:`from_linear` to quantize one.

        Args:
            bias: whether the layer has a bias (stored in ``dtype``).
            weight_granularity: ``"per_channel"`` (one scale per output feature) or ``"per_tensor"``.
            act_granularity: ``"per_token"`` (dynamic) or ``"per_tensor"`` (static, needs ``act_scale``).
            act_scale: the static fp32 activation scale (range / 127); only with ``"per_tensor"``.
            smooth: whether the layer has a ``smooth_scale`` buffer (ones until loaded).
            backend: ``"int8"`` (integer kernels) or ``"fake"`` (float simulation of the same integers).
            kernel: CPU int8 matmul: ``"auto"`` (oneDNN where it is fast and exact, else ``torch._int_mm``),
                ``"onednn"`` or ``"int_mm"``.
        """
        super().__init__()
        self.weight_granularity = check_granularity(weight_granularity, WEIGHT_GRANULARITIES, "weight_granularity")
        self.act_granularity = check_granularity(act_granularity, ACT_GRANULARITIES, "act_granularity")
        self.backend = check_granularity(backend, BACKENDS, "backend")
        self.kernel = check_granularity(kernel, KERNELS, "kernel")
        if kernel == "onednn" and not onednn_int8_available():
            raise ValueError("kernel='onednn': oneDNN's int8 matmul is not available (or not fast) on this machine")
        if act_granularity == "per_tensor":
            act_value = check_static_scale(act_scale)
        elif act_scale is not None:
            raise ValueError("act_scale is only used with act_granularity='per_tensor' (static activations)")
        self.in_features = in_features
        self.out_features = out_features
        factory: dict[str, Any] = {"device": device}
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, **factory))
        w_shape = (out_features, 1) if weight_granularity == "per_channel" else (1,)
        self.register_buffer("weight_scale", torch.ones(w_shape, dtype=torch.float32, **factory))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **factory) if bias else None)
        self.register_buffer(
            "act_scale",
            torch.tensor(act_value, dtype=torch.float32, **factory) if act_granularity == "per_tensor" else None,
        )
        smooth_init = torch.ones(in_features, dtype=torch.float32, **factory) if smooth else None
        self.register_buffer("smooth_scale", smooth_init)
        self._rt: _Runtime | None = None
        self.register_load_state_dict_post_hook(_drop_runtime)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        weight_granularity: WeightGranularity = "per_channel",
        act_granularity: ActGranularity = "per_token",
        act_scale: float | torch.Tensor | None = None,
        smooth_scale: torch.Tensor | None = None,
        backend: Backend = "int8",
        kernel: Kernel = "auto",
    ) -> "W8A8Linear":
        """Quantize ``linear`` (left unchanged).

        Args:
            linear: the float layer, ``y = x W^T + b``.
            weight_granularity: ``"per_channel"`` or ``"per_tensor"`` weight scales.
            act_granularity: ``"per_token"`` (dynamic) or ``"per_tensor"`` (static).
            act_scale: static activation scale (calibrated range / 127) of the quantized input, i.e. of
                ``x / smooth_scale``; required for, and only allowed with, ``"per_tensor"``.
            smooth_scale: optional ``[in]`` positive divisor ``s``: the layer computes ``quant(x / s)`` and
                quantizes ``W * s``, so its float output equals the original's.
            backend: ``"int8"`` or ``"fake"``.
            kernel: CPU int8 matmul kernel, see ``__init__``.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if smooth_scale is not None:
            check_smooth_scale(smooth_scale, linear.in_features)
            smooth_scale = smooth_scale.detach().to(device=weight.device, dtype=torch.float32)
            weight = weight.float() * smooth_scale
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_granularity=weight_granularity,
            act_granularity=act_granularity,
            act_scale=act_scale,
            smooth=smooth_scale is not None,
            backend=backend,
            kernel=kernel,
            dtype=linear.weight.dtype,
            device=weight.device,
        )
        q, scale = quantize_weight(weight, weight_granularity)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        if smooth_scale is not None:
            module.smooth_scale.copy_(smooth_scale)
        return module

    # -- export -------------------------------------------------------------------------------------------------
    def quantization_state(self) -> dict[str, Any]:
        """Everything an exporter needs: tensors (on their device) and the scheme.

        Keys: ``weight`` (int8 ``[out, in]``), ``weight_scale`` (fp32 ``[out, 1]`` or ``[1]``), ``bias``,
        ``input_scale`` (fp32 ``[1]`` static scale, or ``None`` when dynamic), ``smooth_scale`` (``[in]`` or
        ``None``: a compressed-tensors runtime does not apply it, so an exporter must fold it into the producer
        of the input or refuse), ``weight_stored_transposed`` (checkpoints of the replaced layer hold the weight
        as ``[in, out]``), and ``weight_granularity``, ``act_granularity``, ``dynamic``, ``symmetric``, ``bits``.
        """
        return {
            "weight": self.weight,
            "weight_stored_transposed": self.weight_stored_transposed,
            "weight_scale": self.weight_scale,
            "bias": self.bias,
            "input_scale": None if self.act_scale is None else self.act_scale.reshape(1),
            "smooth_scale": self.smooth_scale,
            "weight_granularity": self.weight_granularity,
            "act_granularity": self.act_granularity,
            "dynamic": self.act_granularity == "per_token",
            "symmetric": True,
            "bits": BITS,
        }

    def extra_repr(self) -> str:
        acts = "per_token (dynamic)" if self.act_granularity == "per_token" else "per_tensor (static"
        if self.act_scale is not None:
            acts += f", scale={float(self.act_scale):.4g})"
        backend = self.backend
        if backend == "int8":
            backend += f", kernel={self.active_kernel()}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int{BITS} {self.weight_granularity}, act=int{BITS} {acts}, "
            f"smooth={'in quantizer' if self.smooth_scale is not None else 'none'}, backend={backend}"
        )

    def active_kernel(self, device: torch.device | None = None) -> str:
        """The matmul kernel eager int8 forward uses on ``device`` (default: the weight's)."""
        device = self.weight.device if device is None else device
        if device.type == "cpu" and self.kernel != "int_mm" and onednn_int8_available():
            return "onednn"
        return "int_mm"

    # -- dtype/device moves keep the scales in fp32; caches are not copied --------------------------------------
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        fp32 = {
            name: buf
            for name in ("weight_scale", "act_scale", "smooth_scale")
            if (buf := self._buffers.get(name)) is not None
        }
        result = super()._apply(fn, recurse)
        for name, old in fp32.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        self._rt = None
        return result

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rt"] = None  # oneDNN packed weights are not copyable/picklable; rebuilt on first use
        return state

    # -- forward ------------------------------------------------------------------------------------------------
    def _runtime(self, device: torch.device) -> _Runtime:
        bufs = (self.weight, self.weight_scale, self.bias, self.act_scale, self.smooth_scale)
        key = (device, self.kernel, *(_tensor_key(b) for b in bufs))
        rt = self._rt
        if rt is not None and rt.key == key:
            return rt
        with torch.no_grad():
            w_scale = self.weight_scale.to(device=device, dtype=torch.float32).reshape(-1)
            w_scale = w_scale.expand(self.out_features).contiguous()
            bias = None if self.bias is None else self.bias.to(device=device, dtype=torch.float32)
            smooth = None if self.smooth_scale is None else self.smooth_scale.to(device=device, dtype=torch.float32)
            act_scale = multiplier = static_dequant = None
            if self.act_scale is not None:
                act_scale = float(self.act_scale)
                multiplier = static_multiplier(act_scale, smooth).to(device)
                static_dequant = w_scale * act_scale
            packed = w_zero_point = None
            if self.backend == "int8" and self.active_kernel(device) == "onednn":
                packed = torch.ops.onednn.qlinear_prepack(self.weight.to(device), None)
                w_zero_point = torch.zeros(self.out_features, dtype=torch.long, device=device)
        rt = _Runtime(key, w_scale, bias, smooth, act_scale, multiplier, static_dequant, packed, w_zero_point)
        self._rt = rt
        return rt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features in the last dim, got {list(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():
            out = self._forward_traceable(x2)
        elif self.backend == "fake":
            out = self._forward_fake(x2)
        else:
            out = self._forward_int8(x2)
        return out.reshape(*lead, self.out_features)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 activations and their fp32 scale that forward feeds the int8 matmul (either backend's integers).

        Returns ``(q, scale)``: int8 ``[rows, in]`` (``x`` flattened to rows) and ``[rows, 1]`` (per token) or
        ``[]`` (per tensor), with ``x / smooth_scale ~= q * scale``.
        """
        x2 = x.reshape(-1, self.in_features)
        rt = self._runtime(x2.device)
        if rt.act_scale is None:
            return quantize_per_token(x2, rt.smooth)
        q = quantize_per_tensor(x2, rt.act_scale, multiplier=rt.multiplier)
        return q, torch.tensor(rt.act_scale, dtype=torch.float32, device=x2.device)

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype if x.dtype in _FLOAT_OUT else torch.float32

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()  # int8 rounding has no gradient, and out= kernels refuse inputs with a graph (no no_grad())
        rt = self._runtime(x.device)
        out_dtype = self._out_dtype(x)
        if rt.act_scale is None:
            q, a_scale = quantize_per_token(x, rt.smooth)
        else:
            q = quantize_per_tensor(x, rt.act_scale, multiplier=rt.multiplier)
        if rt.packed is not None:
            u8 = q.view(torch.uint8).bitwise_xor_(U8_ZERO_POINT)  # q + 128, in place
            if rt.act_scale is not None:  # everything fused: scales, bias, output dtype
                return onednn_qlinear(u8, rt.act_scale, rt.packed, rt.w_scale, rt.w_zero_point, rt.bias, out_dtype)
            acc = onednn_qlinear(u8, 1.0, rt.packed, rt.w_scale, rt.w_zero_point, None, torch.float32)
            return row_scale(acc, a_scale, rt.bias, out_dtype)
        y = int8_matmul(q, self.weight if self.weight.device == x.device else self.weight.to(x.device))
        if rt.act_scale is not None:
            return col_scale(y, rt.static_dequant, rt.bias, out_dtype)
        acc = torch.mul(y, a_scale)  # int32 * fp32 -> fp32 in one pass
        return col_scale(acc, rt.w_scale, rt.bias, out_dtype, inplace=True)

    def _forward_fake(self, x: torch.Tensor) -> torch.Tensor:
        rt = self._runtime(x.device)
        xq = fake_quant_activation(x, self.act_granularity, scale=rt.act_scale, smooth_scale=rt.smooth)
        w = dequantize(self.weight.to(x.device), self.weight_scale.to(x.device))
        return F.linear(xq, w, rt.bias).to(self._out_dtype(x))

    def _forward_traceable(self, x: torch.Tensor) -> torch.Tensor:
        """Plain tensor ops on the buffers (no caches), for ``torch.compile``: inductor fuses quant and dequant."""
        smooth = self.smooth_scale
        w_scale = self.weight_scale.reshape(-1).float()
        bias = None if self.bias is None else self.bias.float()
        if self.backend == "fake":
            if self.act_scale is None:
                xq = fake_quant_activation(x, "per_token", smooth_scale=smooth)
            else:
                xq = fake_quant_static(x, multiplier_of(self.act_scale, smooth), self.act_scale)
            w = self.weight.float() * self.weight_scale
            return F.linear(xq, w, bias).to(self._out_dtype(x))
        if self.act_scale is None:
            q, a_scale = quantize_per_token(x, smooth)
            out = int8_matmul(q, self.weight) * a_scale * w_scale
        else:
            q = quantize_static(x, multiplier_of(self.act_scale, smooth))
            out = int8_matmul(q, self.weight) * (w_scale * self.act_scale)
        if bias is not None:
            out = out + bias
        return out.to(self._out_dtype(x))
