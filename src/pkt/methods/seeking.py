"""``seeking``: PostPKT (Seeking Neural Nuggets): LoRA fine-tuning of the student from the teacher's sensitive
blocks, extracted once per task (stage ``extract``, :mod:`pkt.methods.extract`)."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import PostPktArm


class Seeking(PostPktArm):
    name = "seeking"
    init = "seeking"
    reads = ("extract",)


register(Seeking())
