"""The one block finder: which ``nn.ModuleList`` holds a model's decoder blocks.

The streamed pipeline quantizes one block at a time and the block objective scores whole blocks; both ask here.
"""

from __future__ import annotations

from torch import nn

BLOCKS_ATTR = "tico_decoder_blocks"  # set on a one-block unit by the pipeline: the blocks it stands for


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: ``path`` if given, else the ``nn.ModuleList`` of same-class modules holding the most
    parameters (Llama ``model.layers``, GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, ...)."""
    if path is not None:
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{type(model).__name__}.{path} is a {type(blocks).__name__}, not the nn.ModuleList of blocks")
        return path, blocks
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder blocks; pass blocks='path.to.list'")
    return best[1], best[2]


def decoder_blocks(model: nn.Module) -> list[str]:
    """Dotted names of ``model``'s decoder blocks: ``model.tico_decoder_blocks`` if set (one block in the pipeline),
    else the ``nn.ModuleList`` of same-class modules holding the most parameters (as the pipeline finds them);
    ``[]`` when there is none."""
    named = getattr(model, BLOCKS_ATTR, None)
    if named is not None:
        return list(named)
    try:
        path, blocks = find_blocks(model)
    except ValueError:
        return []
    return [f"{path}.{i}".lstrip(".") for i in range(len(blocks))]


def block_of(model: nn.Module, name: str) -> str | None:
    """The repeated block containing module ``name``: the longest prefix whose parent is an ``nn.ModuleList``."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[: end - 1])
        try:
            if isinstance(model.get_submodule(parent), nn.ModuleList):
                return ".".join(parts[:end])
        except AttributeError:
            continue
    return None
