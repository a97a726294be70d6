"""``pkt run``: the whole study as a list of cached stages.

For each task: the seed-independent stages (Seeking extraction, the teacher's KD answers), then for each
seed every method's *build* stage (a fine-tuned / injected student checkpoint) and its *eval* stage, then
one analysis stage (parametric, representation and behavioural similarity). Every stage's directory is
keyed by a hash of what determines it (settings, code, libraries, models, data: see
:mod:`pkt.experiment.cache` and :mod:`pkt.experiment.fingerprint`), so a re-run after an interruption
resumes at the first unfinished stage, and a change recomputes only what it affects. With ``records:`` it
also resumes on another machine: the committed stage records restore the finished stages
(:func:`pkt.experiment.records.restore`), and a stage whose files are gone is rebuilt only for a reader that
still has to run (builds and the shared stages are computed lazily).

Before any stage, :meth:`Study.preflight` checks models, tokenizers, dimensions, sandbox and disk and
estimates the plan (:mod:`pkt.experiment.preflight`, :mod:`pkt.experiment.plan`). A built model's weights
are deleted once it is evaluated unless ``keep_checkpoints`` (a later change that needs them again rebuilds
the stage), and a build whose evaluation is cached is not rebuilt. ``build`` must not read its stage's
result: in a plan the stages only report their keys and the result is None.

Evaluation of a seed uses one seeded subset for every method, so differences to the vanilla student are
paired per example. The answer loss is measured on the tail of the train split, which no method trains on
(fine-tuning uses its head; LaTen uses extract/align; Seeking uses extract).
"""

from __future__ import annotations

import gc
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pkt.cards import add_study_results
from pkt.data.chat import data_identity
from pkt.errors import PktError
from pkt.experiment import fingerprint
from pkt.experiment.cache import StageCache, StageRecord
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.records import INJECTION, RESTORED
from pkt.io import write_json
from pkt.seeding import seed_everything

