r"""GSM8K test (1319): 0-shot in the PKT split format, or k-shot chain of thought (Wei et al. exemplars).

User turn: ``"Answer the following question.\n\nQuestion: {q}"`` (0-shot, exactly the PKT gsm format) or
``"Answer the following questions.\n\n" + demos + "Question: {q}"``; the assistant starts with ``"Answer:"``
(PKT answers read ``"Answer: ... So the answer is N."``). Prediction: the last number in the output with
thousands separators removed; correct when it equals the gold number (numeric comparison, so "18.0" == "18").
Beside it, ``first_answer_accuracy`` reads the number of the first "answer is N" (the last number where the
output has none): a model that states its answer and then writes on (a new question of its own, a loop to the
token cap) is scored on its last number, and the gap between the two says how much that costs it.

Protocol ``lm-eval-cot``: lm-evaluation-harness 0.4.13's ``gsm8k_cot`` (``tasks/gsm8k/gsm8k-cot.yaml``,
version 3.0) exactly: raw text, no chat template; the 8 exemplars of its YAML (``"... The answer is N."``, not
the PKT wording), each ``"Q: {question}\nA: {target}"``, joined and followed by ``"Q: {question}\nA:"`` with
``"\n\n"``; greedy until ``"Q:"``, ``"</s>"``, ``"<|im_end|>"`` or eos, 256 new tokens (lm-eval's default
``max_gen_toks``). Scored by exact match (case-folded, with ``,``, ``$``, everything up to ``"#### "`` and a
final ``.`` removed from both sides) of the strict-match extraction (first ``The answer is (\-?[0-9\.\,]+).``
match) against the gold after ``####``: ``accuracy``; the flexible extraction (last match of
``(-?[$0-9.,]{2,})|(-?[0-9]+)``) gives ``flexible_accuracy``.
"""

from __future__ import annotations

import random
import re

from pkt.evaluate.generate import generate
from pkt.evaluate.tasks.common import hit_cap, parse_protocol, prompt_text, protocol_record, select

# The 8 chain-of-thought exemplars of Wei et al. (2022), Table 20 (as in open-instruct and lm-eval).
EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. So the answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. So the answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "So the answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "So the answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. So the answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. So the answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. So the answer is 8."),
]
ASSISTANT_PREFIX = "Answer:"
STOP = ["\nQuestion:", "<|user|>"]
_NUM = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")
_FIRST_ANSWER = re.compile(r"answer is\W{0,3}?\$?\s*([-+]?\d*\.\d+|[-+]?\d+)", re.IGNORECASE)


# lm-eval 0.4.13 tasks/gsm8k/gsm8k-cot.yaml ``fewshot_config.samples``, verbatim (YAML line folding undone).
LMEVAL_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
LMEVAL_STOP = ["Q:", "</s>", "<|im_end|>"]
STRICT_RE = re.compile(r"The answer is (\-?[0-9\.\,]+).")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # the metric's regexes_to_ignore, applied in this order


def lmeval_prompt(question: str, shots: int = 8) -> str:
    """gsm8k_cot's context: first_n exemplars (``"Q: ..\nA: ..."``) and the question, joined by blank lines."""
    demos = [f"Q: {q}\nA: {a}" for q, a in LMEVAL_EXEMPLARS[:shots]]
    return "\n\n".join([*demos, f"Q: {question}\nA:"])


def regex_extract(regex: re.Pattern, text: str, group_select: int) -> str:
    """lm-eval's RegexFilter: findall, pick one match, first non-empty group of a tuple, strip; '[invalid]'."""
    found = regex.findall(text)
    if not found:
        return "[invalid]"
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "[invalid]")
    return m.strip()


def lmeval_exact_match(pred: str, gold: str) -> bool:
    """lm-eval's exact_match with gsm8k_cot's settings (ignore_case, regexes_to_ignore)."""
    for rx in _IGNORE:
        pred, gold = re.sub(rx, "", pred), re.sub(rx, "", gold)
    return pred.lower() == gold.lower()


def user_turn(question: str, shots: int = 0, seed: int = 0) -> str:
    if shots <= 0:
        return "Answer the following question.\n\nQuestion: " + question.strip()
    demos = EXEMPLARS if shots >= len(EXEMPLARS) else random.Random(seed).sample(EXEMPLARS, shots)
    body = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in demos)
    return "Answer the following questions.\n\n" + body + "\n\nQuestion: " + question.strip()


