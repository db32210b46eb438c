"""The int8 execution kernels: quantization maths, W8A8Linear (int8 and fake backends), smoothing, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tico.experimental.quantization.nn.kernels as kernels_mod
from tico.experimental.quantization.nn import W8A8Linear, onednn_int8_available
from tico.experimental.quantization.nn.kernels import exact_int8_matmul, int8_matmul, int_mm_supported
from tico.experimental.quantization.nn.qscheme import (
    dequantize,
    fake_quant_activation,
    fake_quant_weight,
    quantize_activation,
    quantize_per_tensor,
    quantize_per_token,
    quantize_weight,
)

KERNELS = ["auto", "int_mm"] + (["onednn"] if onednn_int8_available() else [])


def make_linear(k: int = 96, n: int = 40, bias: bool = True, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight[:, 3] *= 20.0  # an outlier input channel, as in real LLMs
    return lin.to(dtype)


def make_input(*shape: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., 5] *= 30.0  # an outlier activation channel
    return x


def smoothing_for(lin: nn.Linear, x: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant scales ``max|X_j|**a / max|W_j|**(1-a)`` from this layer and this input."""
    act = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
    w = lin.weight.detach().abs().amax(0).float()
    return act.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)


def static_scale_of(x: torch.Tensor) -> float:
    return float(x.abs().max()) / 127.0


# -- quantization maths -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_weight_round_trip_within_half_a_step(granularity):
    w = make_linear().weight.detach()
    q, scale = quantize_weight(w, granularity)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == ((w.shape[0], 1) if granularity == "per_channel" else (1,))
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    err = (dequantize(q, scale) - w).abs()
    assert bool((err <= scale * 0.5 * (1 + 1e-5)).all())
    # the largest magnitude of each row (or of the tensor) maps to +-127
    top = q.abs().amax(1) if granularity == "per_channel" else q.abs().max().reshape(1)
    assert bool((top == 127).all())
    assert torch.equal(fake_quant_weight(w, granularity), dequantize(q, scale))


def test_zero_rows_columns_and_tensors_give_finite_scales():
    w = torch.randn(6, 8)
    w[2] = 0.0  # a zero output channel
    w[:, 4] = 0.0  # a zero input column
    q, scale = quantize_weight(w, "per_channel")
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool((q[2] == 0).all()) and bool((q[:, 4] == 0).all())
    q, scale = quantize_weight(torch.zeros(3, 4), "per_tensor")
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all()) and bool((q == 0).all())

    x = torch.randn(5, 8)
    x[1] = 0.0
    q, a = quantize_per_token(x)
    assert bool(torch.isfinite(a).all()) and bool((a > 0).all()) and bool((q[1] == 0).all())
    assert not bool(torch.isnan(fake_quant_activation(x, "per_token")).any())


def test_per_token_round_trip_and_leading_dims():
    x = make_input(2, 3, 64)
    q, scale = quantize_per_token(x)
    assert q.shape == x.shape and scale.shape == (2, 3, 1)
    assert bool(((dequantize(q, scale) - x).abs() <= scale * 0.5 * (1 + 1e-5)).all())
    assert bool((q.abs().amax(-1) == 127).all())  # per-token: every row uses the full range


def test_static_per_tensor_rounds_half_to_even_and_saturates_like_the_serving_engine():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 126.6, 1000.0, -1000.0, -127.5, -128.4]])
    q = quantize_per_tensor(x, 1.0)
    assert q.tolist() == [[0, 2, 2, 0, -2, 127, 127, -128, -128, -128]]  # [-128, 127], as vLLM clamps
    xq = fake_quant_activation(x * 0.25, "per_tensor", scale=0.25)
    assert xq.tolist() == [[v * 0.25 for v in q[0].tolist()]]


def test_static_integers_equal_compressed_tensors_quantize_on_saturating_inputs():
    ct_forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen) * 3
    x[::7, ::5] *= 40  # outliers far beyond the range, both signs
    scale = float(x.abs().quantile(0.9)) / 127  # a clipping static range
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor")
    theirs = ct_forward.quantize(x, torch.tensor([scale]), torch.zeros(1, dtype=torch.int8), args, dtype=torch.int8)
    ours = quantize_per_tensor(x, scale)
    assert int(ours.min()) == -128 and int(ours.max()) == 127
    assert torch.equal(ours, theirs)
    layer = W8A8Linear.from_linear(make_linear(), act_granularity="per_tensor", act_scale=scale)
    assert torch.equal(layer.quantize_input(x)[0], theirs)


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("smooth", [False, True])
def test_fake_quant_uses_the_same_integers(granularity, smooth):
    x = make_input(37, 64).to(torch.bfloat16)
    s = torch.rand(64) + 0.5 if smooth else None
    scale = static_scale_of(x.float() / (1 if s is None else s)) * 0.8 if granularity == "per_tensor" else None
    q, d = quantize_activation(x, granularity, scale=scale, smooth_scale=s)
    fake = fake_quant_activation(x, granularity, scale=scale, smooth_scale=s)
    assert fake.dtype == torch.float32
    assert torch.equal(fake, dequantize(q, d))
    q32, d32 = quantize_activation(x.float(), granularity, scale=scale, smooth_scale=s)
    assert torch.equal(q, q32) and torch.equal(d, d32)  # a bf16 input is quantized from its exact fp32 value


