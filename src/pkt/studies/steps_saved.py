"""``pkt study steps-saved CONFIG``: the fine-tuning steps that LaTen's injection saves, read on one held-out set.

    pkt study steps-saved configs/steps-saved-gsm8k.yaml --dry-run     # the plan and its cost
    pkt study steps-saved configs/steps-saved-gsm8k.yaml --out runs/steps-saved-gsm8k   # run, or resume
    pkt study steps-saved configs/steps-saved-gsm8k.yaml --report      # steps-saved.md + .png from the records

Why: the seed paper's PrePKT claim is that a pre-aligned student needs less fine-tuning. Comparing ``laten-lora``
(LaTen's injected student, then LoRA) with ``lora`` by their *training* loss per step reads that off noise: every
step trains on another minibatch, so two steps' losses differ by their batches as much as by the model. Here every
arm's loss is measured on ONE fixed held-out set at chosen optimizer steps (``heldout_at``; 0 = before any update)
by the training loop's probe (:class:`pkt.align.loop.Probe`, which changes no training bit), so the curves differ
only by the model.

Per seed, every arm of ``arms`` (default lora and laten-lora; also laten-lora's null laten-random-lora, seeking, its
controls seeking-random and seeking-shuffled, or pissa) is fine-tuned exactly as
``pkt run`` builds it (:func:`pkt.methods.base.finetune_cfg`, :func:`pkt.postpkt.run_postpkt`; laten-lora's LaTen
student is ``pkt run``'s ``laten`` build, :mod:`pkt.methods.laten`), with the same seed for the LoRA init, the
data order and the dropout masks: the arms of a seed train on the same examples in the same steps and
micro-batches, which each record lists (``batches``) and the report checks.

The held-out set is the pilot's (:mod:`pkt.studies.pilot_heldout`): questions of the task in no PKT split (not
extract or align, which LaTen trains on and selects with; not train, whose head fine-tuning uses and from which
LaTen's apply draws its seed example) and not in the test set, with gold answers in the PKT splits' wording. The
tail of the train split (``pkt run``'s answer-loss set) would do for fine-tuning, but LaTen's apply may draw its
seed example from it.

Each arm and seed is a stage of :class:`pkt.experiment.cache.StageCache` under ``OUT/stages`` keyed like ``pkt
run``'s (settings, code, libraries, models, data, the held-out examples), so a rerun resumes at the first
unfinished stage; each finished curve is written as a small JSON record into ``records``, from which the report
is derived (:mod:`pkt.studies.steps_saved_report`) and from which a run on another machine restores the finished
stages (a record matches only a stage of the same key). Merged weights are not kept (the curves are the result);
LaTen's fused student is deleted once its seed is done, its delta file kept.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveFloat, field_validator, model_validator

from pkt.config import Settings
from pkt.errors import PktError
from pkt.experiment.config import Budget
from pkt.methods import REGISTRY
from pkt.studies import staged, steps_saved_report as R
from pkt.studies.pilot import heldout_task
from pkt.studies.pilot_heldout import heldout_set

# arm -> the LoRA init it fine-tunes with (laten-lora: plain LoRA on the LaTen-injected student)
INITS = {"lora": "lora", "laten-lora": "lora", "laten-random-lora": "lora", "seeking": "seeking",
         "seeking-random": "seeking", "seeking-shuffled": "seeking", "pissa": "pissa"}


def control_of(arm: str) -> str | None:
    """The control Seeking's factors are turned into for ``arm`` (pkt.postpkt.control_factors, seeded with the
    fine-tuning seed), as pkt run's method of that name declares it: whether a curve below LoRA's comes from the
    teacher's blocks or from a large init of their spectrum. None for every other arm."""

    return getattr(REGISTRY[arm], "control", None)


class HeldoutSettings(Settings):
    size: int = Field(150, ge=1)  # questions of the pilot's held-out pool (pkt.studies.pilot_heldout)
    seed: int = 0  # its sample's seed (0: the pilot's own 150 GSM8K questions)
    batch_size: int = Field(8, ge=1)  # rows per forward of the answer loss


