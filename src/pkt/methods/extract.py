"""Seeking's extraction (stage ``extract-{task}``): the teacher's sensitive blocks as LoRA factors, computed
once per task and read by Seeking and its controls (:func:`pkt.postpkt.run_extraction`)."""

from __future__ import annotations

from pathlib import Path

from pkt.errors import PktError
from pkt.stage import Cost, shared
from pkt.methods.registry import register_shared
from pkt.methods.base import SharedStage, seeking_cfg


class Extraction(SharedStage):
    kind = "extract"

    def run(self, study, task: str) -> Path:
        from pkt.postpkt import run_extraction

        c = study.cfg
        cfg = seeking_cfg(study, task)
        if "embed" in cfg.targets:  # checked on the configs (meta device), before the teacher's sensitivity
            from pkt.postpkt import spec_from_ref

            s_spec, t_spec = spec_from_ref(c.student), spec_from_ref(c.teacher)
            if s_spec.tied_embeddings or s_spec.vocab_size != t_spec.vocab_size:
                raise PktError("budget.seeking_embeddings needs one vocabulary and a student with untied embeddings "
                               f"(student {s_spec.vocab_size} tokens, tied={s_spec.tied_embeddings}; teacher "
                               f"{t_spec.vocab_size})")
        payload = {"teacher": c.teacher, "student": c.student, "task": task, "seeking": cfg.model_dump()}
        path, _ = study.run_stage(shared(self.kind, task), payload, lambda d: {
            "manifest_keys": sorted(run_extraction(c.teacher, c.student, task, cfg, d / "factors",
                                                   progress=True, log=study.echo))},
            reads={"models": [c.teacher, c.student], "data": {task: [cfg.split]}})
        return path / "factors"

    def estimate(self, plan, task: str) -> Cost:
        from pkt.data.tasks import load_split

        c = plan.cfg
        b = c.budget_for(task)
        n = min(b.extract_samples, len(load_split(task, "extract")))
        seconds = plan.secs("train", plan.tp, c.teacher_dtype, n * plan.toks.mean(task, "extract")) + \
            plan.load(plan.tp, c.teacher_dtype)
        return Cost(seconds, plan.lora_bytes(plan.student.spec, b.rank), f"teacher sensitivity on {n} examples")


register_shared(Extraction())