def test_smoothing_inside_the_quantizer_matches_an_explicitly_smoothed_input():
    x = make_input(64, 96)
    s = smoothing_for(make_linear(), x)
    # per token: x / s is formed first -> the very same integers and scales
    q1, d1 = quantize_per_token(x, s)
    q2, d2 = quantize_per_token(x / s)
    assert torch.equal(q1, q2) and torch.equal(d1, d2)
    # per tensor: 1/s folded into the static multiplier -> at most one step apart, on rare boundary values
    scale = static_scale_of(x / s)
    q1 = quantize_per_tensor(x, scale, smooth_scale=s)
    q2 = quantize_per_tensor(x / s, scale)
    diff = (q1.int() - q2.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


# -- W8A8Linear -------------------------------------------------------------------------------------------------


def exact_reference(module: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """fp64 dequantization of the exact integer product of the module's own integers."""
    q, a = module.quantize_input(x)
    acc = q.long() @ module.weight.long().t()  # exact
    out = acc.double() * a.double() * module.weight_scale.reshape(-1).double()
    if module.bias is not None:
        out = out + module.bias.double()
    return out.reshape(*x.shape[:-1], module.out_features)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weight_granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("act_granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_and_fake_backends_agree(kernel, weight_granularity, act_granularity, smooth):
    lin = make_linear()
    x = make_input(4, 9, 96)
    s = smoothing_for(lin, x) if smooth else None
    scale = static_scale_of(x / (1 if s is None else s)) if act_granularity == "per_tensor" else None
    kwargs = dict(
        weight_granularity=weight_granularity, act_granularity=act_granularity, act_scale=scale, smooth_scale=s
    )
    real = W8A8Linear.from_linear(lin, backend="int8", kernel=kernel, **kwargs)
    fake = W8A8Linear.from_linear(lin, backend="fake", **kwargs)
    assert torch.equal(real.weight, fake.weight) and torch.equal(real.weight_scale, fake.weight_scale)
    qr, dr = real.quantize_input(x)
    fake_x = fake_quant_activation(x, act_granularity, scale=scale, smooth_scale=s)
    assert torch.equal(fake_x.reshape(qr.shape), dequantize(qr, dr))  # the same integers and scales
    with torch.no_grad():
        y_real, y_fake, y_float = real(x), fake(x), lin(x)
    ref = exact_reference(real, x)
    assert y_real.shape == y_fake.shape == (4, 9, 40) and y_real.dtype == torch.float32
    tol = 1e-5 * float(ref.abs().max())
    assert float((y_real.double() - ref).abs().max()) <= tol  # only float rounding of the dequantization
    assert float((y_fake.double() - ref).abs().max()) <= tol  # only float summation order
    rel = float((y_real - y_float).norm() / y_float.norm())
    assert rel < 0.15, f"W8A8 output too far from the float layer: {rel}"  # a sanity bound (outliers, no smoothing)


def test_smoothing_inside_the_quantizer_equals_quantizing_a_smoothed_linear():
    lin = make_linear()
    x = make_input(33, 96)
    s = smoothing_for(lin, x)
    smoothed = copy.deepcopy(lin)
    with torch.no_grad():
        smoothed.weight.copy_(lin.weight * s)
    inside = W8A8Linear.from_linear(lin, smooth_scale=s)
    explicit = W8A8Linear.from_linear(smoothed)
    assert torch.equal(inside.weight, explicit.weight) and torch.equal(inside.weight_scale, explicit.weight_scale)
    with torch.no_grad():
        assert torch.equal(inside(x), explicit(x / s))  # per token: bitwise
        scale = static_scale_of(x / s)
        inside = W8A8Linear.from_linear(lin, smooth_scale=s, act_granularity="per_tensor", act_scale=scale)
        explicit = W8A8Linear.from_linear(smoothed, act_granularity="per_tensor", act_scale=scale)
        y_explicit = explicit(x / s)
        torch.testing.assert_close(inside(x), y_explicit, rtol=1e-3, atol=1e-3 * float(y_explicit.abs().max()))
    # and smoothing helps on this outlier channel: closer to the float layer than without
    plain = W8A8Linear.from_linear(lin)
    with torch.no_grad():
        y = lin(x)
        err_smooth = float((W8A8Linear.from_linear(lin, smooth_scale=s)(x) - y).norm())
        err_plain = float((plain(x) - y).norm())
    assert err_smooth < err_plain


def test_exact_fallback_on_odd_shapes_and_large_k():
    gen = torch.Generator().manual_seed(0)
    for m, k, n in [(3, 7, 5), (1, 13, 3), (20, 2500, 9)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        ref = (a.long() @ w.long().t()).int()
        assert torch.equal(exact_int8_matmul(a, w), ref)
        assert torch.equal(int8_matmul(a, w), ref)
    # worst case partial sums: every product (-128) * (-127), the largest an activation and a weight can make
    a = torch.full((2, 3000), -128, dtype=torch.int8)
    w = torch.full((2, 3000), -127, dtype=torch.int8)
    assert torch.equal(exact_int8_matmul(a, w), torch.full((2, 2), 3000 * 128 * 127, dtype=torch.int32))
    with pytest.raises(ValueError, match="chunk"):
        exact_int8_matmul(a, w, chunk=2000)
    cuda = torch.device("cuda")
    assert not int_mm_supported(16, 64, 64, cuda) and not int_mm_supported(32, 60, 64, cuda)
    assert not int_mm_supported(32, 64, 20, cuda) and int_mm_supported(17, 64, 64, cuda)
    assert int_mm_supported(1, 7, 5, torch.device("cpu")) and not int_mm_supported(64, 64, 64, torch.device("meta"))


def test_linear_on_an_odd_shape_through_the_fallback(monkeypatch):
    lin = make_linear(k=7, n=5)
    x = make_input(3, 7)
    for act, scale in [("per_token", None), ("per_tensor", static_scale_of(x))]:
        m = W8A8Linear.from_linear(lin, act_granularity=act, act_scale=scale, kernel="int_mm")
        with torch.no_grad():
            direct = m(x)
            monkeypatch.setattr(kernels_mod, "int_mm_supported", lambda *args: False)
            fallback = m(x)
            monkeypatch.undo()
            auto = W8A8Linear.from_linear(lin, act_granularity=act, act_scale=scale)(x)
        assert torch.equal(direct, fallback)
        torch.testing.assert_close(auto, direct, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(direct.double(), exact_reference(m, x), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_empty_input():
    lin = make_linear()
    m = W8A8Linear.from_linear(lin)
    x = make_input(2, 5, 96)
    with torch.no_grad():
        assert torch.equal(m(x), m(x.reshape(10, 96)).reshape(2, 5, 40))
        assert m(torch.randn(0, 96)).shape == (0, 40)
        assert m(x[0, 0]).shape == (40,)
    with pytest.raises(ValueError, match="96 features"):
        m(torch.randn(2, 95))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_granularity", ["per_token", "per_tensor"])
def test_low_precision_inputs(dtype, act_granularity):
    lin = make_linear(dtype=dtype)
    x = make_input(3, 11, 96).to(dtype)
    scale = static_scale_of(x.float()) if act_granularity == "per_tensor" else None
    m = W8A8Linear.from_linear(lin, act_granularity=act_granularity, act_scale=scale)
    fake = W8A8Linear.from_linear(lin, act_granularity=act_granularity, act_scale=scale, backend="fake")
    assert m.bias.dtype == dtype and m.weight_scale.dtype == torch.float32
    with torch.no_grad():
        y, y_fake, y32 = m(x), fake(x), m(x.float())
    assert y.dtype == dtype and y_fake.dtype == dtype and y.shape == (3, 11, 40)
    # the same integers as the fp32 input; only the final rounding to the low-precision dtype differs
    torch.testing.assert_close(y, y32.to(dtype), rtol=1e-2, atol=1e-2 * float(y32.abs().max()))
    torch.testing.assert_close(y, y_fake, rtol=1e-2, atol=1e-2 * float(y32.abs().max()))


def test_traceable_path_matches_eager():
    """The plain-ops path torch.compile traces (checked here eagerly, compiling is too slow for unit tests)."""
    lin = make_linear()
    x = make_input(20, 96)
    s = smoothing_for(lin, x)
    for act, scale in [("per_token", None), ("per_tensor", static_scale_of(x / s))]:
        for backend in ["int8", "fake"]:
            m = W8A8Linear.from_linear(lin, act_granularity=act, act_scale=scale, smooth_scale=s, backend=backend)
            with torch.no_grad():
                torch.testing.assert_close(m._forward_traceable(x), m(x), rtol=1e-5, atol=1e-5)


def test_state_for_export_state_dict_copies_and_dtype_moves():
    lin = make_linear()
    x = make_input(8, 96)
    m = W8A8Linear.from_linear(lin, act_granularity="per_tensor", act_scale=0.05, smooth_scale=smoothing_for(lin, x))
    state = m.quantization_state()
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (40, 96)
    assert state["weight_scale"].shape == (40, 1) and state["weight_scale"].dtype == torch.float32
    assert state["input_scale"].shape == (1,) and not state["dynamic"] and state["bits"] == 8
    assert set(m.state_dict()) == {"weight", "weight_scale", "bias", "act_scale", "smooth_scale"}
    with torch.no_grad():
        y = m(x)
        loaded = W8A8Linear(96, 40, act_granularity="per_tensor", act_scale=1.0, smooth=True)
        loaded(x)  # builds its caches from the placeholder state; loading must invalidate them
        loaded.load_state_dict(m.state_dict())
        assert torch.equal(loaded(x), y)
        assert torch.equal(copy.deepcopy(m)(x), y)  # after a forward (oneDNN caches are not copied)
        m.weight_scale.mul_(2)  # an in-place edit is seen
        assert not torch.equal(m(x), y)
    moved = copy.deepcopy(m).to(torch.bfloat16)
    assert moved.bias.dtype == torch.bfloat16 and moved.weight.dtype == torch.int8
    assert moved.weight_scale.dtype == moved.act_scale.dtype == moved.smooth_scale.dtype == torch.float32


def test_extra_repr_shows_the_scheme():
    text = repr(W8A8Linear.from_linear(make_linear(), weight_granularity="per_tensor", backend="fake"))
    assert "per_tensor" in text and "per_token (dynamic)" in text and "backend=fake" in text
    text = repr(W8A8Linear.from_linear(make_linear(), act_granularity="per_tensor", act_scale=0.1))
    assert "per_channel" in text and "static" in text and "backend=int8" in text and "kernel=" in text


def test_bad_arguments_raise_clear_errors():
    lin = make_linear()
    with pytest.raises(ValueError, match="weight_granularity must be one of"):
        W8A8Linear.from_linear(lin, weight_granularity="per_group")
    with pytest.raises(ValueError, match="act_granularity must be one of"):
        W8A8Linear.from_linear(lin, act_granularity="per_channel")
    with pytest.raises(ValueError, match="needs act_scale"):
        W8A8Linear.from_linear(lin, act_granularity="per_tensor")
    with pytest.raises(ValueError, match="only used with act_granularity='per_tensor'"):
        W8A8Linear.from_linear(lin, act_scale=0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and > 0"):
            W8A8Linear.from_linear(lin, act_granularity="per_tensor", act_scale=bad)
    with pytest.raises(TypeError, match="bits"):
        W8A8Linear.from_linear(lin, bits=4)  # only int8 exists: there is no bits option
    with pytest.raises(ValueError, match="backend must be one of"):
        W8A8Linear.from_linear(lin, backend="int4")
    with pytest.raises(ValueError, match="kernel must be one of"):
        W8A8Linear.from_linear(lin, kernel="cublas")
    with pytest.raises(ValueError, match="96 input features"):
        W8A8Linear.from_linear(lin, smooth_scale=torch.ones(95))
    with pytest.raises(ValueError, match="strictly positive"):
        W8A8Linear.from_linear(lin, smooth_scale=-torch.ones(96))
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        W8A8Linear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="act_granularity must be one of"):
        quantize_activation(torch.randn(2, 3), "per_row")
    with pytest.raises(ValueError, match="needs act_scale"):
        fake_quant_activation(torch.randn(2, 3), "per_tensor")
    with pytest.raises(ValueError, match="weight_granularity must be one of"):
        quantize_weight(torch.randn(2, 3), "per_row")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("act_granularity", ["per_token", "per_tensor"])
def test_a_model_called_outside_no_grad_gets_the_same_output(kernel, act_granularity):
    """Inputs that carry a graph (a float embedding before it, no torch.no_grad()) run the same int8 kernels."""
    lin = make_linear()
    x = make_input(4, 9, 96)
    scale = static_scale_of(x) if act_granularity == "per_tensor" else None
    real = W8A8Linear.from_linear(lin, backend="int8", kernel=kernel, act_granularity=act_granularity, act_scale=scale)
    with torch.no_grad():
        expected = real(x)
    assert torch.equal(real(x.clone().requires_grad_(True)), expected)
