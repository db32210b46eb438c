"""One row of numbers comparing a (quantized) model with its float reference on the same windows.

Causal LMs get perplexity, mean KL(float || model) and top-1 agreement; encoders (which have no next-token
distribution) get the cosine similarity of mean-pooled embeddings and the relative error of the last hidden
state. ``tico-sq demo`` prints one such row per recipe.
"""

from __future__ import annotations

import torch

from tico.experimental.quantization.progress import track

__all__ = ["compare_to_reference"]


@torch.no_grad()
def compare_to_reference(model: torch.nn.Module, reference: torch.nn.Module, windows: torch.Tensor, causal_lm: bool) -> dict[str, float]:
    """``{"ppl", "kl", "top1"}`` for a causal LM, ``{"cos", "rel_err"}`` for an encoder, on ``windows`` ``[n, seq_len]``."""
    from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
    from tico.experimental.quantization.evaluation.perplexity import perplexity

    if causal_lm:
        fid = logit_fidelity(model, reference, windows)
        ppl = perplexity(model, None, windows.reshape(-1), seq_len=windows.shape[1]).ppl
        return {"ppl": ppl, "kl": fid.kl, "top1": fid.top1_agreement}
    num = den = 0.0
    cos_sum = 0.0
    for batch in track(windows.split(4), "scoring"):
        a, b = model(batch).last_hidden_state.float(), reference(batch).last_hidden_state.float()
        cos_sum += float(torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1), dim=-1).sum())
        num += float((a - b).pow(2).sum())
        den += float(b.pow(2).sum())
    return {"cos": cos_sum / windows.size(0), "rel_err": (num / den) ** 0.5}
