"""What a method of ``pkt run`` is: a file that declares itself, and the pieces its build composes.

A :class:`Method` says what it builds (:meth:`Method.build`: a model reference and the dtype it is
evaluated in, usually through one cached build stage), what that build reads (:attr:`Method.reads`: a stage
several methods share, such as Seeking's extraction, or another method's build of the same task and seed),
which resources its build asks of a cluster (:attr:`Method.resource`, a kind of the config's
``resources:``) and what it costs (:meth:`Method.estimate`, on the plan's reference machine). A
:class:`SharedStage` is a seed-independent stage that methods read (``extract``, ``kd-data``).

The runner (:class:`pkt.experiment.runner.Study`), the plan and the executors know methods only through
this interface and the registry (:mod:`pkt.methods`). The algorithms live in the library's parts
(``locate/``, ``align/``, ``inject``, ``evaluate/``, ``analyse/``); a method composes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkt.stage import Cost, Stage, build as build_stage, shared as shared_stage


class Method:
    """One arm of a study. Subclasses set the class attributes and implement :meth:`build`."""

    name: str = ""
    # the config's ``resources:`` kind of its build stage (pkt run --executor ray)
    resource: str = "finetune"
    # evaluates a model as it is (the student, the teacher): no build, one evaluation stands for every seed
    # when the evaluation subset is fixed (budget.eval_seed), and no precision check against the student
    vanilla: bool = False
    # whose size its model has (the plan's evaluation time): "student" or "teacher"
    sized_as: str = "student"
    # the dtype its evaluation uses when not the study's eval_dtype
    eval_dtype: str | None = None
    # a second evaluation of that method's model (the float32 student), made when :meth:`wanted`
    companion_of: str | None = None
    # what its build reads: shared stage kinds (pkt.methods.SHARED) or other methods (their build of the same
    # task and seed, e.g. laten-lora's LaTen student)
    reads: tuple[str, ...] = ()
    # keys of its build stage's result that each of its evaluation rows carries as "injection"
    injection: tuple[str, ...] = ()
    # its build fine-tunes with :func:`finetune_cfg`, so the config's ``method_lrs`` may give it its own lr
    finetunes: bool = False
    # the arm this one is a null of (seeking-random: "seeking"; laten-random: "laten"), set beside it in comparisons
    controls: str | None = None

    def build(self, study, task: str, seed: int, inputs: dict) -> tuple[str, str]:
        """(model reference, dtype) of the method's model for ``task`` and ``seed``. ``inputs`` maps each
        shared stage kind it reads to that stage's output path. It must not read its stage's result: in a
        plan the stages only report their keys."""
        raise NotImplementedError

    def estimate(self, plan, task: str) -> Cost:
        """The build's cost (``plan``: :class:`pkt.experiment.plan.PlanContext`); default: LoRA fine-tuning of
        the student on the task's training examples."""
        return finetune_cost(plan, task)

    def wanted(self, study) -> bool:
        """Whether a companion evaluation is made in this study."""
        return True

    def read_stages(self, task: str, seed: int, shared_kinds) -> list[Stage]:
        """The stages its build reads, as typed values (the Ray executor's dependencies)."""
        return [shared_stage(r, task) if r in shared_kinds else build_stage(r, task, seed) for r in self.reads]


class SharedStage:
    """A seed-independent stage of a task that methods read (``kind`` names it and its resources)."""

    kind: str = ""

    def run(self, study, task: str) -> Path:
        """The path its stage writes (its stage computed or found cached)."""
        raise NotImplementedError

    def estimate(self, plan, task: str) -> Cost:
        raise NotImplementedError


# ---- pieces the methods compose ------------------------------------------------------------------------
def finetune_cfg(study, task: str, seed: int, method: str):
    """The LoRA fine-tuning settings of a study's task and seed for one fine-tuned or distilled arm (its lr may be
    its own: the config's ``method_lrs``)."""
    from pkt.align.finetune import FinetuneConfig

    c = study.cfg
    b = c.budget_for(task)
    return FinetuneConfig(r=b.rank, alpha=b.alpha, dropout=b.dropout, lr=c.lr_for(task, method), epochs=b.epochs,
                          batch_size=b.batch_size, micro_batch_size=min(4, b.batch_size), max_length=b.max_length,
                          n_train=study.n_train[task], seed=seed, style=c.style, dtype=c.dtype,
                          autocast=c.autocast, pissa_niter=b.pissa_niter, train_on_inputs=b.train_on_inputs, report_to=c.report_to)


