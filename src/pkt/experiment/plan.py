"""The plan of a study before it runs: its stages, an estimated wall time and the disk it needs.

``pkt run --dry-run CONFIG`` and the preflight of ``pkt run`` use it. The stages (names, keys, cached or
not) come from walking the study against a dry cache (:meth:`Study.plan_stages`), so the plan lists
exactly the stages a run would run. Each stage's cost comes from what computes it (a method's build:
:meth:`pkt.methods.base.Method.estimate`; a shared stage's, the evaluation's, the analysis'), through
:class:`PlanContext`. Its time is its work in tokens divided by a throughput
measured on this project's reference machine, :data:`THROUGHPUT` (tokens/s by work kind, dtype and model
size; interpolated log-log between the measured sizes, ∝ 1/size beyond them); the numbers are for that
machine (a 2-core CPU) and say nothing about a GPU. Continuous generation is counted at the answers' expected
lengths (the measured share that runs to the cap, and the others' mean length: :func:`answer_tokens`), padded
generation at its token cap (each batch waits for its longest answer). Token counts of the PKT splits are
measured with the student's tokenizer when it is available (characters / 4 otherwise).

Disk: each fine-tuned or injected model writes a full copy of the student (in its dtype), plus
adapters, LaTen's hypernetwork checkpoints, Seeking's factors and not-yet-prepared embedded models.
Without ``keep_checkpoints`` each copy is deleted once evaluated, so only the largest one counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# tokens/s on the reference machine (2-core x86-64 CPU with avx512_bf16, 24 GiB, torch 2.13 CPU build, 2 threads),
# measured with `flock /tmp/pkt-heavy.lock .venv/bin/python benchmarks/bench_throughput.py --models MODEL
# --batch 8 --repeats 2` for the embedded 0.5B and 1.5B (docs/benchmarks.md, P5): [parameters, tokens/s] per
# (work, dtype); log-log interpolation between sizes, 1/size beyond them. "generate" is measured at batch 8
# and used for every batch size.
THROUGHPUT_MACHINE = "2-core x86-64 CPU, 24 GiB, torch CPU build, 2 threads"
THROUGHPUT: dict[str, dict[str, list[list[float]]]] = {
    # benchmarks/bench_throughput.py --batch 8 (the evaluation's batch), 2026-12-02, load average ~2
    "forward": {"float32": [[630167424, 101.4], [1777088000, 60.2]], "bfloat16": [[630167424, 102.1], [1777088000, 29.9]]},
    "train": {"float32": [[630167424, 42.1], [1777088000, 17.3]], "bfloat16": [[630167424, 36.2], [1777088000, 12.2]]},
    "generate": {"float32": [[630167424, 6.9], [1777088000, 6.0]], "bfloat16": [[630167424, 26.5], [1777088000, 10.9]]},
    # evaluation under eval decoding "continuous": useful new tokens/s with the prompts' prefill included, at
    # CONTINUOUS_ROWS rows on 150 GSM8K and the 164 HumanEval prompts (`benchmarks/p11_gate.sh`, docs/benchmarks.md
    # P11: 58.4 / 58.3 in float32, 136.6 / 138.1 in bfloat16; 2-core AMD EPYC VM without AMX, quiet cores)
    "generate-continuous": {"float32": [[630167424, 58.3]], "bfloat16": [[630167424, 137.0]]},
    # the same behind few-shot exemplars (8-shot GSM8K, 738 shared tokens attended as one copy; P11): each step
    # also attends to the exemplars
    "generate-continuous-fewshot": {"float32": [[630167424, 52.3]], "bfloat16": [[630167424, 110.5]]},
}
CONTINUOUS_ROWS = 64
# A decoding step costs about a + c·rows (P11, bf16 at 64 rows: a = 0.066 s, c = 0.0043 s), so with fewer rows the
# rate falls as rows / (rows + a/c); more rows than measured are counted at the measured rate (P11: 128 rows gave
# 1.04x in bf16 and 0.90x in fp32).
STEP_FIXED_ROWS = 0.066 / 0.0043
# The embedded 0.5B student's greedy answers at a 256-token cap, in its tokens (`benchmarks/answer_lengths.py`,
# docs/benchmarks.md P5): the share that runs to the cap (loops, unfinished code) and the mean length of the others,
# by (task, few-shot prompt). GSM8K's pools the decisive study's 13 evaluations, the student's 2 and its builds' 11
# (its records' at_cap agree: tests/test_plan.py), a collapsed one included: PiSSA at lr 1e-3 ran every answer to
# the cap, as an lr sweep's worst point may.
ANSWER_LENGTHS = {("gsm8k", False): (0.28, 64.3), ("gsm8k", True): (0.02, 86.0), ("humaneval", False): (0.26, 166.0),
                  ("mbpp", False): (0.02, 84.7)}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOAD_SECONDS_PER_GB = 2.0  # reading a prepared safetensors checkpoint (page cache cold)


def answer_tokens(task: str, cap: int, fewshot: bool = False) -> float:
    """Expected new tokens of one greedy answer to ``task`` at a cap of ``cap`` tokens: the answers that run to the
    cap take it whole, the others their mean length (:data:`ANSWER_LENGTHS`); a task not measured, the cap."""
    if (task, fewshot) not in ANSWER_LENGTHS:
        return float(cap)
    looping, others = ANSWER_LENGTHS[(task, fewshot)]
    return looping * cap + (1 - looping) * min(others, cap)


def continuous_rows_factor(rows: int) -> float:
    """The continuous engine's rate at ``rows`` rows relative to its rate at :data:`CONTINUOUS_ROWS`."""
    r = max(1, min(rows, CONTINUOUS_ROWS))
    k = STEP_FIXED_ROWS
    return (r / (r + k)) / (CONTINUOUS_ROWS / (CONTINUOUS_ROWS + k))