def extract_answer(text: str) -> str | None:
    """The last number in ``text`` (thousands separators removed), or None."""
    text = re.sub(r"(\d),(\d)", r"\1\2", text)
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


def extract_first_answer(text: str) -> str | None:
    """The number of the first "answer is N" in ``text``, else the last number (:func:`extract_answer`)."""
    m = _FIRST_ANSWER.search(re.sub(r"(\d),(\d)", r"\1\2", text))
    return m.group(1) if m else extract_answer(text)


def _num(s: str | None) -> float | None:
    try:
        return float(str(s).replace(",", "").rstrip("."))
    except (TypeError, ValueError):
        return None


def is_correct(pred: str | None, gold: str) -> bool:
    p, g = _num(pred), _num(gold)
    return p is not None and g is not None and abs(p - g) < 1e-6


def load_rows() -> list[dict]:
    from pkt.data.tasks import gsm8k_test

    return gsm8k_test()


def run(model, tokenizer, cfg, rows=None, stats=None):
    rows = rows if rows is not None else load_rows()
    rows = select([dict(r, _index=i) for i, r in enumerate(rows)], cfg.limit, cfg.seed)
    for r in rows:
        r.setdefault("gold", r["answer"].split("####")[-1].strip().replace(",", ""))
    proto = parse_protocol(getattr(cfg, "protocol", "pkt"))["gsm8k"]
    if proto == "lm-eval-cot":
        return _run_lmeval(model, tokenizer, cfg, rows, stats)
    shots = cfg.shots if cfg.shots is not None else 0
    max_new = cfg.max_new_tokens or 256
    prompts = [prompt_text(user_turn(r["question"], shots, cfg.seed), tokenizer, cfg.style, ASSISTANT_PREFIX)
               for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new, stop=STOP,
                    batch_size=cfg.batch_size, engine=cfg.decoding, progress=cfg.progress, desc="gsm8k", seed=cfg.seed,
                    stats=stats)
    records = []
    for i, (r, p, o) in enumerate(zip(rows, prompts, outs)):
        pred, first = extract_answer(o[0]), extract_first_answer(o[0])
        records.append({"id": r["_index"], "prompt": p, "output": o[0], "extracted": pred, "gold": r["gold"],
                        "correct": is_correct(pred, r["gold"]), "extracted_first": first,
                        "correct_first": is_correct(first, r["gold"]), "protocol": proto})
    n = len(records)
    return records, {"accuracy": sum(x["correct"] for x in records) / n if n else 0.0,
                     "first_answer_accuracy": sum(x["correct_first"] for x in records) / n if n else 0.0,
                     "n": n, "shots": shots,
                     "protocol": protocol_record("gsm8k", cfg, model, shots=shots, max_new_tokens=max_new),
                     "hit_max_new_tokens": hit_cap(tokenizer, outs, max_new)}


def _run_lmeval(model, tokenizer, cfg, rows, stats):
    shots = min(cfg.shots if cfg.shots is not None else 8, len(LMEVAL_EXEMPLARS))
    max_new = cfg.max_new_tokens or 256
    prompts = [lmeval_prompt(r["question"], shots) for r in rows]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new, stop=LMEVAL_STOP,
                    batch_size=cfg.batch_size, engine=cfg.decoding, progress=cfg.progress, desc="gsm8k",
                    seed=cfg.seed, stats=stats)
    records = []
    for r, p, o in zip(rows, prompts, outs):
        # lm-eval's doc_to_target: the text after the last '####', stripped (separators stay; the metric drops them)
        gold = r["answer"].split("####")[-1].strip()
        strict = regex_extract(STRICT_RE, o[0], 0)
        flexible = regex_extract(FLEXIBLE_RE, o[0], -1)
        records.append({"id": r["_index"], "prompt": p, "output": o[0], "extracted": strict, "gold": gold,
                        "correct": lmeval_exact_match(strict, gold), "extracted_flexible": flexible,
                        "correct_flexible": lmeval_exact_match(flexible, gold), "protocol": "lm-eval-cot"})
    n = len(records)
    return records, {
        "accuracy": sum(x["correct"] for x in records) / n if n else 0.0,
        "flexible_accuracy": sum(x["correct_flexible"] for x in records) / n if n else 0.0,
        "n": n, "shots": shots,
        "protocol": protocol_record("gsm8k", cfg, model, shots=shots, max_new_tokens=max_new),
        "hit_max_new_tokens": hit_cap(tokenizer, outs, max_new)}
