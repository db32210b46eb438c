"""Compatibility: the observer now lives in :mod:`.scales` (statistics in, scales out).

Kept only for ``algorithm/w8a8/observer.py``'s import; delete once it imports from :mod:`.scales`.
"""

from tico.experimental.quantization.algorithm.smoothquant.scales import (  # noqa: F401
    ChannelAbsMaxObserver,
    channel_absmax_of,
    tensor_channel_absmax,
)