# the vanilla student evaluated in float32: the baseline of models evaluated there (see Study._walk)
STUDENT_FP32 = "student-fp32"
FINETUNED = ("lora", "pissa", "seeking")
SEEKING_CONTROLS = ("seeking-random", "seeking-shuffled")  # Seeking's init with random / misplaced factors
SEEKING = ("seeking", *SEEKING_CONTROLS)  # the methods that need the extraction
SPLITS = ("extract", "align", "train")


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
        self.cache = StageCache(self.out, log=self._log)
        self.bar: tqdm | None = None
        self._data_ids: dict = {}
        self._vanilla: dict = {}  # (model label, task) -> its evaluation, when one stands for every seed
        self._check_budget()

    # ---- bookkeeping -------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(msg.strip()[:60])
            tqdm.write(msg)
        else:
            self.log(msg)

    def _stage(self, name: str, payload: dict, fn, reads: dict | None = None) -> tuple[Path, dict]:
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
            path, result = self.cache.run(name, key, fn)
        except PktError as e:
            # one line naming the stage; atomic_dir has removed its half-written directory
            raise PktError(f"stage {name}: {e}") from None
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

    # ---- settings of the library stages ----------------------------------------------------------
    def finetune_cfg(self, task: str, seed: int):
        from pkt.align.finetune import FinetuneConfig

        b = self.cfg.budget_for(task)
        return FinetuneConfig(r=b.rank, alpha=b.alpha, dropout=b.dropout, lr=b.lr, epochs=b.epochs,
                              batch_size=b.batch_size, micro_batch_size=min(4, b.batch_size), max_length=b.max_length,
                              n_train=self.n_train[task], seed=seed, style=self.cfg.style, dtype=self.cfg.dtype,
                              pissa_niter=b.pissa_niter, train_on_inputs=b.train_on_inputs,
                              report_to=self.cfg.report_to)

    def seeking_cfg(self, task: str | None = None):
        from pkt.postpkt import SeekingConfig

        b = self.cfg.budget_for(task) if task else self.cfg.budget
        return SeekingConfig(n_samples=b.extract_samples, rank=b.rank, style=self.cfg.style,
                             targets=self.seeking_targets(task),
                             max_length=b.max_length, dtype=self.cfg.teacher_dtype,
                             train_on_inputs=b.train_on_inputs)

    def seeking_targets(self, task: str | None = None) -> list[str]:
        """Module kinds Seeking (and its controls) transfer: the fine-tuning targets, plus embed/lm_head if asked."""
        from pkt.align.finetune import FinetuneConfig

        b = self.cfg.budget_for(task) if task else self.cfg.budget
        return list(FinetuneConfig().targets) + (["embed", "lm_head"] if b.seeking_embeddings else [])

    def laten_cfg(self, task: str, seed: int):
        from pkt.laten import LatenConfig

        b = self.cfg.budget_for(task)
        return LatenConfig(teacher=self.cfg.teacher, student=self.cfg.student, task=task, style=self.cfg.style,
                           transfer_rate=b.laten_rate, lr=b.laten_lr, batch_size=b.laten_batch,
                           micro_batch=min(4, b.laten_batch), max_steps=self.laten_train_steps(task), seed=seed,
                           cutoff_len=b.max_length, teacher_dtype=self.cfg.teacher_dtype,
                           student_dtype=self.cfg.dtype, schedule=b.laten_schedule,
                           report_to=self.cfg.report_to)

    def laten_train_steps(self, task: str) -> int:
        """Hypernetwork steps to train: the paper's for the task, the selection grid's last, or a fixed count."""
        from pkt.laten import PAPER_STEPS

        b = self.cfg.budget_for(task)
        if b.laten_choice == "paper":
            if task not in PAPER_STEPS:
                raise PktError(f"budget.laten_choice 'paper': the paper gives no LaTen step for task {task!r}; "
                               "use 'select' or 'fixed'")
            return PAPER_STEPS[task]
        return b.laten_select_steps if b.laten_choice == "select" else b.laten_steps

    def eval_cfg(self, seed: int, task: str | None = None):
        from pkt.evaluate.harness import EvalConfig

        b = self.cfg.budget_for(task) if task else self.cfg.budget
        seed = seed if b.eval_seed is None else b.eval_seed
        return EvalConfig(limit=b.eval_limit, seed=seed, style=self.cfg.style, max_new_tokens=b.eval_max_new_tokens,
                          batch_size=b.eval_batch_size, decoding=b.eval_decoding, protocol=b.eval_protocol,
                          shots=b.eval_shots,
                          allow_weak_sandbox=self.cfg.allow_weak_sandbox,
                          max_prompt_tokens=max(b.max_length, 1024), progress=True)

    def heldout(self, task: str):
        from pkt.data.tasks import load_split

        return load_split(task, "train")[-self.cfg.budget_for(task).loss_examples:]

    # ---- stages ------------------------------------------------------------------------------------
    def extraction(self, task: str) -> Path:
        from pkt.postpkt import run_extraction

        cfg = self.seeking_cfg(task)
        if "embed" in cfg.targets:  # checked on the configs (meta device), before the teacher's sensitivity
            from pkt.postpkt import spec_from_ref

            s_spec, t_spec = spec_from_ref(self.cfg.student), spec_from_ref(self.cfg.teacher)
            if s_spec.tied_embeddings or s_spec.vocab_size != t_spec.vocab_size:
                raise PktError("budget.seeking_embeddings needs one vocabulary and a student with untied embeddings "
                               f"(student {s_spec.vocab_size} tokens, tied={s_spec.tied_embeddings}; teacher "
                               f"{t_spec.vocab_size})")
        payload = {"teacher": self.cfg.teacher, "student": self.cfg.student, "task": task, "seeking": cfg.model_dump()}
        path, _ = self._stage(f"extract-{task}", payload, lambda d: {
            "manifest_keys": sorted(run_extraction(self.cfg.teacher, self.cfg.student, task, cfg, d / "factors",
                                                   progress=True, log=self._log))},
            reads={"models": [self.cfg.teacher, self.cfg.student], "data": {task: [cfg.split]}})
        return path / "factors"

    def kd_data(self, task: str) -> Path:
        """SeqKD's training rows: the teacher's answers, to completion within the budget (truncated ones
        dropped or kept open); the stage result counts them."""
        from pkt.align.distill import budget_policy, teacher_answers
        from pkt.data.jsonl import write_chat_jsonl
        from pkt.data.tasks import load_split
        from pkt.models.load import load_model, load_tokenizer

        b = self.cfg.budget_for(task)
        n_train = self.n_train[task]
        payload = {"teacher": self.cfg.teacher, "task": task, "n": n_train, "style": self.cfg.style,
                   "max_new_tokens": b.kd_max_new_tokens, "dtype": self.cfg.teacher_dtype,
                   "truncated": b.kd_truncated, "answers": "to completion"}

        def fn(d: Path) -> dict:
            tok = load_tokenizer(self.cfg.teacher)
            teacher = load_model(self.cfg.teacher, dtype=self.cfg.teacher_dtype)
            answers = teacher_answers(teacher, tok, load_split(task, "train")[:n_train], style=self.cfg.style,
                                      max_new_tokens=b.kd_max_new_tokens)
            rows, counts = budget_policy(answers, b.kd_truncated)
            write_chat_jsonl(answers, d / "kd_answers.jsonl")
            write_chat_jsonl(rows, d / "kd_train.jsonl")
            self._log(f"seqkd data: {counts['finished']} of {counts['answers']} teacher answers finished within "
                      f"{b.kd_max_new_tokens} tokens; {counts['dropped']} dropped, {counts['kept_open']} kept open")
            return {"n": len(rows), **counts,
                    "mean_chars": sum(len(r.assistant) for r in rows) / max(1, len(rows))}

        path, _ = self._stage(f"kd-data-{task}", payload, fn,
                              reads={"models": [self.cfg.teacher], "data": {task: ["train"]}})
        return path / "kd_train.jsonl"

    def build(self, method: str, task: str, seed: int, shared: dict) -> tuple[str, str]:
        """(model reference, dtype) of the method's model for this task and seed."""
        c = self.cfg
        if method == "student":
            return c.student, c.eval_dtype
        if method == "teacher":
            return c.teacher, c.eval_dtype
        if method in FINETUNED:
            from pkt.postpkt import run_postpkt

            ft = self.finetune_cfg(task, seed)
            factors = shared.get("factors") if method == "seeking" else None
            if method == "seeking":
                ft = ft.model_copy(update={"targets": self.seeking_targets(task)})
            payload = {"method": method, "task": task, "teacher": c.teacher, "student": c.student,
                       "finetune": ft.model_dump(), "factors": str(factors) if factors else None,
                       **({"data": data_identity(c.data)} if c.data else {})}
            def fn(d: Path) -> dict:
                if factors is not None and not Path(factors).is_dir():
                    self.extraction(task)  # restored without its files and not needed before (_shared_lazily)
                return _summary(run_postpkt(c.teacher, c.student, task, method, d / "run", ft, self.seeking_cfg(task),
                                            factors_dir=factors, progress=True, log=self._log, data=c.data), d / "run")

            path, _ = self._stage(f"{method}-{task}-s{seed}", payload, fn,
                                  reads={"models": [c.student], "data": {task: ["train"]}})
            return str(path / "run" / "merged"), c.eval_dtype
        if method in SEEKING_CONTROLS:
            from pkt.postpkt import run_postpkt

            control = method.split("-", 1)[1]
            ft = self.finetune_cfg(task, seed).model_copy(update={"targets": self.seeking_targets(task)})
            factors = shared["factors"]
            payload = {"method": method, "task": task, "teacher": c.teacher, "student": c.student,
                       "finetune": ft.model_dump(), "factors": str(factors), "control": control,
                       **({"data": data_identity(c.data)} if c.data else {})}
            def fn(d: Path) -> dict:
                if not Path(factors).is_dir():
                    self.extraction(task)  # restored without its files and not needed before (_shared_lazily)
                return _summary(run_postpkt(c.teacher, c.student, task, "seeking", d / "run", ft,
                                            self.seeking_cfg(task), factors_dir=factors, progress=True, log=self._log,
                                            control=control, data=c.data), d / "run")

            path, _ = self._stage(f"{method}-{task}-s{seed}", payload, fn,
                                  reads={"models": [c.student], "data": {task: ["train"]}})
            return str(path / "run" / "merged"), c.eval_dtype
        if method == "laten-lora":
            # the seed paper's PrePKT claim: pre-alignment reduces the fine-tuning needed afterwards. The LaTen
            # student of this seed (its delta file survives the pruning of the fused weights), then exactly
            # lora's fine-tuning
            from pkt.postpkt import run_postpkt

            laten_ref, _ = self.build("laten", task, seed, shared)
            shared.setdefault("laten_refs", {})[seed] = laten_ref  # pruned by the walk after this seed's arms
            deltas = Path(laten_ref) / "laten_deltas.safetensors"
            ft = self.finetune_cfg(task, seed)
            payload = {"method": method, "task": task, "student": c.student, "finetune": ft.model_dump(),
                       "base_deltas": str(deltas), **({"data": data_identity(c.data)} if c.data else {})}
            path, _ = self._stage(f"{method}-{task}-s{seed}", payload, lambda d: _summary(run_postpkt(
                None, c.student, task, "lora", d / "run", ft, self.seeking_cfg(task), progress=True, log=self._log,
                data=c.data, base_deltas=deltas), d / "run"),
                reads={"models": [c.student, str(laten_ref)], "data": {task: ["train"]}})
            return str(path / "run" / "merged"), c.eval_dtype
        if method == "gkd":
            from pkt.align.gkd import GKDConfig

            b = c.budget_for(task)
            ft = self.finetune_cfg(task, seed)
            gc = GKDConfig(lmbda=b.gkd_lmbda, beta=b.gkd_beta, temperature=b.gkd_temperature,
                           max_new_tokens=b.gkd_max_new_tokens, teacher_dtype=c.teacher_dtype)
            payload = {"method": "gkd", "task": task, "teacher": c.teacher, "student": c.student,
                       "finetune": ft.model_dump(), "gkd": gc.model_dump()}
            path, _ = self._stage(f"gkd-{task}-s{seed}", payload, lambda d: self._gkd(task, ft, gc, d / "run"),
                                  reads={"models": [c.teacher, c.student], "data": {task: ["train"]}})
            return str(path / "run" / "merged"), c.eval_dtype
        if method == "seqkd":
            ft = self.finetune_cfg(task, seed)
            kd_file = shared["kd_file"]
            payload = {"method": "seqkd", "task": task, "student": c.student, "finetune": ft.model_dump(),
                       "data": str(kd_file)}
            def fn(d: Path) -> dict:
                if not Path(kd_file).is_file():
                    self.kd_data(task)  # restored without its files and not needed before (_shared_lazily)
                return self._kd_finetune(kd_file, ft, d / "run")

            path, _ = self._stage(f"seqkd-{task}-s{seed}", payload, fn, reads={"models": [c.student]})
            return str(path / "run" / "merged"), c.eval_dtype
        if method == "laten":
            lc = self.laten_cfg(task, seed)
            b = c.budget_for(task)
            choice = {"choice": b.laten_choice}
            if b.laten_choice == "select" or b.laten_grid:
                choice.update(rates=b.laten_select_rates, examples=b.laten_select_examples)
            if b.laten_grid and b.laten_choice != "select":
                choice["grid"] = True
            payload = {"method": "laten", "laten": lc.model_dump(mode="json"), **choice}
            path, _ = self._stage(f"laten-{task}-s{seed}", payload, lambda d: self._laten(lc, d))
            return str(path / "fused"), c.eval_dtype
        raise PktError(f"unknown method {method!r}")

    def _kd_finetune(self, kd_file: Path, ft, out: Path) -> dict:
        from pkt.align.distill import distill_finetune
        from pkt.data.jsonl import read_chat_jsonl

        return _summary(distill_finetune(self.cfg.student, read_chat_jsonl(kd_file), ft, out,
                                         extra={"data": str(kd_file), "teacher": self.cfg.teacher}), out)

    def _gkd(self, task: str, ft, gc, out: Path) -> dict:
        from pkt.align.gkd import gkd_distill
        from pkt.data.tasks import load_split

        prompts = load_split(task, "train")[: ft.n_train]
        return _summary(gkd_distill(self.cfg.teacher, self.cfg.student, prompts, ft, gc, out, progress=True,
                                    extra={"task": task}), out)

    def _laten(self, lc, d: Path) -> dict:
        from pkt.laten import apply, load_models, train

        b = self.cfg.budget_for(lc.task)
        models = load_models(lc, log=self._log)
        rows = train(lc, d / "train", models=models, resume=False, progress=True, log=lambda s: None)
        point, grid, vanilla = {"step": lc.max_steps, "rate": b.laten_rate}, None, None
        if b.laten_choice == "select" or b.laten_grid:
            from pkt.laten import align_loss, select_point, split_examples

            align = split_examples(lc, "align")[: b.laten_select_examples]
            best, grid = select_point(d / "train", list(range(1, lc.max_steps + 1)), b.laten_select_rates, align,
                                      seed=lc.seed, models=models, log=self._log)
            if b.laten_choice == "select":
                point = best
            vanilla = align_loss(models, {}, align, lc)  # the grid's reference: the student, nothing injected
        manifest, _ = apply(d / "train", point["step"], point["rate"], d / "fused", seed=lc.seed, models=models,
                            log=self._log)
        return {"train_log": rows, "choice": b.laten_choice, "step": point["step"], "rate": point["rate"],
                "selection": grid, "vanilla_align_loss": vanilla, "delta_rel_norm": manifest["delta_rel_norm"],
                "delta_bf16_ratio": manifest["delta_bf16_ratio"],
                "delta_bf16_changed": manifest["delta_bf16_changed"], "delta_size": manifest["delta_size"],
                "apply": {k: v for k, v in manifest.items() if not isinstance(v, (list, dict))}}

    def evaluate(self, method: str, ref: str, dtype: str, task: str, seed: int,
                 label: str | None = None) -> dict | None:
        """Metrics of one model (None in a plan when not cached). A built model is evaluated in ``dtype`` only
        if its changes to the student survive that dtype (:mod:`pkt.evaluate.precision`), else in float32.
        ``label`` names the stage when one model is evaluated twice (the student in float32)."""
        from pkt.evaluate.harness import run_task
        from pkt.models.load import load_model, load_tokenizer

        c = self.cfg
        ecfg = self.eval_cfg(seed, task)
        built = method not in ("student", "teacher")
        payload = {"model": ref, "dtype": dtype, "task": task, "eval": ecfg.model_dump(mode="json"),
                   "loss_examples": c.budget_for(task).loss_examples,
                   "precision": {"reference": c.student, "min_surviving": c.eval_min_surviving} if built else None}
        reads = {"models": [ref, c.student] if built else [ref], "data": {task: ["test", "train"]}}

        def fn(d: Path) -> dict:
            from pkt.io import write_jsonl

            used, precision = dtype, None
            if built:
                from pkt.evaluate.precision import choose_dtype

                used, precision = choose_dtype(ref, c.student, dtype, c.eval_min_surviving)
                if precision["fallback"]:
                    self._log(f"{method}: only {precision['surviving']}/{precision['changed']} changed entries "
                              f"survive {dtype}; evaluating in float32")
            seed_everything(seed)
            tok = load_tokenizer(ref)
            model = load_model(ref, dtype=used)
            records, metrics = run_task(task, model, tok, ecfg)
            loss_records, loss = run_task(f"{task}_loss", model, tok, ecfg.model_copy(update={"limit": None}),
                                          rows=self.heldout(task))
            write_jsonl(d / "predictions.jsonl", records)
            write_jsonl(d / "answer_loss.jsonl", loss_records)
            metric = "accuracy" if "accuracy" in metrics else "pass@1"
            # the record names the evaluation, so that pkt report reads it from the record, not the stage name;
            # nested, because a vanilla model's evaluation stands for every seed (_evaluate_once)
            return {"evaluated_as": {"method": label or method, "task": task, "seed": seed},
                    "metric": metric, "score": metrics[metric], "n": len(records),
                    "per_example": [float(r["correct"]) for r in records], "answer_loss": loss["nll"],
                    "dtype": used, "precision": precision,
                    # the scalars, plus how the task was asked and decoded (protocol) and at what speed: small
                    "metrics": {k: v for k, v in metrics.items()
                                if isinstance(v, (int, float, str)) or k in ("protocol", "generation")}}

        _, result = self._stage(f"eval-{label or method}-{task}-s{seed}", payload, fn, reads=reads)
        return result

    def analysis(self, shared: dict) -> list[Path]:
        c = self.cfg
        task = c.tasks[0]
        b = c.budget_for(task)
        factors = shared.get(task, {}).get("factors")
        laten_dir = shared.get(task, {}).get("laten_dir")
        # everything run_analysis reads: budgets, example counts, style, and both models' weights
        payload = {"teacher": c.teacher, "student": c.student, "task": task, "n": c.analysis_examples,
                   "rank": b.rank, "alpha": b.alpha, "pissa_niter": b.pissa_niter, "max_length": b.max_length,
                   "loss_examples": b.loss_examples, "factors": str(factors) if factors else None,
                   "laten": str(laten_dir) if laten_dir else None, "style": c.style}
        def fn(d: Path) -> dict:
            # what it reads, written now if a restored study did not need it before (_shared_lazily, restore)
            if factors is not None and not Path(factors).is_dir():
                self.extraction(task)
            if laten_dir is not None and not (laten_dir / "laten_deltas.safetensors").is_file():
                self.build("laten", task, c.seeds[0], shared[task])
            return run_analysis(c, task, factors, laten_dir, d, self._log)

        path, result = self._stage("analysis", payload, fn,
                                   reads={"models": [c.teacher, c.student], "data": {task: ["train"]}})
        return [path / f for f in result["figures"]] if result else []

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
                self.cache.records.append(StageRecord(r.stage, r.key, r.seconds, True))
                if not self.cache.dry:
                    self._log(f"[cached] {r.stage}: not needed, its evaluation is cached")
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
            self._log(f"[pruned] {stage.name}/{path.relative_to(stage)}: {freed / 1e9:.2f} GB")

    def needs_fp32_student(self) -> bool:
        """Whether any built model may fall back to float32 (then the student is evaluated there too)."""
        return self.cfg.eval_dtype != "float32" and any(m not in ("student", "teacher") for m in self.cfg.methods)

    def _evaluate_once(self, method: str, ref: str, dtype: str, task: str, seed: int, label: str | None = None):
        """``evaluate``, except that with a fixed evaluation subset (``budget.eval_seed``) a vanilla model (the
        student, the teacher, the float32 student) is evaluated once, as the first seed's stage, and that result
        stands for every seed: greedy decoding of the same model on the same questions is the same."""
        if method not in ("student", "teacher") or self.cfg.budget_for(task).eval_seed is None:
            return self.evaluate(method, ref, dtype, task, seed, label)
        if seed == self.cfg.seeds[0]:
            self._vanilla[(label or method, task)] = self.evaluate(method, ref, dtype, task, seed, label)
        return self._vanilla.get((label or method, task))

    def _walk(self, records: list, shared: dict) -> list[Path]:
        """Every stage in order; in a plan (dry cache) only keys are computed."""
        c = self.cfg
        for task in c.tasks:
            s = shared.setdefault(task, {})
            lazy = []  # the stage records of shared stages no reader has needed yet
            if set(SEEKING) & set(c.methods):
                s["factors"] = self._shared_lazily(lambda: self.extraction(task), lazy)
            if "seqkd" in c.methods:
                s["kd_file"] = self._shared_lazily(lambda: self.kd_data(task), lazy)
            for seed in c.seeds:
                deferred = []  # weights another arm of this seed still reads (laten-lora: its LaTen student)
                for method in c.methods:
                    seed_everything(seed)
                    ref, dtype = self._build_lazily(method, task, seed, s)
                    if method == "laten":
                        s.setdefault("laten_dir", Path(ref))
                    res = self._evaluate_once(method, ref, dtype, task, seed)
                    if res is not None:
                        records.append({"method": method, "task": task, "seed": seed, "model_dir": ref, **res})
                        if method == "laten":
                            records[-1]["injection"] = _laten_injection(Path(ref))
                    if method == "student" and self.needs_fp32_student():
                        # A built model whose change does not survive eval_dtype is evaluated in float32; its
                        # difference to the student must not be the dtype's, so the student is also measured there.
                        res = self._evaluate_once(method, ref, "float32", task, seed, label=STUDENT_FP32)
                        if res is not None:
                            records.append({"method": STUDENT_FP32, "task": task, "seed": seed, "model_dir": ref,
                                            **res})
                    if method == "laten-lora" and "laten" not in c.methods and seed in s.get("laten_refs", {}):
                        deferred.append(s["laten_refs"][seed])  # the LaTen student only laten-lora asked for
                    if method == "laten" and "laten-lora" in c.methods:
                        deferred.append(ref)
                    elif not self.cache.dry:
                        self._prune(ref)
                if not self.cache.dry:
                    for ref in deferred:
                        self._prune(ref)
            # listed as a skipped build is (_build_lazily); a stage that ran meanwhile is listed where it ran
            self.cache.records.extend(StageRecord(r.stage, r.key, r.seconds, True) for r in lazy)
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
        from pkt.experiment import records as R

        if c.records:
            from pkt.io import check_output_dir

            self.records_dir = Path(c.records).resolve()
            check_output_dir(self.records_dir, "records")
        manifest = {
            "name": c.name, "teacher": c.teacher, "student": c.student, "seeds": c.seeds, "tasks": c.tasks,
            "methods": c.methods, "versions": versions(), "code": fingerprint.code_identity(),
            "started": started, "finished": None, "seconds": None, "config": c.model_dump(mode="json"),
            "config_yaml": self.config_text, "estimate": est.to_dict(),
            "stages": [{k: s[k] for k in ("stage", "key", "seconds", "cached")} for s in est.stages],
        }
        with self.cache.lock():
            if self.records_dir is not None:  # the stage list first: a record counts once study.json names it
                R.write_study(self.records_dir, manifest)
                # finished on another machine: its committed records stand in for the stages (their weights are
                # rebuilt only where an unfinished stage reads them)
                restored = R.restore(self.records_dir, est.stages, self.cache.stages, keep_outputs=_record_is_output)
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
                            stages=[r.__dict__ for r in self.cache.records])
            write_json(self.out / "manifest.json", manifest)
            # the report is read back from the stage records, as pkt report reads them: one code path, so this
            # results.md is the one pkt report makes from the exported records
            report = R.rebuild(self.out)
            if self.records_dir is not None:
                R.export_run(self.out, self.records_dir)
                R.rebuild(self.records_dir)
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