def generation_seconds(secs, task: str, questions: int, cap: int, *, decoding: str, batch: int,
                       fewshot: bool, prompt_tokens: float) -> float:
    """Seconds to answer ``questions`` of ``task`` greedily at ``cap`` new tokens; ``secs(work, tokens)`` is the
    model's time for that work at its size and dtype. Continuous decoding: the answers' expected tokens
    (:func:`answer_tokens`) at the engine's measured rate (prefill included; behind few-shot exemplars, its rate
    there), scaled to the rows it decodes at once. Padded decoding: every batch waits for its longest answer, so the prompts' prefill and the cap."""
    if decoding == "continuous":
        rows = min(batch, questions)
        work = "generate-continuous-fewshot" if fewshot else "generate-continuous"
        return secs(work, questions * answer_tokens(task, cap, fewshot)) / continuous_rows_factor(rows)
    return secs("forward", questions * prompt_tokens) + secs("generate", questions * cap)


def tokens_per_second(work: str, params: int, dtype: str) -> float:
    """Interpolated throughput (log-log in model size) of ``work`` for a model of ``params`` parameters."""
    table = THROUGHPUT[work].get(dtype) or THROUGHPUT[work]["float32"]
    pts = sorted(table)
    if params <= pts[0][0]:
        return pts[0][1] * pts[0][0] / params if params < pts[0][0] else pts[0][1]
    if params >= pts[-1][0]:
        return pts[-1][1] * pts[-1][0] / params
    for (p0, t0), (p1, t1) in zip(pts, pts[1:]):
        if p0 <= params <= p1:
            w = (math.log(params) - math.log(p0)) / (math.log(p1) - math.log(p0))
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    raise AssertionError("unreachable")


@dataclass
class Estimate:
    stages: list[dict] = field(default_factory=list)  # stage, key, cached, seconds, bytes, work
    seconds: float = 0.0
    disk_bytes: int = 0
    free: int | None = None
    warnings: list[str] = field(default_factory=list)
    machine: str = THROUGHPUT_MACHINE
    of: dict = field(default_factory=dict)  # stage name -> its Stage (not written: the names say it in records)

    def to_dict(self) -> dict:
        return {"seconds": round(self.seconds), "disk_bytes": self.disk_bytes, "free_bytes": self.free,
                "machine": self.machine, "warnings": self.warnings,
                "stages": [{k: v for k, v in s.items()} for s in self.stages]}

    def summary_line(self) -> str:
        todo = [s for s in self.stages if not s["cached"]]
        free = "" if self.free is None else f", {self.free / 1e9:.1f} GB free"
        return (f"plan: {len(self.stages)} stages ({len(self.stages) - len(todo)} cached), estimated "
                f"{human(self.seconds)} on the reference machine ({self.machine}), disk up to "
                f"{self.disk_bytes / 1e9:.2f} GB{free}")

    def render(self) -> str:
        lines = [f"{'stage':<34} {'status':<7} {'estimate':>10} {'disk':>9}  work"]
        for s in self.stages:
            lines.append(f"{s['stage']:<34} {'cached' if s['cached'] else 'run':<7} {human(s['seconds']):>10} "
                         f"{s['bytes'] / 1e9:>7.2f}GB  {s['work']}")
        lines.append(self.summary_line())
        lines += [f"note: {w}" for w in self.warnings]
        return "\n".join(lines)


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class _Tokens:
    """Mean tokens per example of each PKT split (measured once per split)."""

    def __init__(self, tokenizer_path: str | None, tokenizer=None):
        self.tok = tokenizer
        if tokenizer is None and tokenizer_path:
            try:
                from transformers import AutoTokenizer

                self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
            except (OSError, ValueError):
                self.tok = None
        self.memo: dict = {}

    def mean(self, task: str, split: str, limit: int = 64) -> float:
        if (task, split) not in self.memo:
            from pkt.data.tasks import load_split

            rows = load_split(task, split)[:limit]
            texts = [r.user + r.assistant for r in rows]
            if self.tok is not None and rows:
                n = sum(len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]) / len(rows)
            else:
                n = sum(len(t) for t in texts) / max(1, len(rows)) / 4
            self.memo[(task, split)] = n + 12  # chat template tokens
        return self.memo[(task, split)]


