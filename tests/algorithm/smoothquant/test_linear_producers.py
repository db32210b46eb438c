"""Exact Linear -> Linear foldings found by the traced dataflow (``linear_producers=True``)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig

IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


def _smooth(model, **config):
    with torch.no_grad():
        ref = model(IDS).logits
        model = prepare(model, SmoothQuantConfig(linear_producers=True, **config))
        quantizer = get_quantizer(model)
        model(IDS)
        before = {n: p.clone() for n, p in model.named_parameters()}
        model = convert(model)
        out = model(IDS).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    return quantizer.plan, before, model


def _llama():
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return T.LlamaForCausalLM(config).eval()


def test_v_to_o_respects_grouped_query_heads():
    plan, before, model = _smooth(_llama())
    groups = {g.producer: g for g in plan.smoothed}
    v = groups["model.layers.0.self_attn.v_proj"]
    (o,) = v.consumers
    assert o.name == "model.layers.0.self_attn.o_proj.weight" and o.axis == 1
    head_dim, kv_heads, heads = 8, 2, 4
    expected = [(h // (heads // kv_heads)) * head_dim + d for h in range(heads) for d in range(head_dim)]
    assert list(o.channel_map) == expected  # each query head reads its key/value head's channels
    w_o = model.model.layers[0].self_attn.o_proj.weight
    assert torch.allclose(w_o, before[o.name] * v.scales[torch.tensor(expected)], rtol=1e-6)


def test_up_to_down_through_the_gated_product():
    plan, _, _ = _smooth(_llama())
    up = {g.producer: g for g in plan.smoothed}["model.layers.1.mlp.up_proj"]
    assert up.consumer_modules == ["model.layers.1.mlp.down_proj"] and not up.pinned
    assert "model.layers.1.mlp.gate_proj" not in {g.producer for g in plan.groups}  # silu reads it


@pytest.mark.parametrize("acts_from", ["input", "output"])
def test_relu_bridge(acts_from):
    torch.manual_seed(0)
    config = T.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=64)
    plan, _, _ = _smooth(T.OPTForCausalLM(config).eval(), acts_from=acts_from)
    fc1 = {g.producer: g for g in plan.smoothed}["model.decoder.layers.0.fc1"]
    assert fc1.consumer_modules == ["model.decoder.layers.0.fc2"]
    # "output" observes the pre-activation at fc1 itself; "input" the ReLU output entering fc2
    assert fc1.observe.module == ("model.decoder.layers.0.fc1" if acts_from == "output" else "model.decoder.layers.0.fc2")


def test_fused_qkv_smooths_only_the_value_channels():
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    plan, before, model = _smooth(T.GPT2LMHeadModel(config).eval())
    qkv = {g.producer: g for g in plan.smoothed}["transformer.h.0.attn.c_attn"]
    assert qkv.pinned == tuple(range(64))  # query and key channels go through attention scores
    assert "scaled_dot_product_attention" in qkv.pinned_why
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out]
    old = before["transformer.h.0.attn.c_attn.weight"]
    # (the input side of c_attn is also scaled by ln_1's fold; compare output-column ratios within rows)
    ratio = w / old
    assert torch.allclose(ratio[:, :64] / ratio[:, :1], torch.ones_like(ratio[:, :64]), rtol=1e-5)
    assert not torch.allclose(ratio[:, 64:] / ratio[:, :1], torch.ones_like(ratio[:, 64:]), rtol=1e-3)


def test_off_by_default():
    model = prepare(_llama(), SmoothQuantConfig())
    assert {g.producer.rsplit(".", 1)[-1] for g in get_quantizer(model).plan.groups} == {
        "input_layernorm", "post_attention_layernorm", "norm"
    }
