"""A study's GSM8K outputs scored at their first stated answer beside the last number: what writing on costs.

    pkt study gsm8k-first-answer --digest RUN/stages DIR [--records REC/stages]
    pkt study gsm8k-first-answer --table DIR [--json]

GSM8K is scored on the last number of an output. A fine-tuned arm that states the right answer and then writes on
(a new question of its own, a loop to the token cap) scores 0 for it: a dull explanation of a lower accuracy.
``--digest`` reads every finished GSM8K evaluation under a run's stages dir and keeps, per question, the recorded
verdict, the verdict at the first "answer is N" (``pkt.evaluate.tasks.gsm8k.extract_first_answer``) and whether
the output reached the new-token cap, in small JSON files that travel with a study's committed records. It
re-scores the last number too and stops if that differs from the recorded verdict, so the two columns come from
the same outputs and the same scorer. ``--table`` prints, per arm, both accuracies and each one's difference to
the vanilla student with a paired-bootstrap 95% interval over seeds x questions (the study's own statistic).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pkt.studies.compare_predictions import finished_evaluations, write_digest

FORMAT = "pkt-gsm8k-answers-digest/1"
STAGE = re.compile(r"eval-(?P<arm>.+)-gsm8k-s(?P<seed>\d+)$")
FIELDS = {"id", "correct", "correct_first", "at_cap"}


def digest_rows(predictions: Path, max_new_tokens: int, tokenizer) -> list[dict]:
    """Per question: the recorded verdict, the first answer's, and whether the output used every new token."""
    from pkt.evaluate.tasks.common import hit_cap
    from pkt.evaluate.tasks.gsm8k import extract_answer, extract_first_answer, is_correct

    rows = []
    for n, line in enumerate(predictions.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            out, gold, recorded = r["output"], r["gold"], bool(r["correct"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SystemExit(f"{predictions}:{n}: not a GSM8K prediction row ({e})") from None
        if is_correct(extract_answer(out), gold) != recorded:
            raise SystemExit(f"{predictions}:{n}: re-scoring the last number disagrees with the recorded verdict")
        rows.append({"id": r["id"], "correct": recorded, "correct_first": is_correct(extract_first_answer(out), gold),
                     "at_cap": hit_cap(tokenizer, [[out]], max_new_tokens) == 1})  # the report's own count
    return rows


def write_digests(stages: Path, out: Path, records: Path | None = None) -> list[Path]:
    """Digest every finished GSM8K evaluation under ``stages`` into OUT/<stage>.json (atomically); with
    ``records`` only the stage dirs whose key a record holds (a run dir can keep an older key of a stage)."""
    from pkt.models.load import load_tokenizer

    tokenizers: dict = {}
    written = []
    for pred, meta in finished_evaluations(stages, records, ("gsm8k",)):
        settings = meta["key"]["settings"]
        # a built arm's weights (and tokenizer files) may be pruned; it was built from the student and shares
        # the student's tokenizer, which the stage names as its precision reference
        name = (settings.get("precision") or {}).get("reference") or settings["model"]
        if name not in tokenizers:
            tokenizers[name] = load_tokenizer(name)
        rows = digest_rows(pred, settings["eval"]["max_new_tokens"], tokenizers[name])
        written.append(write_digest(out, {"format": FORMAT, "stage": meta["stage"], "rows": rows}))
    return written


def load(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT}")
        for r in doc["rows"]:
            if not FIELDS <= r.keys():
                raise ValueError(f"row {r.get('id')!r} lacks {sorted(FIELDS - r.keys())}")
        return doc["rows"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not a GSM8K answers digest ({e})") from None


def table(digests: Path) -> list[dict]:
    """Per arm (seeds pooled), both accuracies and their differences to the student with bootstrap intervals."""
    from pkt.experiment.stats import paired_bootstrap

    found: dict[str, dict[int, list[dict]]] = {}
    for f in sorted(digests.glob("eval-*-gsm8k-s*.json")):
        m = STAGE.match(f.stem)
        if m:
            found.setdefault(m["arm"], {})[int(m["seed"])] = sorted(load(f), key=lambda r: str(r["id"]))
    if "student" not in found or len(found["student"]) != 1:
        raise SystemExit(f"{digests}: no single student digest (eval-student-gsm8k-s<seed>.json)")
    base = next(iter(found["student"].values()))  # deterministic: its one evaluation stands for every seed
    out = []
    for arm, seeds in found.items():
        if any([r["id"] for r in rows] != [r["id"] for r in base] for rows in seeds.values()):
            raise SystemExit(f"{digests}: {arm}'s questions are not the student's")
        row = {"arm": arm, "seeds": len(seeds), "n": len(base)}
        for col in ("correct", "correct_first"):
            arm_v = [[float(r[col]) for r in rows] for rows in seeds.values()]
            base_v = [[float(r[col]) for r in base]] * len(seeds)
            row[col] = sum(map(sum, arm_v)) / sum(map(len, arm_v))
            row[f"{col}_vs_student"] = paired_bootstrap(arm_v, base_v) if arm != "student" else None
        rows_all = [r for rows in seeds.values() for r in rows]
        row["at_cap"] = sum(r["at_cap"] for r in rows_all) / len(rows_all)
        # a right first answer that the last number loses: the cost of writing on, counted per output
        row["right_then_lost"] = sum(r["correct_first"] and not r["correct"] for r in rows_all) / len(rows_all)
        out.append(row)
    return out


def table_markdown(rows: list[dict]) -> str:
    def delta(d):
        return "–" if d is None else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"

    lines = ["| arm | seeds | accuracy (last number) | Δ vs student | first answer | Δ vs student | right, then lost "
             "| outputs at the cap |", "|---|---:|---:|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['correct']:.1%} | {delta(r['correct_vs_student'])} | "
                     f"{r['correct_first']:.1%} | {delta(r['correct_first_vs_student'])} | {r['right_then_lost']:.1%} "
                     f"| {r['at_cap']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--digest", nargs=2, type=Path, metavar=("STAGES", "DIR"),
                    help="digest every GSM8K evaluation under a run's stages dir into DIR")
    ap.add_argument("--records", type=Path, help="with --digest: only the stages whose key these records hold")
    ap.add_argument("--table", type=Path, metavar="DIR", help="every arm's digest in DIR against the student's")
    ap.add_argument("--json", action="store_true", help="with --table: print JSON")
    args = ap.parse_args(argv)
    if bool(args.digest) == bool(args.table):
        ap.error("give one of --digest STAGES DIR and --table DIR")
    if args.digest:
        if not args.digest[0].is_dir():
            ap.error(f"--digest {args.digest[0]}: not a directory")
        written = write_digests(*args.digest, args.records)
        print(f"{len(written)} GSM8K evaluations digested into {args.digest[1]}")
        return 0
    if not args.table.is_dir():
        ap.error(f"--table {args.table}: not a directory")
    rows = table(args.table)
    print(json.dumps(rows, indent=2) if args.json else table_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
