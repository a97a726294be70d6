"""One call that seeds every global RNG a run draws from (Python, NumPy, torch).

Why one place: LoRA's A init, dropout and data shuffles draw from the global generators, so every entry
point that promises "same seed → same result" (``pkt run``, ``pkt postpkt``, ``pkt kd``) must seed all of
them the same way.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
