"""``teacher``: the vanilla teacher, evaluated as it is (the score transfer aims at)."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import Method


class Teacher(Method):
    name = "teacher"
    vanilla = True
    sized_as = "teacher"

    def build(self, study, task, seed, inputs):
        return study.cfg.teacher, study.cfg.eval_dtype


register(Teacher())
