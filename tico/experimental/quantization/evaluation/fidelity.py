"""How closely a (quantized) model reproduces its float reference, position by position.

Perplexity says how good a model is on a text; it can hide a quantized model that is as good on average
but different token by token. :func:`logit_fidelity` compares the two models' next-token distributions at
every position of the same inputs: the KL divergence KL(reference || model) (the information lost by
using the model in place of the reference), how often their greedy (top-1) tokens agree, and the largest
logit difference (which exposes a single broken channel or overflow that the averages would dilute).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tico.experimental.quantization.evaluation.perplexity import _model_device, model_logits
from tico.experimental.quantization.progress import track

__all__ = ["FidelityResult", "logit_fidelity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FidelityResult:
    """What :func:`logit_fidelity` measured over ``num_positions`` positions.

    ``kl`` is the mean over positions of KL(reference || model) in nats; ``max_kl`` its largest value at
    one position; ``top1_agreement`` the fraction of positions whose argmax tokens are equal;
    ``max_abs_logit_diff`` the largest absolute difference of any raw logit.
    """

    kl: float
    max_kl: float
    top1_agreement: float
    max_abs_logit_diff: float
    num_positions: int

    def __str__(self) -> str:
        return (
            f"KL {self.kl:.3e} (max {self.max_kl:.3e}), top-1 agreement {self.top1_agreement:.4%}, "
            f"max |logit diff| {self.max_abs_logit_diff:.3e} over {self.num_positions} positions"
        )


def _nanmax(a: float, b: float) -> float:
    """``max`` that keeps a NaN (plain ``max(0.0, nan)`` is 0.0 and would hide a broken model)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def logit_fidelity(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 4,
    progress: bool = False,
) -> FidelityResult:
    """Compare ``model``'s next-token distributions with ``reference``'s on the same ``input_ids``.

    Args:
        model: the model under test (e.g. the SmoothQuant/W8A8 model).
        reference: the model it should reproduce (e.g. the float original). The two may live on different
            devices and have different dtypes; each gets the same ids on its own device.
        input_ids: ``[n, seq_len]`` windows (e.g. from
            :func:`~tico.experimental.quantization.evaluation.data.token_windows`), or one ``[seq_len]``.
        batch_size: rows per forward; changes memory, not the result.
        progress: report each batch to the progress callback (see
            :mod:`~tico.experimental.quantization.progress`; the command line draws it).

    All positions are compared (every logit row, including the last one). Log-probabilities come from
    ``log_softmax`` in fp32 and sums are accumulated in float64. Both models run in eval mode under
    ``torch.no_grad()``, and their previous train/eval modes are restored.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point:
        raise TypeError("input_ids must be an integer tensor of token ids")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must have shape [n, seq_len] or [seq_len], got {list(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    input_ids = input_ids.long()
    model_device, ref_device = _model_device(model), _model_device(reference)

    kl_sum, max_kl, agree, max_diff, positions = 0.0, 0.0, 0, 0.0, 0
    modes = [(m, m.training) for m in (model, reference)]
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            starts = range(0, input_ids.size(0), batch_size)
            for start in track(starts, "fidelity") if progress else starts:
                x = input_ids[start : start + batch_size]
                got = model_logits(model, x.to(model_device))
                want = model_logits(reference, x.to(ref_device)).to(got.device)
                if got.shape != want.shape:
                    raise ValueError(
                        f"logit shapes differ: model {list(got.shape)}, reference {list(want.shape)}"
                    )
                got, want = got.float(), want.float()
                logp, logq = torch.log_softmax(got, dim=-1), torch.log_softmax(want, dim=-1)
                q = logq.exp()
                # q * (log q - log p), with 0 where q == 0 (so a -inf logit in the reference adds nothing)
                kl = torch.where(q > 0, q * (logq - logp), torch.zeros_like(q)).sum(dim=-1, dtype=torch.float64)
                kl_sum += float(kl.sum())
                max_kl = _nanmax(max_kl, float(kl.max()))
                agree += int((got.argmax(dim=-1) == want.argmax(dim=-1)).sum())
                max_diff = _nanmax(max_diff, float((got - want).abs().max()))
                positions += kl.numel()
    finally:
        for m, training in modes:
            m.train(training)

    result = FidelityResult(
        kl=kl_sum / positions,
        max_kl=max_kl,
        top1_agreement=agree / positions,
        max_abs_logit_diff=max_diff,
        num_positions=positions,
    )
    logger.info("%s", result)
    return result
