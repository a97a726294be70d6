"""The evaluation stage of a study's arm (``eval-{method}-{task}-s{seed}``): the task's score and the answer
loss on the held-out tail of the train split, for any method's model.

Evaluation of a seed uses one seeded subset for every method, so differences to the vanilla student are
paired per example. The answer loss is measured on the tail of the train split, which no method trains on
(fine-tuning uses its head; LaTen uses extract/align; Seeking uses extract). A built model is evaluated in
the study's ``eval_dtype`` only if its changes to the student survive that dtype
(:mod:`pkt.evaluate.precision`), else in float32.
"""

from __future__ import annotations

from pathlib import Path

from pkt.stage import Cost, evaluation
from pkt.methods import get, is_vanilla
from pkt.seeding import seed_everything

TEST_SIZES = {"gsm8k": 1319, "mmlu": 14042, "humaneval": 164, "mbpp": 500}
TEST_PROMPT_TOKENS = {"gsm8k": 120, "mmlu": 160, "humaneval": 180, "mbpp": 150}  # incl. the chat template


def eval_cfg(cfg, seed: int, task: str | None = None):
    """The evaluation settings of a study's task and seed (``budget.eval_seed`` fixes the subset's seed)."""
    from pkt.evaluate.harness import EvalConfig

    b = cfg.budget_for(task) if task else cfg.budget
    seed = seed if b.eval_seed is None else b.eval_seed
    return EvalConfig(limit=b.eval_limit, seed=seed, style=cfg.style, max_new_tokens=b.eval_max_new_tokens,
                      batch_size=b.eval_batch_size, decoding=b.eval_decoding, protocol=b.eval_protocol,
                      shots=b.eval_shots, allow_weak_sandbox=cfg.allow_weak_sandbox,
                      max_prompt_tokens=max(b.max_length, 1024), progress=True)


def heldout(cfg, task: str):
    """The answer-loss examples: the last ``loss_examples`` rows of the train split."""
    from pkt.data.tasks import load_split

    return load_split(task, "train")[-cfg.budget_for(task).loss_examples:]


def evaluate(study, method: str, ref: str, dtype: str, task: str, seed: int,
             label: str | None = None) -> dict | None:
    """Metrics of one model (None in a plan when not cached). ``label`` names the stage when one model is
    evaluated twice (the student in float32)."""
    from pkt.evaluate.harness import run_task
    from pkt.models.load import load_model, load_tokenizer

    c = study.cfg
    ecfg = eval_cfg(c, seed, task)
    built = not is_vanilla(method)
    # a built model's change is measured against the model it was built from: the student, or the teacher for a
    # method whose model is the teacher's size (sized_as)
    base = c.teacher if built and get(method).sized_as == "teacher" else c.student
    payload = {"model": ref, "dtype": dtype, "task": task, "eval": ecfg.model_dump(mode="json"),
               "loss_examples": c.budget_for(task).loss_examples,
               "precision": {"reference": base, "min_surviving": c.eval_min_surviving} if built else None}
    reads = {"models": [ref, base] if built else [ref], "data": {task: ["test", "train"]}}

    def fn(d: Path) -> dict:
        from pkt.io import write_jsonl

        used, precision = dtype, None
        if built:
            from pkt.evaluate.precision import choose_dtype

            used, precision = choose_dtype(ref, base, dtype, c.eval_min_surviving)
            if precision["fallback"]:
                study.echo(f"{method}: only {precision['surviving']}/{precision['changed']} changed entries "
                           f"survive {dtype}; evaluating in float32")
        seed_everything(seed)
        tok = load_tokenizer(ref)
        model = load_model(ref, dtype=used)
        records, metrics = run_task(task, model, tok, ecfg)
        loss_records, loss = run_task(f"{task}_loss", model, tok, ecfg.model_copy(update={"limit": None}),
                                      rows=heldout(c, task))
        write_jsonl(d / "predictions.jsonl", records)
        write_jsonl(d / "answer_loss.jsonl", loss_records)
        metric = "accuracy" if "accuracy" in metrics else "pass@1"
        # the record names the evaluation, so that pkt report reads it from the record, not the stage name;
        # nested, because a vanilla model's evaluation stands for every seed (evaluate_once)
        return {"evaluated_as": {"method": label or method, "task": task, "seed": seed},
                "metric": metric, "score": metrics[metric], "n": len(records),
                "per_example": [float(r["correct"]) for r in records], "answer_loss": loss["nll"],
                "dtype": used, "precision": precision,
                # the scalars, plus how the task was asked and decoded (protocol) and at what speed: small
                "metrics": {k: v for k, v in metrics.items()
                            if isinstance(v, (int, float, str)) or k in ("protocol", "generation")}}

    _, result = study.run_stage(evaluation(label or method, task, seed), payload, fn, reads=reads)
    return result


def evaluate_once(study, method: str, ref: str, dtype: str, task: str, seed: int, label: str | None = None):
    """``study.evaluate``, except that with a fixed evaluation subset (``budget.eval_seed``) a vanilla model (the
    student, the teacher, the float32 student) is evaluated once, as the first seed's stage, and that result
    stands for every seed: greedy decoding of the same model on the same questions is the same."""
    if not is_vanilla(method) or study.cfg.budget_for(task).eval_seed is None:
        return study.evaluate(method, ref, dtype, task, seed, label)
    if seed == study.cfg.seeds[0]:
        study.vanilla[(label or method, task)] = study.evaluate(method, ref, dtype, task, seed, label)
    return study.vanilla.get((label or method, task))


def estimate(plan, method: str, task: str) -> Cost:
    """An evaluation's cost: prompts and answers (:func:`pkt.experiment.plan.generation_seconds`), the
    answer-loss examples and the model's load, for a model of the size the method declares. A built model is
    counted in eval_dtype (a lower bound: it may fall back to float32)."""
    from pkt.evaluate.tasks.common import is_fewshot

    c = plan.cfg
    m = get(method)
    b = c.budget_for(task)
    n = min(b.eval_limit or TEST_SIZES[task], TEST_SIZES[task])
    params = plan.tp if m.sized_as == "teacher" else plan.sp
    dt = m.eval_dtype or c.eval_dtype
    gen = 0 if task == "mmlu" else b.eval_max_new_tokens
    if gen:
        answer = plan.generation(params, dt, task, n, gen, decoding=b.eval_decoding, batch=b.eval_batch_size,
                                 fewshot=is_fewshot(task, b.eval_protocol, b.eval_shots),
                                 prompt_tokens=TEST_PROMPT_TOKENS[task])
    else:  # MMLU: one forward pass of each prompt
        answer = plan.secs("forward", params, dt, n * TEST_PROMPT_TOKENS[task])
    seconds = (answer
               + plan.secs("forward", params, dt, b.loss_examples * plan.toks.mean(task, "train"))
               + plan.load(params, dt))
    work = f"{n} {task} questions" + (f" x <= {gen} new tokens" if gen else "") + \
        f", {b.loss_examples} loss examples ({dt})"
    return Cost(seconds, 0, work)
