"""Why two code evaluations differ: their predictions compared question by question, failures by kind, and style.

    pkt study compare-predictions A B     # A, B: evaluation stage dirs, or their digests
    pkt study compare-predictions --digest RUN/stages DIR [--records REC/stages]
    pkt study compare-predictions --table DIR     # every arm's digest in DIR against the student
    pkt study compare-predictions --style-of TRAIN.jsonl [--first N]   # the training targets

A fine-tuned arm that scores below the vanilla student on HumanEval or MBPP may have learnt a worse *answer format*
(code the extractor cannot find, prose, a lost indentation: a dull explanation) or worse *code* (programs that run
and fail their assertions). This tool tells the two apart from the ``predictions.jsonl`` every evaluation stage
writes (runs/<study>/stages/eval-*/): the passes of each, the questions only one passes with the McNemar p-value,
what the lost questions fail of (assertion, another exception, timeout, no code extracted), and the style of each
side's outputs (lines, comment lines, outputs that hold a comment). Stdlib only, no model. The full outputs stay in
the run directory; ``--digest`` keeps the little a comparison needs (per question: passed, failure kind, lines,
comment lines) in small JSON files that travel with a study's committed records. ``--table`` sets every digest of a
study against the vanilla student's, per seed and summed over seeds; ``--style-of`` measures the same style on the
targets an arm was trained on, so an arm's style can be set beside the data's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

from pkt.studies.compare_records import compare as compare_verdicts
from pkt.studies.compare_records import DIGEST_FORMAT

RAISED = re.compile(r"pkt-sandbox: the program raised (\w+)")
CODE_TASKS = ("humaneval", "mbpp")
DIGEST_FIELDS = {"id", "correct", "kind", "lines", "comment_lines"}
STAGE = re.compile(rf"^eval-(?P<arm>.+)-(?P<task>{'|'.join(CODE_TASKS)})-s(?P<seed>\d+)$")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)


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


def code_lines(code: str) -> dict:
    """Non-blank lines of a piece of code and how many of them are comments."""
    lines = [ln for ln in code.splitlines() if ln.strip()]
    return {"lines": len(lines), "comment_lines": sum(ln.lstrip().startswith("#") for ln in lines)}


def digest_row(row: dict) -> dict:
    """The little a comparison needs of a prediction: small enough to commit beside the study's records."""
    return {"id": row["id"], "correct": bool(row.get("correct")), "kind": failure_kind(row),
            **code_lines(row.get("extracted") or "")}


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


def finished_evaluations(stages: Path, records: Path | None, tasks: tuple[str, ...]):
    """(predictions.jsonl, stage.json's content) of every finished evaluation of ``tasks`` under a run's stages dir.

    With ``records`` (a study's records/stages dir) only the stage dirs whose key a record holds: a run dir can keep
    an older key's dir of the same stage. A finished stage holds stage.json; an unfinished one is never read."""
    keys = {json.loads(f.read_text())["key"] for f in records.glob("*.json")} if records else None
    for pred in sorted(stages.glob("eval-*/predictions.jsonl")):
        if not (pred.parent / "stage.json").is_file() or (keys is not None and pred.parent.name not in keys):
            continue
        meta = json.loads((pred.parent / "stage.json").read_text())
        if meta.get("key", {}).get("settings", {}).get("task") in tasks:
            yield pred, meta


