"""The int8 layers of a converted model under the names they take in a checkpoint."""

from __future__ import annotations

from torch import nn

from tico.experimental.quantization.export import transforms
from tico.experimental.quantization.nn.linear import W8A8Linear


def w8a8_layers(model: nn.Module) -> dict[str, W8A8Linear]:
    """Every int8 layer by its checkpoint name: the layer behind an exportable online rotation takes the rotation's
    name (``<name>.inner`` -> ``<name>``), so the checkpoint has the model's own module names."""
    online, _ = transforms.online_layers(model)
    inner = {id(m.inner): name for name, m in online.items()}
    return {inner.get(id(m), n): m for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
