"""Perplexity of a causal LM on a text, by the standard protocols, so float and quantized runs compare.

Two protocols, both on the text tokenized once as one stream with one BOS at the start
(see :mod:`~tico.experimental.quantization.evaluation.data`):

- ``stride=None`` — **disjoint windows** (the GPTQ / SmoothQuant evaluation): the stream is cut into
  adjacent windows of ``seq_len`` tokens, the incomplete tail is left out, and every window is scored on
  its tokens 1..seq_len-1 (token 0 of a window has no context inside it, so it is not scored). Each token
  is scored at most once.
- ``stride=s`` with ``s <= seq_len`` — the **Hugging Face sliding window**
  (https://huggingface.co/docs/transformers/perplexity): windows start every ``s`` tokens, each scores
  only the tokens the previous window did not score, and the rest of it is context. With
  ``stride < seq_len`` every token but the first of the stream is scored exactly once (with
  ``stride == seq_len`` the first token of each window is unscored, as with disjoint windows). The last
  (possibly shorter) window ends at the end of the stream, so no tail is dropped. Smaller strides give
  each scored token more context, hence a lower perplexity, at ``seq_len / stride`` times the cost.

The result is the exact token-weighted mean NLL (summed in float64 over all scored tokens, not a mean of
per-window means), from fp32 log-probabilities even for fp16/bf16 models.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tico.experimental.quantization.evaluation.data import _as_stream, token_windows, tokenize_text
from tico.experimental.quantization.progress import track

__all__ = ["PerplexityResult", "perplexity", "model_logits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured.

    ``ppl`` is ``exp(nll)``; ``nll`` is the mean negative log-likelihood per scored token, in nats;
    ``num_tokens`` is the number of scored tokens, ``num_windows`` the number of model forwards (rows);
    ``stride`` is ``None`` for disjoint windows.
    """

    ppl: float
    nll: float
    num_tokens: int
    num_windows: int
    seq_len: int
    stride: int | None

    def __str__(self) -> str:
        mode = "disjoint" if self.stride is None else f"stride {self.stride}"
        return (
            f"perplexity {self.ppl:.4f} (nll {self.nll:.6f}) over {self.num_tokens} tokens in "
            f"{self.num_windows} windows of {self.seq_len} ({mode})"
        )


def model_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of ``model`` for ``input_ids``, in the model's own dtype.

    Hugging Face models are called with ``use_cache=False`` (a KV cache is useless for one full forward
    and costs memory); any other module is called with the ids alone and may return a tensor, a tuple
    whose first element is the logits, or an object/dict with ``logits``.
    """
    from transformers import PreTrainedModel  # local: keeps importing this module light

    if isinstance(model, PreTrainedModel):
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot find logits in the output of {type(model).__name__} ({type(out).__name__})")
    return logits


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the first parameter (the embedding for dispatched HF models)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab_size(model: torch.nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None


def _plan(num_tokens: int, seq_len: int, stride: int | None) -> list[tuple[int, int, int]]:
    """Windows as ``(begin, end, score_from)`` token positions; tokens ``score_from..end-1`` are scored."""
    if stride is None:
        return [(b, b + seq_len, b + 1) for b in range(0, num_tokens - seq_len + 1, seq_len)]
    plan, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        score_from = max(prev_end, begin + 1)  # the first token of the stream has no context at all
        if score_from < end:
            plan.append((begin, end, score_from))
        prev_end = end
        if end == num_tokens:
            break
    return plan


def _batches(plan: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of the same length and scored span, at most ``batch_size`` to a batch."""
    batches: list[list[tuple[int, int, int]]] = []
    for w in plan:
        shape = (w[1] - w[0], w[2] - w[0])
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][2] - last[0][0]) == shape:
            last.append(w)
        else:
            batches.append([w])
    return batches


