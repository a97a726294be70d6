"""MMLU test (14,042 rows, 57 subjects), 0-shot (PKT format) or k-shot from the dev CSVs.

User turn (open-instruct / PKT mmlu split)::

    The following are multiple choice questions (with answers) about {subject words}.\n\n
    [k dev examples "Q\nA. ..\nD. ..\nAnswer: X\n\n"] Q\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:

then the assistant prefix ``"The answer is:"`` (PKT answers read ``"The answer is: D"``). The prediction is the
letter whose next-token log-probability is highest; each letter is scored as the max over its tokenisations
(``" A"`` and ``"A"``; the Qwen tokenizer has both as single tokens), so either spacing convention works.
Shots are dropped from the end while the prompt exceeds ``max_prompt_tokens`` (open-instruct: 2048).
"""

from __future__ import annotations

from collections import defaultdict

from pkt.evaluate.generate import next_token_logprobs
from pkt.evaluate.tasks.common import prompt_text, select

LETTERS = "ABCD"
ASSISTANT_PREFIX = "The answer is:"


def format_example(row: dict, include_answer: bool) -> str:
    s = row["question"]
    for letter, choice in zip(LETTERS, row["choices"]):
        s += f"\n{letter}. {choice}"
    s += "\nAnswer:"
    if include_answer:
        s += f" {LETTERS[int(row['answer'])]}\n\n"
    return s


def user_turn(row: dict, dev: list[dict]) -> str:
    subject = row["subject"].replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return head + "".join(format_example(d, True) for d in dev) + format_example(row, False)


def letter_token_ids(tokenizer) -> list[list[int]]:
    """For each letter, the ids of its single-token variants (" A", "A")."""
    out = []
    for letter in LETTERS:
        ids = []
        for variant in (" " + letter, letter):
            enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:  # multi-token only: score by the first token of " X"
            ids.append(tokenizer(" " + letter, add_special_tokens=False)["input_ids"][0])
        out.append(ids)
    return out


def load_rows() -> tuple[list[dict], list[dict]]:
    from pkt.data.tasks import mmlu_rows

    return mmlu_rows("test"), mmlu_rows("dev")


def run(model, tokenizer, cfg, rows=None, stats=None, dev_rows=None):
    if rows is None:
        rows, dev_rows = load_rows()
    elif dev_rows is None:
        dev_rows = []
    shots = cfg.shots if cfg.shots is not None else 0
    dev_by_subject: dict[str, list[dict]] = defaultdict(list)
    for d in dev_rows:
        dev_by_subject[d["subject"]].append(d)
    rows = select([dict(r, _index=i) for i, r in enumerate(rows)], cfg.limit, cfg.seed)
    prompts, used_shots = [], []
    for r in rows:
        k = min(shots, len(dev_by_subject[r["subject"]]))
        while True:
            p = prompt_text(user_turn(r, dev_by_subject[r["subject"]][:k]), tokenizer, cfg.style, ASSISTANT_PREFIX)
            if k == 0 or len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= cfg.max_prompt_tokens:
                break
            k -= 1
        prompts.append(p)
        used_shots.append(k)
    variants = letter_token_ids(tokenizer)
    flat = [i for ids in variants for i in ids]
    lp = next_token_logprobs(model, tokenizer, prompts, flat, batch_size=cfg.batch_size, progress=cfg.progress,
                             desc="mmlu")
    records, by_subject = [], defaultdict(list)
    for n, (r, p) in enumerate(zip(rows, prompts)):
        scores, col = [], 0
        for ids in variants:
            scores.append(float(lp[n, col:col + len(ids)].max()))
            col += len(ids)
        pred = LETTERS[max(range(4), key=lambda j: scores[j])]
        gold = LETTERS[int(r["answer"])]
        ok = pred == gold
        by_subject[r["subject"]].append(ok)
        records.append({"id": f"{r['subject']}_{r['_index']}", "subject": r["subject"], "prompt": p,
                        "output": pred, "extracted": pred, "gold": gold, "correct": ok, "shots": used_shots[n],
                        "logprobs": {L: round(s, 4) for L, s in zip(LETTERS, scores)}})
    per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    total = len(records)
    metrics = {
        "accuracy": sum(x["correct"] for x in records) / total if total else 0.0,
        "macro_accuracy": sum(per_subject.values()) / len(per_subject) if per_subject else 0.0,
        "n": total, "shots": shots, "subjects": len(per_subject), "per_subject": per_subject,
        "letter_tokens": {L: tokenizer.convert_ids_to_tokens(ids) for L, ids in zip(LETTERS, variants)},
    }
    return records, metrics
