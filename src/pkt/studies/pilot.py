"""``pkt study pilot CONFIG``: the pilot curve that finds a training budget at which plain LoRA moves the student.

    pkt study pilot configs/pilot-gsm8k.yaml --dry-run      # the plan and its cost on the reference machine
    pkt study pilot configs/pilot-gsm8k.yaml --out runs/pilot-gsm8k   # run, or resume
    pkt study pilot configs/pilot-gsm8k.yaml --report       # pilot.md + pilot.png from the records alone

Why: a claim that an init beats plain LoRA needs a budget at which plain LoRA itself beats the untuned student.
For every budget (train examples × epochs) of the grid and every lr, the student gets a LoRA built exactly as
``pkt postpkt --init lora`` builds it (:func:`pkt.align.finetune.finetune_config`, :func:`pkt.postpkt.run_postpkt`),
which is scored on a HELD-OUT set; per budget the lr with the best held-out score is chosen
(:func:`pkt.studies.pilot_report.select_lr`) and only that build is scored on the TEST subset, paired with the
untuned student on the same questions. The test set never takes part in the choice.

The held-out set (:mod:`pkt.studies.pilot_heldout`): for GSM8K the questions of its train.jsonl in no PKT gsm
split and not in the test set, for MBPP its validation rows; a fixed seeded sample. HumanEval has no held-out pool
(its 164 problems are the test set), so a HumanEval pilot is refused.

Several inits (``inits: [lora, pissa, seeking, seeking-random]``; LoRA alone by default): every init is built as
``pkt postpkt --init <init>`` builds it (seeking-random: ``--init seeking --control random``) at every budget, lr and
seed, and each init gets its own lr, chosen on the held-out set. Seeking and seeking-random read the teacher's
extraction (``teacher:``), a stage of its own computed once and shared by all their builds. Every build records
‖ΔW‖/‖W‖ of the change that reached the evaluated model (merged minus student) and ‖B₀A₀‖/‖W‖ of its init's own
adapter at step 0, so that the inits can also be compared at matched update size (:mod:`pkt.studies.pilot_report`).
A config without ``inits`` runs LoRA alone, under the stage names and keys it had before inits existed.

Every build and evaluation is a stage of :class:`pkt.experiment.cache.StageCache` under ``OUT/stages``, keyed
like ``pkt run``'s (settings, pkt's code, library versions, model and data hashes), written atomically: a rerun
resumes at the first unfinished stage. A build's merged weights are deleted once its budget is evaluated unless
``keep_checkpoints``; a build whose evaluations are cached is not rebuilt. Each finished piece writes a small JSON
record into ``records`` (:mod:`pkt.studies.pilot_report`), from which pilot.md and pilot.png are derived.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pkt.config import Settings
from pkt.errors import PktError
from pkt.studies import pilot_report as R, staged
from pkt.studies.pilot_heldout import heldout_set

METRICS = {"gsm8k": "accuracy", "mbpp": "pass@1"}
INITS = ("lora", "pissa", "seeking", "seeking-random")
TEACHER_INITS = ("seeking", "seeking-random")  # built from the teacher's extraction
NO_HELDOUT = {"humaneval": "HumanEval has no held-out pool (its 164 problems are the test set); use mbpp",
              "mmlu": "MMLU is scored by a letter, not generated; the pilot covers gsm8k and mbpp"}
Positive = Annotated[float, Field(gt=0)]


def heldout_task(v: str) -> str:
    """A task setting's validator: a task with a held-out pool (:mod:`pkt.studies.pilot_heldout`), which every
    study that chooses on held-out data needs."""
    if v in NO_HELDOUT:
        raise ValueError(NO_HELDOUT[v])
    if v not in METRICS:
        raise ValueError(f"unknown task {v!r}; expected one of {', '.join(METRICS)}")
    return v


class EvalSettings(Settings):
    """How both sets are asked and decoded (the ``pkt eval`` defaults: the PKT papers' 0-shot format)."""

    test_size: int = Field(300, ge=1)  # the test subset: a fixed seeded sample of the task's test set
    test_seed: int = 0
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    decoding: Literal["padded", "continuous"] = "continuous"
    protocol: str = "pkt"
    shots: int = Field(0, ge=0)
    allow_weak_sandbox: bool = False


class HeldoutSettings(Settings):
    size: int = Field(150, ge=1)
    seed: int = 0
    answer_loss: bool = True  # also the teacher-forced loss of the held-out gold answers (one forward pass)


class PilotConfig(Settings):
    name: str = "pilot"
    student: str
    task: str = "gsm8k"
    # the inits swept, each with its own lr chosen on held-out; LoRA is always one (the others are compared with it)
    inits: list[Literal[INITS]] = Field(["lora"], min_length=1)
    # Seeking's teacher, whose extraction the seeking inits start from: needed only by them
    teacher: str | None = Field(None, validate_default=True)
    teacher_dtype: Literal["float32", "bfloat16"] = "float32"
    extract_samples: int = Field(32, ge=1)  # examples of the extract split the teacher's sensitivity is taken on
    pissa_niter: int | None = Field(None, ge=1)  # PiSSA's SVD: None = exact (`pkt postpkt`'s), K = randomised
    # also evaluate on the test subset each init's build at LoRA's update size (its matched lr), when that is not
    # its selected build; off, the matched comparison is read on held-out only
    matched_test: bool = False
    records: str  # the directory the records (and pilot.md) go to, committed as they finish
    seeds: list[int] = Field([0], min_length=1)
    # the seeds the lr grid is built and selected on (default: every seed); the other seeds build only each init's
    # selected lr and score it on the test subset, so that seeds add test evidence without multiplying the sweep
    select_seeds: list[int] | None = Field(None, min_length=1)
    train_examples: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    epochs: list[Positive] = Field([1.0], min_length=1)
    extra_budgets: list[tuple[Annotated[int, Field(ge=1)], Positive]] = []  # (examples, epochs) beyond the grid
    lrs: list[Positive] = Field(min_length=1)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    max_length: int = Field(384, ge=16)
    rank: int = Field(16, ge=1)
    alpha: float = 16
    dropout: float | None = Field(None, ge=0, lt=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    style: Literal["chat", "tulu"] = "chat"
    keep_checkpoints: bool = False
    progress: bool = Field(True, exclude=True)  # progress bars; not a setting of any result
    eval: EvalSettings = EvalSettings()
    heldout: HeldoutSettings = HeldoutSettings()

    _has_heldout = field_validator("task")(heldout_task)
    _distinct = field_validator("seeds", "select_seeds", "train_examples", "lrs", "epochs", "inits")(staged.distinct)

    @property
    def sweep_seeds(self) -> list[int]:
        """The seeds whose every lr is built and evaluated on the held-out set (the report's rule)."""
        return R.sweep_seeds({"seeds": self.seeds, "select_seeds": self.select_seeds})

    @field_validator("inits")
    @classmethod
    def _has_lora(cls, v: list) -> list:
        if "lora" not in v:
            raise ValueError("lora must be one of the inits (every other init is compared with it)")
        return v

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str | None, info) -> str | None:
        need = [i for i in info.data.get("inits") or [] if i in TEACHER_INITS]
        if need and not v:
            raise ValueError(f"init {need[0]} starts from the teacher's extraction: name the teacher "
                             "(e.g. teacher: qwen2.5-coder-1.5b-instruct)")
        return v

    @model_validator(mode="after")
    def _micro_batch(self):
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} exceeds batch_size {self.batch_size}")
        extra = [x for x in self.select_seeds or [] if x not in self.seeds]
        if extra:
            raise ValueError(f"select_seeds: seed {extra[0]} is not one of the seeds {self.seeds}")
        return self


