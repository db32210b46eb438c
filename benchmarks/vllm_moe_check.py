"""vLLM serves the W8A8 checkpoints of MoE models (Mixtral, Qwen2-MoE) that ``tico-sq quantize`` writes (issue 16).

A tiny random Mixtral or Qwen2-MoE (hidden 128, 4 heads of 32: a head size vLLM's CPU attention runs; 2 layers,
4 experts, the stories260K vocabulary) is saved as a source checkpoint (per-expert tensors, as released ones are),
quantized by the streamed pipeline (``w8a8-static`` and ``w8a8-dynamic``) and served by vLLM's offline API; its
prompt log-probs and greedy tokens are compared with ``load_compressed`` (``vllm_check.compare``). A checkpoint
vLLM cannot load is reported with vLLM's own error.

    python benchmarks/vllm_moe_check.py --vllm-python ../vllm-venv/bin/python --model mixtral
    python benchmarks/vllm_moe_check.py --vllm-python ../vllm-venv/bin/python --model qwen2_moe --ignore 're:.*shared_expert_gate$'
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import vllm_check as V

COMMON = dict(vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, initializer_range=0.1)


def build(kind: str):
    """The tiny random MoE model, its LM head scaled to logits of a trained model's spread (as ``vllm_check``)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=256, num_local_experts=4, num_experts_per_tok=2, **COMMON))
    else:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                                                   shared_expert_intermediate_size=256, num_experts_per_tok=2, **COMMON))
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0 / (0.1 * COMMON["hidden_size"] ** 0.5))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from tico.experimental.quantization.pipeline.stream import quantize_checkpoint
    from tico.experimental.quantization.run.schemes import build_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--model", choices=["mixtral", "qwen2_moe"], default="mixtral")
    parser.add_argument("--ignore", action="append", default=[], help="modules kept in float (tico-sq --ignore)")
    args = parser.parse_args(argv)
    stories = V.SHARED / "stories260K-hf"
    calib, prompts = V.calibration_and_prompts(AutoTokenizer.from_pretrained(stories), 8, 64, 2, 24)
    work = Path(tempfile.mkdtemp(prefix="vllm-moe-"))
    src = work / "src"
    build(args.model).save_pretrained(src)
    dirs = {}
    for scheme in ("static", "dynamic"):
        dirs[scheme] = work / scheme
        quantize_checkpoint(src, build_config(f"w8a8-{scheme}", ignore=args.ignore), list(calib.split(4)), dirs[scheme])
        V.copy_tokenizer(stories, dirs[scheme])
    result = V.run_vllm(args.vllm_python, dirs, prompts, 8, "float32", work, server_for=())
    print(f"{args.model}, ignore {args.ignore or 'none'}: vLLM offline against load_compressed, 2 prompts of 24 tokens\n")
    print("| scheme | max abs dlogprob | greedy identical | vLLM kernels / error |\n|---|---|---|---|")
    for scheme, path in dirs.items():
        theirs = result[scheme].get("offline", {})
        if "error" in theirs:
            print(f"| {scheme} | - | - | load failed: {theirs.get('cause', theirs['error'])[:300]} |")
            continue
        row = V.compare(scheme, "offline", V.reference(path, prompts, 8), theirs)
        print(f"| {scheme} | {row.max_abs_dlogprob:.1e} | {row.greedy_identical} | {', '.join(theirs.get('kernels', []))} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from results import recorded  # benchmarks/results.py: the figures go to RESULTS.md

    with recorded():
        main()
