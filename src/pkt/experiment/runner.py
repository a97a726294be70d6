"""``pkt run``: the whole study as a list of cached stages.

For each task: the seed-independent stages the study's methods read (Seeking's extraction, the teacher's KD
answers), then for each seed every method's *build* stage (a fine-tuned / injected student checkpoint) and
its *eval* stage, then one analysis stage (parametric, representation and behavioural similarity). What a
method builds and reads is its own file's business (:mod:`pkt.methods`); the study asks it through the
registry, and each stage is a typed :class:`~pkt.stage.Stage`. Every stage's directory is keyed
by a hash of what determines it (settings, code, libraries, models, data: see :mod:`pkt.experiment.cache`
and :mod:`pkt.experiment.fingerprint`), so a re-run after an interruption resumes at the first unfinished
stage, and a change recomputes only what it affects. With ``records:`` it also resumes on another machine:
the committed stage records restore the finished stages (:func:`pkt.experiment.records.restore`), and a
stage whose files are gone is rebuilt only for a reader that still has to run (builds and the shared stages
are computed lazily).

Before any stage, :meth:`Study.preflight` checks models, tokenizers, dimensions, sandbox and disk and
estimates the plan (:mod:`pkt.experiment.preflight`, :mod:`pkt.experiment.plan`). A built model's weights
are deleted once it is evaluated unless ``keep_checkpoints`` (a later change that needs them again rebuilds
the stage), and a build whose evaluation is cached is not rebuilt. A method's ``build`` must not read its
stage's result: in a plan the stages only report their keys and the result is None. Evaluations:
:mod:`pkt.experiment.evaluation`; the analysis: :mod:`pkt.analyse.stage`.
"""

from __future__ import annotations

import gc
import json
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pkt import methods
from pkt.cards import add_study_results
from pkt.errors import PktError
from pkt.experiment import evaluation, fingerprint
from pkt.experiment.cache import StageCache, StageRecord
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.records import RESTORED
from pkt.stage import ANALYSIS, EVAL, Stage
from pkt.io import write_json
from pkt.seeding import seed_everything

SPLITS = ("extract", "align", "train")
# stages whose committed record is all that later stages and the report read of them
OUTPUT_KINDS = (EVAL, ANALYSIS)


def versions() -> dict:
    import peft
    import transformers

    import pkt

    return {"pkt": pkt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}


