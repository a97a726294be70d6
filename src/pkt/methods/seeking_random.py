"""``seeking-random``: Seeking's init with each extracted (U_r, V_r) replaced by random orthonormal bases with
the same singular values (:func:`pkt.postpkt.control_factors`): what a large initial LoRA adds without the
teacher's subspaces."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import PostPktArm


class SeekingRandom(PostPktArm):
    name = "seeking-random"
    init = "seeking"
    control = "random"
    controls = "seeking"
    reads = ("extract",)


register(SeekingRandom())
