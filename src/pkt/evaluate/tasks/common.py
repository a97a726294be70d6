"""Helpers shared by the task modules: seeded subsets and prompt rendering."""

from __future__ import annotations

import random

from pkt.data.chat import render_prompt


def select(rows: list, limit: int | None, seed: int) -> list:
    """A fixed seeded subset of ``limit`` rows (in original order); all rows when limit is None or too big."""
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit < 0:
        raise ValueError("limit must be >= 0")
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def prompt_text(user: str, tokenizer, style: str, assistant_prefix: str = "") -> str:
    """Rendered prompt (chat template or tulu) followed by the assistant prefix."""
    return render_prompt(user, tokenizer, style, assistant_prefix)
