"""The compact per-task table docs/results.md quotes, printed from a study's results.json (``pkt report`` writes it).

    pkt study table docs/results/cpu-study/results.json gsm8k

Scores and deltas in points; an interval (paired bootstrap 95%, as the report computes it) is bold when it
excludes 0, and marked ✓ when its comparison is also significant after the report's Holm correction (rows of
reports written before pkt computed it carry no Holm p, and no mark). The study's own results.md holds every column; this is the short form, so that the doc's tables are
printed from the committed records rather than copied by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pkt.experiment.report import ALPHA

NAMES = {"lora": "LoRA", "pissa": "PiSSA", "seeking": "Seeking", "laten": "LaTen", "seqkd": "SeqKD", "gkd": "GKD"}
VANILLA = ("student", "teacher")


def points(x: float) -> str:
    return f"{x * 100:+.1f}".replace("-", "−")


def interval(d: float | None, lo: float | None, hi: float | None, p_holm: float | None = None) -> str:
    if d is None:
        return "–"
    s = f"{points(d)} [{points(lo)}, {points(hi)}]"
    s = f"**{s}**" if lo > 0 or hi < 0 else s
    return s + (" ✓" if p_holm is not None and p_holm <= ALPHA else "")


def table(results: dict, task: str) -> str:
    rows = [r for r in results["rows"] if r["task"] == task]
    if not rows:
        raise SystemExit(f"no rows for task {task!r} (tasks: {sorted({r['task'] for r in results['rows']})})")
    out = [f"| arm | seeds | {rows[0]['metric']} (mean ± std) | Δ vs student | Δ vs LoRA | outputs at the cap "
           "| answer loss |", "|---|---:|---|---|---|---:|---|"]
    for r in rows:
        vanilla = r["method"] in VANILLA  # deterministic: one evaluation serves every seed, so no std
        score = f"{r['mean'] * 100:.1f}%" if vanilla else f"{r['mean'] * 100:.1f} ± {r['std'] * 100:.1f}%"
        loss = "–" if r.get("answer_loss_mean") is None else (
            f"{r['answer_loss_mean']:.3f}" if vanilla else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}")
        cap = "–" if r.get("at_cap") is None else f"{r['at_cap']:.1%}"
        vs_lora = interval(r.get("delta_lora"), r.get("delta_lora_low"), r.get("delta_lora_high"),
                           r.get("delta_lora_p_holm"))
        out.append(f"| {NAMES.get(r['method'], r['method'])} | {'–' if vanilla else len(r['seeds'])} | {score} "
                   f"| {interval(r['delta'], r['delta_low'], r['delta_high'], r.get('delta_p_holm'))} "
                   f"| {vs_lora} "
                   f"| {cap} | {loss} |")
    return "\n".join(out)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a study's results.json")
    ap.add_argument("task")
    args = ap.parse_args(argv)
    try:  # a row that lacks a field the table reads is as bad as no rows: one line naming the file
        print(table(json.loads(args.results.read_text()), args.task))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{args.results}: not a study's results.json ({e!r})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
