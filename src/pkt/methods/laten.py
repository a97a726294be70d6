"""``laten``: PrePKT (LaTen): a hypernetwork trained to translate the teacher's located neurons into the
student's, applied at a chosen (step, rate) and fused into the student's weights (:mod:`pkt.laten`). The
point is the paper's step for the task, the best of a selection grid scored on align examples, or a fixed
count; with ``budget.laten_grid`` the whole grid is scored and recorded as well."""

from __future__ import annotations

from pathlib import Path

from pkt.errors import PktError
from pkt.stage import Cost, build as build_stage
from pkt.methods.registry import register
from pkt.methods.base import Method

# LaTen's chosen point and delta size, which each evaluation row of the arm carries ("injection")
INJECTION = ("choice", "step", "rate", "delta_rel_norm", "delta_bf16_ratio", "delta_bf16_changed", "selection",
             "vanilla_align_loss")


def train_steps(cfg, task: str) -> int:
    """Hypernetwork steps to train: the paper's for the task, the selection grid's last, or a fixed count."""
    from pkt.laten import PAPER_STEPS

    b = cfg.budget_for(task)
    if b.laten_choice == "paper":
        if task not in PAPER_STEPS:
            raise PktError(f"budget.laten_choice 'paper': the paper gives no LaTen step for task {task!r}; "
                           "use 'select' or 'fixed'")
        return PAPER_STEPS[task]
    return b.laten_select_steps if b.laten_choice == "select" else b.laten_steps


def laten_cfg(study, task: str, seed: int):
    """The hypernetwork's training settings of a study's task and seed."""
    return laten_settings(study.cfg, task, seed)


def laten_settings(c, task: str, seed: int):
    """The hypernetwork's training settings that ``pkt run`` gives the task and seed of the experiment config
    ``c`` (:class:`pkt.experiment.config.ExperimentConfig`)."""
    from pkt.laten import LatenConfig

    b = c.budget_for(task)
    return LatenConfig(teacher=c.teacher, student=c.student, task=task, style=c.style,
                       transfer_rate=b.laten_rate, penalty=b.laten_penalty, lr=b.laten_lr, batch_size=b.laten_batch,
                       micro_batch=min(4, b.laten_batch), max_steps=train_steps(c, task), seed=seed,
                       cutoff_len=b.max_length, teacher_dtype=c.teacher_dtype,
                       student_dtype=c.dtype, schedule=b.laten_schedule,
                       report_to=c.report_to)


def train_and_fuse(study, lc, d: Path) -> dict:
    """The build stage's work: train the hypernetwork, choose the point (scoring the grid if asked) and write
    the fused student under ``d/fused``; the result records the choice and the injected delta's size."""
    from pkt.laten import apply, load_models, train

    b = study.cfg.budget_for(lc.task)
    models = load_models(lc, log=study.echo)
    rows = train(lc, d / "train", models=models, resume=False, progress=True, log=lambda s: None)
    point, grid, vanilla = {"step": lc.max_steps, "rate": b.laten_apply_rate or b.laten_rate}, None, None
    if b.laten_choice == "select" or b.laten_grid:
        from pkt.laten import align_loss, select_point, split_examples

        align = split_examples(lc, "align")[: b.laten_select_examples]
        best, grid = select_point(d / "train", list(range(1, lc.max_steps + 1)), b.laten_select_rates, align,
                                  seed=lc.seed, models=models, log=study.echo)
        if b.laten_choice == "select":
            point = best
        vanilla = align_loss(models, {}, align, lc)  # the grid's reference: the student, nothing injected
    manifest, _ = apply(d / "train", point["step"], point["rate"], d / "fused", seed=lc.seed, models=models,
                        log=study.echo)
    return {"train_log": rows, "choice": b.laten_choice, "step": point["step"], "rate": point["rate"],
            "selection": grid, "vanilla_align_loss": vanilla, "delta_rel_norm": manifest["delta_rel_norm"],
            "delta_bf16_ratio": manifest["delta_bf16_ratio"],
            "delta_bf16_changed": manifest["delta_bf16_changed"], "delta_size": manifest["delta_size"],
            "apply": {k: v for k, v in manifest.items() if not isinstance(v, (list, dict))}}


def hypernet_seconds(plan, task: str, steps: int) -> float:
    """Estimated seconds of ``steps`` hypernetwork steps on the reference machine of ``plan`` (a
    :class:`pkt.experiment.plan.PlanContext`): each a teacher forward and a student forward and backward over
    ``laten_batch`` align examples."""
    c = plan.cfg
    per_step = c.budget_for(task).laten_batch * plan.toks.mean(task, "align")
    return steps * (plan.secs("forward", plan.tp, c.teacher_dtype, per_step)
                    + plan.secs("train", plan.sp, c.dtype, per_step))


class Laten(Method):
    name = "laten"
    resource = "laten"
    injection = INJECTION
    vectors = "real"  # what the hypernetwork translates (pkt.laten.LatenConfig.teacher_vectors)

    def build(self, study, task, seed, inputs):
        c = study.cfg
        lc = laten_cfg(study, task, seed).model_copy(update={"teacher_vectors": self.vectors})
        b = c.budget_for(task)
        choice = {"choice": b.laten_choice}
        if b.laten_choice == "select" or b.laten_grid:
            choice.update(rates=b.laten_select_rates, examples=b.laten_select_examples)
        if b.laten_grid and b.laten_choice != "select":
            choice["grid"] = True
        payload = {"method": self.name, "laten": lc.model_dump(mode="json"), **choice}
        # its key's models and data are read from the settings (the teacher, the student, the task's splits)
        path, _ = study.run_stage(build_stage(self.name, task, seed), payload, lambda d: train_and_fuse(study, lc, d))
        return str(path / "fused"), c.eval_dtype

    def estimate(self, plan, task: str) -> Cost:
        c = plan.cfg
        b = c.budget_for(task)
        steps = train_steps(c, task)
        seconds = hypernet_seconds(plan, task, steps)
        if b.laten_choice == "select" or b.laten_grid:
            n_sel = steps * len(b.laten_select_rates) * b.laten_select_examples * plan.toks.mean(task, "align")
            seconds += plan.secs("forward", plan.sp, c.dtype, n_sel)
        seconds += plan.load(plan.tp, c.teacher_dtype) + plan.load(plan.sp, c.dtype)
        nbytes = plan.model_bytes(plan.sp, c.dtype)
        if plan.teacher.spec is not None and plan.student.spec is not None:
            h_t, h_s = plan.teacher.spec.hidden_size, plan.student.spec.hidden_size
            nbytes += (steps + 1) * 4 * (h_t * h_t + h_s * h_t) * 4  # a translator checkpoint per step
        return Cost(seconds, nbytes, f"{steps} hypernetwork steps x {b.laten_batch} examples", checkpoint=True)


register(Laten())