class Study:
    """Runs one :class:`ExperimentConfig` into ``out`` (stages under ``out/stages``, report at the top)."""

    # where each finished stage's record is exported (cfg.records, set by run); None: nowhere
    records_dir: Path | None = None

    def __init__(self, cfg: ExperimentConfig, out: str | Path, config_text: str = "", log=print):
        self.cfg, self.out, self.config_text, self.log = cfg, Path(out), config_text, log
        self.cache = StageCache(self.out, log=self.echo)
        self.bar: tqdm | None = None
        self._data_ids: dict = {}
        self.vanilla: dict = {}  # (model label, task) -> its evaluation, when one stands for every seed
        self._check_budget()

    # ---- bookkeeping -------------------------------------------------------------------------
    def echo(self, msg: str) -> None:
        """A line of the run's log (above the progress bar while there is one)."""
        if self.bar is not None:
            self.bar.set_description_str(msg.strip()[:60])
            tqdm.write(msg)
        else:
            self.log(msg)

    def run_stage(self, stage: Stage, payload: dict, fn, reads: dict | None = None) -> tuple[Path, dict]:
        """Run (or reuse) a stage. Its key covers ``payload`` (the settings), pkt's code, the library versions
        and ``reads``: {"models": [refs], "data": {task: [parts]}}, where a part is a PKT split or "test".
        Without ``reads``, the models named teacher/student/model anywhere in the payload and the PKT splits
        of its task are assumed. In a plan (dry cache) nothing runs and the result is None."""
        reads = reads if reads is not None else _default_reads(payload)
        key = {"settings": self._in_out(payload), "code": fingerprint.code_identity(),
               "libraries": fingerprint.library_versions(),
               "models": {self._in_out(str(m)): fingerprint.model_identity(m, self.cache.stages)
                          for m in reads.get("models", [])},
               "data": {t: self._data_identity(t, tuple(parts)) for t, parts in reads.get("data", {}).items()}}
        try:
            path, result = self.cache.run(stage, key, fn)
        except PktError as e:
            # one line naming the stage; atomic_dir has removed its half-written directory
            raise PktError(f"stage {stage}: {e}") from None
        if self.bar is not None and not self.cache.dry:
            self.bar.update(1)
        if not self.cache.dry and self.records_dir is not None:
            from pkt.experiment.records import export_stage

            export_stage(path, self.records_dir)  # as soon as it exists: committed records survive the machine
        if not self.cache.dry:
            gc.collect()
        return path, result

    def _in_out(self, obj):
        """``obj`` with every path into this run's directory written as ``<out>/...``: a stage's key must not
        depend on where the run directory is, so that a committed record names the same stage on another
        machine (:func:`pkt.experiment.records.restore`)."""
        if isinstance(obj, dict):
            return {k: self._in_out(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._in_out(v) for v in obj]
        if isinstance(obj, str):
            for root in (str(self.out.resolve()), str(self.out)):
                if obj == root or obj.startswith(root + "/"):
                    return "<out>" + obj[len(root):]
        return obj

    def _data_identity(self, task: str, parts: tuple) -> dict:
        # hashed once per study object: a plan of full.yaml asks for the same files ~300 times
        if (task, parts) not in self._data_ids:
            self._data_ids[(task, parts)] = fingerprint.data_identity(task, parts)
        return self._data_ids[(task, parts)]

    def _check_budget(self) -> None:
        from pkt.data.tasks import load_split

        self.n_train = {}
        for task in self.cfg.tasks:
            b = self.cfg.budget_for(task)
            n = len(load_split(task, "train"))
            if b.loss_examples >= n:
                raise PktError(f"budget: loss_examples ({b.loss_examples}) must leave training examples in the "
                               f"{n} of {task}/train")
            # The answer loss uses the last loss_examples rows, so training stops short of them.
            self.n_train[task] = min(b.train_examples, n - b.loss_examples)

    def n_stages(self) -> int:
        return len(self.plan_stages())

    def plan_stages(self) -> list[StageRecord]:
        """Every stage of the study with its key and whether it is cached, computing nothing."""
        self.cache.dry, n0 = True, len(self.cache.records)
        try:
            self._walk([], {})
            return _unique(self.cache.records[n0:])
        finally:
            del self.cache.records[n0:]
            self.cache.dry = False

    # ---- stages ------------------------------------------------------------------------------------
    def build(self, method: str, task: str, seed: int, shared: dict) -> tuple[str, str]:
        """(model reference, dtype) of the method's model for this task and seed (:mod:`pkt.methods`).
        ``shared``: this task's outputs of the shared stages, by kind; each built model is noted there
        ("built", by (method, seed)) for the walk, which prunes it once every arm that reads it is done."""
        ref, dtype = methods.get(method).build(self, task, seed, shared)
        shared.setdefault("built", {})[(method, seed)] = ref
        return ref, dtype

    def shared_stage(self, kind: str, task: str) -> Path:
        """The output path of the task's shared stage ``kind`` (Seeking's extraction, SeqKD's teacher answers)."""
        return methods.get_shared(kind).run(self, task)

    def eval_cfg(self, seed: int, task: str | None = None):
        return evaluation.eval_cfg(self.cfg, seed, task)

    def evaluate(self, method: str, ref: str, dtype: str, task: str, seed: int,
                 label: str | None = None) -> dict | None:
        """Metrics of one model, None in a plan when not cached (:func:`pkt.experiment.evaluation.evaluate`)."""
        return evaluation.evaluate(self, method, ref, dtype, task, seed, label)

    def analysis(self, shared: dict) -> list[Path]:
        from pkt.analyse.stage import analysis

        return analysis(self, shared)

    # ---- the study ----------------------------------------------------------------------------------
    def preflight(self, plan: bool = False):
        """Check models, tokenizers, dimensions, sandbox and disk (:mod:`pkt.experiment.preflight`) and
        estimate the plan. A real run raises on the first failure; a plan reports them as warnings."""
        from pkt.experiment import preflight as pf
        from pkt.experiment.plan import estimate

        teacher, student = pf.check_models(self.cfg, plan=plan)
        warnings = [*teacher.notes, *student.notes]
        try:
            pf.check_sandbox(self.cfg.tasks, self.cfg.allow_weak_sandbox)
        except PktError as e:
            if not plan:
                raise
            warnings.append(f"a real run would stop here: {e}")
        est = estimate(self, teacher, student)
        est.warnings += warnings
        est.free = pf.free_bytes(self.out)
        if est.free < est.disk_bytes:
            try:
                pf.check_disk(self.out, est.disk_bytes)
            except PktError as e:
                if not plan:
                    raise
                est.warnings.append(f"a real run would stop here: {e}")
        return est

    def _peek(self, fn):
        """``fn()`` against the dry cache: (its value, the stage records it would produce); nothing runs."""
        dry, n0 = self.cache.dry, len(self.cache.records)
        self.cache.dry = True
        try:
            return fn(), self.cache.records[n0:]
        finally:
            del self.cache.records[n0:]
            self.cache.dry = dry

    def _build_lazily(self, method: str, task: str, seed: int, shared: dict) -> tuple[str, str]:
        """Build the method's model unless its evaluation is cached (its weights may have been pruned)."""
        (ref, dtype), peeked = self._peek(lambda: self.build(method, task, seed, shared))
        if peeked and self._peek(lambda: self.evaluate(method, ref, dtype, task, seed))[0] is not None:
            for r in peeked:
                self.cache.records.append(replace(r, cached=True))
                if not self.cache.dry:
                    self.echo(f"[cached] {r.stage}: not needed, its evaluation is cached")
                if self.bar is not None:
                    self.bar.update(1)
            return ref, dtype
        if self.cache.dry:
            self.cache.records.extend(peeked)
            return ref, dtype
        return self.build(method, task, seed, shared)

    def _shared_lazily(self, fn, lazy: list):
        """The path that ``fn``'s stage writes for several readers (Seeking's extraction, SeqKD's teacher
        answers), computed here, in the plan's order, unless the stage was restored from its committed record
        without its files (:func:`pkt.experiment.records.restore`): then each reader's stage calls ``fn`` when it
        runs, so that a restored study whose readers are all done does not recompute it. Its plan record then
        goes to ``lazy``."""
        value, peeked = self._peek(fn)
        if self.cache.dry:
            self.cache.records.extend(peeked)
        elif any(not r.cached and (self.cache.stages / r.key / RESTORED).is_file() for r in peeked):
            lazy.extend(peeked)
        else:
            return fn()
        return value

    def _prune(self, ref: str) -> None:
        """Delete an evaluated model's weights unless keep_checkpoints (LaTen's delta file is kept)."""
        path = Path(ref)
        if self.cfg.keep_checkpoints or not path.is_dir():
            return
        try:
            stage = self.cache.stages / path.resolve().relative_to(self.cache.stages.resolve()).parts[0]
        except ValueError:
            return  # not a stage output (a vanilla model)
        files = sorted([*path.glob("model*.safetensors"), *path.glob("pytorch_model*.bin")])
        if files:
            freed = self.cache.prune(stage, files, f"weights of {path.name}/ deleted after evaluation")
            self.echo(f"[pruned] {stage.name}/{path.relative_to(stage)}: {freed / 1e9:.2f} GB")

    def _walk(self, records: list, shared: dict) -> list[Path]:
        """Every stage in order; in a plan (dry cache) only keys are computed. Per task: the shared stages the
        study's methods read; then per seed each method's build and evaluation (and its companions', e.g. the
        float32 student's); then the analysis."""
        c = self.cfg
        arms = [methods.get(m) for m in c.methods]
        for task in c.tasks:
            s = shared.setdefault(task, {})
            lazy = []  # the stage records of shared stages no reader has needed yet
            for kind in methods.SHARED:
                if any(kind in m.reads for m in arms):
                    s[kind] = self._shared_lazily(lambda kind=kind: self.shared_stage(kind, task), lazy)
            for seed in c.seeds:
                deferred = []  # weights another arm of this seed still reads (laten-lora: its LaTen student)
                for m in arms:
                    seed_everything(seed)
                    ref, dtype = self._build_lazily(m.name, task, seed, s)
                    s.setdefault("first", {}).setdefault(m.name, ref)  # the analysis reads LaTen's first
                    res = evaluation.evaluate_once(self, m.name, ref, dtype, task, seed)
                    if res is not None:
                        records.append({"method": m.name, "task": task, "seed": seed, "model_dir": ref, **res})
                        if m.injection:
                            records[-1]["injection"] = _build_result(self.cache.stages, ref, m.injection)
                    for extra in methods.companions(m.name):
                        if not extra.wanted(self):
                            continue
                        res = evaluation.evaluate_once(self, m.name, ref, extra.eval_dtype or dtype, task, seed,
                                                       extra.name)
                        if res is not None:
                            records.append({"method": extra.name, "task": task, "seed": seed, "model_dir": ref,
                                            **res})
                    for read in m.reads:  # a build it reads that no arm of the study evaluates
                        if read not in methods.SHARED and read not in c.methods and (read, seed) in s.get("built", {}):
                            deferred.append(s["built"][(read, seed)])
                    if any(m.name in other.reads for other in arms):
                        deferred.append(ref)
                    elif not self.cache.dry:
                        self._prune(ref)
                if not self.cache.dry:
                    for ref in deferred:
                        self._prune(ref)
            # listed as a skipped build is (_build_lazily); a stage that ran meanwhile is listed where it ran
            self.cache.records.extend(replace(r, cached=True) for r in lazy)
        return self.analysis(shared) if c.analysis else []

    def run(self, executor=None) -> dict:
        """Run the study. ``executor`` (e.g. :class:`pkt.experiment.executors.RayExecutor`) computes the
        stages elsewhere first; the walk then finds them cached and writes the same results and report."""
        c = self.cfg
        t0 = time.perf_counter()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        records, shared = [], {}
        est = self.preflight()  # read-only: a failing check leaves no trace in the output directory
        self.log(est.summary_line())
        from pkt.machine import describe, kernel_class

        from pkt.experiment import records as R

        if c.records:
            from pkt.io import check_output_dir

            self.records_dir = Path(c.records).resolve()
            check_output_dir(self.records_dir, "records")
        manifest = {
            "name": c.name, "teacher": c.teacher, "student": c.student, "seeds": c.seeds, "tasks": c.tasks,
            "methods": c.methods, "versions": versions(), "machine": kernel_class(),
            "code": fingerprint.code_identity(),
            "started": started, "finished": None, "seconds": None, "config": c.model_dump(mode="json"),
            "config_yaml": self.config_text, "estimate": est.to_dict(),
            "stages": [{k: s[k] for k in ("stage", "key", "seconds", "cached")} for s in est.stages],
        }
        with self.cache.lock():
            self.log(f"machine: {describe(kernel_class())}; dtypes: training {c.dtype}"
                     f"{' under bf16 autocast' if c.autocast == 'bf16' else ''}, teacher {c.teacher_dtype}, "
                     f"evaluation {c.eval_dtype}")
            if self.records_dir is not None:  # the stage list first: a record counts once study.json names it
                R.write_study(self.records_dir, manifest)
                # finished on another machine: its committed records stand in for the stages (their weights are
                # rebuilt only where an unfinished stage reads them)
                restored = R.restore(self.records_dir, est.stages, self.cache.stages,
                                     keep_outputs=lambda name: est.of[name].kind in OUTPUT_KINDS)
                if restored:
                    self.log(f"restored {len(restored)} finished stages from their records in {self.records_dir}")
            ran = {r.key: r for r in executor.run_stages(self)} if executor is not None else {}
            self.bar = tqdm(total=len(est.stages), desc="pkt run", unit="stage", dynamic_ncols=True)
            try:
                self._walk(records, shared)
                add_study_results(records)  # each built model's card gets its scores
            finally:
                self.bar.close()
                self.bar = None
            # the executor's stages were computed in this run, though the walk found them in the store
            self.cache.records = [ran.get(r.key, r) for r in _unique(self.cache.records)]
            manifest.update(finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            seconds=round(time.perf_counter() - t0, 1),
                            stages=[r.to_dict() for r in self.cache.records])
            write_json(self.out / "manifest.json", manifest)
            # the report is read back from the stage records, as pkt report reads them: one code path, so this
            # results.md is the one pkt report makes from the exported records
            report = R.rebuild(self.out)
            if self.records_dir is not None:
                R.export_run(self.out, self.records_dir)
                R.rebuild(self.records_dir)
        for r in self.cache.records:  # what each stage of this run took, so a user sees which stage needs what
            if not r.cached:
                peak = "" if r.peak_rss_bytes is None else f", peak {r.peak_rss_bytes / 2**30:.2f} GiB"
                self.log(f"  {r.stage}: {r.seconds:.0f} s{peak}")
        self.log(f"wrote {self.out / 'results.md'} and {self.out / 'report.html'} "
                 f"({manifest['seconds']:.0f} s, {sum(not r.cached for r in self.cache.records)} stages run, "
                 f"{sum(r.cached for r in self.cache.records)} cached)")
        return {"manifest": manifest, "records": records, **report}


def _unique(records: list[StageRecord]) -> list[StageRecord]:
    """Stage records in order, each key once: a build another build reuses (laten-lora asks for its seed's
    laten) is one stage, in the plan and in the manifest. A stage met first as cached and later run (a restored
    build that the analysis rebuilds because it reads its files) counts as run, at its first place."""
    ran = {r.key: r for r in records if not r.cached}
    seen: set = set()
    return [ran.get(r.key, r) for r in records if not (r.key in seen or seen.add(r.key))]


def _build_result(stages: Path, ref: str, keys: tuple[str, ...]) -> dict | None:
    """``keys`` of the result of the build stage that wrote ``ref`` (read from its stage.json, which survives
    the pruning of its weights); None when ``ref`` is not a stage's output or the record is unreadable."""
    try:
        stage_dir = Path(stages) / Path(ref).relative_to(stages).parts[0]
        result = json.loads((stage_dir / "stage.json").read_text(encoding="utf-8"))["result"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return {k: result.get(k) for k in keys}


def _default_reads(payload: dict) -> dict:
    """Models and data a stage reads, guessed from its settings (stages that know better pass ``reads``)."""
    models, tasks = [], []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("teacher", "student", "model") and isinstance(v, str) and v not in models:
                    models.append(v)
                elif k == "task" and isinstance(v, str) and v not in tasks:
                    tasks.append(v)
                else:
                    walk(v)

    walk(payload)
    return {"models": models, "data": {t: list(SPLITS) for t in tasks}}
