"""``seqkd``: sequence-level knowledge distillation: LoRA fine-tuning of the student on the teacher's answers
to the training prompts (stage ``kd-data``, :mod:`pkt.methods.kd_data`; :func:`pkt.align.distill.distill_finetune`)."""

from __future__ import annotations

from pathlib import Path

from pkt.stage import build as build_stage
from pkt.methods.registry import register
from pkt.methods.base import Method, finetune_cfg, merged, summary


class SeqKD(Method):
    name = "seqkd"
    reads = ("kd-data",)
    finetunes = True

    def build(self, study, task, seed, inputs):
        c = study.cfg
        ft = finetune_cfg(study, task, seed, self.name)
        kd_file = inputs["kd-data"]
        payload = {"method": "seqkd", "task": task, "student": c.student, "finetune": ft.model_dump(),
                   "data": str(kd_file)}

        def fn(d: Path) -> dict:
            from pkt.align.distill import distill_finetune
            from pkt.data.jsonl import read_chat_jsonl

            if not Path(kd_file).is_file():
                study.shared_stage("kd-data", task)  # restored without its files and not needed before
            out = d / "run"
            return summary(distill_finetune(c.student, read_chat_jsonl(kd_file), ft, out,
                                            extra={"data": str(kd_file), "teacher": c.teacher}), out)

        path, _ = study.run_stage(build_stage(self.name, task, seed), payload, fn, reads={"models": [c.student]})
        return merged(path), c.eval_dtype


register(SeqKD())