def write_digest(out: Path, doc: dict) -> Path:
    """OUT/<stage>.json, written atomically (a stopped commit leaves no half digest)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{doc['stage']}.json.tmp"
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    tmp.replace(out / f"{doc['stage']}.json")
    return out / f"{doc['stage']}.json"


def write_digests(stages: Path, out: Path, records: Path | None = None) -> list[Path]:
    """Digest every finished code evaluation under a run's stages dir into OUT/<stage>.json.

    Weights and full outputs stay in the run directory; these digests travel with the committed records, so the
    comparisons can be redone on another machine."""
    return [write_digest(out, {"format": DIGEST_FORMAT, "stage": meta["stage"], "rows": list(load(pred).values())})
            for pred, meta in finished_evaluations(stages, records, CODE_TASKS)]


def commented(row: dict) -> bool:
    return row["comment_lines"] > 0


def passes_by_comment(rows: list[dict]) -> dict:
    return {side: {"passed": sum(r["correct"] for r in rows if commented(r) == has),
                   "n": sum(commented(r) == has for r in rows)} for side, has in (("with", True), ("without", False))}


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict:
    """compare_records' paired counts, then what each side fails of where only the other passes, and style."""
    common = [k for k in a if k in b]
    counts = compare_verdicts({k: r["correct"] for k, r in a.items()}, {k: r["correct"] for k, r in b.items()})
    only_a = {k for k in common if a[k]["correct"] and not b[k]["correct"]}
    only_b = {k for k in common if b[k]["correct"] and not a[k]["correct"]}

    def split(groups: dict[str, list]) -> dict:
        return {name: {"n": len(ids), "only_a": sum(k in only_a for k in ids), "only_b": sum(k in only_b for k in ids)}
                for name, ids in groups.items()}

    c = {
        **counts,
        "b_fails_on_only_a": dict(Counter(b[k]["kind"] for k in sorted(only_a)).most_common()),
        "a_fails_on_only_b": dict(Counter(a[k]["kind"] for k in sorted(only_b)).most_common()),
        "failures_a": dict(Counter(a[k]["kind"] for k in common if not a[k]["correct"]).most_common()),
        "failures_b": dict(Counter(b[k]["kind"] for k in common if not b[k]["correct"]).most_common()),
        "style_a": style([a[k] for k in common]),
        "style_b": style([b[k] for k in common]),
        # how often each side's commented and uncommented outputs pass: a side that comments where a question is
        # hard passes less often with a comment, so comments mark difficulty as well as style
        "passes_by_comment_a": passes_by_comment([a[k] for k in common]),
        "passes_by_comment_b": passes_by_comment([b[k] for k in common]),
    }
    # the paired counts split by both sides' comments: A's commenting marks which questions A found hard (its
    # commented outputs can pass less often), so "B dropped the comment" is compared with "B kept it" within A's
    # commented questions; by_b_comment (does B lose where it changed style?) is the same counts by B's side only
    c["by_comment"] = split({
        name: [k for k in common if (commented(a[k]), commented(b[k])) == sides]
        for name, sides in (("both", (True, True)), ("a_only", (True, False)), ("b_only", (False, True)),
                            ("neither", (False, False)))})
    c["by_b_comment"] = by_b_comment(c["by_comment"])
    return c


def by_b_comment(by_comment: dict) -> dict:
    """The paired counts by whether B's output holds a comment, summed from the four strata of ``by_comment``."""
    return {side: {k: by_comment[s1][k] + by_comment[s2][k] for k in ("n", "only_a", "only_b")}
            for side, (s1, s2) in (("with", ("both", "b_only")), ("without", ("a_only", "neither")))}


