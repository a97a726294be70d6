"""Paired comparison of two evaluation records (``benchmarks/eval_chunked.py --record``) on the items both scored.

    pkt study compare-records A.json B.json

Prints each record's passes on the common items, how many pass under both, only under A and only under B, and
the exact two-sided McNemar p-value of the discordant pairs (a binomial test of only-A against only-B at 1/2).
This is where docs/evaluation.md's per-task MBPP comparisons come from: the full split's verdicts read on the
sanitized tasks (A = mbpp-qwen-coder.json, B = mbpp-sanitized-qwen-coder.json share the MBPP task ids).
Either side may also be a study's code-predictions digest (``pkt study compare-predictions --digest``), so a study's
evaluation can be set against a standalone one (docs/results.md: the vanilla HumanEval rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pkt.experiment.stats import mcnemar_exact


def compare(a: dict, b: dict) -> dict:
    """Counts over the item ids both ``verdicts`` maps hold."""
    common = [k for k in a if k in b]
    both = sum(a[k] and b[k] for k in common)
    only_a = sum(a[k] and not b[k] for k in common)
    only_b = sum(b[k] and not a[k] for k in common)
    return {"common": len(common), "a_passed": both + only_a, "b_passed": both + only_b, "both": both,
            "only_a": only_a, "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}


DIGEST_FORMAT = "pkt-code-predictions-digest/1"  # compare_predictions' digests (it imports this module)


def verdicts(doc: dict) -> dict:
    """Item id -> passed, from an evaluation record or a code-predictions digest."""
    if doc.get("format") == DIGEST_FORMAT:
        return {r["id"]: bool(r["correct"]) for r in doc["rows"]}
    return doc["verdicts"]


def main(argv=None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args(argv)
    found = []
    for path in (args.a, args.b):
        try:
            found.append(verdicts(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"{path}: not an evaluation record with verdicts, nor a predictions digest "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            raise SystemExit(2) from None
    print(json.dumps(compare(*found), indent=1))


if __name__ == "__main__":
    main()
