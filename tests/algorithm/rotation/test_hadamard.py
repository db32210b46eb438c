"""Hadamard and random rotations: orthogonal, +-1/sqrt(n) entries, seeded, and the fast transform."""

from __future__ import annotations

import math

import pytest
import torch

from tico.experimental.quantization.algorithm.rotation.hadamard import (
    fast_hadamard_transform,
    hadamard_matrix,
    hadamard_order_base,
    make_rotation,
)


try:
    import compressed_tensors  # noqa: F401

    KNOWN = True  # its library of known Hadamard matrices (Sloane) extends the orders we can build
except ImportError:
    KNOWN = False


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 40, 44, 48, 64, 96, 128, 160, 172, 176, 768, 688])
def test_hadamard_is_orthogonal_with_equal_magnitudes(n: int) -> None:
    base = hadamard_order_base(n)
    if n in (28, 172, 688):  # 27, 171 are not prime: Paley I builds neither, nor 14, 7, 86, 43
        assert base == (n if n < 256 else 172) if KNOWN else base is None
        if not KNOWN:
            return
    h = hadamard_matrix(n, normalized=False)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    hn = hadamard_matrix(n)
    assert torch.allclose(hn @ hn.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_base_orders() -> None:
    assert hadamard_order_base(4096) == 1
    assert hadamard_order_base(12 * 256) == 12
    assert hadamard_order_base(20 * 64) == 20
    assert hadamard_order_base(6) is None  # no Hadamard matrix of order 6 exists
    assert hadamard_order_base(2 * 43) is None


@pytest.mark.parametrize("n,kind", [(64, "hadamard"), (12, "hadamard"), (86, "hadamard"), (32, "random")])
def test_make_rotation_orthogonal_seeded(n: int, kind: str) -> None:
    want = "random" if n == 86 else kind  # 86 = 2 * 43: no Hadamard matrix (not a multiple of 4)
    r = make_rotation(n, seed=3, kind=kind)
    assert r.kind == want and r.size == n
    assert torch.allclose(r.matrix @ r.matrix.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r.matrix, make_rotation(n, seed=3, kind=kind).matrix)
    assert not torch.equal(r.matrix, make_rotation(n, seed=4, kind=kind).matrix)
    if want == "hadamard":
        assert torch.allclose(r.matrix.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))


def test_make_rotation_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="hadamard"):
        make_rotation(8, 0, kind="dct")


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_fast_transform_matches_matrix(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fast_hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)


def test_fast_transform_needs_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        fast_hadamard_transform(torch.zeros(2, 12))
