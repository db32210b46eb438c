"""The maths of SmoothQuant: scales from statistics and weights, and folding ``s`` into consumer weights.

Everything is computed in fp32 whatever the model's dtype, and cast back to each parameter's dtype at the end.
"""

from __future__ import annotations

import torch

# Below this an activation or weight channel counts as all-zero: its scale is set to 1, because the
# channel cannot influence the output and any other value would only blow up the other side.
EPS = 1e-5


@torch.no_grad()
def channel_absmax(param: torch.Tensor, axis: int) -> torch.Tensor:
    """``max |param|`` over every axis but ``axis``, in fp32 (two reductions, no full-size temporary)."""
    dims = tuple(d for d in range(param.dim()) if d != axis)
    if not dims:
        return param.detach().abs().float()
    return torch.maximum(param.amax(dim=dims), param.amin(dim=dims).neg()).float()


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``, with 1 where either side is (almost) zero.

    Args:
        act_absmax: per-channel ``max |X_j|`` over the calibration data (fp32).
        weight_absmax: per-channel ``max_k max |W_k[:, j]|`` over all consumers (fp32).
        alpha: migration strength in [0, 1].

    Returns:
        fp32 scales, finite and strictly positive.
    """
    a = act_absmax.float()
    w = weight_absmax.float().to(a.device)
    dead = (a < EPS) | (w < EPS)
    s = a.clamp_min(EPS).pow(alpha) / w.clamp_min(EPS).pow(1.0 - alpha)
    return torch.where(dead | ~torch.isfinite(s) | (s <= 0), torch.ones_like(s), s)


@torch.no_grad()
def scale_input_channels(param: torch.Tensor, axis: int, scales: torch.Tensor, chunk_elems: int = 1 << 24) -> None:
    """Multiply ``param`` by ``scales`` along ``axis`` in place, computing in fp32.

    fp32 parameters are scaled with one in-place multiply; lower-precision ones are processed in slices of
    ``chunk_elems`` elements so the fp32 temporary stays small for large (e.g. fused expert) tensors.
    """
    shape = [1] * param.dim()
    shape[axis] = -1
    s = scales.to(device=param.device, dtype=torch.float32).view(shape)
    if param.dtype == torch.float32:
        param.mul_(s)
        return
    rows = max(1, chunk_elems // max(1, param[0].numel())) if param.dim() > 1 else param.shape[0]
    for start in range(0, param.shape[0], rows):
        piece = param[start : start + rows]
        s_piece = s if axis != 0 else s[start : start + rows]
        piece.copy_((piece.float() * s_piece).to(param.dtype))


def to_producer_channels(values: torch.Tensor, channel_map: tuple[int, ...] | None, channels: int) -> torch.Tensor:
    """Per-column maxima (``values[j]`` for column ``j``) as per-producer-channel maxima, via ``channel_map``.

    Several columns may read one channel (a key/value head shared by several query heads); a channel no
    column reads gets 0, which :func:`smoothing_scales` turns into a scale of 1.
    """
    if channel_map is None:
        return values
    index = torch.tensor(channel_map, device=values.device)
    return torch.zeros(channels, dtype=values.dtype, device=values.device).scatter_reduce(0, index, values, "amax")


def to_columns(scales: torch.Tensor, channel_map: tuple[int, ...] | None) -> torch.Tensor:
    """The scale each column sees: ``scales[channel_map[j]]`` (``scales`` itself for the identity)."""
    return scales if channel_map is None else scales[torch.tensor(channel_map, device=scales.device)]
