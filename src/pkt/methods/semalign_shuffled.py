"""``semalign-shuffled``: semalign with the vocabulary correspondence broken: the student's vocabulary rows are
matched to the teacher's through a seeded derangement of the basis tokens (no token keeps its own row), so the
fine-tuned teacher's layer outputs reach the student through the wrong words. Pairing, layers, steps, learning
rate and data are semalign's. SemAlign's claim is that the shared vocabulary aligns the two latent spaces; this
null keeps the teacher's signal and the whole training and removes only that alignment (docs/methods.md §9.3)."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.semalign import SemAlign


class SemAlignShuffled(SemAlign):
    name = "semalign-shuffled"
    vocab = "shuffled"
    controls = "semalign"


register(SemAlignShuffled())
