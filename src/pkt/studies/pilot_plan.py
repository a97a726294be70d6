"""The cost of a pilot before it runs (``pkt study pilot CONFIG --dry-run``): its stages, cached or not, with their
estimated time on the reference machine of :mod:`pkt.experiment.plan` (its measured training, forward and
continuous-decoding rates by model size and dtype; continuous generation counted at the answers' expected
lengths) and the disk its merged students take at once. Seeking's extraction costs the teacher's sensitivity pass
(training rate of the teacher's size, on the extract split's examples) and its load; a PiSSA or Seeking build
adds reading the merged build and the student once more (its ‖ΔW‖/‖W‖); PiSSA's SVD of every adapted matrix is
not counted (no measured rate; seconds for a 0.5B student).
"""

from __future__ import annotations

from pkt.studies import pilot_report as R, staged


def generation_seconds(e, task: str, questions: int, secs) -> float:
    """Seconds to answer ``questions`` of ``task`` greedily under the evaluation settings ``e`` (the pilot's
    ``EvalSettings``; :func:`pkt.experiment.plan.generation_seconds`); ``secs(work, tokens)`` is the model's time
    for that work."""
    from pkt.experiment.evaluation import TEST_PROMPT_TOKENS
    from pkt.evaluate.tasks.common import is_fewshot
    from pkt.experiment.plan import generation_seconds as seconds

    return seconds(secs, task, questions, e.max_new_tokens, decoding=e.decoding, batch=e.batch_size,
                   fewshot=is_fewshot(task, e.protocol, e.shots), prompt_tokens=TEST_PROMPT_TOKENS[task])


class Costs:
    """Seconds of a build or an evaluation on the reference machine, from :mod:`pkt.experiment.plan`'s measured
    rates (training, forward and continuous-decoding tokens/s by model size and dtype)."""

    def __init__(self, cfg, heldout):
        from pkt.experiment.plan import DTYPE_BYTES, LOAD_SECONDS_PER_GB, _Tokens
        from pkt.experiment.preflight import meta_facts, model_facts

        facts = meta_facts(model_facts(cfg.student, plan=True))
        self.cfg, self.n_heldout, self.params = cfg, len(heldout.rows), facts.params or 0
        self.notes = [] if self.params else ["the student's size is unknown until it is prepared: its stages cost 0"]
        self.tokens = min(_Tokens(facts.path, facts.tokenizer).mean(cfg.task, "train"), cfg.max_length)
        self.model_bytes = self.params * DTYPE_BYTES[cfg.dtype]
        self.load = self.model_bytes / 1e9 * LOAD_SECONDS_PER_GB
        self.teacher_params = self.extract_tokens = 0
        if "pissa" in cfg.inits:
            self.notes.append("PiSSA's SVD of every adapted matrix at init is not counted in its builds")
        if any(i.startswith("seeking") for i in cfg.inits):
            from pkt.data.tasks import load_split
            from pkt.postpkt import SeekingConfig

            t = meta_facts(model_facts(cfg.teacher, plan=True))
            self.teacher_params = t.params or 0
            if not self.teacher_params:
                self.notes.append("the teacher's size is unknown until it is prepared: its extraction costs 0")
            n = min(cfg.extract_samples, len(load_split(cfg.task, "extract")))
            limit = SeekingConfig().max_length  # the extraction's cutoff (`pkt postpkt`'s)
            self.extract_n = n
            self.extract_tokens = n * min(_Tokens(t.path, t.tokenizer).mean(cfg.task, "extract"), limit) \
                if self.teacher_params else 0
            self.teacher_load = self.teacher_params * DTYPE_BYTES[cfg.teacher_dtype] / 1e9 * LOAD_SECONDS_PER_GB

    def _secs(self, work: str, tokens: float) -> float:
        from pkt.experiment.plan import tokens_per_second

        return tokens / tokens_per_second(work, self.params, self.cfg.dtype) if self.params else 0.0

    def build(self, n: int, epochs: float, init: str = "lora") -> float:
        # a non-zero init's update is measured from the merged build and the student, read once more each
        reads = 1 if init == "lora" else 3
        return self._secs("train", n * epochs * self.tokens) + reads * self.load * bool(self.params)

    def extraction(self) -> float:
        from pkt.experiment.plan import tokens_per_second

        if not self.teacher_params:
            return 0.0
        rate = tokens_per_second("train", self.teacher_params, self.cfg.teacher_dtype)
        return self.extract_tokens / rate + self.teacher_load

    def extraction_work(self) -> str:
        return f"teacher sensitivity on {self.extract_n} extract examples, shared by every seeking build"

    def questions(self, which: str) -> int:
        from pkt.experiment.evaluation import TEST_SIZES

        return self.n_heldout if which == "heldout" else min(self.cfg.eval.test_size, TEST_SIZES[self.cfg.task])

    def evaluate(self, which: str) -> float:
        e, q = self.cfg.eval, self.questions(which)
        gen = generation_seconds(e, self.cfg.task, q, self._secs)
        loss = self._secs("forward", q * self.tokens) if which == "heldout" and self.cfg.heldout.answer_loss else 0
        return gen + loss + self.load * bool(self.params)

    def work(self, which: str) -> str:
        loss = ", answer loss" if which == "heldout" and self.cfg.heldout.answer_loss else ""
        return f"{self.questions(which)} {which} questions x <= {self.cfg.eval.max_new_tokens} new tokens{loss}"

    def disk_note(self) -> str:
        c = self.cfg
        n = len(c.lrs) * len(c.seeds) * (len(R.budgets(c.model_dump(mode="json"))) * len(c.inits)
                                         if c.keep_checkpoints else 1)
        per = "budget" if c.inits == ["lora"] else "init and budget"
        return (f"disk: up to {n} merged students at once ({n * self.model_bytes / 1e9:.1f} GB"
                f"{'' if c.keep_checkpoints else f': each {per} keeps its builds until its test evaluation'}) "
                "besides their adapters")


def render_plan(pilot) -> str:
    """The plan of ``pilot`` (:meth:`pkt.studies.pilot.Pilot.plan`) as a table, its total and notes."""
    from pkt.experiment.plan import THROUGHPUT_MACHINE, human

    rows = pilot.plan()
    todo = [r for r in rows if not r[1]]
    seconds = sum(r[2] for r in todo)
    lines = staged.plan_table(rows, 44)  # the stage column: an init's names are longer than LoRA's
    builds = sum(r[0].startswith("build-") for r in rows)
    extractions = sum(r[0].startswith("extract-") for r in rows)
    evals = len(rows) - builds - extractions
    lines.append(f"plan: {builds} builds{', 1 extraction' if extractions else ''} and {evals} evaluations "
                 f"({len(rows) - len(todo)} stages "
                 f"cached), estimated {human(seconds)} on the reference machine ({THROUGHPUT_MACHINE}), "
                 "continuous generation counted at the answers' expected lengths")
    return "\n".join(lines + [f"note: {x}" for x in pilot.plan_notes])
