"""The plan of a laten-dose study before it runs (``pkt study laten-dose CONFIG --dry-run``): every stage a run
computes, in its order, cached or not (:func:`plan`: from the study's stage keys and records; nothing runs), with
its estimated time on the reference machine of :mod:`pkt.experiment.plan` (its measured forward, training and
decoding rates by model size and dtype; continuous generation counted at the answers' expected lengths).

* a hypernetwork training: ``pkt run``'s LaTen estimate per step (:func:`pkt.methods.laten.hypernet_seconds`:
  a teacher forward and a student training step over ``laten_batch`` align examples) and both models' loading;
* a seed's locate stage: both models' attribution of the seed example at every rate, each counted as 1.82 forward
  passes of it (docs/laten.md, "Attribution cost"), and the loading;
* a grid: one student forward over the held-out answers per (step, rate), and the loading (the Δ's extraction,
  translation and fusing are not counted: seconds against the forwards' minutes);
* an evaluation: the pilot's (:func:`pkt.studies.pilot_plan.generation_seconds`); a LaTen point's also loads the
  teacher, whose vectors it translates.
"""

from __future__ import annotations

from types import SimpleNamespace

from pkt.studies import laten_dose_report as R, staged

ATTRIBUTION_FORWARDS = 1.82  # one attribution of an example, in forward passes of it (docs/laten.md)


class Costs:
    def __init__(self, study):
        from pkt.experiment.plan import PlanContext, _Tokens
        from pkt.experiment.preflight import check_models, meta_facts

        self.study, self.cfg = study, study.cfg
        teacher, student = check_models(study.ecfg, plan=True)
        teacher, student = meta_facts(teacher), meta_facts(student)
        # PlanContext reads the experiment's settings from its study (pkt run's, of the LaTen arm)
        self.ctx = PlanContext(SimpleNamespace(cfg=study.ecfg, n_train={}), teacher, student,
                               _Tokens(student.path, student.tokenizer))
        self.notes = [] if self.ctx.sp and self.ctx.tp else \
            ["a model's size is unknown until it is prepared: its stages cost 0"]
        tok = self.ctx.toks.tok
        self.heldout_tokens = sum((len(tok(e.user + e.assistant, add_special_tokens=False)["input_ids"])
                                   if tok is not None else len(e.user + e.assistant) / 4) + 12
                                  for e in study.heldout.loss)
        self.notes.append(self.disk_note(teacher, student))

    def _load(self, teacher: bool = True) -> float:
        c, x = self.cfg, self.ctx
        return x.load(x.sp, c.dtype) + (x.load(x.tp, c.teacher_dtype) if teacher else 0.0)

    def train(self, steps: int) -> float:
        from pkt.methods.laten import hypernet_seconds

        return hypernet_seconds(self.ctx, self.cfg.task, steps) + self._load()

    def locate(self) -> float:
        c, x = self.cfg, self.ctx
        tokens = ATTRIBUTION_FORWARDS * x.toks.mean(c.task, "train") * len(c.rates)
        return x.secs("forward", x.tp, c.teacher_dtype, tokens) + x.secs("forward", x.sp, c.dtype, tokens) \
            + self._load()

    def locate_work(self) -> str:
        return f"attribute the seed example at {len(self.cfg.rates)} rates (teacher and student)"

    def grid(self, steps: int) -> float:
        c, x = self.cfg, self.ctx
        return steps * len(c.rates) * x.secs("forward", x.sp, c.dtype, self.heldout_tokens) + self._load()

    def grid_work(self, steps: int) -> str:
        return (f"{steps} step{'s' * (steps != 1)} x {len(self.cfg.rates)} rates: fuse, held-out loss of "
                f"{len(self.study.heldout.loss)} answers")

    def heldout_loss(self) -> float:
        c, x = self.cfg, self.ctx
        return x.secs("forward", x.sp, c.dtype, self.heldout_tokens) + self._load(teacher=False)

    def loss_work(self) -> str:
        return f"held-out loss of {len(self.study.heldout.loss)} answers"

    def questions(self, which: str) -> int:
        from pkt.experiment.evaluation import TEST_SIZES

        c = self.cfg
        return c.accuracy.size if which == "heldout" else min(c.eval.test_size, TEST_SIZES[c.task])

    def evaluate(self, which: str, student: bool = False) -> float:
        from pkt.studies.pilot_plan import generation_seconds

        c, x = self.cfg, self.ctx
        gen = generation_seconds(c.eval, c.task, self.questions(which),
                                 lambda work, tokens: x.secs(work, x.sp, c.dtype, tokens))
        return gen + self._load(teacher=not student)

    def eval_work(self, which: str) -> str:
        return f"{self.questions(which)} {which} questions x <= {self.cfg.eval.max_new_tokens} new tokens"

    def disk_note(self, teacher, student) -> str:
        if teacher.spec is None or student.spec is None:
            return "disk: unknown until both models are prepared"
        h_t, h_s = teacher.spec.hidden_size, student.spec.hidden_size
        per = 4 * (h_t * h_t + h_s * h_t) * 4  # a translator per module kind: two fp32 layers (pkt.align.hypernet)
        def kept(r) -> int:
            return len(self.study.scored(r)) if not self.cfg.keep_checkpoints else r.trained + 1

        runs = self.study.runs()
        # a null retrains the selected point's run: at most the run that keeps the most checkpoints
        n = len(self.cfg.seeds) * (sum(map(kept, runs)) + len(self.cfg.nulls) * max(map(kept, runs)))
        return (f"disk: {n} hypernetwork checkpoints of {per / 1e6:.0f} MB ({n * per / 1e9:.1f} GB; each run keeps "
                f"{'every step' if self.cfg.keep_checkpoints else 'those of its scored steps'}) besides the "
                "pairings (kilobytes)")


