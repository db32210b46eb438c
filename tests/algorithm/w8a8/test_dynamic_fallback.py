"""Massive activations: a seeded Llama whose first token carries a massive value at one ``down_proj`` input.

The model is built so that exactly one token id (``SINK``, always at position 0 here, as a BOS / attention sink
is) owns residual channel ``K``; layer 0's ``gate_proj``/``up_proj`` read only that channel in intermediate
channel ``J``, so ``down_proj``'s input at position 0 is hundreds of times every other token's, while no other
layer sees anything unusual. A per-tensor static scale cannot hold that input; dynamic per-token can.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.algorithm.w8a8 import dynamic_fallback
from tico.experimental.quantization.algorithm.w8a8.dynamic_fallback import MassiveRowObserver, choose_activation_mode
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig
from tico.experimental.quantization.config.w8a8 import W8A8Config, W8A8Tuning
from tico.experimental.quantization.evaluation.fidelity import logit_fidelity
from tico.experimental.quantization.export.compressed_tensors import load_compressed, save_compressed
from tico.experimental.quantization.nn.linear import W8A8Linear

SINK, K, J = 0, 5, 7
AFFECTED = "model.layers.0.mlp.down_proj"
BUDGET = 16.0


def massive_llama(gain: float = 16.0, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama; with ``gain > 0`` token ``SINK`` drives layer 0's ``down_proj`` input massive."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    if gain > 0:
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            emb[:, K] = 0.0  # only SINK has residual channel K ...
            emb[SINK] = 0.0
            emb[SINK, K] = 1.0
            layer = model.model.layers[0]
            layer.self_attn.o_proj.weight[K] = 0.0  # ... and attention does not write it for the others
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
                linear.weight[J] = 0.0
                linear.weight[J, K] = gain  # intermediate channel J = silu(8 gain) * 8 gain at SINK, 0 elsewhere
    return model


def _ids(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (n, 32), generator=gen)
    ids[:, 0] = SINK
    return ids


CALIB, EVAL = _ids(16, 1), _ids(16, 2)


def _quantize(config: W8A8Config, gain: float = 16.0):
    model = prepare(massive_llama(gain), config)
    quantizer = get_quantizer(model)
    with torch.no_grad():
        model(CALIB)
    return convert(model), quantizer


def _kl(model, gain: float = 16.0) -> float:
    return logit_fidelity(model, massive_llama(gain), EVAL).kl


def _dynamic_layers(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, W8A8Linear) and m.quantization_state()["dynamic"]}


def test_the_model_has_a_massive_first_token_in_exactly_one_layer():
    model = massive_llama()
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach().abs().amax(-1)))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        model(EVAL)
    for h in hooks:
        h.remove()
    ratios = {n: float(t.max() / t.median()) for n, t in seen.items()}
    assert {n for n, r in ratios.items() if r > 20} == {AFFECTED}, ratios
    assert int(seen[AFFECTED].argmax()) % EVAL.shape[1] == 0  # at position 0


@pytest.mark.parametrize("smoothing", [None, SmoothQuantConfig(alpha="auto", linear_producers=True)])
def test_fallback_picks_dynamic_for_exactly_the_massive_layer_and_recovers(smoothing):
    common = dict(smoothing=smoothing, activations="static", act_range="mse", tuning=W8A8Tuning(backend="fake"))
    static, _ = _quantize(W8A8Config(**common))
    mixed, quantizer = _quantize(W8A8Config(dynamic_fallback=BUDGET, **common))
    dynamic, _ = _quantize(W8A8Config(activations="dynamic", tuning=W8A8Tuning(backend="fake")))
    kl_static, kl_mixed, kl_dynamic = _kl(static), _kl(mixed), _kl(dynamic)
    assert _dynamic_layers(static) == set()
    assert _dynamic_layers(mixed) == {AFFECTED}
    report = quantizer.report
    assert report.act_modes[AFFECTED].startswith("dynamic (massive tokens at positions [0];")
    assert all(v.startswith("static") for n, v in report.act_modes.items() if n != AFFECTED)
    assert AFFECTED not in report.act_ranges and AFFECTED in report.summary()
    if smoothing is None:  # naive static is far off; keeping one layer dynamic brings it next to all-dynamic
        assert kl_static > 20 * kl_dynamic, (kl_static, kl_dynamic)
    assert kl_mixed < kl_static / 3, (kl_static, kl_mixed)


def test_no_massive_token_keeps_every_layer_static():
    mixed, quantizer = _quantize(W8A8Config(activations="static", act_range="mse", dynamic_fallback=BUDGET,
                                            tuning=W8A8Tuning(backend="fake")), gain=0.0)
    assert _dynamic_layers(mixed) == set()
    assert all(v.startswith("static (no massive token") for v in quantizer.report.act_modes.values())


def test_mixed_schemes_export_and_reload(tmp_path):
    mixed, _ = _quantize(W8A8Config(smoothing=SmoothQuantConfig(alpha="auto", linear_producers=True),
                                    activations="static", act_range="mse", dynamic_fallback=BUDGET))
    save_compressed(mixed, tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    acts = {g["input_activations"]["strategy"]: g for g in groups.values()}
    assert set(acts) == {"token", "tensor"}
    assert acts["token"]["input_activations"]["dynamic"] is True
    assert acts["token"]["targets"] == [f"re:^{AFFECTED}$"]
    reloaded = load_compressed(tmp_path)
    assert _dynamic_layers(reloaded) == {AFFECTED}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(EVAL).logits, mixed(EVAL).logits)


def test_observer_keeps_the_largest_rows_with_their_positions():
    obs = MassiveRowObserver(channels=4, max_rows=8, keep=3)
    x = torch.ones(2, 10, 4)
    x[0, 0, 1] = 100.0
    x[1, 0, 2] = -90.0
    x[1, 7, 3] = 50.0
    obs.observe(x[:1])
    obs.observe(x[1:])
    assert obs.massive_positions.tolist() == [0, 0, 7]
    assert obs.massive_rows.abs().amax(1).tolist() == [100.0, 90.0, 50.0]
    assert obs.position_max[0] == 100.0 and obs.position_max[7] == 50.0 and obs.position_max[1] == 1.0


def test_choice_is_static_for_ordinary_rows_and_dynamic_when_a_token_is_massive():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=gen)
    w = torch.randn(16, 32, generator=gen)
    ordinary = choose_activation_mode(x, x[:4], torch.zeros(4, dtype=torch.long), float(x.abs().max()), w, BUDGET)
    assert ordinary.mode == "static" and ordinary.positions == []
    m = x[:4].clone()
    m[:, 3] = 2000.0  # a token no per-tensor scale can hold together with the others
    held = choose_activation_mode(x, m, torch.zeros(4, dtype=torch.long), 2000.0, w, BUDGET)
    clipped = choose_activation_mode(x, m, torch.zeros(4, dtype=torch.long), float(x.abs().max()), w, BUDGET)
    assert held.mode == clipped.mode == "dynamic" and held.positions == [0]



@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_errors_are_those_of_the_deployed_fake_quantized_product(granularity):
    """The int8 x int8 -> int32 scoring reproduces the fake-quant fp32 reference ||Qa(x) Qw(W)^T - x W^T||^2 /
    ||x W^T||^2, per token then averaged, for the static range and per-token dynamic."""
    from tico.experimental.quantization.nn.qscheme import fake_quant_activation, fake_quant_range, fake_quant_weight

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 48, generator=gen)
    x[:, 7] *= 25
    m = x[:3] * 40
    w = torch.randn(40, 48, generator=gen)
    r = float(x.abs().max()) * 0.5  # clips: the static error is not tiny
    choice = choose_activation_mode(x, m, torch.zeros(3, dtype=torch.long), r, w, BUDGET, granularity)
    wq = fake_quant_weight(w, granularity)

    def reference(rows, xq):
        ref = rows @ w.T
        return float(((xq @ wq.T - ref).pow(2).sum(1) / ref.pow(2).sum(1)).mean())

    expected = [reference(x, fake_quant_range(x, r)), reference(m, fake_quant_range(m, r)),
                reference(x, fake_quant_activation(x, "per_token")), reference(m, fake_quant_activation(m, "per_token"))]
    got = [*choice.static_error, *choice.dynamic_error]
    assert got == pytest.approx(expected, rel=1e-4)

def test_wide_layers_are_scored_on_a_channel_subset(monkeypatch):
    """More outputs than SCORE_CHANNELS: the ordinary rows' per-token relative errors come from a seeded subset of
    output channels, within 10% of scoring every channel; the massive rows are scored on every channel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 32, generator=gen)
    x[:, 5] *= 30
    m = x[:4].clone()
    m[:, 3] = 400.0
    w = torch.randn(3000, 32, generator=gen)
    r = float(x.abs().max())
    sub = choose_activation_mode(x, m, torch.zeros(4, dtype=torch.long), r, w, BUDGET)
    assert w.shape[0] > dynamic_fallback.SCORE_CHANNELS
    monkeypatch.setattr(dynamic_fallback, "SCORE_CHANNELS", 10**6)
    every = choose_activation_mode(x, m, torch.zeros(4, dtype=torch.long), r, w, BUDGET)
    assert sub.mode == every.mode
    for a, b in ((sub.static_error[0], every.static_error[0]), (sub.dynamic_error[0], every.dynamic_error[0])):
        assert a != b and a == pytest.approx(b, rel=0.1)
    assert (sub.static_error[1], sub.dynamic_error[1]) == (every.static_error[1], every.dynamic_error[1])

