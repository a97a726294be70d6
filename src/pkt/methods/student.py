"""``student``: the vanilla student, evaluated as it is; every difference in a study is measured against it."""

from __future__ import annotations

from pkt.methods.registry import register
from pkt.methods.base import Method


class Student(Method):
    name = "student"
    vanilla = True

    def build(self, study, task, seed, inputs):
        return study.cfg.student, study.cfg.eval_dtype


register(Student())
