"""The rows of a study's report: each arm's score over seeds and its paired differences to the vanilla student
and to LoRA, the paired comparisons between arms, and Holm's correction over all of them.

A function of the records alone (:mod:`pkt.experiment.report` formats and writes what this computes); the
intervals and p-values come from :mod:`pkt.experiment.stats`.
"""

from __future__ import annotations

from pkt.experiment.stats import holm, mean_std, paired_difference

BASELINE = "student"
FIGURES = "figures"  # the analysis figures of a report, under its output directory
# The student evaluated in float32 (pkt.methods.student_fp32): a model that had to be evaluated in
# float32 (its change would not survive the study's eval dtype) is compared with it, so that its Δ is the
# method's and not the dtype's; its own row's Δ vs the student is the dtype's effect alone.
BASELINE_FP32 = "student-fp32"
LORA = "lora"  # the fine-tuning baseline every built arm is also compared with
ALPHA = 0.05  # the level of every verdict a report states


def aggregate(records: list[dict]) -> list[dict]:
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in records))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for task in tasks:
        base = {r["seed"]: r for r in records if r["task"] == task and r["method"] == BASELINE}
        base32 = {r["seed"]: r for r in records if r["task"] == task and r["method"] == BASELINE_FP32}
        for method in methods:
            recs = sorted((r for r in records if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            if not recs:
                continue
            score_m, score_s = mean_std([r["score"] for r in recs])
            losses = [r["answer_loss"] for r in recs if r.get("answer_loss") is not None]
            row = {
                "method": method, "task": task, "metric": recs[0]["metric"], "seeds": [r["seed"] for r in recs],
                "n_examples": recs[0].get("n", len(recs[0].get("per_example", []))),
                "mean": score_m, "std": score_s,
                "answer_loss_mean": mean_std(losses)[0] if losses else None,
                "answer_loss_std": mean_std(losses)[1] if losses else None,
                "delta": None, "delta_low": None, "delta_high": None, "delta_p": None,
                "dtype": _dtype_cell(recs),
                "at_cap": _at_cap(recs),
            }
            first = _first_answer(recs)
            if first is not None:  # GSM8K under the pkt protocol since first_answer_accuracy exists
                row["first_answer"] = first
            ref = base
            if (method != BASELINE_FP32 and base32 and all(r.get("dtype") == "float32" for r in recs)
                    and all(r["seed"] in base32 for r in recs)):
                ref = base32
                row["delta_vs"] = BASELINE_FP32
            if method != BASELINE and ref and all(r["seed"] in ref for r in recs):
                d = paired_difference([r["per_example"] for r in recs], [ref[r["seed"]]["per_example"] for r in recs])
                row.update(delta=d.mean, delta_low=d.low, delta_high=d.high, delta_p=d.p)
                row.setdefault("delta_vs", BASELINE)
            rows.append(row)
    _deltas_vs_lora(rows, records)
    return rows


def adjust(rows: list[dict], comps: list[dict]) -> int:
    """Holm-adjust, together, the p-values of every comparison the report states (each row's Δ vs the student
    and vs LoRA, and the paired comparisons between arms), in place as ``*_p_holm``; returns the family's size."""
    slots = [(r, k) for r in rows for k in ("delta_p", "delta_lora_p") if r.get(k) is not None]
    slots += [(c, "p") for c in comps]
    for (obj, key), q in zip(slots, holm([obj[key] for obj, key in slots])):
        obj[f"{key}_holm"] = q
    for r in rows:  # the keys exist on every row, so that results.json's rows have one shape
        r.setdefault("delta_p_holm", None)
        r.setdefault("delta_lora_p_holm", None)
    return len(slots)


def _deltas_vs_lora(rows: list[dict], records: list[dict]) -> None:
    """``delta_lora*``: each built arm's paired difference to LoRA on the same task, seeds and examples (the
    arms' question is whether they beat plain LoRA at the same budget). Only between rows evaluated in the
    same dtype, so that the difference is the method's and not the dtype's."""
    for row in rows:
        row.update(delta_lora=None, delta_lora_low=None, delta_lora_high=None, delta_lora_p=None)
        if row["method"] in (BASELINE, BASELINE_FP32, "teacher", LORA):
            continue
        ref = {r["seed"]: r for r in records if r["task"] == row["task"] and r["method"] == LORA}
        recs = sorted((r for r in records if r["task"] == row["task"] and r["method"] == row["method"]),
                      key=lambda r: r["seed"])
        if not ref or not all(r["seed"] in ref for r in recs):
            continue
        pairs = [(r, ref[r["seed"]]) for r in recs]
        if any(len(r["per_example"]) != len(b["per_example"]) or r.get("dtype") != b.get("dtype") for r, b in pairs):
            continue
        d = paired_difference([r["per_example"] for r in recs], [ref[r["seed"]]["per_example"] for r in recs])
        row.update(delta_lora=d.mean, delta_lora_low=d.low, delta_lora_high=d.high, delta_lora_p=d.p)


def _at_cap(recs: list[dict]) -> float | None:
    """Mean share of the outputs that reached the new-token cap (cut answers: a model that loops, or a cap too
    low for its answers), from each evaluation's metrics; None when no record counts them."""
    hits = [((r.get("metrics") or {}).get("hit_max_new_tokens"), r.get("n")) for r in recs]
    shares = [h / n for h, n in hits if h is not None and n]
    return sum(shares) / len(shares) if shares else None


def _first_answer(recs: list[dict]) -> float | None:
    """Mean over seeds of GSM8K's first-answer accuracy (the number of the first "answer is N" rather than the
    output's last number): set beside the score, it shows what writing on past the answer costs a model. None
    unless every record has it."""
    vals = [(r.get("metrics") or {}).get("first_answer_accuracy") for r in recs]
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def _dtype_cell(recs: list[dict]) -> str | None:
    """The evaluation dtype(s) of a row; a float32 fallback says how little of the change survived."""
    used = sorted({r["dtype"] for r in recs if r.get("dtype")})
    if not used:
        return None
    falls = [r["precision"] for r in recs if (r.get("precision") or {}).get("fallback")]
    if falls:
        frac = min(p["fraction"] for p in falls)
        return f"{'/'.join(used)} ({frac:.1%} of the change survives {falls[0]['requested']})"
    return "/".join(used)


# The study's head-to-head questions beyond "vs student" and "vs LoRA" (the table's columns, which every built arm,
# function-transfer included, already has: listed here too they would enter Holm's family twice). First every arm
# against each of its nulls, read from the methods' ``controls`` (seeking-random and -shuffled of Seeking, the
# function-transfer and SemAlign nulls, LaTen's and laten-lora's random-teacher nulls: a new null is compared with
# its arm by declaring it); then Seeking against PiSSA (is the located sub-matrix what helps, or any SVD init?),
# parametric against language-based transfer at the same teacher-derived examples, laten-lora against LaTen, and
# whether the split teaches the teacher itself (teacher-lora against the teacher it was fine-tuned from). A pair
# whose arms a study lacks is skipped, so older reports keep their table.
HEAD_TO_HEAD = [("seeking", "pissa"), ("seeking", "seqkd"), ("seeking", "gkd"), ("laten", "seqkd"),
                ("laten-lora", "laten"), ("teacher-lora", "teacher")]


def comparison_pairs() -> list[tuple[str, str]]:
    """(arm, other) of every comparison a report states: each registered null against its arm, then HEAD_TO_HEAD."""
    from pkt.methods import REGISTRY

    return [(m.controls, m.name) for m in REGISTRY.values() if m.controls] + HEAD_TO_HEAD


def comparisons(records: list[dict], pairs: list[tuple[str, str]] | None = None) -> list[dict]:
    """Paired differences a − b (``pairs``, default :func:`comparison_pairs`) on each task over the seeds both arms
    have: the score's difference with its 95%
    paired-bootstrap interval and p-value, and the answer loss's (mean ± std over seeds of the per-seed
    difference). Only arms evaluated in the same dtype on the same examples are compared."""
    pairs = comparison_pairs() if pairs is None else pairs
    out = []
    for task in dict.fromkeys(r["task"] for r in records):
        by = {}
        for r in records:
            if r["task"] == task:
                by.setdefault(r["method"], {})[r["seed"]] = r
        for a, b in pairs:
            seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
            matched = [(by[a][s], by[b][s]) for s in seeds]
            if not matched or any(len(x["per_example"]) != len(y["per_example"]) or x.get("dtype") != y.get("dtype")
                                 for x, y in matched):
                continue
            d = paired_difference([x["per_example"] for x, _ in matched], [y["per_example"] for _, y in matched])
            dl = [x["answer_loss"] - y["answer_loss"] for x, y in matched
                  if x.get("answer_loss") is not None and y.get("answer_loss") is not None]
            out.append({"a": a, "b": b, "task": task, "seeds": seeds, "delta": d.mean, "low": d.low, "high": d.high,
                        "p": d.p, "loss": mean_std(dl) if dl else None})
    return out
