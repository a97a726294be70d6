"""``laten-random-lora``: laten-lora's null. LoRA's fine-tuning, exactly as ``laten-lora``'s, of the student that
LaTen's random-teacher null injected (``laten-random``): whether a pre-aligned student saves fine-tuning because of
the teacher's vectors or because of the hypernetwork's own training on the student's loss."""

from __future__ import annotations

from pkt.methods.laten_lora import LatenLoRA
from pkt.methods.registry import register


class LatenRandomLoRA(LatenLoRA):
    name = "laten-random-lora"
    source = "laten-random"
    reads = (source,)
    controls = "laten-lora"


register(LatenRandomLoRA())
