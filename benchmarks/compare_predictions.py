"""Why two code evaluations differ: their predictions compared question by question, failures by kind, and style.

    .venv/bin/python -m benchmarks.compare_predictions A B     # A, B: evaluation stage dirs, or their digests
    .venv/bin/python -m benchmarks.compare_predictions --digest RUN/stages DIR [--records REC/stages]

A fine-tuned arm that scores below the vanilla student on HumanEval or MBPP may have learnt a worse *answer format*
(code the extractor cannot find, prose, a lost indentation: a dull explanation) or worse *code* (programs that run
and fail their assertions). This tool tells the two apart from the ``predictions.jsonl`` every evaluation stage
writes (runs/<study>/stages/eval-*/): the passes of each, the questions only one passes with the McNemar p-value,
what the lost questions fail of (assertion, another exception, timeout, no code extracted), and the style of each
side's outputs (lines, comment lines, outputs that hold a comment). Stdlib only, no model. The full outputs stay in
the run directory; ``--digest`` keeps the little a comparison needs (per question: passed, failure kind, lines,
comment lines) in small JSON files that travel with a study's committed records.
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
DIGEST_FORMAT = "pkt-code-predictions-digest/1"
CODE_TASKS = ("humaneval", "mbpp")
DIGEST_FIELDS = {"id", "correct", "kind", "lines", "comment_lines"}


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


def digest_row(row: dict) -> dict:
    """The little a comparison needs of a prediction: small enough to commit beside the study's records."""
    lines = [ln for ln in (row.get("extracted") or "").splitlines() if ln.strip()]
    return {"id": row["id"], "correct": bool(row.get("correct")), "kind": failure_kind(row), "lines": len(lines),
            "comment_lines": sum(ln.lstrip().startswith("#") for ln in lines)}


def load(path: Path) -> dict[str, dict]:
    """Digested predictions by question id, from a stage dir, its predictions.jsonl or a digest (--digest)."""
    file = path / "predictions.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"{file}: no such file (give an evaluation stage dir, its predictions.jsonl or a digest)")
    if file.suffix == ".json":
        try:
            doc = json.loads(file.read_text())
            if doc.get("format") != DIGEST_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {DIGEST_FORMAT}")
            rows = {r["id"]: r for r in doc["rows"]}
            for r in rows.values():  # every field compare() reads, checked here rather than met as a KeyError later
                if not DIGEST_FIELDS <= r.keys():
                    raise ValueError(f"row {r['id']!r} lacks {sorted(DIGEST_FIELDS - r.keys())}")
            return rows
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise SystemExit(f"{file}: not a predictions digest ({e})") from None
    rows = {}
    for n, line in enumerate(file.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows[row["id"]] = digest_row(row)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"{file}:{n}: not a prediction row ({e})") from None
    return rows


def style(rows: list[dict]) -> dict:
    """Length and commenting of the outputs: a terse learnt style shows here before it shows in the score."""
    return {
        "median_lines": statistics.median(r["lines"] for r in rows) if rows else 0,
        "mean_comment_lines": round(statistics.fmean(r["comment_lines"] for r in rows), 2) if rows else 0.0,
        "with_comment": round(sum(r["comment_lines"] > 0 for r in rows) / len(rows), 3) if rows else 0.0,
    }


def write_digests(stages: Path, out: Path, records: Path | None = None) -> list[Path]:
    """Digest every finished code evaluation under a run's stages dir into OUT/<stage>.json (atomically).

    Weights and full outputs stay in the run directory; these digests travel with the committed records, so the
    comparisons can be redone on another machine. With ``records`` (a study's records/stages dir) only the stage
    dirs whose key a record holds are read: a run dir can keep an older key's dir of the same stage."""
    keys = {json.loads(f.read_text())["key"] for f in records.glob("*.json")} if records else None
    written = []
    for pred in sorted(stages.glob("eval-*/predictions.jsonl")):
        if not (pred.parent / "stage.json").is_file() or (keys is not None and pred.parent.name not in keys):
            continue  # unfinished (a finished stage holds stage.json), or not the recorded key
        meta = json.loads((pred.parent / "stage.json").read_text())
        if meta.get("key", {}).get("settings", {}).get("task") not in CODE_TASKS:
            continue
        stage = meta["stage"]
        doc = {"format": DIGEST_FORMAT, "stage": stage, "rows": list(load(pred).values())}
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{stage}.json.tmp"
        tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        tmp.replace(out / f"{stage}.json")
        written.append(out / f"{stage}.json")
    return written


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """compare_records' paired counts, then what each side fails of where only the other passes, and style."""
    common = [k for k in a if k in b]
    counts = compare_verdicts({k: r["correct"] for k, r in a.items()}, {k: r["correct"] for k, r in b.items()})
    only_a = {k for k in common if a[k]["correct"] and not b[k]["correct"]}
    only_b = {k for k in common if b[k]["correct"] and not a[k]["correct"]}
    return {
        **counts,
        "b_fails_on_only_a": dict(Counter(b[k]["kind"] for k in sorted(only_a)).most_common()),
        "a_fails_on_only_b": dict(Counter(a[k]["kind"] for k in sorted(only_b)).most_common()),
        "failures_a": dict(Counter(a[k]["kind"] for k in common if not a[k]["correct"]).most_common()),
        "failures_b": dict(Counter(b[k]["kind"] for k in common if not b[k]["correct"]).most_common()),
        "style_a": style([a[k] for k in common]),
        "style_b": style([b[k] for k in common]),
        # does B lose where it changed style? the paired counts again, split by whether B's output holds a comment
        "by_b_comment": {
            side: {"n": len(ids), "only_a": sum(k in only_a for k in ids), "only_b": sum(k in only_b for k in ids)}
            for side, ids in (("with", [k for k in common if b[k]["comment_lines"] > 0]),
                              ("without", [k for k in common if b[k]["comment_lines"] == 0]))
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="stage dir, predictions.jsonl or digest (with --digest: a run's stages dir)")
    ap.add_argument("b", type=Path, help="the same for the other side (with --digest: the dir to write into)")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    ap.add_argument("--digest", action="store_true", help="digest every code evaluation under A into B")
    ap.add_argument("--records", type=Path, help="with --digest: only the stages whose key these records hold")
    args = ap.parse_args(argv)
    if args.digest:
        written = write_digests(args.a, args.b, args.records)
        print(f"{len(written)} code evaluations digested into {args.b}")
        return 0
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
    for side, d in c["by_b_comment"].items():
        has = "has a comment" if side == "with" else "has no comment"
        print(f"questions where B's output {has}: {d['n']}; only A passes {d['only_a']}, only B {d['only_b']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