def load_config(path: str | Path) -> tuple[PilotConfig, str]:
    """The validated config and its text; a bad one is a one-line PktError naming the file and the setting."""
    return staged.read_config(PilotConfig, path)


# ---- the run --------------------------------------------------------------------------------------------------
class Pilot:
    """One pilot config run into ``out`` (stages) and ``cfg.records`` (records, pilot.md)."""

    def __init__(self, cfg: PilotConfig, out: str | Path | None, config_text: str = "", log=print, dry: bool = False):
        from pkt.experiment.cache import StageCache
        from pkt.experiment.fingerprint import code_identity, library_versions

        self.cfg, self.config_text, self.log = cfg, config_text, log
        # a plan without --out knows no cached stage; its stage names are all it needs of a directory
        self.cache = StageCache(Path(out) if out is not None else Path("."), log=log, dry=dry or out is None)
        self.records = Path(cfg.records)
        self.inits = R.inits(cfg.model_dump(mode="json"))  # LoRA first: the others are compared with it
        self._factors: tuple[Path, dict] | None = None  # the extraction, once computed or found
        self.common = {"code": code_identity(), "libraries": library_versions()}
        self.heldout = heldout_set(cfg.task, cfg.heldout.size, cfg.heldout.seed)
        self._check_budgets()
        self.restored = restorable(self.records)

    def _have(self, name: str, key: dict) -> bool:
        """Whether an evaluation is done: cached here, or in a committed record of the same stage key."""
        return self.cache.is_cached(name, key) or self.cache.path(name, key).name in self.restored

    def _check_budgets(self) -> None:
        from pkt.data.tasks import load_split

        n = len(load_split(self.cfg.task, "train"))
        for b, _ in R.budgets(self.cfg.model_dump(mode="json")):
            if b > n:
                raise PktError(f"train_examples {b}: the {self.cfg.task} PKT train split has only {n} examples")

    # ---- keys ----
    def eval_cfg(self, which: str):
        c = self.cfg
        return staged.eval_config(c.eval, which, c.style, c.max_length, c.progress)

    def finetune_cfg(self, n: int, epochs: float, lr: float, seed: int, init: str = "lora"):
        """The FinetuneConfig ``pkt postpkt --init <init>`` builds from the same flags (PiSSA's also from
        ``--config`` with ``pissa_niter``; no other init reads it, so it is not in their keys)."""
        from pkt.align.finetune import finetune_config

        c = self.cfg
        return finetune_config(None, r=c.rank, alpha=c.alpha, dropout=c.dropout, lr=lr, epochs=epochs,
                               batch_size=c.batch_size, micro_batch_size=c.micro_batch_size, max_length=c.max_length,
                               n_train=n, style=c.style, dtype=c.dtype, seed=seed, report_to="none",
                               pissa_niter=c.pissa_niter if init == "pissa" else None)

    def seeking_cfg(self):
        """The extraction settings ``pkt postpkt --init seeking --teacher T`` uses: SeekingConfig's defaults with the
        style, at the LoRA's rank and targets (:func:`pkt.postpkt.run_postpkt`), on ``extract_samples`` examples."""
        from pkt.postpkt import SeekingConfig

        c = self.cfg
        ex = SeekingConfig(style=c.style, n_samples=c.extract_samples, dtype=c.teacher_dtype)
        ft = self.finetune_cfg(1, 1.0, 1e-4, 0, "seeking")
        return ex.model_copy(update={"rank": ft.r, "targets": list(ft.targets)})

    def extraction_key(self) -> tuple[str, dict]:
        """The teacher's extraction: one stage per task, whatever the budget, lr, seed or seeking init."""
        from pkt.experiment.fingerprint import data_identity, model_identity

        c = self.cfg
        return f"extract-{c.task}", {
            "kind": "pilot-extract", "teacher": c.teacher, "student": c.student, "task": c.task,
            "seeking": self.seeking_cfg().model_dump(), **self.common,
            "models": {c.teacher: model_identity(c.teacher), c.student: model_identity(c.student)},
            "data": data_identity(c.task, (self.seeking_cfg().split,))}

    def build_key(self, n: int, epochs: float, lr: float, seed: int, init: str = "lora") -> tuple[str, dict]:
        """A build's stage name and key. LoRA's are those of a pilot before inits existed (its name has no init,
        its key's ``init`` is "lora"); another init's name starts with it, and a seeking init's key names the
        extraction stage it reads (its directory name: the extraction's key hash)."""
        from pkt.experiment.fingerprint import data_identity, model_identity

        key = {"kind": "pilot-build", "init": init, "task": self.cfg.task,
               "finetune": self.finetune_cfg(n, epochs, lr, seed, init).model_dump(), **self.common,
               "models": {self.cfg.student: model_identity(self.cfg.student)},
               "data": data_identity(self.cfg.task, ("train",))}
        if init in TEACHER_INITS:
            key["extraction"] = self.cache.path(*self.extraction_key()).name
        return f"build-{R.point_name(n, epochs, lr, seed, init)}", key

    def eval_key(self, label: str, which: str, model: dict) -> tuple[str, dict]:
        c = self.cfg
        return staged.eval_key("pilot-eval", label, which, self.eval_cfg(which), c.task, self.heldout.info, model,
                               c.dtype, self.common, answer_loss=which == "heldout" and c.heldout.answer_loss)

    # ---- stages ----
    def _evaluate(self, name: str, key: dict, ref: str, which: str) -> dict | None:
        got = staged.restored(self.cache, self.restored, name, key, self.records, self.log)
        if got is not None:
            return got

        def fn(d: Path) -> dict:
            import gc

            from pkt.evaluate.harness import run_task
            from pkt.io import write_jsonl
            from pkt.models.load import load_model, load_tokenizer
            from pkt.seeding import seed_everything

            ecfg = self.eval_cfg(which)
            seed_everything(ecfg.seed)
            tok, model = load_tokenizer(ref), load_model(ref, dtype=self.cfg.dtype)
            rows = self.heldout.rows if which == "heldout" else None
            res = {**staged.generation_result(self.cfg.task, METRICS[self.cfg.task], model, tok, ecfg, rows, d),
                   "answer_loss": None}
            if key["answer_loss"]:
                loss_records, loss = run_task(f"{self.cfg.task}_loss", model, tok, ecfg, rows=self.heldout.loss)
                write_jsonl(d / "answer_loss.jsonl", loss_records)
                res["answer_loss"] = loss["nll"]
            del model
            gc.collect()
            return res

        return self.cache.run(name, key, fn)[1]

    def extraction(self) -> tuple[Path, dict]:
        """(factors directory, what the build records of it) of the teacher's extraction, computed on first need."""
        if self._factors is None:
            name, key = self.extraction_key()

            def fn(d: Path) -> dict:
                from pkt.postpkt import run_extraction

                m = run_extraction(self.cfg.teacher, self.cfg.student, self.cfg.task, self.seeking_cfg(),
                                   d / "factors", progress=self.cfg.progress, log=self.log)
                return {"teacher_layers": m["teacher_layers"], "n_samples": m["n_samples"], "seconds": m["seconds"]}

            path, res = self.cache.run(name, key, fn)
            self._factors = (path / "factors", {"stage": path.name, "teacher_layers": res["teacher_layers"],
                                                "n_samples": res["n_samples"]})
        return self._factors

    def _build(self, init: str, n: int, epochs: float, lr: float, seed: int, needed: bool) \
            -> tuple[Path, dict | None]:
        """The build's directory and result; run only when ``needed`` or never finished (its weights may be pruned:
        a build whose evaluations are cached is read from its stage.json, not rebuilt)."""
        name, key = self.build_key(n, epochs, lr, seed, init)
        path = self.cache.path(name, key)
        done = staged.finished(path) or self.restored.get(path.name)
        if not needed and done is not None:
            if not self.cache.dry:
                self.log(f"[cached] {name}: not needed, its evaluations are cached")
            return path, done
        if init in TEACHER_INITS and not self.cache.dry and not self.cache.is_cached(name, key):
            self.extraction()  # its own stage, before the build's (whose peak memory it is not)

        def fn(d: Path) -> dict:
            from pkt.methods.base import summary
            from pkt.models.load import resolve
            from pkt.postpkt import run_postpkt
            from pkt.seeding import seed_everything
            from pkt.studies.adapter_update import (adapter_dir, base_tensors, merged_update_norms, summarise,
                                                    update_norms)

            seed_everything(seed)  # the lora init's A factors come from the global RNG (as `pkt postpkt` seeds it)
            factors, extraction = self.extraction() if init in TEACHER_INITS else (None, None)
            run = run_postpkt(self.cfg.teacher if factors else None, self.cfg.student, self.cfg.task,
                              "seeking" if factors else init, d / "run", self.finetune_cfg(n, epochs, lr, seed, init),
                              self.seeking_cfg(), factors_dir=factors, progress=self.cfg.progress, log=self.log,
                              control="random" if init == "seeking-random" else None)
            base = base_tensors(Path(resolve(self.cfg.student)))
            if init == "lora":  # the record it had before inits existed
                # for a plain LoRA the saved adapter's product is exactly merged − student
                update = summarise(update_norms(adapter_dir(d / "run"), base))
                return {**summary(run, d / "run"), "update": dict(sorted(update.items()))}
            # PiSSA and Seeking move W at init (W − B₀A₀ is stored): what reached the evaluated model is the merged
            # checkpoint minus the student, over the matrices the adapter covers; B₀A₀ is the init's own size
            start = d / "run" / "adapter_init"
            update = summarise(merged_update_norms(d / "run" / "merged", base, start))
            init_update = summarise(update_norms(start, base))
            return {**summary(run, d / "run"), "update": dict(sorted(update.items())),
                    "init_update": dict(sorted(init_update.items())),
                    **({"extraction": extraction} if extraction else {})}

        return self.cache.run(name, key, fn)

    def point(self, init: str, n: int, epochs: float, lr: float, seed: int) -> dict | None:
        """One grid point: build, held-out evaluation, record. None in a plan while it is not cached."""
        bname, bkey = self.build_key(n, epochs, lr, seed, init)
        ename, ekey = self.eval_key(R.point_name(n, epochs, lr, seed, init), "heldout",
                                    {"stage": self.cache.path(bname, bkey).name})
        path, build = self._build(init, n, epochs, lr, seed, needed=not self._have(ename, ekey))
        res = self._evaluate(ename, ekey, str(path / "run" / "merged"), "heldout") if build is not None else None
        if res is None:
            return None
        return {"point": R.point_name(n, epochs, lr, seed, init), "init": init, "train_examples": n,
                "epochs": epochs, "lr": lr, "seed": seed, "build_stage": path.name,
                "eval_stage": self.cache.path(ename, ekey).name, "build": build, "heldout": res}

    def test(self, init: str, n: int, epochs: float, lr: float, seed: int, means: dict,
             matched: dict | None = None) -> dict | None:
        """The build of ``lr`` on the test subset: the selected one, or (``matched``: LoRA's update size and this
        build's) the one at LoRA's update size."""
        bname, bkey = self.build_key(n, epochs, lr, seed, init)
        ename, ekey = self.eval_key(R.point_name(n, epochs, lr, seed, init), "test",
                                    {"stage": self.cache.path(bname, bkey).name})
        path, build = self._build(init, n, epochs, lr, seed, needed=not self._have(ename, ekey))
        res = self._evaluate(ename, ekey, str(path / "run" / "merged"), "test") if build is not None else None
        if res is None:
            return None
        return {"budget": R.budget_name(n, epochs), "init": init, "train_examples": n, "epochs": epochs,
                "seed": seed, "lr": lr, "heldout_means": {f"{k:g}": v for k, v in sorted(means.items())},
                **({"matched": matched} if matched else {}), "build_stage": path.name,
                "eval_stage": self.cache.path(ename, ekey).name, "test": res,
                **({"update": build["update"]} if self.cfg.select_seeds and "update" in build else {})}

    def student(self) -> dict:
        from pkt.experiment.fingerprint import model_identity

        out = {}
        for which in ("heldout", "test"):
            name, key = self.eval_key("student", which, model_identity(self.cfg.student))
            res = self._evaluate(name, key, self.cfg.student, which)
            if res is not None:
                out[which] = {**res, "eval_stage": self.cache.path(name, key).name}
        return out

    def meta(self) -> dict:
        return {"format": 1, "settings": self.cfg.model_dump(mode="json"), "config_yaml": self.config_text,
                "metric": METRICS[self.cfg.task], "heldout": self.heldout.info, **self.common,
                "test": staged.describe_test_subset(self.cfg.eval, self.cfg.task)}

    def run(self) -> Path:
        from pkt.experiment.preflight import check_sandbox, model_facts

        model_facts(self.cfg.student)  # a missing or unusable student fails here, before any stage
        if any(i in TEACHER_INITS for i in self.inits):
            model_facts(self.cfg.teacher)
        if self.cfg.task == "mbpp":
            check_sandbox(["mbpp"], self.cfg.eval.allow_weak_sandbox)
        record = staged.RecordWriter(self.records)
        s = self.cfg.model_dump(mode="json")
        grid = R.budgets(s)
        lrs, seeds, sweep = list(self.cfg.lrs), list(self.cfg.seeds), self.cfg.sweep_seeds
        total = len(grid) * len(lrs) * len(sweep) * len(self.inits)

        with self.cache.lock():
            record(R.META, self.meta())
            st = self.student()
            record(R.STUDENT, st)
            self.log("[pilot] student: " + ", ".join(f"{w} {st[w]['score']:.1%}" for w in st))
            done = 0
            for n, e in grid:
                points: dict = {}  # every init's, by point name (the names carry the init)
                target = None  # ‖ΔW‖/‖W‖ of LoRA's selected build, which comes first
                for init in self.inits:
                    for seed in sweep:
                        for lr in lrs:
                            p = self.point(init, n, e, lr, seed)
                            points[p["point"]] = p
                            record(f"{R.POINTS}/{p['point']}.json", p)
                            done += 1
                            self.log(f"[pilot] point {done}/{total} {p['point']}: held-out "
                                     f"{p['heldout']['score']:.1%}, ‖ΔW‖/‖W‖ {p['build']['update']['all']:.3%}")
                    lr, means = R.select_lr(points, n, e, lrs, sweep, init)
                    who = "" if init == R.LORA else f"{init} "
                    for seed in seeds:
                        t = self.test(init, n, e, lr, seed, means)
                        record(f"{R.TESTS}/{R.test_name(n, e, seed, init)}.json", t)
                        self.log(f"[pilot] {who}budget {t['budget']} seed {seed}: lr {lr:g} selected on held-out, "
                                 f"test {t['test']['score']:.1%}")
                    if init == R.LORA:
                        target = R.mean_updates(points, n, e, lrs, sweep)[lr]
                    elif self.cfg.matched_test:
                        m = R.matched_lr(points, n, e, lrs, sweep, init, target)
                        ups = R.mean_updates(points, n, e, lrs, sweep, init)
                        for seed in seeds if m != lr else []:
                            t = self.test(init, n, e, m, seed, means, matched={"target": target, "update": ups[m]})
                            record(f"{R.TESTS}/{R.test_name(n, e, seed, init, matched=True)}.json", t)
                            self.log(f"[pilot] {init} budget {t['budget']} seed {seed}: lr {m:g} matches LoRA's "
                                     f"update size, test {t['test']['score']:.1%}")
                    if not self.cfg.keep_checkpoints:  # one init's builds on disk at a time
                        for seed in seeds:
                            for x in lrs:
                                self._prune(self.cache.path(*self.build_key(n, e, x, seed, init)))
                R.write_report(self.records)
            record.drop_others(R.POINTS, R.TESTS)
            report = R.write_report(self.records)
        self.log(f"[pilot] wrote {report} and {report.with_name(R.PLOT)}")
        return report

    # ---- the plan (--dry-run) ----
    def plan(self) -> list[tuple[str, bool, float, str]]:
        """(stage, cached, estimated seconds, work) of every stage a run computes; nothing runs. A budget's test
        stage is named once its held-out stages are cached (the lr is chosen from them)."""
        from pkt.experiment.fingerprint import model_identity

        from pkt.studies.pilot_plan import Costs

        cost = Costs(self.cfg, self.heldout)
        rows = []
        for which in ("heldout", "test"):
            name, key = self.eval_key("student", which, model_identity(self.cfg.student))
            rows.append((name, self._have(name, key), cost.evaluate(which), cost.work(which)))
        lrs, seeds, sweep = list(self.cfg.lrs), list(self.cfg.seeds), self.cfg.sweep_seeds
        teacher_builds = []  # whether each seeking build is done: the extraction runs only for one that is not
        for n, e in R.budgets(self.cfg.model_dump(mode="json")):
            points: dict = {}
            target = None
            for init in self.inits:
                for seed in sweep:
                    for lr in lrs:
                        bname, bkey = self.build_key(n, e, lr, seed, init)
                        p = self.point(init, n, e, lr, seed)
                        if p is not None:
                            points[p["point"]] = p
                        built = p is not None or self.cache.is_cached(bname, bkey)
                        if init in TEACHER_INITS:
                            teacher_builds.append(built)
                        rows += [(bname, built, cost.build(n, e, init),
                                  f"{'' if init == R.LORA else init + ': '}fine-tune {n} examples x {e:g} epochs, "
                                  f"lr {lr:g}"),
                                 (f"heldout-{R.point_name(n, e, lr, seed, init)}", p is not None,
                                  cost.evaluate("heldout"), cost.work("heldout"))]
                lr, means = R.select_lr(points, n, e, lrs, sweep, init)
                for seed in seeds:
                    t = self.test(init, n, e, lr, seed, means) if lr is not None else None
                    if seed not in sweep:  # its build is not a grid point: it is made for the test alone
                        bname = f"build-{R.point_name(n, e, lr, seed, init)}" if lr is not None else \
                            f"build-{R.test_name(n, e, seed, init)} (lr to be chosen)"
                        built = t is not None or (lr is not None and self.cache.is_cached(
                            *self.build_key(n, e, lr, seed, init)))
                        if init in TEACHER_INITS:
                            teacher_builds.append(built)
                        rows.append((bname, built, cost.build(n, e, init),
                                     f"{'' if init == R.LORA else init + ': '}fine-tune {n} examples x {e:g} epochs, "
                                     "the selected lr"))
                    name = f"test-{R.point_name(n, e, lr, seed, init)}" if lr is not None else \
                        f"test-{R.test_name(n, e, seed, init)} (lr to be chosen)"
                    rows.append((name, t is not None, cost.evaluate("test"), cost.work("test")))
                if init == R.LORA:
                    target = R.mean_updates(points, n, e, lrs, sweep).get(lr)
                elif self.cfg.matched_test:
                    m = R.matched_lr(points, n, e, lrs, sweep, init, target)
                    for seed in seeds if m is None or m != lr else []:
                        t = self.test(init, n, e, m, seed, means) if m is not None else None
                        name = f"test-{R.point_name(n, e, m, seed, init)}" if m is not None else \
                            f"test-{R.test_name(n, e, seed, init, matched=True)} (lr to be matched; none if selected)"
                        rows.append((name, t is not None, cost.evaluate("test"), cost.work("test")))
        if teacher_builds:
            name, key = self.extraction_key()
            rows.insert(2, (name, self.cache.is_cached(name, key) or all(teacher_builds), cost.extraction(),
                            cost.extraction_work()))
        self.plan_notes = cost.notes + [cost.disk_note()]
        return rows

    def _prune(self, path: Path) -> None:
        files = sorted((path / "run" / "merged").glob("model*.safetensors"))
        if files:
            freed = self.cache.prune(path, files, "merged weights deleted after the budget's evaluations")
            self.log(f"[pruned] {path.name}: {freed / 1e9:.2f} GB")


