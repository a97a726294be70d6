"""Seeded random draws that the controls and nulls share: a derangement (a permutation that moves every item:
Seeking's shuffled-layer control, function-transfer's shuffled pairing, SemAlign's shuffled vocabulary) and a
Haar-random orthonormal basis (Seeking's random-factor control, function-transfer's random task vector).

Here, at the bottom of the package, so that the pipelines (``pkt.postpkt``) and the algorithms below them
(``pkt.align``) draw them the same way without importing each other.
"""

from __future__ import annotations

import random

import torch

from pkt.errors import PktError


def derangement(n: int, seed: int, what: str = "items") -> list[int]:
    """A seeded uniform permutation of range(n) with no fixed point (rejection sampling, ~e tries)."""
    if n < 2:
        raise PktError(f"a derangement needs at least 2 {what}, got {n}")
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def random_orthonormal(rows: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """[rows × r] with orthonormal columns, Haar-distributed (QR of a Gaussian with the sign fix)."""
    q, rr = torch.linalg.qr(torch.randn(rows, r, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(rr))).float()
