"""Why two code evaluations differ: their predictions compared question by question, failures by kind, and style.

    .venv/bin/python -m benchmarks.compare_predictions A B     # A, B: evaluation stage dirs or predictions.jsonl

A fine-tuned arm that scores below the vanilla student on HumanEval or MBPP may have learnt a worse *answer format*
(code the extractor cannot find, prose, a lost indentation: a dull explanation) or worse *code* (programs that run
and fail their assertions). This tool tells the two apart from the ``predictions.jsonl`` every evaluation stage
writes (runs/<study>/stages/eval-*/): the passes of each, the questions only one passes with the McNemar p-value,
what the lost questions fail of (assertion, another exception, timeout, no code extracted), and the style of each
side's outputs (lines, comment lines, outputs that hold a comment). Stdlib only, no model.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from benchmarks.compare_records import compare as compare_verdicts

RAISED = re.compile(r"pkt-sandbox: the program raised (\w+)")


def load(path: Path) -> dict[str, dict]:
    """Predictions by question id, from a stage dir or a predictions.jsonl."""
    file = path / "predictions.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"{file}: no such file (give an evaluation stage dir or its predictions.jsonl)")
    rows = {}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{file}:{n}: not a prediction row ({e})") from None
    return rows


def failure_kind(row: dict) -> str:
    """What a failed prediction failed of: the exception its program raised, a timeout, or no code to run."""
    if row.get("correct"):
        return "passed"
    if not (row.get("extracted") or "").strip():
        return "no code extracted"
    m = RAISED.findall(row.get("error") or "")
    if m:
        return m[-1]
    return row.get("status") or "failed"


def style(rows: list[dict]) -> dict:
    """Length and commenting of the outputs: a terse learnt style shows here before it shows in the score."""
    lines = [[ln for ln in (r.get("extracted") or "").splitlines() if ln.strip()] for r in rows]
    comments = [sum(ln.lstrip().startswith("#") for ln in ls) for ls in lines]
    return {
        "median_lines": statistics.median(len(ls) for ls in lines) if lines else 0,
        "mean_comment_lines": round(statistics.fmean(comments), 2) if comments else 0.0,
        "with_comment": round(sum(c > 0 for c in comments) / len(comments), 3) if comments else 0.0,
    }


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """compare_records' paired counts, then what each side fails of where only the other passes, and style."""
    common = [k for k in a if k in b]
    counts = compare_verdicts({k: bool(a[k].get("correct")) for k in a}, {k: bool(b[k].get("correct")) for k in b})
    only_a = [k for k in common if a[k].get("correct") and not b[k].get("correct")]
    only_b = [k for k in common if b[k].get("correct") and not a[k].get("correct")]
    return {
        **counts,
        "b_fails_on_only_a": dict(Counter(failure_kind(b[k]) for k in only_a).most_common()),
        "a_fails_on_only_b": dict(Counter(failure_kind(a[k]) for k in only_b).most_common()),
        "failures_a": dict(Counter(failure_kind(a[k]) for k in common if not a[k].get("correct")).most_common()),
        "failures_b": dict(Counter(failure_kind(b[k]) for k in common if not b[k].get("correct")).most_common()),
        "style_a": style([a[k] for k in common]),
        "style_b": style([b[k] for k in common]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(argv)
    c = compare(load(args.a), load(args.b))
    if args.json:
        print(json.dumps(c, indent=2))
        return 0
    print(f"A = {args.a}\nB = {args.b}")
    print(f"{c['common']} common questions: A passes {c['a_passed']}, B passes {c['b_passed']}; "
          f"only A {c['only_a']}, only B {c['only_b']} (exact McNemar p = {c['mcnemar_p']:.3g})")
    print(f"what B fails of where only A passes: {c['b_fails_on_only_a']}")
    print(f"what A fails of where only B passes: {c['a_fails_on_only_b']}")
    print(f"all failures, A: {c['failures_a']}")
    print(f"all failures, B: {c['failures_b']}")
    print(f"style, A: {c['style_a']}")
    print(f"style, B: {c['style_b']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
