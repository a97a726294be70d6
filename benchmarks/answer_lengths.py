"""P5 of docs/benchmarks.md: how long a model's greedy answers are, for the dry-run's generation estimate
(``pkt.experiment.plan.ANSWER_LENGTHS``).

    .venv/bin/python -m benchmarks.answer_lengths --cap 256 RUN/stages/*/predictions.jsonl bench_decoding.json ...

Each input is an evaluation's ``predictions.jsonl`` (its ``output`` texts, decoded at ``--cap`` new tokens) or a
``bench_decoding`` JSON (every engine's ``texts``, at the JSON's own ``max_new_tokens``). Each text is re-tokenized
with ``--model``'s tokenizer; an answer within 2 tokens of the cap counts as one that ran to it (re-tokenizing a
decoded text can merge or split a token at its end). Prints, per input and pooled over all of them, the answers,
the share at the cap and the mean length of the others: the two numbers the estimate takes per task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def texts_of(path: Path, cap: int | None) -> list[tuple[str, list[str], int]]:
    """(label, texts, cap) for each set of answers in ``path``."""
    if path.suffix == ".jsonl":
        if cap is None:
            raise SystemExit(f"{path}: a predictions file does not say its cap: pass --cap")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(f"{path.parent.name}", [r["output"] for r in rows], cap)]
    data = json.loads(path.read_text())
    return [(f"{path.name}:{name}", e["texts"], data["max_new_tokens"]) for name, e in data["engines"].items()]


def summary(lengths: list[int], cap: int) -> tuple[int, float, float]:
    """(answers, share at the cap, mean length of the others)."""
    capped = [n for n in lengths if n >= cap - 2]
    rest = [n for n in lengths if n < cap - 2]
    return len(lengths), len(capped) / len(lengths), (sum(rest) / len(rest) if rest else float("nan"))


def main() -> None:
    from pkt.models.load import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--cap", type=int, help="the new-token cap of predictions.jsonl inputs")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="whose tokenizer counts the tokens")
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    pooled: list[tuple[int, int]] = []  # (length, cap)
    for path in args.inputs:
        for label, texts, cap in texts_of(path, args.cap):
            lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
            if not lengths:
                continue
            n, share, mean = summary(lengths, cap)
            pooled += [(length, cap) for length in lengths]
            print(f"{label:<60} {n:>5} answers  at cap {share:6.1%}  others' mean {mean:6.1f}  (cap {cap})")
    caps = {c for _, c in pooled}
    if len(caps) == 1 and pooled:
        n, share, mean = summary([length for length, _ in pooled], caps.pop())
        print(f"{'pooled':<60} {n:>5} answers  at cap {share:6.1%}  others' mean {mean:6.1f}")


if __name__ == "__main__":
    main()
