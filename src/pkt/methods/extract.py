"""Seeking's extraction (stage ``extract-{task}``): the teacher's sensitive blocks as LoRA factors, computed
once per task and read by Seeking and its controls (:func:`pkt.postpkt.run_extraction`)."""

from __future__ import annotations

from pathlib import Path

from pkt.errors import PktError
from pkt.experiment.stage import Cost, shared
from pkt.methods.registry import register_shared
from pkt.methods.base import SharedStage


def seeking_targets(study, task: str | None = None) -> list[str]:
    """Module kinds Seeking (and its controls) transfer: the fine-tuning targets, plus embed/lm_head if asked."""
    from pkt.align.finetune import FinetuneConfig

    b = study.cfg.budget_for(task) if task else study.cfg.budget
    return list(FinetuneConfig().targets) + (["embed", "lm_head"] if b.seeking_embeddings else [])


def seeking_cfg(study, task: str | None = None):
    """The extraction's settings (also handed to every PostPKT arm, which reads only its split and style)."""
    from pkt.postpkt import SeekingConfig

    c = study.cfg
    b = c.budget_for(task) if task else c.budget
    return SeekingConfig(n_samples=b.extract_samples, rank=b.rank, style=c.style, targets=seeking_targets(study, task),
                         max_length=b.max_length, dtype=c.teacher_dtype, train_on_inputs=b.train_on_inputs)


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