def _check_sizes(model: torch.nn.Module, seq_len: int, stride: int | None, max_windows: int | None,
                 batch_size: int) -> None:
    """The window sizes are valid and fit the model's positions (ValueError naming the value otherwise)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one context token and one scored token), got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be None (disjoint windows) or in [1, seq_len={seq_len}], got {stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_pos = _max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's {max_pos} positions (config.max_position_embeddings); "
            f"pass seq_len <= {max_pos}"
        )


def _score(model: torch.nn.Module, ids: torch.Tensor, batches: list, device: torch.device,
           progress: bool) -> tuple[float, int]:
    """Summed NLL (fp64) and the number of scored tokens over ``batches`` of planned windows, in eval mode
    without gradients; the model's train/eval mode is restored."""
    nll_sum, num_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in track(batches, "perplexity") if progress else batches:
                begin0, end0, from0 = batch[0]
                offset = from0 - begin0  # first scored position inside each window of this batch
                x = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
                logits = model_logits(model, x)
                # Position t predicts token t+1: keep only the positions whose next token is scored, then
                # upcast, so a fp16/bf16 model's loss is still computed in fp32.
                logits = logits[:, offset - 1 : end0 - begin0 - 1].float()
                target = x[:, offset:].to(logits.device)
                nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
                nll_sum += float(nll.sum(dtype=torch.float64))
                num_tokens += target.numel()
    finally:
        model.train(was_training)
    return nll_sum, num_tokens


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | torch.Tensor,
    seq_len: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    add_bos: bool = True,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the two protocols).

    Args:
        model: a causal LM (a Hugging Face ``*ForCausalLM`` or any module mapping ids to logits).
        tokenizer: tokenizes ``text``; unused (may be ``None``) when ``text`` is already token ids.
        text: the whole evaluation text, or its token stream as a ``[N]`` / ``[1, N]`` LongTensor
            (then no BOS is added: include it yourself, e.g. with
            :func:`~tico.experimental.quantization.evaluation.data.tokenize_text`).
        seq_len: tokens per window (2048 is the usual figure for LLMs; it must fit the model's
            ``max_position_embeddings``, which is checked where the config says).
        stride: ``None`` for disjoint windows, or ``1 <= stride <= seq_len`` for the sliding window.
        max_windows: score only the first this many windows (a fast, still exact, partial figure).
        batch_size: windows per forward; it changes speed and memory, not the result (beyond float
            rounding in the model's batched kernels).
        device: where the input ids are placed; default the device of the model's first parameter.
            The model itself is not moved.
        add_bos: begin windows as the tokenizer begins a text (its BOS, if it adds one): every window for
            disjoint windows (``stride=None``, :func:`~...evaluation.data.token_windows`: the BOS and
            ``seq_len - 1`` text tokens), once at the start of the text for the sliding window.
        progress: report each batch of windows to the progress callback (see
            :mod:`~tico.experimental.quantization.progress`; the command line draws it).

    The model is run in eval mode under ``torch.no_grad()``; its previous train/eval mode is restored.
    Raises :class:`ValueError` for a text too short for one window, for invalid sizes, and for token ids
    outside the model's vocabulary (usually a tokenizer that does not belong to the model).
    """
    _check_sizes(model, seq_len, stride, max_windows, batch_size)
    if isinstance(text, torch.Tensor):
        ids = _as_stream(text)
    elif tokenizer is None:
        raise ValueError("a tokenizer is needed to score text; pass one, or pass token ids instead of text")
    else:
        ids = token_windows(tokenizer, text, seq_len, add_bos=add_bos).reshape(-1) if stride is None \
            else tokenize_text(tokenizer, text, add_bos=add_bos)
    n = ids.numel()
    vocab = _vocab_size(model)
    if n and vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(
            f"token id {int(ids.max())} is outside the model's vocabulary of {vocab}: "
            "is the tokenizer the model's own?"
        )

    plan = _plan(n, seq_len, stride)
    if not plan:
        need = seq_len if stride is None else 2
        raise ValueError(f"text too short: {n} tokens, but one window needs {need} (seq_len={seq_len})")
    if stride is None and n % seq_len:
        logger.debug("the last %d tokens do not fill a window of %d and are not scored", n % seq_len, seq_len)
    if max_windows is not None:
        plan = plan[:max_windows]
    device = _model_device(model) if device is None else torch.device(device)

    nll_sum, num_tokens = _score(model, ids, _batches(plan, batch_size), device, progress)
    mean = nll_sum / num_tokens
    ppl = math.exp(mean) if mean < 700 else math.inf
    if not math.isfinite(mean):
        logger.warning("perplexity is not finite (mean nll %s): the model produced inf/nan logits", mean)
    result = PerplexityResult(
        ppl=ppl, nll=mean, num_tokens=num_tokens, num_windows=len(plan), seq_len=seq_len, stride=stride
    )
    logger.info("%s", result)
    return result
