"""``student-fp32``: the vanilla student evaluated once more, in float32. A built model whose change to the
student does not survive eval_dtype is evaluated in float32 (:mod:`pkt.evaluate.precision`); its difference
to the student must not be the dtype's, so a study that evaluates in another dtype and builds any model
also measures the student there. Not a method a config lists: it comes with ``student``."""

from __future__ import annotations

from pkt.methods.registry import REGISTRY, register
from pkt.methods.base import Method


class StudentFP32(Method):
    name = "student-fp32"
    vanilla = True
    companion_of = "student"
    eval_dtype = "float32"

    def build(self, study, task, seed, inputs):
        return study.cfg.student, self.eval_dtype

    def wanted(self, study) -> bool:
        c = study.cfg
        return c.eval_dtype != "float32" and any(not (m in REGISTRY and REGISTRY[m].vanilla) for m in c.methods)


register(StudentFP32())
