"""The study's analysis stage (``analysis``): parametric, representation and behavioural similarity of the
teacher and the student on the first task, drawn as figures.

It reads the first task's Seeking extraction (the Seeking init's similarity to the student's weights, next to
PiSSA's) and the first seed's LaTen student (its delta against the student's weights), when the study has
them; the representation and next-token behaviour comparisons need only the two models. The result keeps the
figures' inputs, so that ``pkt report`` redraws them from the stage's record alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkt.stage import ANALYSIS_STAGE, Cost
from pkt.io import write_json

def analysis(study, shared: dict) -> list[Path]:
    """Run (or find cached) the analysis stage of ``study``; ``shared``: the walk's per-task outputs (each
    shared stage's path by kind, and each method's first built model under "first"). Returns the figures."""
    c = study.cfg
    task = c.tasks[0]
    b = c.budget_for(task)
    factors = shared.get(task, {}).get("extract")
    laten_dir = shared.get(task, {}).get("first", {}).get("laten")
    laten_dir = Path(laten_dir) if laten_dir is not None else None
    # everything run_analysis reads: budgets, example counts, style, and both models' weights
    payload = {"teacher": c.teacher, "student": c.student, "task": task, "n": c.analysis_examples,
               "rank": b.rank, "alpha": b.alpha, "pissa_niter": b.pissa_niter, "max_length": b.max_length,
               "loss_examples": b.loss_examples, "factors": str(factors) if factors else None,
               "laten": str(laten_dir) if laten_dir else None, "style": c.style}

    def fn(d: Path) -> dict:
        # what it reads, written now if a restored study did not need it before (Study._shared_lazily, restore)
        if factors is not None and not Path(factors).is_dir():
            study.shared_stage("extract", task)
        if laten_dir is not None and not (laten_dir / "laten_deltas.safetensors").is_file():
            study.build("laten", task, c.seeds[0], shared[task])
        return run_analysis(c, task, factors, laten_dir, d, study.echo)

    path, result = study.run_stage(ANALYSIS_STAGE, payload, fn,
                                   reads={"models": [c.teacher, c.student], "data": {task: ["train"]}})
    return [path / f for f in result["figures"]] if result else []


def estimate(plan) -> Cost:
    """The analysis' cost: its examples through both models, twice (representations, then behaviour)."""
    c = plan.cfg
    task = c.tasks[0]
    n = c.analysis_examples * plan.toks.mean(task, "train")
    seconds = 2 * (plan.secs("forward", plan.tp, "bfloat16", n) + plan.secs("forward", plan.sp, "bfloat16", n)) + \
        2 * (plan.load(plan.tp, "bfloat16") + plan.load(plan.sp, "bfloat16"))
    return Cost(seconds, 0, f"{c.analysis_examples} examples through both models, twice")


def run_analysis(c, task: str, factors, laten_dir, d: Path, log) -> dict:
    """Parametric (Seeking/PiSSA inits, LaTen deltas), representation and behaviour similarity → PNGs. The
    result keeps the figures' inputs (``plots``: :func:`pkt.analyse.plots.plot_inputs`), from which the PNGs are
    drawn, so that ``pkt report`` can redraw them from the stage's record alone. ``c``: the study's
    ExperimentConfig."""
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