def data_setting(cfg) -> dict:
    """The key entry of the fine-tuned arms' own training data (``data:``), if the study has one."""
    if not cfg.data:
        return {}
    from pkt.data.chat import data_identity

    return {"data": data_identity(cfg.data)}


def summary(run_summary: dict, run_dir: Path | None = None) -> dict:
    """A build stage's record: the run summary, plus the per-step training loss (for loss curves compared at
    equal steps, e.g. laten-lora against lora) read from the run's train_log.jsonl."""
    keep = ("init", "n_train", "steps", "final_loss", "train_seconds", "save_seconds", "extract_seconds")
    out = {k: run_summary.get(k) for k in keep}
    log = Path(run_dir) / "train_log.jsonl" if run_dir is not None else None
    if log is not None and log.is_file():
        rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
        out["loss_curve"] = [round(float(r["loss"]), 5) for r in rows if "loss" in r]
    return out


def merged(path: Path) -> str:
    """The merged checkpoint a fine-tuning run writes into its build stage."""
    return str(path / "run" / "merged")


def finetune_cost(plan, task: str, on: str = "student") -> Cost:
    """LoRA fine-tuning of the student (or, ``on="teacher"``, of the teacher): training tokens at the train rate,
    its load, a full copy of it and the adapter with its optimiser state."""
    c = plan.cfg
    b = c.budget_for(task)
    n = plan.n_train(task)
    params, spec = (plan.tp, plan.teacher.spec) if on == "teacher" else (plan.sp, plan.student.spec)
    tokens = n * b.epochs * plan.toks.mean(task, "train")
    seconds = plan.secs("train", params, c.dtype, tokens) + plan.load(params, c.dtype)
    nbytes = plan.model_bytes(params, c.dtype) + 3 * plan.lora_bytes(spec, b.rank)
    what = "the teacher on " if on == "teacher" else ""
    return Cost(seconds, nbytes, f"fine-tune {what}{n} examples x {b.epochs:g} epochs ({c.dtype})", checkpoint=True)


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


class PostPktArm(Method):
    """A PostPKT arm (:func:`pkt.postpkt.run_postpkt`): LoRA fine-tuning of the student from the init ``init``
    (lora | pissa | seeking), Seeking's from the task's extraction, optionally turned into a ``control``."""

    init: str = "lora"
    control: str | None = None
    finetunes = True

    def build(self, study, task, seed, inputs):
        from pkt.postpkt import run_postpkt

        c = study.cfg
        ft = finetune_cfg(study, task, seed, self.name)
        factors = inputs["extract"] if "extract" in self.reads else None
        if self.init == "seeking":
            ft = ft.model_copy(update={"targets": seeking_targets(study, task)})
        payload = {"method": self.name, "task": task, "teacher": c.teacher, "student": c.student,
                   "finetune": ft.model_dump(), "factors": str(factors) if factors else None,
                   **({"control": self.control} if self.control else {}), **data_setting(c)}

        def fn(d: Path) -> dict:
            if factors is not None and not Path(factors).is_dir():
                study.shared_stage("extract", task)  # restored without its files and not needed before
            return summary(run_postpkt(c.teacher, c.student, task, self.init, d / "run", ft, seeking_cfg(study, task),
                                       factors_dir=factors, progress=True, log=study.echo, control=self.control,
                                       data=c.data), d / "run")

        path, _ = study.run_stage(build_stage(self.name, task, seed), payload, fn,
                                  reads={"models": [c.student], "data": {task: ["train"]}})
        return merged(path), c.eval_dtype


def save_with_deltas(student, tok, deltas: dict, out: Path, study) -> tuple[dict, dict]:
    """Add ``deltas`` to the student's weights, save it (and its tokenizer) to ``out``, and measure what of the
    change survives the study's evaluation dtype: (the deltas' norms, the survival record). The transfer methods'
    common end (function-transfer, SemAlign)."""
    from pkt.evaluate.precision import surviving
    from pkt.transfer.function_transfer import apply_deltas

    norms = apply_deltas(student, deltas)
    student.save_pretrained(out)
    tok.save_pretrained(out)
    return norms, surviving(str(out), study.cfg.student, study.cfg.eval_dtype)
