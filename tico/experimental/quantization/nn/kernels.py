"""int8 x int8 -> int32 matrix products: ``torch._int_mm``, oneDNN's prepacked u8 x s8 kernel, an exact fallback.

* :func:`int8_matmul`: ``torch._int_mm`` where it takes the shape/device (CPU any shape, CUDA with padding of
  small ``m``), else :func:`exact_int8_matmul`, which is exact on any device.
* :func:`onednn_int8_available`: whether oneDNN's fused int8 linear is present, exact and fast here (probed once).
* :func:`row_scale`, :func:`col_scale`: the epilogues that scale the accumulators (and add the bias) in one pass.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from tico.experimental.quantization.nn.qscheme import QMAX, QMIN_ACT

# Every partial sum of this many int8 x int8 products (|p| <= 128 * 127) stays below 2**24, so fp32 holds it exactly.
QMAX_PRODUCT = -QMIN_ACT * QMAX
EXACT_CHUNK = 1024
U8_ZERO_POINT = 128  # oneDNN's fast int8 kernels take u8 activations: q + 128, with zero point 128


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` accepts an ``[m, k] x [k, n]`` int8 product on ``device``.

    CPU takes any shape; CUDA needs ``m > 16`` and ``k``, ``n`` multiples of 8; other devices are not supported.
    """
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return m > 16 and k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0
    return False


def exact_int8_matmul(a: torch.Tensor, w: torch.Tensor, chunk: int = EXACT_CHUNK) -> torch.Tensor:
    """``a [m, k] @ w [n, k]^T`` of int8 tensors as exact int32, on any device, with fp32 matmuls.

    The reduction is split into ``chunk``-long pieces whose partial sums (at most ``chunk * 127 * 127 < 2**24``) are
    integers fp32 represents exactly, whatever the summation order (also under TF32/bf16 matmul modes: int8 values
    are exact there too); the pieces are added in int32.
    """
    if chunk * QMAX_PRODUCT >= 2**24:
        raise ValueError(f"chunk={chunk} is too long for exact fp32 partial sums (at most {(2**24 - 1) // QMAX_PRODUCT})")
    m, k = a.shape
    out = torch.zeros(m, w.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, k, chunk):
        part = a[:, start : start + chunk].float() @ w[:, start : start + chunk].float().t()
        out += part.to(torch.int32)
    return out


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a [m, k] @ w [n, k]^T`` for int8 ``a`` and ``w``, as int32 ``[m, n]``: ``torch._int_mm`` where supported.

    On CUDA, ``m <= 16`` is handled by padding ``a`` with zero rows; shapes or devices ``torch._int_mm`` cannot take
    go to :func:`exact_int8_matmul`.
    """
    m, k = a.shape
    n = w.shape[0]
    if a.device.type == "cuda" and m <= 16 and int_mm_supported(17, k, n, a.device):
        padded = F.pad(a, (0, 0, 0, 17 - m))
        return torch._int_mm(padded, w.t())[:m]
    if int_mm_supported(m, k, n, a.device):
        return torch._int_mm(a, w.t())
    return exact_int8_matmul(a, w)


def onednn_qlinear(
    u8: torch.Tensor,
    x_scale: float,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """oneDNN int8 linear: ``(u8 - 128) @ W^T * (x_scale * w_scale) + bias`` in ``out_dtype``."""
    return torch.ops.onednn.qlinear_pointwise(
        u8, x_scale, U8_ZERO_POINT, packed, w_scale, w_zero_point, bias, 1.0, 0, out_dtype, "none", [], ""
    )


def _onednn_ops_present() -> bool:
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and hasattr(torch.ops.onednn, "qlinear_prepack")
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


@functools.lru_cache(maxsize=None)
def onednn_int8_available() -> bool:
    """Whether oneDNN's fast int8 matmul runs here: ops present, a CPU with VNNI, exact and not a slow reference.

    Checked once per process on a small problem: the result must equal ``torch._int_mm`` bit for bit, and must
    not be far slower (a build/CPU where oneDNN falls back to its reference kernel is hundreds of times slower).
    """
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if not _onednn_ops_present() or vnni is None or not vnni():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (64, 512), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (256, 512), dtype=torch.int8, generator=gen)
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        ones, zp = torch.ones(256), torch.zeros(256, dtype=torch.long)
        u8 = a.view(torch.uint8) ^ U8_ZERO_POINT

        def onednn() -> torch.Tensor:
            return onednn_qlinear(u8, 1.0, packed, ones, zp, None, torch.float32)

        def int_mm() -> torch.Tensor:
            return torch._int_mm(a, w.t())

        if not torch.equal(onednn().to(torch.int32), int_mm()):
            return False
        times = {}
        for name, fn in (("onednn", onednn), ("int_mm", int_mm)):
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[name] = best
        return times["onednn"] < 10 * times["int_mm"] + 1e-3
    except Exception:  # noqa: BLE001 - any failure means: do not use it
        return False


# -- epilogues: the int32 (or fp32) accumulators scaled, plus the bias, in one pass ----------------------------


def row_scale(
    acc: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``acc * a_scale (+ bias)`` in one pass, written in ``out_dtype`` (in place when fp32)."""
    out = acc if out_dtype == torch.float32 else torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    if bias is None:
        return torch.mul(acc, a_scale, out=out)
    return torch.addcmul(bias, acc, a_scale, out=out)


def col_scale(
    acc: torch.Tensor, col: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, inplace: bool = False
) -> torch.Tensor:
    """``acc * col (+ bias)`` in one pass (``acc`` int32 or fp32), written in ``out_dtype``."""
    if inplace and out_dtype == torch.float32:
        out = acc
    else:
        out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    if bias is None:
        return torch.mul(acc, col, out=out)
    return torch.addcmul(bias, acc, col, out=out)
