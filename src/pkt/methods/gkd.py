"""``gkd``: on-policy distillation (GKD): the student's own samples scored by the teacher's token
distributions, on a LoRA student (:func:`pkt.align.gkd.gkd_distill`)."""

from __future__ import annotations

from pkt.stage import Cost, build as build_stage
from pkt.methods.registry import register
from pkt.methods.base import Method, finetune_cfg, merged, summary


class GKD(Method):
    name = "gkd"
    finetunes = True
    resource = "gkd"

    def build(self, study, task, seed, inputs):
        from pkt.align.gkd import GKDConfig

        c = study.cfg
        b = c.budget_for(task)
        ft = finetune_cfg(study, task, seed, self.name)
        gc = GKDConfig(lmbda=b.gkd_lmbda, beta=b.gkd_beta, temperature=b.gkd_temperature,
                       max_new_tokens=b.gkd_max_new_tokens, teacher_dtype=c.teacher_dtype)
        payload = {"method": "gkd", "task": task, "teacher": c.teacher, "student": c.student,
                   "finetune": ft.model_dump(), "gkd": gc.model_dump()}

        def fn(d):
            from pkt.align.gkd import gkd_distill
            from pkt.data.tasks import load_split

            out = d / "run"
            prompts = load_split(task, "train")[: ft.n_train]
            return summary(gkd_distill(c.teacher, c.student, prompts, ft, gc, out, progress=True,
                                       extra={"task": task}), out)

        path, _ = study.run_stage(build_stage(self.name, task, seed), payload, fn,
                                  reads={"models": [c.teacher, c.student], "data": {task: ["train"]}})
        return merged(path), c.eval_dtype

    def estimate(self, plan, task: str) -> Cost:
        c = plan.cfg
        b = c.budget_for(task)
        n = plan.n_train(task)
        new = getattr(b, "gkd_max_new_tokens", 0)
        tokens = n * b.epochs * (plan.toks.mean(task, "train") + new)
        seconds = (plan.secs("generate", plan.sp, c.dtype, n * b.epochs * new)
                   + plan.secs("forward", plan.tp, c.teacher_dtype, tokens)
                   + plan.secs("train", plan.sp, c.dtype, tokens) + plan.load(plan.tp, c.teacher_dtype)
                   + plan.load(plan.sp, c.dtype))
        nbytes = plan.model_bytes(plan.sp, c.dtype) + 3 * plan.lora_bytes(plan.student.spec, b.rank)
        return Cost(seconds, nbytes, f"on-policy distillation, {n} prompts x {b.epochs:g} epochs x <= {new} sampled "
                                     "tokens", checkpoint=True)


register(GKD())
