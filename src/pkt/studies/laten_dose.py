"""``pkt study laten-dose CONFIG``: LaTen's dose–response, its operating point chosen on held-out data alone.

    pkt study laten-dose configs/laten-dose-gsm8k.yaml --dry-run    # the plan and its cost
    pkt study laten-dose configs/laten-dose-gsm8k.yaml --out runs/laten-dose-gsm8k   # run, or resume
    pkt study laten-dose configs/laten-dose-gsm8k.yaml --report     # laten-dose.md + .png from the records

Why: ``pkt run``'s LaTen arm applies one operating point (the paper's step at rate 0.1, λ 1000, the OneCycle over
the steps trained) and changes almost nothing. Whether another dose does more is read here over the hypernetwork
step (``steps``), the schedule (``schedules``: ``cycle`` = the reference's OneCycle over the whole extract split,
20 steps for GSM8K, stopped at each step; ``trained`` = a cycle over exactly the k steps trained, one training per
k), the transfer rate of the apply (``rates``) and the alignment penalty λ (``penalties``).

A *run* is one hypernetwork training (:func:`pkt.laten.train`, with ``pkt run``'s settings for the budget,
:func:`pkt.methods.laten.laten_settings`): k steps of a cycle spanning s steps (:class:`Run`). The cycle schedule
is the run of max(steps) steps of the extract split's cycle, scored at every step of ``steps`` from its
per-step checkpoints; the trained schedule is one run per k of ``trained_steps``. A trained run of the whole
extract split is the cycle's own run (the same training: both schedules span the same steps), so it is trained
once. Per seed, the apply locates with the seed example once per rate (``locate`` stage: the pairing depends
on the rate, not on the step or the run), and every (run, step, rate) is translated, fused into the student in
memory (:func:`pkt.inject.fused`, the weights restored bit for bit after it) and scored by the held-out answer
loss (steps-saved's measure, :func:`pkt.align.finetune.heldout_probe`), with ‖Δ‖/‖W‖ and the share of Δ that a
bf16 cast keeps (:func:`pkt.inject.delta_stats`).

The held-out set is the pilot's (:mod:`pkt.studies.pilot_heldout`): GSM8K train questions in no PKT split and not
in the test set. Held-out accuracy (greedy, the pilot's evaluation settings) is measured at a few points: the
``accuracy.best`` points of lowest mean held-out loss and ``pkt run``'s point (``accuracy.paper``). The operating
point is chosen on held-out data only (:func:`pkt.studies.laten_dose_report.select`: lowest mean loss over the
seeds, or best accuracy with ``select: accuracy``; ties to the smaller dose) and only that point is evaluated on
the test subset, for every seed, paired with the untuned student question by question.

The hypernetwork is trained on the student's own loss over align examples, so a point can lower the held-out loss
whatever the teacher's vectors hold. ``nulls`` (``random``: :func:`pkt.locate.pairing.null_vectors`, the same located
sites with each teacher vector replaced by a fixed random direction of its norm) retrains the selected point's run
per seed with the null's vectors, scores its grid, and evaluates the selected point's null on the held-out
questions and the test subset: LaTen's gain counts only against its null's, question by question.

Every piece is a stage of :class:`pkt.experiment.cache.StageCache` under ``OUT/stages`` keyed like the pilot's
(settings, code, libraries, models, data, the held-out examples): a rerun resumes at the first unfinished stage,
and a stage is computed only when something that still has to run reads it. Each finished piece writes a small
JSON record into ``records`` (:mod:`pkt.studies.laten_dose_report`), from which the report is derived and from
which a run on another machine restores the finished stages.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pkt.config import Settings
from pkt.errors import PktError
from pkt.experiment.config import Budget
from pkt.studies import laten_dose_report as R, staged
from pkt.studies.pilot import METRICS, EvalSettings, heldout_task
from pkt.studies.pilot_heldout import heldout_set
from pkt.studies.steps_saved import HeldoutSettings

SCHEDULES = ("cycle", "trained")


class AccuracySettings(Settings):
    best: int = Field(2, ge=0)  # the points of lowest mean held-out loss whose held-out accuracy is measured
    paper: bool = True  # also pkt run's point for the budget (laten_choice paper: the paper's step)
    size: int = Field(150, ge=1)  # held-out questions answered (the pilot's held-out pool, seed heldout.seed)


class LatenDoseConfig(Settings):
    name: str = "laten-dose"
    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    task: str = "gsm8k"
    records: str  # the directory the records and the report go to, committed as they finish
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    steps: list[Annotated[int, Field(ge=1)]] = Field([1, 2, 4, 8, 20], min_length=1)  # hypernetwork steps scored
    schedules: list[Literal[SCHEDULES]] = Field(list(SCHEDULES), min_length=1)
    # the step counts the trained schedule trains for, each a training of its own (None: every step of steps)
    trained_steps: list[Annotated[int, Field(ge=1)]] | None = None
    rates: list[Annotated[float, Field(gt=0, le=1)]] = Field([0.1, 0.3, 1.0], min_length=1)
    penalties: list[Annotated[float, Field(ge=0)]] = Field([1000.0, 0.0], min_length=1)  # λ
    select: Literal["loss", "accuracy"] = "loss"  # what chooses the operating point, on the held-out set
    # the selected point again with the teacher's vectors replaced by a null's (pkt.laten.LatenConfig
    # .teacher_vectors): its run retrained and scored per seed, its point evaluated like the selected one
    nulls: list[Literal["random"]] = []
    heldout: HeldoutSettings = HeldoutSettings(size=64)
    accuracy: AccuracySettings = AccuracySettings()
    eval: EvalSettings = EvalSettings()
    dtype: Literal["float32", "bfloat16"] = "float32"  # the student's, trained into, fused into and evaluated in
    teacher_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    style: Literal["chat", "tulu"] = "chat"
    keep_checkpoints: bool = False  # keep every hypernetwork checkpoint (else those of the scored steps)
    progress: bool = Field(True, exclude=True)  # progress bars; not a setting of any result
    # pkt run's budget (pkt.experiment.config.Budget): LaTen's laten_batch, laten_lr, laten_rate (the training's
    # rate), max_length, laten_choice / laten_steps / laten_schedule (pkt run's point); the rest is not read
    budget: Budget = Budget()

    _has_heldout = field_validator("task")(heldout_task)
    _distinct = field_validator("seeds", "steps", "schedules", "rates", "penalties", "trained_steps",
                                "nulls")(staged.distinct)

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if v != sorted(v):
            raise ValueError(f"must increase: {v}")
        return v

    @field_validator("trained_steps")
    @classmethod
    def _subset(cls, v: list[int] | None, info) -> list[int] | None:
        steps = info.data.get("steps") or []
        bad = [k for k in v or [] if k not in steps]
        if bad:
            raise ValueError(f"{bad[0]} is not one of steps {steps}")
        return sorted(v) if v is not None else None


    @model_validator(mode="after")
    def _accuracy_points(self):
        if self.select == "accuracy" and not (self.accuracy.best or self.accuracy.paper):
            raise ValueError("select 'accuracy' chooses among the accuracy points, and accuracy.best 0 with "
                             "accuracy.paper false measures none")
        return self


def load_config(path: str | Path) -> tuple[LatenDoseConfig, str]:
    """The validated config and its text; a bad one is a one-line PktError naming the file and the setting."""
    return staged.read_config(LatenDoseConfig, path)


@dataclass(frozen=True)
class Run:
    """One hypernetwork training: ``trained`` steps of a OneCycle spanning ``span`` steps, at penalty λ, on the
    teacher's vectors or a null's (``vectors``)."""

    trained: int
    span: int
    penalty: float
    vectors: str = "real"

    @property
    def label(self) -> str:
        return R.run_label(self.trained, self.span, self.penalty, self.vectors)

    @property
    def real(self) -> "Run":
        """The same training on the teacher's vectors (a null run's twin)."""
        return Run(self.trained, self.span, self.penalty)


def run_of_point(p: dict) -> Run:
    """The training a point (a record's POINT_KEYS, and ``vectors`` for a null's) reads its checkpoint from."""
    return Run(p["trained"], p["span"], float(p["penalty"]), p.get("vectors", "real"))


# ---- the work of the stages (module functions: the tests call them on tiny models) ----------------------------
def heldout_measure(tok, examples, style: str, batch_size: int, max_length: int):
    """``measure(model)``: the held-out answer loss of steps-saved (:func:`pkt.align.finetune.heldout_probe`:
    teacher-forced NLL of the gold answers, tokenised as ``pkt eval``'s answer loss), in eval mode, no grad."""
    import torch

    from pkt.align.finetune import Heldout, heldout_probe

    probe = heldout_probe(Heldout(examples, (0,), batch_size, max_length), tok, style)

    def measure(model) -> dict:
        model.eval()
        with torch.no_grad():
            return probe.measure(model)

    return measure


def point_deltas(models, pairing, net, lc):
    """The deltas of hypernetwork ``net`` on the vectors of ``pairing``'s located neurons (the teacher's, or the
    null's of the run's settings ``lc``), as :func:`pkt.laten.apply` makes them."""
    from pkt.laten import teacher_sources, translate

    sources, sites = teacher_sources(models, pairing, net.kinds, lc)
    return translate(net, sources, sites)


def score_grid(models, run_dir: Path, steps: list[int], pairings: dict, measure, lc,
               log=lambda m: None) -> list[dict]:
    """Every (step, rate) of one run (its settings ``lc``): translate, fuse into the student in memory, measure,
    restore. ``pairings``: {rate: Pairing}. A point records the held-out loss and the size of its Δ
    (:func:`pkt.inject.delta_stats`)."""
    from pkt.align.hypernet import HyperNet
    from pkt.inject import delta_stats, fused
    from pkt.laten import ckpt_path, teacher_sources, translate

    nets = {s: HyperNet.load(ckpt_path(run_dir, s)) for s in steps}
    points = []
    for rate, pairing in pairings.items():
        # the teacher's vectors depend on the rate's pairing only: extracted once for every step
        sources, sites = teacher_sources(models, pairing, nets[steps[0]].kinds, lc)
        for s in steps:
            deltas = translate(nets[s], sources, sites)
            size = delta_stats(models.student, deltas, models.s_spec)
            with fused(models.student, deltas, models.s_spec):
                loss = measure(models.student)
            points.append({"step": s, "rate": rate, **loss, "rel_norm": size["rel_norm"],
                           "bf16_ratio": size["bf16_ratio"], "bf16_changed": size["bf16_changed"],
                           "per_kind": size["per_kind"], **pairing.summary()})
            log(f"[laten-dose] step {s} rate {rate:g}: held-out loss {loss['loss_per_example']:.4f}, "
                f"‖Δ‖/‖W‖ {size['rel_norm']:.3g}")
            del deltas
        del sources
    return points


# ---- the run --------------------------------------------------------------------------------------------------
class LatenDose:
    """One laten-dose config run into ``out`` (stages) and ``cfg.records`` (records, report)."""

    def __init__(self, cfg: LatenDoseConfig, out: str | Path | None, config_text: str = "", log=print,
                 dry: bool = False):
        from pkt.data.tasks import load_split
        from pkt.experiment.cache import StageCache
        from pkt.experiment.config import ExperimentConfig
        from pkt.experiment.fingerprint import code_identity, library_versions

        self.cfg, self.config_text, self.log = cfg, config_text, log
        # a plan without --out knows no cached stage; its stage names are all it needs of a directory
        self.cache = StageCache(Path(out) if out is not None else Path("."), log=log, dry=dry or out is None)
        self.records = Path(cfg.records)
        # pkt run's experiment of the LaTen arm: its hypernetwork settings and its point come from it
        self.ecfg = ExperimentConfig(name=cfg.name, teacher=cfg.teacher, student=cfg.student, tasks=[cfg.task],
                                     methods=["student", "laten"], seeds=cfg.seeds, dtype=cfg.dtype,
                                     teacher_dtype=cfg.teacher_dtype, eval_dtype=cfg.dtype, style=cfg.style,
                                     analysis=False, budget=cfg.budget, report_to="none")
        self.common = {"code": code_identity(), "libraries": library_versions()}
        self.heldout = heldout_set(cfg.task, cfg.heldout.size, cfg.heldout.seed)
        self.acc_set = heldout_set(cfg.task, cfg.accuracy.size, cfg.heldout.seed)
        self.n_extract = len(load_split(cfg.task, "extract"))
        if cfg.steps[-1] > self.n_extract:
            raise PktError(f"steps: {cfg.steps[-1]} exceeds the {cfg.task} extract split's {self.n_extract} examples "
                           "(one hypernetwork step per extract example)")
        self.settings = cfg.model_dump(mode="json")
        self.paper = R.paper_point(self.settings, self._pkt_run_step(), self.n_extract)
        self.restored = restorable(self.records)

    def _pkt_run_step(self) -> int | None:
        """The step ``pkt run``'s LaTen arm applies for this budget (None when it selects one)."""
        from pkt.methods.laten import train_steps

        if not self.cfg.accuracy.paper:
            return None
        if self.cfg.budget.laten_choice == "select":
            raise PktError("accuracy.paper: budget.laten_choice 'select' gives pkt run no fixed LaTen point; use "
                           "'paper' or 'fixed', or set accuracy.paper: false")
        return train_steps(self.ecfg, self.cfg.task)

    # ---- runs and keys ----
    def runs(self) -> list[Run]:
        """Every training of one seed, in the order they run: per penalty the cycle's run, then the trained
        schedule's (the one that is the cycle's own run only once)."""
        out: list[Run] = []
        for lam in self.cfg.penalties:
            for schedule in self.cfg.schedules:
                for k in R.schedule_steps(self.settings, schedule):
                    run = self.run_of(schedule, k, lam)
                    if run not in out:
                        out.append(run)
        return out

    def run_of(self, schedule: str, step: int, penalty: float) -> Run:
        t, s = R.run_of(self.settings, self.n_extract, schedule, step)
        return Run(t, s, float(penalty))

    def null_run(self, null: str, point: dict | None) -> Run:
        """The training a null retrains: the selected ``point``'s run on the null's vectors, or, before a point is
        chosen, the longest run's (the plan's stand-in)."""
        if point is not None:
            return run_of_point({**point, "vectors": null})
        longest = max(self.runs(), key=lambda r: (r.trained, r.span))
        return Run(longest.trained, longest.span, longest.penalty, null)

    def scored(self, run: Run) -> list[int]:
        """The steps of a run's checkpoints that the grid scores (a null run's: its real twin's)."""
        return sorted({k for sch in self.cfg.schedules for lam in self.cfg.penalties
                       for k in R.schedule_steps(self.settings, sch) if self.run_of(sch, k, lam) == run.real})

    def laten_cfg(self, run: Run, seed: int):
        """pkt run's hypernetwork settings with the run's steps, schedule and penalty (a cycle spanning the
        trained steps is LatenConfig's ``trained`` schedule; one spanning the extract split, its ``extract``)."""
        from pkt.methods.laten import laten_settings

        schedule = "trained" if run.span == run.trained else "extract"
        return laten_settings(self.ecfg, self.cfg.task, seed).model_copy(
            update={"max_steps": run.trained, "schedule": schedule, "penalty": run.penalty,
                    "teacher_vectors": run.vectors})

    def _models_id(self, *refs: str) -> dict:
        from pkt.experiment.fingerprint import model_identity

        return {r: model_identity(r) for r in refs}

    def locate_key(self, seed: int) -> tuple[str, dict]:
        """Per seed: the pairing of the seed example's located neurons at every rate (what the apply reads of
        LaTen's settings: not the training's steps, schedule, penalty or rate)."""
        from pkt.experiment.fingerprint import data_identity

        lc = self.laten_cfg(Run(1, 1, 0.0), seed).model_dump(mode="json")
        reads = {k: lc[k] for k in R.LOCATE_SETTINGS}
        c = self.cfg
        return f"locate-{c.task}-s{seed}", {
            "kind": "laten-dose-locate", "laten": reads, "rates": list(c.rates), **self.common,
            "models": self._models_id(c.teacher, c.student), "data": data_identity(c.task, ("train",))}

    def train_key(self, run: Run, seed: int) -> tuple[str, dict]:
        from pkt.experiment.fingerprint import data_identity

        c = self.cfg
        return f"train-{c.task}-{run.label}-s{seed}", {
            "kind": "laten-dose-train", "laten": self.laten_cfg(run, seed).model_dump(mode="json"),
            "checkpoints": self.scored(run), **self.common, "models": self._models_id(c.teacher, c.student),
            "data": data_identity(c.task, ("extract", "align"))}

    def heldout_spec(self) -> dict:
        from pkt.experiment.cache import stable_hash

        h = self.heldout
        return {"source": h.info["source"], "ids": h.info["ids"],
                "examples": stable_hash([[e.user, e.assistant] for e in h.loss]),
                "batch_size": self.cfg.heldout.batch_size, "max_length": self.max_length}

    @property
    def max_length(self) -> int:
        return max(self.cfg.budget.max_length, 1024)  # cut as pkt eval's answer loss cuts (steps-saved's)

    def grid_key(self, run: Run, seed: int) -> tuple[str, dict]:
        c = self.cfg
        return f"grid-{c.task}-{run.label}-s{seed}", {
            "kind": "laten-dose-grid", "train": self.cache.path(*self.train_key(run, seed)).name,
            "locate": self.cache.path(*self.locate_key(seed)).name, "steps": self.scored(run),
            "rates": list(c.rates), "heldout": self.heldout_spec(), "dtype": c.dtype, **self.common,
            "models": self._models_id(c.student)}

    def student_loss_key(self) -> tuple[str, dict]:
        return "heldout-loss-student", {"kind": "laten-dose-heldout-loss", "heldout": self.heldout_spec(),
                                        "dtype": self.cfg.dtype, **self.common,
                                        "models": self._models_id(self.cfg.student)}

    def eval_cfg(self, which: str):
        c = self.cfg
        return staged.eval_config(c.eval, which, c.style, c.budget.max_length, c.progress)

    def eval_key(self, label: str, which: str, model: dict) -> tuple[str, dict]:
        c = self.cfg
        return staged.eval_key("laten-dose-eval", label, which, self.eval_cfg(which), c.task, self.acc_set.info,
                               model, c.dtype, self.common)

    def point_model(self, p: dict, seed: int) -> dict:
        """What a LaTen point's evaluation reads: its run's checkpoint at the step, the seed's pairing at the rate."""
        run = run_of_point(p)
        return {"train": self.cache.path(*self.train_key(run, seed)).name,
                "locate": self.cache.path(*self.locate_key(seed)).name, "step": p["step"], "rate": p["rate"]}

    # ---- stages ----
    def _restored(self, name: str, key: dict) -> dict | None:
        """A stage's result from a committed record of the same key, when it is not cached here."""
        return staged.restored(self.cache, self.restored, name, key, self.records, self.log)

    def locate(self, seed: int) -> Path:
        name, key = self.locate_key(seed)

        def fn(d: Path) -> dict:
            from pkt.laten import load_models, locate, seed_example
            from pkt.locate.pairing import save_pairing

            lc = self.laten_cfg(Run(1, 1, 0.0), seed)
            m = load_models(lc, log=self.log)
            example = seed_example(lc, seed)
            out = {"seed_example": example.meta.get("id"), "rates": {}}
            for rate in self.cfg.rates:
                pairing = locate(m, example, lc, rate, self.cfg.progress)
                save_pairing(pairing, d / R.pairing_file(rate))
                out["rates"][f"{rate:g}"] = pairing.summary()
            return out

        return self.cache.run(name, key, fn)[0]

    def train(self, run: Run, seed: int) -> Path:
        name, key = self.train_key(run, seed)

        def fn(d: Path) -> dict:
            import shutil

            from pkt.laten import ckpt_path, load_models, train

            lc = self.laten_cfg(run, seed)
            rows = train(lc, d / "train", models=load_models(lc, log=self.log), resume=False,
                         progress=self.cfg.progress, log=lambda m: None)
            keep = set(self.scored(run))
            if not self.cfg.keep_checkpoints:  # the scored steps' checkpoints are the stage's output
                for k in range(run.trained + 1):
                    if k not in keep:
                        shutil.rmtree(ckpt_path(d / "train", k).parent, ignore_errors=True)
                (d / "train" / "state.pt").unlink(missing_ok=True)
            drop = ("seconds", "locate_seconds", "tokens_per_s")  # timings: not results
            return {"steps": run.trained, "span": run.span, "penalty": run.penalty, "schedule": lc.schedule,
                    "log": [{k: v for k, v in r.items() if k not in drop} for r in rows]}

        return self.cache.run(name, key, fn)[0]

    def grid(self, run: Run, seed: int) -> tuple[str, dict | None, str, dict | None]:
        """(stage name, result, train stage name, train result) of one run's grid; None in a plan while not done."""
        tname, tkey = self.train_key(run, seed)
        name, key = self.grid_key(run, seed)
        got = self._restored(name, key)
        if got is not None:
            return self.cache.path(name, key).name, got, self.cache.path(tname, tkey).name, \
                self.restored.get(self.cache.path(tname, tkey).name)
        if not self.cache.dry and not self.cache.is_cached(name, key):
            # its inputs, each its own stage (whose peak memory the grid's is not)
            self.locate(seed)
            self.train(run, seed)

        def fn(d: Path) -> dict:
            import gc

            from pkt.laten import load_models
            from pkt.locate.pairing import load_pairing

            lc = self.laten_cfg(run, seed)
            m = load_models(lc, log=self.log)
            loc = self.cache.path(*self.locate_key(seed))
            pairings = {r: load_pairing(loc / R.pairing_file(r)) for r in self.cfg.rates}
            measure = heldout_measure(m.tokenizer, self.heldout.loss, self.cfg.style, self.cfg.heldout.batch_size,
                                      self.max_length)
            points = score_grid(m, self.cache.path(tname, tkey) / "train", self.scored(run), pairings, measure,
                                lc, log=self.log)
            del m
            gc.collect()
            return {"points": points}

        path, res = self.cache.run(name, key, fn)
        tres = staged.finished(self.cache.path(tname, tkey))
        return path.name, res, self.cache.path(tname, tkey).name, tres

    def student_loss(self) -> dict | None:
        name, key = self.student_loss_key()
        got = self._restored(name, key)
        if got is not None:
            return {**got, "stage": self.cache.path(name, key).name}

        def fn(d: Path) -> dict:
            from pkt.models.load import load_model, load_tokenizer

            tok = load_tokenizer(self.cfg.student, padding_side="right")
            model = load_model(self.cfg.student, dtype=self.cfg.dtype)
            return heldout_measure(tok, self.heldout.loss, self.cfg.style, self.cfg.heldout.batch_size,
                                   self.max_length)(model)

        path, res = self.cache.run(name, key, fn)
        return None if res is None else {**res, "stage": path.name}

    def _evaluate(self, name: str, key: dict, which: str, point: tuple[dict, int] | None) -> dict | None:
        """The student (``point`` None) or a LaTen point (its record and seed) on the held-out questions or the
        test subset; the point's student is fused in memory from its run's checkpoint and the seed's pairing."""
        got = self._restored(name, key)
        if got is not None:
            return got
        if point is not None and not self.cache.dry and not self.cache.is_cached(name, key):
            p, seed = point
            self.locate(seed)
            self.train(run_of_point(p), seed)

        def fn(d: Path) -> dict:
            import gc

            from pkt.models.load import load_model, load_tokenizer
            from pkt.seeding import seed_everything

            ecfg = self.eval_cfg(which)
            seed_everything(ecfg.seed)
            tok = load_tokenizer(self.cfg.student)
            extra = {}
            if point is None:
                model = load_model(self.cfg.student, dtype=self.cfg.dtype)
            else:
                from pkt.align.hypernet import HyperNet
                from pkt.inject import delta_stats, fuse
                from pkt.laten import ckpt_path, load_models
                from pkt.locate.pairing import load_pairing

                p, seed = point
                lc = self.laten_cfg(run_of_point(p), seed)
                m = load_models(lc, log=self.log)
                pairing = load_pairing(self.cache.path(*self.locate_key(seed)) / R.pairing_file(p["rate"]))
                net = HyperNet.load(ckpt_path(self.cache.path(*self.train_key(run_of_point(p), seed)) / "train",
                                              p["step"]))
                deltas = point_deltas(m, pairing, net, lc)
                size = delta_stats(m.student, deltas, m.s_spec)
                fuse(m.student, deltas, m.s_spec)
                model = m.student
                extra = {"rel_norm": size["rel_norm"], "bf16_changed": size["bf16_changed"]}
                del m, deltas
            rows = self.acc_set.rows if which == "heldout" else None
            res = {**staged.generation_result(self.cfg.task, METRICS[self.cfg.task], model, tok, ecfg, rows, d),
                   **extra}
            del model
            gc.collect()
            return res

        return self.cache.run(name, key, fn)[1]

    def student_eval(self, which: str) -> dict | None:
        from pkt.experiment.fingerprint import model_identity

        name, key = self.eval_key("student", which, model_identity(self.cfg.student))
        res = self._evaluate(name, key, which, None)
        return None if res is None else {**res, "eval_stage": self.cache.path(name, key).name}

    def point_eval(self, p: dict, seed: int, which: str) -> tuple[str, dict | None]:
        """(stage name, result) of a LaTen point's evaluation for a seed."""
        name, key = self.eval_key(f"{self.cfg.task}-{R.point_label(p)}-s{seed}", which, self.point_model(p, seed))
        return self.cache.path(name, key).name, self._evaluate(name, key, which, (p, seed))

    def meta(self) -> dict:
        lc = self.laten_cfg(Run(1, 1, 0.0), self.cfg.seeds[0]).model_dump(mode="json")
        return {"format": 1, "settings": self.settings, "config_yaml": self.config_text,
                "metric": METRICS[self.cfg.task], "n_extract": self.n_extract, "heldout": self.heldout.info,
                "accuracy_set": self.acc_set.info, "paper_point": self.paper,
                "laten": {k: v for k, v in lc.items() if k not in ("max_steps", "schedule", "penalty", "seed")},
                **self.common, "test": staged.describe_test_subset(self.cfg.eval, self.cfg.task)}

    def _record_grid(self, record, run: Run, seed: int) -> dict:
        stage, res, tstage, tres = self.grid(run, seed)
        record(f"{R.GRIDS}/{R.grid_file(run.label, seed)}",
               {"run": run.label, "trained": run.trained, "span": run.span, "penalty": run.penalty,
                **({"vectors": run.vectors} if run.vectors != "real" else {}),
                "seed": seed, "stage": stage, "result": res, "train_stage": tstage, "train": tres})
        return res

    def _evaluate_point(self, record, p: dict, which: str) -> None:
        """A point's evaluation on the held-out questions or the test subset, every seed, each recorded."""
        where, field = (R.ACCURACY, "heldout") if which == "heldout" else (R.TESTS, "test")
        for seed in self.cfg.seeds:
            stage, res = self.point_eval(p, seed, which)
            record(f"{where}/{R.point_label(p)}-s{seed}.json",
                   {"point": R.point_label(p), **p, "seed": seed, "eval_stage": stage, field: res})
            self.log(f"[laten-dose] {R.point_label(p)} seed {seed}: {field} {res['score']:.1%}")

    def run(self) -> Path:
        from pkt.experiment.preflight import check_models

        check_models(self.ecfg)  # a missing or mismatched model fails here, before any stage
        record = staged.RecordWriter(self.records)
        c = self.cfg
        with self.cache.lock():
            record(R.META, self.meta())
            student = {"heldout_loss": self.student_loss()}
            record(R.STUDENT, student)
            self.log(f"[laten-dose] student: held-out loss {student['heldout_loss']['loss_per_example']:.4f}")
            runs, total, done = self.runs(), len(self.runs()) * len(c.seeds), 0
            for seed in c.seeds:
                for run in runs:
                    res = self._record_grid(record, run, seed)
                    done += 1
                    self.log(f"[laten-dose] grid {done}/{total} {run.label} seed {seed}: held-out loss "
                             + ", ".join(f"step {p['step']} rate {p['rate']:g} {p['loss_per_example']:.4f}"
                                         for p in res["points"]))
                R.write_report(self.records)
            for which in ("heldout", "test"):
                student[which] = self.student_eval(which)
                record(R.STUDENT, student)
            rec = R.load(self.records)
            for p in R.accuracy_points(rec):
                self._evaluate_point(record, p, "heldout")
            R.write_report(self.records)
            chosen = R.select(R.load(self.records))
            self._evaluate_point(record, chosen, "test")
            for null in c.nulls:  # the selected point on the null's vectors: its run, then its evaluations
                p = {**chosen, "vectors": null}
                for seed in c.seeds:
                    self._record_grid(record, self.null_run(null, chosen), seed)
                for which in ("heldout", "test"):
                    self._evaluate_point(record, p, which)
            record.drop_others(R.GRIDS, R.ACCURACY, R.TESTS)  # another grid's or settings': not this study's
            report = R.write_report(self.records)
        self.log(f"[laten-dose] wrote {report} and {report.with_name(R.PLOT)}")
        return report


def restorable(records: Path) -> dict[str, dict]:
    """Stage results held by the committed records (:func:`pkt.studies.staged.restorable`): each grid, its
    training and each evaluation, and the student's, which a run on another machine takes."""
    return staged.restorable(records, {R.GRIDS: (("stage", "result"), ("train_stage", "train")),
                                       R.ACCURACY: (("eval_stage", "heldout"),), R.TESTS: (("eval_stage", "test"),)},
                             R.STUDENT, (("heldout_loss", "stage"), ("heldout", "eval_stage"), ("test", "eval_stage")))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pkt.studies.laten_dose_plan import render_plan

    return staged.main(argv, prog, doc=__doc__, example="configs/laten-dose-gsm8k.yaml", load_config=load_config,
                       study=LatenDose, render_plan=render_plan, report=R, what="stages and checkpoints")


if __name__ == "__main__":
    sys.exit(main())
