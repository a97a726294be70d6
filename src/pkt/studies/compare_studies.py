"""The same arm in two studies, paired per seed and question: what a control changed (B − A), with intervals.

    pkt study compare docs/results/cpu-study docs/results/cpu-study-dropout0

A control study re-runs some of a study's arms with one setting changed (cpu-study-dropout0: LoRA dropout 0). Its
evaluations answer the same questions per seed, so the change is measured best as a paired difference, not as
two rows of two tables. For every (method, task) whose evaluations both studies hold for the same seeds, this
prints B − A in points with the report's paired bootstrap 95% interval (seeds, then questions within a seed) and
the answer loss of each. It refuses pairs whose questions differ (task, subset, shots, protocol, cap or data), and
the deterministic vanilla rows must come out identical: a non-zero student row means the two evaluations differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pkt.experiment.stats import paired_bootstrap
from pkt.studies.results_table import points

# what fixes the questions asked and how an answer is scored; the model, batch size and progress may differ
SAME_QUESTIONS = ("protocol", "limit", "seed", "shots", "style", "max_new_tokens", "max_prompt_tokens",
                  "temperature", "n_samples", "mbpp_variant", "loss_split")


def evaluations(study: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """{(method, task): {seed: record}} of a study's evaluation records."""
    stages = study / "stages"
    if not stages.is_dir():
        raise SystemExit(f"{study}: no stages/ directory of records")
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted(stages.glob("eval-*.json")):
        try:
            rec = json.loads(path.read_text())
            who = rec["result"]["evaluated_as"]
            out.setdefault((who["method"], who["task"]), {})[int(who["seed"])] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not an evaluation record ({type(e).__name__}: {e})") from None
    return out


def question_settings(rec: dict) -> dict:
    s = rec["inputs"]["settings"]
    return {"task": s["task"], "loss_examples": s.get("loss_examples"), "data": rec["inputs"].get("data"),
            **{k: s["eval"].get(k) for k in SAME_QUESTIONS}}


def compare(a: dict[int, dict], b: dict[int, dict], where: str) -> dict:
    """B − A over the seeds both hold, as the report's paired bootstrap computes it."""
    seeds = sorted(set(a) & set(b))
    for s in seeds:
        qa, qb = question_settings(a[s]), question_settings(b[s])
        if qa != qb:
            diff = sorted(k for k in qa if qa[k] != qb.get(k))
            raise SystemExit(f"{where}, seed {s}: the two evaluations ask different questions ({', '.join(diff)})")
    pa = [a[s]["result"]["per_example"] for s in seeds]
    pb = [b[s]["result"]["per_example"] for s in seeds]
    d, lo, hi = paired_bootstrap(pb, pa)
    changed = sum(x != y for ea, eb in zip(pa, pb) for x, y in zip(ea, eb))
    loss = [[r[s]["result"].get("answer_loss") for s in seeds] for r in (a, b)]
    mean = [sum(v) / len(v) if None not in v else None for v in loss]
    return {"seeds": seeds, "a": sum(map(sum, pa)), "b": sum(map(sum, pb)), "n": sum(map(len, pa)),
            "delta": d, "low": lo, "high": hi, "changed": changed, "loss_a": mean[0], "loss_b": mean[1]}


def table(a_dir: Path, b_dir: Path) -> list[str]:
    a, b = evaluations(a_dir), evaluations(b_dir)
    both = sorted(set(a) & set(b), key=lambda k: (k[1], k[0] not in ("student", "teacher"), k[0]))
    if not both:
        raise SystemExit(f"{a_dir} and {b_dir} share no evaluated (method, task)")
    lines = [f"B − A, B = {b_dir.name}, A = {a_dir.name}; points, paired bootstrap 95% over seeds × questions",
             "", "| method | task | seeds | A passed | B passed | of | items that differ | B − A [95% CI] "
             "| answer loss A → B |", "|---|---|---|---:|---:|---:|---:|---|---|"]
    for method, task in both:
        if not set(a[method, task]) & set(b[method, task]):
            continue
        c = compare(a[method, task], b[method, task], f"{method}/{task}")
        ci = f"{points(c['delta'])} [{points(c['low'])}, {points(c['high'])}]"
        if c["low"] > 0 or c["high"] < 0:
            ci = f"**{ci}**"
        loss = "–" if c["loss_a"] is None else f"{c['loss_a']:.3f} → {c['loss_b']:.3f}"
        # per-example scores are 0/1 for accuracy and pass@1: their sums count the items passed
        lines.append(f"| {method} | {task} | {','.join(map(str, c['seeds']))} | {c['a']:g} | {c['b']:g} | {c['n']} "
                     f"| {c['changed']} | {ci} | {loss} |")
    return lines


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="a study's records directory (the reference)")
    ap.add_argument("b", type=Path, help="another study's records directory (the control)")
    args = ap.parse_args(argv)
    print("\n".join(table(args.a, args.b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
