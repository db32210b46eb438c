"""The source checkpoint: its safetensors shards, a model skeleton without weights, and loading one part of it.

The skeleton is built on the meta device (no memory for weights); only the non-persistent buffers that a
model computes in ``__init__`` (rotary frequencies, embedding scales) are made real again through the model's
own ``_init_weights``, as ``from_pretrained`` does. A part of the model (one decoder block, or everything but
the blocks) is then loaded from the shards through transformers' own key conversions (renamed keys, per-expert
tensors fused into 3-D expert weights), and released back to meta when done.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tico.experimental.quantization.export.shards import read_tensors, safetensors_files
from tico.experimental.quantization.progress import quiet_transformers

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]  # weights + config + tokenizer


def resolve_checkpoint(model_dir_or_id: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (safetensors and configs only)."""
    path = Path(model_dir_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file: give the checkpoint's folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_dir_or_id), allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; name the id and the cause
        raise FileNotFoundError(f"{model_dir_or_id}: not a local folder, and the hub download failed ({type(exc).__name__}: {exc})") from exc


def _floating_dtype(files: dict[str, Path], prefer: str) -> torch.dtype:
    """The checkpoint's float dtype, read from the shard headers (a block weight's, if any)."""
    from safetensors import safe_open

    names = sorted(files, key=lambda n: (not n.startswith(prefer), n))
    for name in names:
        with safe_open(str(files[name]), "pt") as f:
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
        if dtype is not None:
            return dtype
    return torch.float32


class Checkpoint:
    """A safetensors checkpoint folder and the weight-less model built from its ``config.json``."""

    def __init__(self, folder: Path, attn_implementation: str | None = None) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = folder
        self.files = safetensors_files(folder)  # refuses pickle-only folders
        self.config = AutoConfig.from_pretrained(folder)
        self.dtype = _floating_dtype(self.files, prefer="")
        kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype, **kwargs)
        self.model = model.eval()
        self._materialize_computed_buffers()

    def _materialize_computed_buffers(self) -> None:
        owners = []
        for name, module in self.model.named_modules():
            for key, buf in list(module._buffers.items()):
                if buf is not None and buf.is_meta:
                    module._buffers[key] = torch.empty_like(buf, device="cpu")
                    owners.append(module)
        for module in dict.fromkeys(owners):
            self.model._init_weights(module)

    # -- which keys belong where ---------------------------------------------------------------------------
    def keys_under(self, prefix: str) -> list[str]:
        """Checkpoint keys of the module at ``prefix`` (also in checkpoints saved without the base prefix)."""
        base = getattr(self.model, "base_model_prefix", "")
        short = prefix[len(base) + 1:] if base and prefix.startswith(base + ".") else None
        return [k for k in self.files if k.startswith(prefix + ".") or (short is not None and k.startswith(short + "."))]

    # -- loading and releasing -----------------------------------------------------------------------------
    def load(self, names: list[str], expected: list[str], into: nn.Module | None = None) -> None:
        """Load checkpoint tensors ``names`` into the skeleton (on the CPU), or into ``into`` (a copy of it);
        every state-dict entry in ``expected`` must then be real, else an error names what the checkpoint lacks."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        model = self.model if into is None else into
        tensors = dict(read_tensors(self.files, names))
        with quiet_transformers():
            convert_and_load_state_dict_in_model(
                model, tensors,
                LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=self.dtype),
            )
        del tensors
        if getattr(self.config, "tie_word_embeddings", False):
            model.tie_weights()
        state = model.state_dict(keep_vars=True)
        missing = [n for n in expected if state[n].is_meta]
        if missing:
            raise ValueError(f"{self.folder}: the checkpoint has no tensor for {missing[:5]} ({len(missing)} missing)")
        for t in state.values():
            if isinstance(t, nn.Parameter):
                t.requires_grad_(False)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Free a part's weights (back to meta); the skeleton keeps its shape."""
        module.to("meta")