class StepsSavedConfig(Settings):
    name: str = "steps-saved"
    teacher: str = "qwen2.5-coder-1.5b-instruct"
    student: str = "qwen2.5-coder-0.5b-instruct"
    task: str = "gsm8k"
    records: str  # the directory the records and the report go to, committed as they finish
    seeds: list[int] = Field([0], min_length=1)
    arms: list[str] = ["lora", "laten-lora"]
    # an arm's own lr (e.g. the lr the decisive study selected for its init on held-out questions); the other arms
    # train at budget.lr. A non-zero init moves the student further per step than LoRA at the same lr, so an init
    # compared at LoRA's lr is compared at another step size
    arm_lrs: dict[str, PositiveFloat] = {}
    # optimizer steps at which the held-out loss is measured: 0 (before any update) first, the run's last step last
    heldout_at: list[int] = [0, 1, 2, 4, 8]
    heldout: HeldoutSettings = HeldoutSettings()
    # records directories of steps-saved studies with the same lora (the same settings but for their arms and lrs):
    # the report sets their arms beside these, paired (steps_saved_report.join checks that the lora curves are
    # equal bit for bit). Read by the report only; nothing of theirs is run
    compare_with: list[str] = []
    dtype: Literal["float32", "bfloat16"] = "float32"
    teacher_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    style: Literal["chat", "tulu"] = "chat"
    keep_checkpoints: bool = False  # keep the merged fine-tuned students and LaTen's fused ones
    progress: bool = Field(True, exclude=True)  # progress bars; not a setting of any result
    # pkt run's budget (pkt.experiment.config.Budget): fine-tuning (train_examples, epochs, batch_size, lr, rank,
    # ...) and LaTen (laten_*), read through the same functions as pkt run's methods
    budget: Budget = Budget()

    _has_heldout = field_validator("task")(heldout_task)  # gsm8k or mbpp
    _distinct = field_validator("seeds")(staged.distinct)

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in INITS]
        if bad:
            raise ValueError(f"unknown arm {bad[0]!r}; expected some of {', '.join(INITS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"values repeat in {v}")
        if "lora" not in v:
            raise ValueError("'lora' must be among the arms: steps are counted against its final held-out loss")
        return v

    @model_validator(mode="after")
    def _arm_lrs(self):
        bad = [a for a in self.arm_lrs if a not in self.arms]
        if bad:
            raise ValueError(f"arm_lrs: {bad[0]!r} is not one of the arms {self.arms}")
        return self

    @field_validator("compare_with")
    @classmethod
    def _compare_with(cls, v: list[str]) -> list[str]:
        for d in v:
            if not (Path(d) / R.META).is_file():
                raise ValueError(f"{d} holds no steps-saved records ({R.META})")
        return v

    @field_validator("heldout_at")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or v[0] != 0:
            raise ValueError("must start at 0 (the model before any update anchors every curve)")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must increase step by step: {v}")
        return v


def load_config(path: str | Path) -> tuple[StepsSavedConfig, str]:
    """The validated config and its text; a bad one is a one-line PktError naming the file and the setting."""
    return staged.read_config(StepsSavedConfig, path)


class StepsSaved:
    """One steps-saved config run into ``out`` (stages) and ``cfg.records`` (records, report)."""

    def __init__(self, cfg: StepsSavedConfig, out: str | Path | None, config_text: str = "", log=print,
                 dry: bool = False):
        from pkt.experiment.config import ExperimentConfig
        from pkt.experiment.fingerprint import code_identity, library_versions
        from pkt.experiment.runner import Study

        self.cfg, self.config_text, self.log = cfg, config_text, log
        # pkt run's study object builds the arms' inputs (LaTen's student, Seeking's extraction) with pkt run's
        # stage keys; a plan without --out knows no cached stage
        self.ecfg = ExperimentConfig(name=cfg.name, teacher=cfg.teacher, student=cfg.student, tasks=[cfg.task],
                                     methods=["student", *cfg.arms], seeds=cfg.seeds, dtype=cfg.dtype,
                                     teacher_dtype=cfg.teacher_dtype, eval_dtype="float32", style=cfg.style,
                                     analysis=False, budget=cfg.budget, keep_checkpoints=cfg.keep_checkpoints,
                                     report_to="none")
        self.study = Study(self.ecfg, Path(out) if out is not None else Path("."), config_text, log=log)
        self.study.cache.dry = dry or out is None
        self.records = Path(cfg.records)
        self.common = {"code": code_identity(), "libraries": library_versions()}
        self.heldout = heldout_set(cfg.task, cfg.heldout.size, cfg.heldout.seed)
        self.n_train = self.study.n_train[cfg.task]
        self.total = self._check_steps()
        self.restored = restorable(self.records)

    def _check_steps(self) -> int:
        from pkt.align.loop import plan

        b = self.cfg.budget
        total = plan(self.n_train, b.batch_size, b.epochs)[1]
        if self.cfg.heldout_at[-1] != total:
            raise PktError(f"heldout_at ends at step {self.cfg.heldout_at[-1]}, but the run has {total} optimizer "
                           f"steps ({self.n_train} examples, batch {b.batch_size}, {b.epochs:g} epochs): the last "
                           "measured step must be the last, LoRA's final loss")
        return total

    @contextlib.contextmanager
    def _dry(self):
        """Stage keys and paths only: nothing runs, and the peeked stages are not listed as run."""
        cache = self.study.cache
        was, n0 = cache.dry, len(cache.records)
        cache.dry = True
        try:
            yield
        finally:
            cache.dry = was
            del cache.records[n0:]

    # ---- keys ----
    def _inputs(self, arm: str, seed: int) -> dict:
        """What the arm starts from besides the student, as stage paths: LaTen's fused student (laten-lora) or
        Seeking's factors; built unless cached (or, in a peek, only named)."""
        source = getattr(REGISTRY[arm], "source", None)  # laten-lora's LaTen build, laten-random-lora's null's
        if source:
            ref, _ = self.study.build(source, self.cfg.task, seed, {})
            return {"laten": ref}
        if INITS[arm] == "seeking":  # Seeking and its controls start from the task's one extraction
            return {"factors": str(self.study.shared_stage("extract", self.cfg.task))}
        return {}

    def finetune_cfg(self, arm: str, seed: int):
        from pkt.methods.base import finetune_cfg, seeking_targets

        ft = finetune_cfg(self.study, self.cfg.task, seed, arm)  # the seed of the LoRA init, data order and dropout
        if arm in self.cfg.arm_lrs:
            ft = ft.model_copy(update={"lr": self.cfg.arm_lrs[arm]})
        if INITS[arm] != "seeking":
            return ft
        return ft.model_copy(update={"targets": seeking_targets(self.study, self.cfg.task)})

    def heldout_spec(self):
        from pkt.align.finetune import Heldout

        # cut as pkt eval's answer loss cuts (its max_prompt_tokens: evaluation.eval_cfg)
        return Heldout(self.heldout.loss, tuple(self.cfg.heldout_at), self.cfg.heldout.batch_size,
                       max(self.cfg.budget.max_length, 1024))

    def key(self, arm: str, seed: int, inputs: dict) -> tuple[str, dict, dict]:
        """(stage name, payload, reads) of one arm's curve; its key is completed by Study.run_stage."""
        from pkt.experiment.cache import stable_hash

        c, h = self.cfg, self.heldout_spec()
        payload = {"kind": "steps-saved-curve", "arm": arm, "init": INITS[arm], "task": c.task, "student": c.student,
                   **({"control": control_of(arm)} if control_of(arm) else {}),
                   "finetune": self.finetune_cfg(arm, seed).model_dump(), **inputs,
                   "heldout": {"source": self.heldout.info["source"], "ids": self.heldout.info["ids"],
                               "examples": stable_hash([[e.user, e.assistant] for e in h.examples]),
                               "at": list(h.at), "batch_size": h.batch_size, "max_length": h.max_length}}
        reads = {"models": [c.student] + ([inputs["laten"]] if "laten" in inputs else []), "data": {c.task: ["train"]}}
        return R.curve_name(arm, seed, c.task), payload, reads

    # ---- stages ----
    def curve(self, arm: str, seed: int) -> tuple[Path, dict | None]:
        """One arm's held-out curve: cached, restored from a committed record, or trained (None in a plan)."""
        with self._dry():
            inputs = self._inputs(arm, seed)
            name, payload, reads = self.key(arm, seed, inputs)
            path, done = self.study.run_stage(name, payload, None, reads)
        if done is None and path.name in self.restored:
            # finished on another machine (same settings, code and data: the stage key is in the name)
            if not self.study.cache.dry:
                self.log(f"[restored] {name} from its record in {self.records}")
            return path, self.restored[path.name]
        if self.study.cache.dry:
            return path, done
        inputs = self._inputs(arm, seed) if done is None else inputs  # built now only when the curve must run
        return self.study.run_stage(name, payload, lambda d: self._train(arm, seed, inputs, d), reads)

    def _train(self, arm: str, seed: int, inputs: dict, d: Path) -> dict:
        from pkt.methods.base import seeking_cfg
        from pkt.postpkt import run_postpkt
        from pkt.seeding import seed_everything

        c = self.cfg
        seed_everything(seed)  # the LoRA A init draws from the global RNG: the same draws for every arm of a seed
        deltas = Path(inputs["laten"]) / "laten_deltas.safetensors" if "laten" in inputs else None
        summary = run_postpkt(c.teacher if INITS[arm] == "seeking" else None, c.student, c.task, INITS[arm], d / "run",
                              self.finetune_cfg(arm, seed), seeking_cfg(self.study, c.task),
                              factors_dir=inputs.get("factors"), progress=c.progress, log=self.study.echo,
                              base_deltas=deltas, heldout=self.heldout_spec(), control=control_of(arm))
        probe = json.loads((d / "run" / "heldout.json").read_text(encoding="utf-8"))
        train = [json.loads(x) for x in (d / "run" / "train_log.jsonl").read_text(encoding="utf-8").splitlines() if x]
        if not c.keep_checkpoints:  # the curve is the result; a merged student is a full copy of the model
            for f in (d / "run" / "merged").glob("model*.safetensors"):
                f.unlink()
        keep = ("step", "loss", "loss_per_example", "tokens", "per_example")
        return {"arm": arm, "seed": seed, "steps": summary["steps"], "n_train": summary["n_train"],
                "train_loss": [r["loss"] for r in train],
                "heldout": [{k: r[k] for k in keep} for r in probe["records"]], "batches": probe["batches"],
                "train_seconds": summary.get("train_seconds")}

    def _prune_laten(self, seed: int) -> None:
        """The LaTen students (LaTen's, its null's) once their seed's arms are done (delta files and records stay)."""
        if self.cfg.keep_checkpoints:
            return
        for source in dict.fromkeys(getattr(REGISTRY[a], "source", None) for a in self.cfg.arms):
            if source is None:
                continue
            with self._dry():
                ref = Path(self.study.build(source, self.cfg.task, seed, {})[0])
            files = sorted(ref.glob("model*.safetensors"))
            if files:
                freed = self.study.cache.prune(ref.parent, files, "LaTen's fused weights deleted after its seed's curves")
                self.log(f"[pruned] {ref.parent.name}/{ref.name}: {freed / 1e9:.2f} GB")

    def meta(self) -> dict:
        return {"format": 1, "settings": self.cfg.model_dump(mode="json"), "config_yaml": self.config_text,
                "heldout": self.heldout.info, "n_train": self.n_train, "steps": self.total, **self.common}

    def run(self) -> Path:
        from pkt.experiment.preflight import check_models

        check_models(self.ecfg)  # a missing or mismatched model fails here, before any stage
        record = staged.RecordWriter(self.records)
        with self.study.cache.lock():
            record(R.META, self.meta())
            total, done = len(self.cfg.seeds) * len(self.cfg.arms), 0
            for seed in self.cfg.seeds:
                for arm in self.cfg.arms:
                    path, res = self.curve(arm, seed)
                    record(f"{R.CURVES}/{R.curve_file(arm, seed)}", {"arm": arm, "seed": seed, "stage": path.name,
                                                                     "result": res})
                    done += 1
                    losses = ", ".join(f"{r['step']}: {r['loss']:.4f}" for r in res["heldout"])
                    self.log(f"[steps-saved] {done}/{total} {arm} seed {seed}: held-out loss by step {losses}")
                self._prune_laten(seed)
                R.write_report(self.records, **report_options(self.cfg))
            record.drop_others(R.CURVES)  # a record of other arms or seeds: not this study's
            report = R.write_report(self.records, **report_options(self.cfg))
        self.log(f"[steps-saved] wrote {report} and {report.with_name(R.PLOT)}")
        return report

    # ---- the plan (--dry-run) ----
    def plan(self) -> tuple[list[tuple[str, bool, float, str]], list[str]]:
        """(stage, cached, estimated seconds, work) of every stage a run computes, and notes; nothing runs."""
        from pkt import methods
        from pkt.experiment.plan import PlanContext, _Tokens
        from pkt.experiment.preflight import check_models, meta_facts
        from pkt.methods.base import finetune_cost
        from pkt.stage import BUILD

        teacher, student = check_models(self.ecfg, plan=True)
        teacher, student = meta_facts(teacher), meta_facts(student)
        ctx = PlanContext(self.study, teacher, student, _Tokens(student.path, student.tokenizer))
        c, task, rows, seen = self.cfg, self.cfg.task, [], set()
        notes = [] if ctx.sp and ctx.tp else ["a model's size is unknown until it is prepared: its stages cost 0"]
        probe_tokens = len(c.heldout_at) * sum(self._tokens(ctx, e) for e in self.heldout.loss)
        records = self.study.cache.records
        with self._dry():
            for seed in c.seeds:
                for arm in c.arms:
                    _, res = self.curve(arm, seed)
                    if res is None:  # its inputs are built only for a curve that runs
                        n0 = len(records)
                        self._inputs(arm, seed)
                        for rec in records[n0:]:
                            if rec.key not in seen:
                                seen.add(rec.key)
                                cost = (methods.get(rec.of.method) if rec.of.kind == BUILD
                                        else methods.get_shared(rec.of.kind)).estimate(ctx, task)
                                rows.append((rec.stage, rec.cached, 0.0 if rec.cached else cost.seconds, cost.work))
                    ft = finetune_cost(ctx, task)
                    seconds = ft.seconds + ctx.secs("forward", ctx.sp, c.dtype, probe_tokens)
                    rows.append((R.curve_name(arm, seed, task), res is not None, seconds,
                                 f"{ft.work}; held-out loss of {len(self.heldout.loss)} examples at steps "
                                 f"{', '.join(map(str, c.heldout_at))}"))
        return rows, notes

    @staticmethod
    def _tokens(ctx, example) -> float:
        text = example.user + example.assistant
        tok = ctx.toks.tok
        return (len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else len(text) / 4) + 12


def render_plan(study: StepsSaved) -> str:
    from pkt.experiment.plan import THROUGHPUT_MACHINE, human

    rows, notes = study.plan()
    todo = [r for r in rows if not r[1]]
    lines = staged.plan_table(rows, 34)
    curves = sum(r[0].startswith(R.CURVE_PREFIX) for r in rows)
    lines.append(f"plan: {curves} curves and {len(rows) - curves} input builds ({len(rows) - len(todo)} stages "
                 f"cached), estimated {human(sum(r[2] for r in todo))} on the reference machine "
                 f"({THROUGHPUT_MACHINE})")
    return "\n".join(lines + [f"note: {x}" for x in notes])


def restorable(records: Path) -> dict[str, dict]:
    """Curve results held by the committed records (:func:`pkt.studies.staged.restorable`), which a run on
    another machine takes."""
    return staged.restorable(records, {R.CURVES: (("stage", "result"),)})


def report_options(cfg: StepsSavedConfig) -> dict:
    """What the report reads besides the records directory (``R.write_report``'s keyword arguments)."""
    return {"compare_with": cfg.compare_with}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return staged.main(argv, prog, doc=__doc__, example="configs/steps-saved-gsm8k.yaml", load_config=load_config,
                       study=StepsSaved, render_plan=render_plan, report=R, what="stages",
                       report_options=report_options)

if __name__ == "__main__":
    sys.exit(main())
