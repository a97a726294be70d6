"""``pissa``: LoRA fine-tuning from the student's own principal components (PiSSA), Seeking's init without
the teacher."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import PostPktArm


class PiSSA(PostPktArm):
    name = "pissa"
    init = "pissa"


register(PiSSA())
