"""Evaluation of float and quantized causal LMs: text windows, perplexity and logit fidelity.

>>> from tico.experimental.quantization.evaluation import logit_fidelity, perplexity, read_text, token_windows
>>> text = read_text("../shared/data/wikitext-2/test.txt")                         # doctest: +SKIP
>>> perplexity(model, tokenizer, text, seq_len=2048).ppl                           # doctest: +SKIP
>>> windows = token_windows(tokenizer, text, seq_len=512, num_windows=16)          # doctest: +SKIP
>>> logit_fidelity(quantized_model, float_model, windows).kl                       # doctest: +SKIP

Every tool here tokenizes a text once, as one stream with one BOS at its start, and cuts windows from it,
so calibration, perplexity and fidelity all see the same tokens.
"""

from tico.experimental.quantization.evaluation.data import (
    bos_token_id,
    leading_bos,
    text_tokens_per_window,
    calibration_windows,
    cut_windows,
    read_text,
    token_windows,
    tokenize_text,
    window_picks,
    windows_outside,
    SELECTIONS,
)
from tico.experimental.quantization.evaluation.fidelity import FidelityResult, logit_fidelity
from tico.experimental.quantization.evaluation.perplexity import PerplexityResult, model_logits, perplexity

from tico.experimental.quantization.evaluation import data as _data

__all__ = [
    *_data.__all__,
    "PerplexityResult",
    "perplexity",
    "model_logits",
    "FidelityResult",
    "logit_fidelity",
]
