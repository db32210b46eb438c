"""Make a small pretrained Llama that vLLM can serve: the shared stories260K with its attention heads widened.

stories260K has head size 8, which vLLM's attention backends refuse (they take 32 and more; FlashInfer and some
others only 64/128/256). This script widens every head to ``--head-dim`` (32 or 128; default 128, which every
backend takes) without changing what the model computes, so the result is still the real pretrained model, with
the same tokenizer:

* query and key dims: old dim ``i`` of a head goes to new dim ``r*i`` and old dim ``i + d/2`` to ``r*i + D/2``
  (``r = D/d``). Rotary embeddings pair dim ``j`` with ``j + D/2`` at frequency ``theta**(-2j/D)``, so those new
  dims get exactly the old frequencies ``theta**(-2i/d)`` (the same binary fractions, hence the same floats);
  every other new dim is zero in both query and key, so it adds nothing to a score;
* the queries are multiplied by ``sqrt(D/d)`` (2 for 32, 4 for 128: exact in float), which cancels the smaller
  ``1/sqrt(D)`` attention scaling;
* value dims are padded with zeros, and ``o_proj`` reads zeros at the padded positions.

In real arithmetic the widened model's logits equal the original's; in float they differ only by the order of
the sums over the longer (zero-padded) dims. The script checks that on seeded token ids and refuses to save
otherwise. Nothing is random in the result: running it twice writes the same weights.

    python examples/make_servable_model.py --output out/stories260K-hd128
    python examples/make_servable_model.py --head-dim 32 --output out/stories260K-hd32
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_SOURCE = SHARED / "stories260K-hf"
HEAD_DIMS = (32, 128)  # D/d a power of 4 for d = 8: the query factor sqrt(D/d) is a power of 2, exact in float
TOLERANCE = 1e-4  # max |logit difference| / max |logit| accepted in float32 (sums in a different order only)


def _spread(weight: torch.Tensor, heads: int, old: int, new: int, rope: bool) -> torch.Tensor:
    """``[heads*old, in]`` projection rows -> ``[heads*new, in]``: old dims placed as described above, others 0."""
    w = weight.reshape(heads, old, -1)
    out = w.new_zeros(heads, new, w.shape[-1])
    if rope:
        r, half_old, half_new = new // old, old // 2, new // 2
        idx = torch.arange(half_old)
        out[:, r * idx] = w[:, idx]
        out[:, r * idx + half_new] = w[:, idx + half_old]
    else:
        out[:, :old] = w
    return out.reshape(heads * new, -1)


@torch.no_grad()
def widen_heads(model: torch.nn.Module, head_dim: int) -> torch.nn.Module:
    """A copy of the Llama ``model`` with every attention head widened to ``head_dim`` (outputs unchanged)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    old = config.head_dim
    ratio = head_dim // old
    if head_dim % old or head_dim <= old or math.isqrt(ratio) ** 2 != ratio or (old % 2):
        raise ValueError(f"head_dim {head_dim}: must be {old} times a power of 4 (got ratio {head_dim / old:g})")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{config.model_type}: only plain rotary embeddings (no rope_scaling, full rotary) are widened")
    wide_config = type(config).from_dict({**config.to_dict(), "head_dim": head_dim})
    wide = AutoModelForCausalLM.from_config(wide_config).to(next(model.parameters()).dtype).eval()
    state = dict(model.state_dict())
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        state[p + "q_proj.weight"] = _spread(state[p + "q_proj.weight"], q_heads, old, head_dim, True) * math.isqrt(ratio)
        state[p + "k_proj.weight"] = _spread(state[p + "k_proj.weight"], kv_heads, old, head_dim, True)
        state[p + "v_proj.weight"] = _spread(state[p + "v_proj.weight"], kv_heads, old, head_dim, False)
        o = state[p + "o_proj.weight"]  # [hidden, heads*old]: columns follow the value dims
        state[p + "o_proj.weight"] = _spread(o.T.contiguous(), q_heads, old, head_dim, False).T.contiguous()
        for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
            if p + name in state:
                raise ValueError(f"{p}{name}: attention biases are not widened by this script")
    wide.load_state_dict(state, strict=True)
    if getattr(wide_config, "tie_word_embeddings", False):
        wide.tie_weights()
    wide.generation_config = model.generation_config
    return wide


@torch.no_grad()
def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module, vocab: int, seed: int = 0) -> float:
    """max |logits_a - logits_b| / max |logits_b| on seeded random token ids (4 x 64)."""
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(seed))
    la, lb = a(ids).logits, b(ids).logits
    return float((la - lb).abs().max() / lb.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="Llama folder to widen (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, choices=HEAD_DIMS, default=128, help="new head size (default: %(default)s)")
    parser.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        print(f"error: --output {output} exists and is not empty", file=sys.stderr)
        return 2
    source = AutoModelForCausalLM.from_pretrained(args.source, attn_implementation="eager").eval()
    wide = widen_heads(source, args.head_dim)
    wide.config._attn_implementation = "eager"
    diff = max_relative_difference(wide, source, source.config.vocab_size)
    if diff > TOLERANCE:
        print(f"error: the widened model's logits differ by {diff:.2e} (relative) from {args.source}; nothing saved",
              file=sys.stderr)
        return 1
    wide.save_pretrained(output)
    AutoTokenizer.from_pretrained(args.source).save_pretrained(output)
    print(f"saved {output}: {args.source} with head size {source.config.head_dim} -> {args.head_dim}; "
          f"logits equal up to float rounding (max relative difference {diff:.1e} on seeded token ids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
