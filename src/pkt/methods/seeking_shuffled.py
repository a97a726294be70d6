"""``seeking-shuffled``: Seeking's extracted factors placed into the wrong student layers (a seeded
derangement, :func:`pkt.postpkt.control_factors`): what the placement of the teacher's subspaces adds."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import PostPktArm


class SeekingShuffled(PostPktArm):
    name = "seeking-shuffled"
    init = "seeking"
    control = "shuffled"
    controls = "seeking"
    reads = ("extract",)


register(SeekingShuffled())
