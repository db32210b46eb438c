"""Orthogonal matrices for rotations: Walsh-Hadamard and Paley constructions, randomized by seeded signs.

A rotation that spreads outlier channels wants every entry of the matrix to have the same magnitude
(``1/sqrt(n)``): then no input channel can stay concentrated in one output channel. Hadamard matrices have
exactly that property, and applying one costs ``O(n log n)`` (a fast Walsh-Hadamard transform) where a
random dense matrix costs ``O(n^2)``. Multiplying by a random diagonal of signs keeps both properties and gives
a different rotation per seed (QuaRot's "randomized Hadamard").

Hadamard matrices of order ``n`` exist for ``n = 2^k * m`` where ``m`` is the order of a known base matrix. We
build bases with Paley's first construction (order ``q + 1`` for a prime ``q = 3 mod 4``: 4, 8, 12, 20, 24, 32,
44, 48, 60, 68, 72, 80, 84, ...) and take Kronecker products with Sylvester's ``[[1, 1], [1, -1]]``. Where neither
fits (e.g. 28, or 172 = 4 * 43) and the optional ``compressed-tensors`` package is installed, its copy of Sloane's
library (every multiple of 4 up to 256) provides the base. Sizes still without one (no Hadamard matrix exists for
orders other than 1, 2 and multiples of 4) get a seeded random orthogonal matrix instead, and say so: note that
the rotation of such a size therefore depends on whether ``compressed-tensors`` is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "Rotation",
    "hadamard_matrix",
    "hadamard_order_base",
    "make_rotation",
    "fast_hadamard_transform",
    "random_orthogonal",
]

# Paley bases are built from primes up to this bound (orders up to 1024): plenty for hidden and head sizes.
_MAX_PALEY_PRIME = 1023


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a ``(q + 1) x (q + 1)`` Hadamard matrix (entries +-1) for a prime ``q = 3 mod 4``."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.view(1, -1) - idx.view(-1, 1)) % q]  # Q[i, j] = chi(j - i), antisymmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _is_paley_order(m: int) -> bool:
    q = m - 1
    return q % 4 == 3 and q <= _MAX_PALEY_PRIME and _is_prime(q)


@lru_cache(maxsize=1)
def _known_bases() -> dict[int, torch.Tensor]:
    """Hadamard matrices from N. J. A. Sloane's library as shipped by ``compressed-tensors`` (every multiple of 4
    up to 256, e.g. 28, 172), if that optional package is installed; each one is checked before use."""
    try:
        from compressed_tensors.transform.utils import hadamard as ct_hadamard
        from safetensors import safe_open
    except ImportError:
        return {}
    path = getattr(ct_hadamard, "REPO_PATH", None)
    if path is None:
        return {}
    found: dict[int, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():
                h = file.get_tensor(key).to(torch.float64)
                m = h.shape[0]
                if h.shape == (m, m) and torch.equal(h.abs(), torch.ones_like(h)) and torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):
                    found[m] = h
    except (OSError, ValueError, RuntimeError):  # an unreadable file is simply no extra bases
        return {}
    return found


@lru_cache(maxsize=None)
def _base(n: int) -> tuple[int, str] | None:
    """``(m, source)`` with ``n = 2^k * m`` and a Hadamard matrix of order ``m`` available, or None.

    Own constructions first (Sylvester, then Paley; the smallest base wins, so the fast transform does most of
    the work), then the known matrices of ``compressed-tensors``.
    """
    if n < 1:
        return None
    candidates = []
    m = n
    while True:
        candidates.append(m)
        if m % 2:
            break
        m //= 2
    for m in reversed(candidates):  # smallest first
        if m == 1:
            return 1, "sylvester"
        if _is_paley_order(m):
            return m, "paley"
    known = _known_bases()
    for m in reversed(candidates):
        if m in known:
            return m, "known"
    return None


def hadamard_order_base(n: int) -> int | None:
    """The base order ``m`` with ``n = 2^k * m`` of the Hadamard matrix built for order ``n``, or None if this
    module cannot build one (1 for powers of two, a Paley order, or a known matrix's order)."""
    found = _base(n)
    return None if found is None else found[0]


@lru_cache(maxsize=None)
def _hadamard_pm1(n: int) -> torch.Tensor:
    found = _base(n)
    if found is None:
        raise ValueError(f"no Hadamard matrix of order {n} is known to this module (need 2^k, or 2^k times q+1 "
                         f"for a prime q = 3 mod 4 up to {_MAX_PALEY_PRIME}, or compressed-tensors' known matrices)")
    base, source = found
    if source == "sylvester":
        h = torch.ones(1, 1, dtype=torch.float64)
    elif source == "paley":
        h = _paley(base - 1)
    else:
        h = _known_bases()[base]
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(sylvester, h)
    return h


def hadamard_matrix(n: int, normalized: bool = True) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64): entries ``+-1``, or ``+-1/sqrt(n)`` (orthogonal) if ``normalized``."""
    h = _hadamard_pm1(n).clone()
    return h / math.sqrt(n) if normalized else h


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A seeded, Haar-distributed random orthogonal ``n x n`` matrix (float64): the fallback for sizes with no
    Hadamard matrix here."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` seeded random ``+-1`` values (float64)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1


@dataclass(frozen=True)
class Rotation:
    """An orthogonal ``n x n`` matrix and how it was made (for reports and for an online transform)."""

    matrix: torch.Tensor  # float64, orthogonal
    kind: str  # "hadamard" (randomized: H diag(signs) / sqrt(n)) or "random" (dense random orthogonal)
    seed: int

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    def describe(self) -> str:
        return f"{self.kind}({self.size}, seed={self.seed})"


def make_rotation(n: int, seed: int, kind: str = "hadamard") -> Rotation:
    """A seeded orthogonal ``n x n`` rotation.

    ``kind="hadamard"``: ``diag(signs) H / sqrt(n)`` (randomized Hadamard) when order ``n`` is constructible, else
    a random orthogonal matrix (``kind`` of the result says which). ``kind="random"``: always random orthogonal.
    """
    if kind not in ("hadamard", "random"):
        raise ValueError(f"rotation kind must be 'hadamard' or 'random', got {kind!r}")
    if kind == "hadamard" and hadamard_order_base(n) is not None:
        return Rotation(random_signs(n, seed).unsqueeze(1) * hadamard_matrix(n), "hadamard", seed)
    return Rotation(random_orthogonal(n, seed), "random", seed)


def fast_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(n)`` along the last axis in ``O(n log n)`` (``n`` a power of two; ``H`` Sylvester's, symmetric).

    This is what a run-time (online) rotation costs instead of a dense ``n x n`` matmul.
    """
    n = x.shape[-1]
    if not _is_power_of_two(n):
        raise ValueError(f"the fast Walsh-Hadamard transform needs a power-of-two size, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)