def test_bad_budget_rejected():
    with pytest.raises(ValueError, match="dynamic_fallback"):
        W8A8Config(dynamic_fallback=0.5)


def test_layers_reading_one_tensor_share_one_mode(monkeypatch):
    """q/k/v (and gate/up) read one tensor and are served as one fused GEMM with one input quantization: when
    the per-layer choice makes only q_proj dynamic, its siblings follow, as the exported checkpoint is served."""

    real = dynamic_fallback.choose_activation_mode
    calls = []

    def only_q_dynamic(*args, **kwargs):
        choice = real(*args, **kwargs)
        calls.append(choice)
        choice.mode = "dynamic" if len(calls) == 1 else "static"  # the first planned layer: layer 0's q_proj
        return choice

    monkeypatch.setattr(dynamic_fallback, "choose_activation_mode", only_q_dynamic)
    mixed, quantizer = _quantize(W8A8Config(activations="static", act_range="mse", dynamic_fallback=BUDGET,
                                            tuning=W8A8Tuning(backend="fake")), gain=0.0)
    from tico.experimental.quantization.export.compressed_tensors import w8a8_layers
    from tico.experimental.quantization.export.fusion import mixed_fused_groups

    attn = "model.layers.0.self_attn"
    assert _dynamic_layers(mixed) == {f"{attn}.{p}_proj" for p in "qkv"}
    assert mixed_fused_groups(w8a8_layers(mixed)) == []  # served by vLLM as measured
    for p in "kv":
        assert quantizer.report.act_modes[f"{attn}.{p}_proj"] == f"dynamic: shares its input with {attn}.q_proj, which needs dynamic"
        assert f"{attn}.{p}_proj" not in quantizer.report.act_ranges