def target_style(path: Path, first: int | None = None) -> dict:
    """The style of a training split's targets (the last message of each chat row; the code of its fenced blocks,
    or the whole answer when it has none), measured as ``style`` measures an arm's outputs."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (give a training split's JSONL)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines()[:first], 1):
        try:
            answer = json.loads(line)["messages"][-1]["content"]
            blocks = FENCE.findall(answer)
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise SystemExit(f"{path}:{n}: not a chat row with messages ({e!r})") from None
        rows.append(code_lines("\n".join(blocks) if blocks else answer))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return {"n": len(rows), **style(rows)}


def table(digests: Path) -> list[dict]:
    """Every arm's digest in a study's predictions dir against the vanilla student's of the same task.

    The student is deterministic and evaluated once per task (its one seed's digest serves every seed). Per arm,
    a row per seed and, where it has several, one summing its counts. The seeds answer the same questions, so a
    question would count up to once per seed in a test on the sum: the summed row has no McNemar p (the per-seed
    rows have theirs, and the study's report the paired interval over questions and seeds)."""
    found: dict[str, dict] = {}
    for f in sorted(digests.glob("eval-*.json")):
        m = STAGE.match(f.stem)
        if m:
            found[f.stem] = {**m.groupdict(), "rows": load(f)}
    if not found:
        raise SystemExit(f"{digests}: no code evaluation digests (eval-<arm>-<humaneval|mbpp>-s<seed>.json)")
    out = []
    for task in sorted({d["task"] for d in found.values()}):
        base = [d for d in found.values() if d["task"] == task and d["arm"] == "student"]
        if len(base) != 1:
            raise SystemExit(f"{digests}: {len(base)} student digests for {task}, expected one")
        arms: dict[str, list] = {}
        for d in found.values():
            if d["task"] == task and d["arm"] != "student":
                arms.setdefault(d["arm"], []).append(d)
        for arm, ds in arms.items():
            rows = [{"task": task, "arm": arm, "seed": d["seed"], **compare(base[0]["rows"], d["rows"])}
                    for d in sorted(ds, key=lambda d: int(d["seed"]))]
            out += rows
            if len(rows) > 1:
                pooled = {"task": task, "arm": arm, "seed": "all"}
                for k in ("common", "a_passed", "b_passed", "only_a", "only_b"):
                    pooled[k] = sum(r[k] for r in rows)
                pooled["mcnemar_p"] = None
                pooled["by_comment"] = {side: {k: sum(r["by_comment"][side][k] for r in rows)
                                               for k in ("n", "only_a", "only_b")} for side in rows[0]["by_comment"]}
                pooled["by_b_comment"] = by_b_comment(pooled["by_comment"])
                n = pooled["common"]
                pooled["style_b"] = {"with_comment": round(pooled["by_b_comment"]["with"]["n"] / n, 3) if n else 0.0}
                out.append(pooled)
    return out


def _p(p: float | None) -> str:
    return "–" if p is None else format(p, ".3g")


def table_markdown(rows: list[dict]) -> str:
    """The table, then the questions only the student / only the arm passes within each pair of comment habits."""
    head = ("| task | arm | seed | passes (arm / student) | only student | only arm | McNemar p | arm's outputs "
            "with a comment | both comment | student only | arm only | neither |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        strata = " | ".join(f"{d['only_a']} / {d['only_b']} of {d['n']}" for d in r["by_comment"].values())
        lines.append(f"| {r['task']} | {r['arm']} | {r['seed']} | {r['b_passed']} / {r['a_passed']} of {r['common']} "
                     f"| {r['only_a']} | {r['only_b']} | {_p(r['mcnemar_p'])} "
                     f"| {r['style_b']['with_comment']:.0%} "
                     f"| {strata} |")
    lines.append("\nLast four columns: the questions only the student / only the arm passes, of the questions where "
                 "both outputs hold a comment, only the student's, only the arm's, neither.")
    for task in dict.fromkeys(r["task"] for r in rows):
        d = next(r for r in rows if r["task"] == task)["passes_by_comment_a"]
        lines.append(f"The student on {task}: its outputs with a comment pass {d['with']['passed']} of "
                     f"{d['with']['n']}, those without {d['without']['passed']} of {d['without']['n']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, nargs="?",
                    help="stage dir, predictions.jsonl or digest (with --digest: a run's stages dir)")
    ap.add_argument("b", type=Path, nargs="?",
                    help="the same for the other side (with --digest: the dir to write into)")
    ap.add_argument("--table", type=Path, metavar="DIR", help="every arm's digest in DIR against the student's")
    ap.add_argument("--style-of", type=Path, metavar="JSONL", help="the style of a training split's targets")
    ap.add_argument("--first", type=int, help="with --style-of: only its first N rows (the study trains on these)")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    ap.add_argument("--digest", action="store_true", help="digest every code evaluation under A into B")
    ap.add_argument("--records", type=Path, help="with --digest: only the stages whose key these records hold")
    args = ap.parse_args(argv)
    if args.first is not None and args.first < 1:
        ap.error(f"--first {args.first}: give a number of rows, 1 or more")
    if args.style_of:
        print(json.dumps(target_style(args.style_of, args.first)))
        return 0
    if args.table:
        rows = table(args.table)
        print(json.dumps(rows, indent=2) if args.json else table_markdown(rows))
        return 0
    if args.a is None or args.b is None:
        ap.error("give A and B (or --table DIR, or --style-of JSONL)")
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
    for side in "ab":
        d = c[f"passes_by_comment_{side}"]
        print(f"{side.upper()}'s outputs with a comment pass {d['with']['passed']} of {d['with']['n']}, "
              f"without {d['without']['passed']} of {d['without']['n']}")
    for side, d in c["by_b_comment"].items():
        has = "has a comment" if side == "with" else "has no comment"
        print(f"questions where B's output {has}: {d['n']}; only A passes {d['only_a']}, only B {d['only_b']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