@dataclass
class PlanContext:
    """What a stage's estimate reads: the study, both models' facts (size, architecture), the splits' token
    counts, and the reference machine's rates (:data:`THROUGHPUT`)."""

    study: object
    teacher: object  # pkt.experiment.preflight.ModelFacts, with params and spec filled
    student: object
    toks: _Tokens

    @property
    def cfg(self):
        return self.study.cfg

    @property
    def tp(self) -> int:
        return self.teacher.params or 0

    @property
    def sp(self) -> int:
        return self.student.params or 0

    def n_train(self, task: str) -> int:
        return self.study.n_train[task]

    def secs(self, work: str, params: int, dtype: str, tokens: float) -> float:
        if not (params and tokens):
            return 0.0
        # decoding is counted at the batch-8 rate whatever the batch: at batch 32 the 0.5B measured 37.4 (bf16)
        # and 15.2 (fp32) tok/s, no faster, though on a loaded machine (docs/benchmarks.md P5)
        return tokens / tokens_per_second(work, params, dtype)

    def generation(self, params: int, dtype: str, task: str, questions: int, cap: int, **how) -> float:
        """:func:`generation_seconds` for a model of ``params`` parameters in ``dtype``."""
        return generation_seconds(lambda work, tokens: self.secs(work, params, dtype, tokens), task, questions, cap,
                                  **how)

    def load(self, params: int, dtype: str) -> float:
        return params * DTYPE_BYTES.get(dtype, 4) / 1e9 * LOAD_SECONDS_PER_GB

    def model_bytes(self, params: int, dtype: str) -> int:
        return int(params * DTYPE_BYTES.get(dtype, 4))

    def lora_bytes(self, spec, rank: int) -> int:
        if spec is None:
            return 0
        per_layer = sum(sum(spec.weight_shape(k)) for k in ("q", "k", "v", "o", "gate", "up", "down"))
        return per_layer * spec.num_layers * rank * 4


def stage_cost(plan: PlanContext, stage):
    """The :class:`pkt.methods.base.Cost` of one stage, from what computes it: the analysis, the evaluation,
    a method's build, or a shared stage."""
    from pkt import methods
    from pkt.stage import ANALYSIS, BUILD, EVAL

    if stage.kind == ANALYSIS:
        from pkt.analyse.stage import estimate as analysis_cost

        return analysis_cost(plan)
    if stage.kind == EVAL:
        from pkt.experiment.evaluation import estimate as eval_cost

        return eval_cost(plan, stage.method, stage.task)
    if stage.kind == BUILD:
        return methods.get(stage.method).estimate(plan, stage.task)
    return methods.get_shared(stage.kind).estimate(plan, stage.task)


def estimate(study, teacher, student) -> Estimate:
    """The plan of ``study`` (a :class:`pkt.experiment.runner.Study`) with time and disk per stage."""
    from pkt.experiment.preflight import meta_facts

    c = study.cfg
    est = Estimate()
    teacher, student = meta_facts(teacher), meta_facts(student)
    plan = PlanContext(study, teacher, student, _Tokens(student.path, student.tokenizer))
    if not plan.tp or not plan.sp:
        est.warnings.append("a model's size is unknown until it is prepared: its stages are estimated at 0")
    checkpoint_bytes, other_bytes = [], 0
    for rec in study.plan_stages():
        cost = stage_cost(plan, rec.of)
        seconds, nbytes = (0.0, 0) if rec.cached else (cost.seconds, cost.bytes)
        est.stages.append({"stage": rec.stage, "key": rec.key, "cached": rec.cached, "seconds": round(seconds, 1),
                           "bytes": nbytes, "work": cost.work})
        est.of[rec.stage] = rec.of
        if cost.checkpoint and not rec.cached:
            # (at most what the stage writes: a model of unknown size is estimated at 0 bytes)
            ckpt = min(plan.model_bytes(plan.sp, c.dtype), nbytes)
            checkpoint_bytes.append(ckpt)
            other_bytes += nbytes - ckpt
        else:
            other_bytes += nbytes
    for facts in (teacher, student):
        if facts.source == "embedded" and facts.path is None and facts.params:
            other_bytes += plan.model_bytes(facts.params, "float32")
    est.seconds = sum(s["seconds"] for s in est.stages)
    peak_ckpt = sum(checkpoint_bytes) if c.keep_checkpoints else max(checkpoint_bytes, default=0)
    est.disk_bytes = int(other_bytes + peak_ckpt)
    return est