def restorable(records: Path) -> dict[str, dict]:
    """Stage results held by the committed records (:func:`pkt.studies.staged.restorable`): an evaluation's
    result, and a build's (its record, without weights), which a pilot resumed on another machine takes. A test's
    own build (a seed outside ``select_seeds``) is held by its test record as the update that reached the model,
    all that a resumed test reads of it: without it that build would be retrained although its test is done."""
    found = staged.restorable(records, {R.POINTS: (("eval_stage", "heldout"), ("build_stage", "build")),
                                        R.TESTS: (("eval_stage", "test"),)},
                              R.STUDENT, (("heldout", "eval_stage"), ("test", "eval_stage")))
    for f in sorted((records / R.TESTS).glob("*.json")):
        rec = staged.read_json(f)
        if isinstance(rec, dict) and isinstance(rec.get("build_stage"), str) and isinstance(rec.get("update"), dict):
            found.setdefault(rec["build_stage"], {"update": rec["update"]})
    return found


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from pkt.studies.pilot_plan import render_plan

    return staged.main(argv, prog, doc=__doc__, example="configs/pilot-gsm8k.yaml", load_config=load_config,
                       study=Pilot, render_plan=render_plan, report=R, what="stages and weights")

if __name__ == "__main__":
    sys.exit(main())
