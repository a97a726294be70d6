"""``lora``: LoRA fine-tuning of the student (peft's default init), the fine-tuning baseline every built arm
is also compared with."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import PostPktArm


class LoRA(PostPktArm):
    name = "lora"
    init = "lora"


register(LoRA())
