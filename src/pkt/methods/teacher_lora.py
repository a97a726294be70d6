"""``teacher-lora``: the teacher fine-tuned with plain LoRA on the student's split, at the student's budget.

Two uses (docs/methods.md §9): its row says whether the split teaches the teacher anything at this budget (a
transfer can hardly carry a gain the teacher itself does not make), and its adapter is the teacher's own task
vector, the thing a transfer through function moves into the student. Exactly ``lora``'s fine-tuning settings
(rank, learning rate, steps, batches, seed), with the teacher in the student's place; evaluated like the teacher.
"""

from __future__ import annotations

from pkt.methods.base import Method, data_setting, finetune_cfg, finetune_cost, merged, seeking_cfg, summary
from pkt.methods.registry import register
from pkt.stage import Cost, build as build_stage  # noqa: F401  (Cost: estimate's type)


class TeacherLoRA(Method):
    name = "teacher-lora"
    finetunes = True
    sized_as = "teacher"

    def build(self, study, task, seed, inputs):
        from pkt.postpkt import run_postpkt

        c = study.cfg
        ft = finetune_cfg(study, task, seed, self.name)
        payload = {"method": self.name, "task": task, "teacher": c.teacher, "finetune": ft.model_dump(),
                   **data_setting(c)}

        def fn(d):
            return summary(run_postpkt(None, c.teacher, task, "lora", d / "run", ft, seeking_cfg(study, task),
                                       progress=True, log=study.echo, data=c.data), d / "run")

        path, _ = study.run_stage(build_stage(self.name, task, seed), payload, fn,
                                  reads={"models": [c.teacher], "data": {task: ["train"]}})
        return merged(path), c.eval_dtype

    def estimate(self, plan, task: str) -> Cost:
        return finetune_cost(plan, task, on="teacher")


register(TeacherLoRA())
