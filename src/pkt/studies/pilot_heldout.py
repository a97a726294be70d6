"""The held-out set on which ``pkt study pilot`` chooses the learning rate: questions of the task that no PKT split
holds and the test set does not hold either, so that the choice reads neither the training data nor the test.

* GSM8K: the questions of GSM8K's own train.jsonl (7,473) that are in none of the PKT gsm splits (extract, align,
  train: 1,100 questions, all drawn from train.jsonl) and not in the test set;
* MBPP: MBPP's validation split (task ids 511-600, 90 rows), which neither the test (ids 11-510) nor the PKT mbpp
  splits (drawn from its train split) use, with the same exclusion;
* HumanEval: no pool (its 164 problems are the test set), so the pilot refuses it (:mod:`pkt.studies.pilot`).

Questions are compared by the prompt each row is asked with (the task's own ``user_turn``, as the PKT splits write
it), normalised (:func:`normalise`: case-folded words), so that spacing or punctuation cannot hide a shared
question; the record counts how many PKT prompts were found in the source, which for GSM8K must be all of them.
The set is a fixed seeded sample of the pool (:func:`pkt.evaluate.tasks.common.select`, in source order). Its
gold answers, for the held-out answer loss, are written in the PKT splits' own format (:func:`pkt_gsm_answer`; for
MBPP the completion prefix and the reference code), so the loss measures the format the build was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pkt.errors import PktError

MBPP_VALIDATION = range(511, 601)


def normalise(text: str) -> str:
    """Case-folded words of a prompt: punctuation and spacing differences do not hide a shared question."""
    return " ".join(re.sub(r"\W+", " ", text.casefold()).split())


def pkt_gsm_answer(solution: str) -> str:
    """A GSM8K solution ("...<<6*2=12>>12...\\n#### 12") in the PKT gsm answers' wording."""
    body, gold = solution.split("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip().replace("\n", " ")
    return f"Answer: {body if body.endswith('.') else body + '.'} So the answer is {gold.strip()}."


@dataclass
class HeldOut:
    rows: list[dict]  # the task's evaluation rows
    loss: list  # ChatExample per row: the gold answer in the PKT format
    info: dict = field(default_factory=dict)  # what pilot.json records: source, pool, exclusions, ids


def _task_rows(task: str) -> tuple[list, object, object, dict]:
    """(candidates [(id, row)], prompt(row), PKT-format answer(row), source description) of a task's pool."""
    from pkt.data.tasks import mbpp_all_rows
    from pkt.evaluate.tasks import gsm8k, mbpp
    from pkt.evaluate.tasks.code import ASSISTANT_PREFIX

    if task == "gsm8k":
        from pkt.data.tasks import _read_jsonl  # the test set's reader: file:line errors
        from pkt.settings import data_dir

        rows = _read_jsonl(data_dir(required=True) / "gsm8k" / "train.jsonl")
        return (list(enumerate(rows)), lambda r: gsm8k.user_turn(r["question"]),
                lambda r: pkt_gsm_answer(r["answer"]), {"source": "gsm8k/train.jsonl", "id": "line index"})
    rows = mbpp_all_rows()
    return ([(i, rows[i]) for i in MBPP_VALIDATION if i in rows], mbpp.user_turn,
            lambda r: ASSISTANT_PREFIX + r["code"], {"source": "mbpp/mbpp.jsonl task ids 511-600", "id": "task_id"})


def excluded_prompts(task: str) -> tuple[set[str], set[str]]:
    """(normalised prompts of every PKT split of the task, normalised prompts of its test set)."""
    from pkt.data.tasks import SPLITS, gsm8k_test, load_split, mbpp_rows
    from pkt.evaluate.tasks import gsm8k, mbpp

    pkt = {normalise(e.user) for s in SPLITS for e in load_split(task, s)}
    test = ({normalise(gsm8k.user_turn(r["question"])) for r in gsm8k_test()} if task == "gsm8k"
            else {normalise(mbpp.user_turn(r)) for r in mbpp_rows("full")})
    return pkt, test


def heldout_set(task: str, size: int, seed: int) -> HeldOut:
    """A fixed seeded sample of ``size`` rows of the task's pool that no PKT split and no test question shares."""
    from pkt.data.jsonl import ChatExample
    from pkt.evaluate.tasks.common import select

    cands, prompt, answer, info = _task_rows(task)
    pkt, test = excluded_prompts(task)
    keys = [normalise(prompt(r)) for _, r in cands]
    pool = [(i, r) for (i, r), k in zip(cands, keys) if k not in pkt and k not in test]
    if size > len(pool):
        raise PktError(f"heldout.size {size}: the {task} held-out pool has only {len(pool)} rows")
    chosen = select(pool, size, seed)
    info.update(task=task, candidates=len(cands), pkt_prompts=len(pkt), pkt_prompts_in_source=len(pkt & set(keys)),
                excluded=len(cands) - len(pool), pool=len(pool), size=size, seed=seed, ids=[i for i, _ in chosen],
                description=f"{size} of the {len(pool)} {info['source']} rows in no PKT {task} split and not in "
                            f"the test set (seed {seed})")
    return HeldOut([dict(r) for _, r in chosen], [ChatExample(prompt(r), answer(r)) for _, r in chosen], info)