def plan(study) -> tuple[list[tuple[str, bool, float, str]], list[str]]:
    """(stage, cached, estimated seconds, work) of every stage a run of ``study``
    (:class:`pkt.studies.laten_dose.LatenDose`) computes, in the order it runs them, and the plan's notes; nothing
    runs. The accuracy points and the selected point are named once the records that choose them exist."""
    from pkt.experiment.fingerprint import model_identity

    cost = Costs(study)
    c = study.cfg
    rows = [(study.student_loss_key()[0], study.student_loss() is not None, cost.heldout_loss(), cost.loss_work())]
    for which in ("heldout", "test"):
        name, _ = study.eval_key("student", which, model_identity(c.student))
        rows.append((name, study.student_eval(which) is not None, cost.evaluate(which, student=True),
                     cost.eval_work(which)))
    for seed in c.seeds:
        needs: list[bool] = []
        sub = []
        for run in study.runs():
            _, gres, _, _ = study.grid(run, seed)
            tname, tkey = study.train_key(run, seed)
            tdone = gres is not None or study.cache.is_cached(tname, tkey)
            needs.append(gres is None)
            sub += [(tname, tdone, cost.train(run.trained),
                     f"{run.trained} hypernetwork step{'s' * (run.trained != 1)} of a {run.span}-step cycle, "
                     f"λ {run.penalty:g}"),
                    (study.grid_key(run, seed)[0], gres is not None, cost.grid(len(study.scored(run))),
                     cost.grid_work(len(study.scored(run))))]
        lname, lkey = study.locate_key(seed)
        rows.append((lname, study.cache.is_cached(lname, lkey) or not any(needs), cost.locate(), cost.locate_work()))
        rows += sub
    # the records choose the points only when they are this config's (a plan may precede a changed run)
    rec = R.load(study.records) if (study.records / R.META).is_file() else None
    rec = rec if rec is not None and rec["meta"]["settings"] == study.settings else None
    points = R.accuracy_points(rec) if rec is not None and R.grids_complete(rec) else None
    n_acc = len(points) if points is not None else c.accuracy.best + int(study.paper is not None)
    for i in range(n_acc):
        for seed in c.seeds:
            if points is not None:
                _, res = study.point_eval(points[i], seed, "heldout")
                rows.append((f"heldout-{R.point_label(points[i])}-s{seed}", res is not None,
                             cost.evaluate("heldout"), cost.eval_work("heldout")))
            else:
                rows.append((f"heldout-point{i + 1}-s{seed} (point to be chosen)", False,
                             cost.evaluate("heldout"), cost.eval_work("heldout")))
    chosen = R.select(rec) if rec is not None and points is not None and R.accuracy_complete(rec) else None
    for seed in c.seeds:
        if chosen is not None:
            _, res = study.point_eval(chosen, seed, "test")
            rows.append((f"test-{R.point_label(chosen)}-s{seed}", res is not None, cost.evaluate("test"),
                         cost.eval_work("test")))
        else:
            rows.append((f"test-selected-s{seed} (point to be chosen)", False, cost.evaluate("test"),
                         cost.eval_work("test")))
    rows += _null_rows(study, cost, chosen)
    return rows, cost.notes