def _record_is_output(stage: str) -> bool:
    """Whether a stage's record is all that later stages and the report read of it (an evaluation, the
    analysis), so that its committed record fully restores it."""
    return stage.startswith("eval-") or stage == "analysis"


def _laten_injection(fused: Path) -> dict | None:
    """The chosen (step, rate) and the injected delta's size, from the LaTen build stage's record (which
    survives the pruning of the fused weights)."""
    try:
        result = json.loads((fused.parent / "stage.json").read_text(encoding="utf-8"))["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {k: result.get(k) for k in INJECTION}


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


def _summary(summary: dict, run_dir: Path | None = None) -> dict:
    """The build stage's record: the run summary, plus the per-step training loss (for loss curves compared at
    equal steps, e.g. laten-lora against lora) read from the run's train_log.jsonl."""
    keep = ("init", "n_train", "steps", "final_loss", "train_seconds", "save_seconds", "extract_seconds")
    out = {k: summary.get(k) for k in keep}
    log = Path(run_dir) / "train_log.jsonl" if run_dir is not None else None
    if log is not None and log.is_file():
        rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines() if x.strip()]
        out["loss_curve"] = [round(float(r["loss"]), 5) for r in rows if "loss" in r]
    return out


def run_analysis(c: ExperimentConfig, task: str, factors, laten_dir, d: Path, log) -> dict:
    """Parametric (Seeking/PiSSA inits, LaTen deltas), representation and behaviour similarity → PNGs. The
    result keeps the figures' inputs (``plots``: :func:`pkt.analyse.plots.plot_inputs`), from which the PNGs are
    drawn, so that ``pkt report`` can redraw them from the stage's record alone."""
    from pkt.align.lora_init import make_lora_model
    from pkt.analyse import params as P
    from pkt.analyse import plots
    from pkt.analyse.behaviour import BehaviourConfig, behaviour_similarity
    from pkt.analyse.representations import RepConfig, representation_similarity
    from pkt.data.tasks import load_split
    from pkt.models.arch import ArchSpec
    from pkt.models.load import assert_same_tokenizer, load_model, load_tokenizer

    out, delta_recs = {}, None
    b = c.budget
    kinds = ("up", "down", "v", "o")
    inits = {}
    if factors is not None:
        from pkt.postpkt import load_extraction

        fac, _ = load_extraction(factors)
        model = make_lora_model(load_model(c.student), "seeking", list(fac_kinds(fac)), b.rank, b.alpha, factors=fac)
        inits["seeking"] = P.lora_similarity(model)
        del model
    inits["pissa"] = P.lora_similarity(make_lora_model(load_model(c.student), "pissa", kinds, b.rank, b.alpha,
                                                       pissa_niter=b.pissa_niter))
    out["params"] = {k: P.summarise(v) for k, v in inits.items()}
    if laten_dir is not None:
        from pkt.inject import dense, load_deltas

        student = load_model(c.student)
        spec = ArchSpec.from_model(student)
        deltas = {spec.module_name(layer, kind): dense(spec, kind, idx, val)
                  for (layer, kind), (idx, val) in load_deltas(Path(laten_dir) / "laten_deltas.safetensors").items()}
        delta_recs = P.delta_similarity(student, deltas)
        out["laten_delta"] = P.summarise(delta_recs)
        del student
    tok = load_tokenizer(c.student, padding_side="right")
    assert_same_tokenizer(load_tokenizer(c.teacher), tok)
    examples = load_split(task, "train")[-b.loss_examples:][: c.analysis_examples]
    rep_cfg = RepConfig(style=c.style, max_length=b.max_length, max_tokens=1024)
    rep = representation_similarity(lambda: load_model(c.teacher, dtype="bfloat16"),
                                    lambda: load_model(c.student, dtype="bfloat16"), tok, examples, rep_cfg, log=log)
    out["representations"] = {k: {m: v[m]["summary"] for m in v} for k, v in rep["modules"].items()}
    teacher, student = load_model(c.teacher, dtype="bfloat16"), load_model(c.student, dtype="bfloat16")
    beh = behaviour_similarity(teacher, student, tok, examples, BehaviourConfig(style=c.style, max_length=b.max_length,
                                                                                keep_per_token=True))
    out["behaviour"] = beh["summary"]
    inputs = plots.plot_inputs(inits, delta_recs, rep, beh)
    figures = plots.analysis_figures(inputs, d)
    write_json(d / "analysis.json", {**out, "plots": inputs})
    return {"figures": figures, "summary": json.loads(json.dumps(out, default=float)),
            "plots": json.loads(json.dumps(inputs, default=float))}


def fac_kinds(factors: dict) -> list[str]:
    """The module kinds present in a Seeking factor dict (keys are plain module names)."""
    from pkt.models.arch import PEFT_NAMES

    by_name = {v: k for k, v in PEFT_NAMES.items()}
    kinds = []
    for name in factors:
        last = name.split(".")[-1]
        kind = by_name.get(last, {"embed_tokens": "embed", "lm_head": "lm_head"}.get(last))
        if kind and kind not in kinds:
            kinds.append(kind)
    return kinds
