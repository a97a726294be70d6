"""SeqKD's training rows (stage ``kd-data-{task}``): the teacher's answers to the training prompts, to
completion within the budget (truncated ones dropped or kept open, :func:`pkt.align.distill.budget_policy`);
computed once per task and read by the ``seqkd`` arm of every seed."""

from __future__ import annotations

from pathlib import Path

from pkt.stage import Cost, shared
from pkt.methods.registry import register_shared
from pkt.methods.base import SharedStage


class TeacherAnswers(SharedStage):
    kind = "kd-data"

    def run(self, study, task: str) -> Path:
        from pkt.align.distill import budget_policy, teacher_answers
        from pkt.data.jsonl import write_chat_jsonl
        from pkt.data.tasks import load_split
        from pkt.models.load import load_model, load_tokenizer

        c = study.cfg
        b = c.budget_for(task)
        n_train = study.n_train[task]
        payload = {"teacher": c.teacher, "task": task, "n": n_train, "style": c.style,
                   "max_new_tokens": b.kd_max_new_tokens, "dtype": c.teacher_dtype,
                   "truncated": b.kd_truncated, "answers": "to completion"}

        def fn(d: Path) -> dict:
            tok = load_tokenizer(c.teacher)
            teacher = load_model(c.teacher, dtype=c.teacher_dtype)
            answers = teacher_answers(teacher, tok, load_split(task, "train")[:n_train], style=c.style,
                                      max_new_tokens=b.kd_max_new_tokens)
            rows, counts = budget_policy(answers, b.kd_truncated)
            write_chat_jsonl(answers, d / "kd_answers.jsonl")
            write_chat_jsonl(rows, d / "kd_train.jsonl")
            study.echo(f"seqkd data: {counts['finished']} of {counts['answers']} teacher answers finished within "
                       f"{b.kd_max_new_tokens} tokens; {counts['dropped']} dropped, {counts['kept_open']} kept open")
            return {"n": len(rows), **counts,
                    "mean_chars": sum(len(r.assistant) for r in rows) / max(1, len(rows))}

        path, _ = study.run_stage(shared(self.kind, task), payload, fn,
                                  reads={"models": [c.teacher], "data": {task: ["train"]}})
        return path / "kd_train.jsonl"

    def estimate(self, plan, task: str) -> Cost:
        c = plan.cfg
        b = c.budget_for(task)
        n = plan.n_train(task)
        seconds = plan.secs("generate", plan.tp, c.teacher_dtype, n * b.kd_max_new_tokens) + \
            plan.load(plan.tp, c.teacher_dtype)
        return Cost(seconds, 0, f"teacher answers {n} prompts x <= {b.kd_max_new_tokens} tokens")


register_shared(TeacherAnswers())