def test_weight_dependent_ranges_of_one_tensor_are_made_one():
    """``output_mse`` picks a range per layer from its weights; layers reading one tensor get the largest."""
    model, quantizer = _quantize(W8A8Config(activations="static", act_range="output_mse",
                                            tuning=W8A8Tuning(backend="fake")), gain=0.0)
    ranges = quantizer.report.act_ranges
    for layer in range(2):
        qkv = {ranges[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"}
        gate_up = {ranges[f"model.layers.{layer}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1, (qkv, gate_up)
        scales = {float(model.get_submodule(f"model.layers.{layer}.self_attn.{p}_proj").act_scale) for p in "qkv"}
        assert len(scales) == 1


def test_the_merged_largest_rows_do_not_depend_on_how_batches_were_split():
    """Over ranks, the ``keep`` largest rows (ties of abs-max broken by the sampling key) and the positions'
    maxima are those one process keeps; here with many exact ties (rows repeated with the same abs-max)."""
    from tico.experimental.quantization.algorithm.w8a8.dynamic_fallback import MassiveRowObserver

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 6 + i, 8, generator=gen).round() for i in range(6)]  # rounded: many equal maxima

    def merged(parts):
        ranks = [MassiveRowObserver(8, 10, keep=5) for _ in parts]
        for obs, part in zip(ranks, parts):
            for b in part:
                obs.observe(b)
        summaries, memo = [o.summary() for o in ranks], {}
        contributions = [o.contribution(summaries, r, memo) for r, o in enumerate(ranks)]
        ranks[0].merge(summaries, contributions, {})
        return ranks[0]

    one = merged([batches])
    for parts in ([batches[::2], batches[1::2]], [batches[4:], batches[:4][::-1]]):
        got = merged(parts)
        for name in ("massive_rows", "massive_positions", "position_max", "rows_sample", "absmax"):
            assert torch.equal(getattr(got, name), getattr(one, name)), name


def test_attention_maxima_merge_to_the_maximum_over_ranks():
    from tico.experimental.quantization.algorithm.w8a8.attention import AttentionQuantState

    a, b = AttentionQuantState(), AttentionQuantState()
    a("query", torch.tensor([1.0, -3.0]))
    b("query", torch.tensor([2.0]))
    b("key", torch.tensor([-5.0]))
    summaries = [a.summary(), b.summary()]
    a.merge(summaries, [None, None], {})
    assert a.absmax == {"query": 3.0, "key": 5.0}
