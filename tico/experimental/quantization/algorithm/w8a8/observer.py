"""Calibration statistics for W8A8: per-channel abs-max over all data plus a bounded uniform row sample.

The abs-max gives smoothing scales and abs-max static ranges exactly (``max_j max|X_j| / s_j``); the sample
lets convert choose error-minimising ranges and score alphas *after* smoothing, from the same single pass.
"""

from __future__ import annotations

from typing import Any

import torch

from tico.experimental.quantization.algorithm.smoothquant.observer import ChannelAbsMaxObserver


class SampledChannelObserver(ChannelAbsMaxObserver):
    """:class:`ChannelAbsMaxObserver` that also keeps a uniform sample of at most ``max_rows`` rows.

    Sampling without replacement over everything seen: each row gets a uniform random key and the rows with
    the largest keys are kept (a one-pass reservoir), so the sample does not depend on how data is batched.
    """

    def __init__(self, channels: int, max_rows: int, seed: int = 0) -> None:
        super().__init__(channels)
        self.max_rows = max_rows
        self.rows_sample: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: Any) -> None:
        before = self.calls
        super().observe(x)
        if self.calls == before or self.max_rows <= 0:  # rejected (bad shape) or empty
            return
        flat = x.detach().reshape(-1, self.channels)
        keys = torch.rand(flat.shape[0], generator=self._gen)
        if self.rows_sample is not None:
            keys = torch.cat([self._keys, keys])
            candidates = torch.cat([self.rows_sample, flat.to(self.rows_sample.device)])
        else:
            candidates = flat
        if keys.numel() > self.max_rows:
            keys, idx = torch.topk(keys, self.max_rows)
            candidates = candidates[idx.to(candidates.device)]
        self._keys = keys
        self.rows_sample = candidates.clone() if candidates is flat else candidates
