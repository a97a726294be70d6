"""MMLU test (14,042 rows, 57 subjects), 0-shot (PKT format) or k-shot from the dev CSVs.

User turn (open-instruct / PKT mmlu split)::

    The following are multiple choice questions (with answers) about {subject words}.\n\n
    [k dev examples "Q\nA. ..\nD. ..\nAnswer: X\n\n"] Q\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:

then the assistant prefix ``"The answer is:"`` (PKT answers read ``"The answer is: D"``). The prediction is the
letter whose next-token log-probability is highest; each letter is scored as the max over its tokenisations
(``" A"`` and ``"A"``; the Qwen tokenizer has both as single tokens), so either spacing convention works.
Shots are dropped from the end while the prompt exceeds ``max_prompt_tokens`` (open-instruct: 2048).

Protocol ``lm-eval``: lm-evaluation-harness 0.4.13's ``mmlu`` (``tasks/mmlu/default``) exactly: raw text, no
chat template; the subject's description ``"The following are multiple choice questions (with answers) about
{subject words}.\n\n"``, then the first 5 dev rows of the subject (``first_n`` sampler), each
``"{question.strip()}\nA. ..\nD. ..\nAnswer: X"``, joined and followed by the test row's text (ending in
``"Answer:"``) with ``"\n\n"``; the prediction is the choice whose continuation ``" A"`` .. ``" D"`` has the
highest log-likelihood (``acc``; no shots are dropped). ``accuracy`` is the micro mean, as the ``mmlu`` group
reports it (``weight_by_size``).
"""

from __future__ import annotations

from collections import defaultdict

from pkt.evaluate.generate import next_token_logprobs
from pkt.evaluate.tasks.common import parse_protocol, prompt_text, protocol_record, select

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


def lmeval_doc(row: dict, include_answer: bool) -> str:
    """``_default_template_yaml``'s doc_to_text (+ target delimiter ``" "`` and the letter for a shot)."""
    c = row["choices"]
    s = f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return s + f" {LETTERS[int(row['answer'])]}" if include_answer else s


def lmeval_prompt(row: dict, dev: list[dict]) -> str:
    """The per-subject task's description + first_n dev shots + the test doc, ``"\n\n"``-delimited."""
    description = f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"
    return description + "\n\n".join([*(lmeval_doc(d, True) for d in dev), lmeval_doc(row, False)])


def continuation_ids(tokenizer) -> list[list[int]]:
    """Token ids of the continuations " A".." D" as lm-eval scores them (a single token for Qwen)."""
    return [tokenizer(" " + L, add_special_tokens=False)["input_ids"] for L in LETTERS]


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
    proto = parse_protocol(getattr(cfg, "protocol", "pkt"))["mmlu"]
    shots = cfg.shots if cfg.shots is not None else (5 if proto == "lm-eval" else 0)
    dev_by_subject: dict[str, list[dict]] = defaultdict(list)
    for d in dev_rows:
        dev_by_subject[d["subject"]].append(d)
    rows = select([dict(r, _index=i) for i, r in enumerate(rows)], cfg.limit, cfg.seed)
    if proto == "lm-eval":
        return _run_lmeval(model, tokenizer, cfg, rows, dev_by_subject, shots, stats)
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
                             desc="mmlu", engine=cfg.decoding)
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
                        "logprobs": {L: round(s, 4) for L, s in zip(LETTERS, scores)}, "protocol": proto})
    per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    total = len(records)
    metrics = {
        "accuracy": sum(x["correct"] for x in records) / total if total else 0.0,
        "macro_accuracy": sum(per_subject.values()) / len(per_subject) if per_subject else 0.0,
        "n": total, "shots": shots, "subjects": len(per_subject), "per_subject": per_subject,
        "letter_tokens": {L: tokenizer.convert_ids_to_tokens(ids) for L, ids in zip(LETTERS, variants)},
        "protocol": protocol_record("mmlu", cfg, model, shots=shots),
    }
    return records, metrics


def _summary(records: list[dict], shots: int) -> dict:
    by_subject = defaultdict(list)
    for x in records:
        by_subject[x["subject"]].append(x["correct"])
    per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    total = len(records)
    return {"accuracy": sum(x["correct"] for x in records) / total if total else 0.0,
            "macro_accuracy": sum(per_subject.values()) / len(per_subject) if per_subject else 0.0,
            "n": total, "shots": shots, "subjects": len(per_subject), "per_subject": per_subject}


def _run_lmeval(model, tokenizer, cfg, rows, dev_by_subject, shots, stats):
    from pkt.evaluate.generate import continuation_logprobs

    prompts = [lmeval_prompt(r, dev_by_subject[r["subject"]][:shots]) for r in rows]
    conts = continuation_ids(tokenizer)
    lp = continuation_logprobs(model, tokenizer, prompts, conts, batch_size=cfg.batch_size,
                               progress=cfg.progress, desc="mmlu", engine=cfg.decoding)
    records = []
    for r, p, scores in zip(rows, prompts, lp):
        pred = LETTERS[max(range(4), key=lambda j: scores[j])]  # first maximum, as numpy argmax in lm-eval
        gold = LETTERS[int(r["answer"])]
        records.append({"id": f"{r['subject']}_{r['_index']}", "subject": r["subject"], "prompt": p,
                        "output": pred, "extracted": pred, "gold": gold, "correct": pred == gold,
                        "shots": min(shots, len(dev_by_subject[r["subject"]])),
                        "logprobs": {L: round(s, 4) for L, s in zip(LETTERS, scores)}, "protocol": "lm-eval"})
    return records, {**_summary(records, shots), "protocol": protocol_record("mmlu", cfg, model, shots=shots),
                     "continuations": {L: tokenizer.convert_ids_to_tokens(ids) for L, ids in zip(LETTERS, conts)}}
