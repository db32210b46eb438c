"""``W8A8Config.quantize_embeddings``: the input embedding as int8 rows, and a head tied to it reading them."""

from __future__ import annotations

from torch import nn

from tico.experimental.quantization.algorithm.w8a8.report import W8A8Report
from tico.experimental.quantization.nn.embedding import Int8Embedding, Int8TiedHead


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The model's input embedding; raises (naming what it is instead) unless it is an ``nn.Embedding``."""
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):  # transformers' default for models without one
        embedding = None
    if not isinstance(embedding, nn.Embedding):
        what = "none (no get_input_embeddings())" if embedding is None else f"{type(embedding).__name__}"
        raise ValueError(
            f"W8A8Config.quantize_embeddings: {type(model).__name__}'s input embedding is {what}, "
            "not an nn.Embedding; leave quantize_embeddings off"
        )
    return embedding


def plan_embeddings(
    model: nn.Module, layers: dict[str, nn.Module], report: W8A8Report
) -> list[tuple[nn.Module, str, nn.Module]]:
    """int8 rows for the input embedding; a head tied to it (and not quantized as a layer) reads the same rows.
    Returns the ``(parent, child name, new module)`` swaps; ``report`` says what they are."""
    embedding = input_embedding(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    q = Int8Embedding(embedding)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}".lstrip(".")
            if child is embedding:
                swaps.append((module, child_name, q))
            elif tied and child is head and full not in layers:
                swaps.append((module, child_name, Int8TiedHead(q, head.bias)))  # type: ignore[union-attr]
                report.kept_float.pop(full, None)
    tied = tied and any(isinstance(new, Int8TiedHead) for _, _, new in swaps)
    report.quantized.append("input embedding (int8 rows, weight-only)" + (" + tied LM head" if tied else ""))
    return swaps