def _null_rows(study, cost: Costs, chosen: dict | None) -> list[tuple[str, bool, float, str]]:
    """Each null's stages: the selected point's run retrained and its grid scored per seed, then the point's
    held-out and test evaluations. Before the point is chosen, the longest run (the cycle's) stands for it."""
    c = study.cfg
    rows = []
    for null in c.nulls:
        run = study.null_run(null, chosen)
        p = {**chosen, "vectors": null} if chosen is not None else None
        label = R.point_label(p) if p is not None else f"{null}-null (point to be chosen)"
        for seed in c.seeds:
            _, gres, _, _ = study.grid(run, seed) if chosen is not None else (None, None, None, None)
            tname, tkey = study.train_key(run, seed)
            rows += [(tname, gres is not None or study.cache.is_cached(tname, tkey), cost.train(run.trained),
                      f"{run.trained} hypernetwork steps of a {run.span}-step cycle, λ {run.penalty:g}, {null} null"),
                     (study.grid_key(run, seed)[0], gres is not None, cost.grid(len(study.scored(run))),
                      cost.grid_work(len(study.scored(run))))]
        for which in ("heldout", "test"):
            for seed in c.seeds:
                res = study.point_eval(p, seed, which)[1] if chosen is not None else None
                rows.append((f"{which}-{label}-s{seed}", res is not None, cost.evaluate(which), cost.eval_work(which)))
    return rows


def render_plan(study) -> str:
    """The plan of ``study`` (:func:`plan`) as a table, its total and notes."""
    from pkt.experiment.plan import THROUGHPUT_MACHINE, human

    rows, notes = plan(study)
    todo = [r for r in rows if not r[1]]
    lines = staged.plan_table(rows, 34)

    def count(prefix: str) -> int:
        return sum(r[0].startswith(prefix) for r in rows)

    trainings, grids, locates = count("train-"), count("grid-"), count("locate-")
    evals = len(rows) - trainings - grids - locates
    by_kind = {k: human(sum(r[2] for r in todo if r[0].startswith(k))) for k in ("train-", "grid-", "locate-")}
    lines.append(f"plan: {trainings} hypernetwork trainings, {locates} locate stages, {grids} grids and {evals} "
                 f"evaluations ({len(rows) - len(todo)} stages cached), estimated {human(sum(r[2] for r in todo))} on "
                 f"the reference machine ({THROUGHPUT_MACHINE}), generation at the answers' expected lengths: "
                 f"trainings {by_kind['train-']}, grids {by_kind['grid-']}, locating {by_kind['locate-']}")
    return "\n".join(lines + [f"note: {x}" for x in notes])
