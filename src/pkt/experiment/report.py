"""Write the study's results: results.{json,csv,md}, a bar plot, and a self-contained HTML page.

Input records are one per (method, task, seed): the task's headline metric with its per-example scores
(0/1 correctness, or pass@1 estimates) and the answer loss. Output rows aggregate over seeds: mean ± std,
the difference to the vanilla student and to LoRA with a 95% paired-bootstrap interval (questions resampled once
for all seeds, and seeds: :mod:`pkt.experiment.stats`) and its p-value, Holm-adjusted over every comparison the
report states, and the answer loss.
The HTML page embeds every figure as base64 so it opens anywhere, offline, as a single file.

``pkt run`` and ``pkt report`` both come here through :func:`pkt.experiment.records.rebuild`, with the records
and analysis read back from the stage records, so results.md is a function of the records alone: no timestamps,
no paths, rows in the study's order, fixed float formats and a seeded bootstrap. The analysis figures are
redrawn from the analysis stage's plot inputs into ``OUT/figures/``; every figure is palette-compressed, since
a report is committed with its records.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import shutil
from pathlib import Path

from pkt.experiment.stats import holm, mean_std, paired_difference
from pkt.io import write_json, write_text
from pkt.tracking import ARM_LABEL

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


def _fmt(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.4f}"


def _p_cell(p: float | None, q: float | None) -> str:
    """A comparison's p-value and its Holm-adjusted one: "0.004* (0.120)"; * marks p ≤ ALPHA."""
    if p is None:
        return "–"
    star = lambda x: "*" if x <= ALPHA else ""  # noqa: E731
    return f"{_p(p)}{star(p)}" + ("" if q is None else f" ({_p(q)}{star(q)})")


def stats_note(family: int) -> str:
    """How the intervals and p-values of a report are made, under its table."""
    return ("Intervals: 95% paired bootstrap that resamples the questions once for all seeds (every seed is scored on "
            "the same questions) and the seeds. p: the bootstrap's two-sided p-value; in parentheses, Holm-adjusted "
            f"over the {family} comparison{'s' * (family != 1)} this report states (both Δ columns and the paired comparisons); "
            f"* marks p ≤ {ALPHA:g}.\n")


def _delta_cell(r: dict) -> str:
    if r["delta"] is None:
        return "–"
    cell = f"{r['delta']:+.3f} [{r['delta_low']:+.3f}, {r['delta_high']:+.3f}]"
    return cell + (f" (vs {BASELINE_FP32})" if r.get("delta_vs") == BASELINE_FP32 else "")


def injection_table(records: list[dict]) -> str:
    """LaTen's chosen point and injected delta per seed: ‖Δ‖/‖W‖ over the located weights, ‖Δ‖ over bf16's
    resolution (half an ulp of each weight), and the share of located weights whose bf16 value changes."""
    recs = [r for r in records if r.get("injection")]
    if not recs:
        return ""
    lines = ["| method | task | seed | choice | step | rate | ‖Δ‖/‖W‖ (located) | ‖Δ‖ / bf16 resolution | "
             "bf16 entries changed |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in recs:
        i = r["injection"]

        def g(k, fmt):
            return "–" if i.get(k) is None else format(i[k], fmt)

        lines.append(f"| {r['method']} | {r['task']} | {r['seed']} | {i.get('choice') or '–'} | {g('step', 'd')} | "
                     f"{g('rate', 'g')} | {g('delta_rel_norm', '.3g')} | {g('delta_bf16_ratio', '.3g')} | "
                     f"{g('delta_bf16_changed', '.1%')} |")
    return "\n".join(lines) + "\n"


def _lora_cell(r: dict) -> str:
    if r.get("delta_lora") is None:
        return "–"
    return f"{r['delta_lora']:+.3f} [{r['delta_lora_low']:+.3f}, {r['delta_lora_high']:+.3f}]"


def progress_note(progress: dict | None) -> str:
    """The mark on a study still running (committed records are exported stage by stage): its rows hold only the
    seeds finished so far, and a std over fewer seeds than planned is not the study's."""
    if not progress or progress["recorded"] >= progress["planned"]:
        return ""
    return (f"**Unfinished study: records of {progress['recorded']} of {progress['planned']} stages.** Each row is "
            "over the seeds finished so far (column `seeds`).")


def stage_time_note(progress: dict | None) -> str:
    """The compute the records account for. In report.html only: results.md is a function of the results, and
    two runs with the same results (say, on two executors) take different times."""
    if not progress:
        return ""
    return (f"Stage time: {_duration(progress['seconds'])} over {progress['recorded']} stages (the sum of each "
            "stage's own time).")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def markdown_table(rows: list[dict]) -> str:
    vs_lora = any(r.get("delta_lora") is not None for r in rows)
    cap = any(r.get("at_cap") is not None for r in rows)
    first = any("first_answer" in r for r in rows)
    head = "| method | task | metric | seeds | n | score (mean ± std) | Δ vs student [95% CI] | p (Holm) |"
    head += (" Δ vs lora [95% CI] | p (Holm) |" * vs_lora + " at cap |" * cap + " first answer |" * first
             + " answer loss | eval dtype |")
    lines = [head, "|---|---|---|---:|---:|---|---|---|" + "---|---|" * vs_lora + "---:|" * cap + "---:|" * first
             + "---|---|"]
    for r in rows:
        delta = _delta_cell(r)
        loss = "–" if r["answer_loss_mean"] is None else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}"
        at_cap = "–" if r.get("at_cap") is None else f"{r['at_cap']:.1%}"
        lines.append(f"| {r['method']} | {r['task']} | {r['metric']} | {len(r['seeds'])} | {r['n_examples']} | "
                     f"{_fmt(r['mean'])} ± {_fmt(r['std'])} | {delta} | {_p_cell(r['delta_p'], r.get('delta_p_holm'))} |"
                     + f" {_lora_cell(r)} | {_p_cell(r['delta_lora_p'], r.get('delta_lora_p_holm'))} |" * vs_lora
                     + f" {at_cap} |" * cap + f" {_fmt(r.get('first_answer'))} |" * first
                     + f" {loss} | {r.get('dtype') or '–'} |")
    return "\n".join(lines) + "\n"


def laten_grid(records: list[dict]) -> dict:
    """LaTen's scored (step, rate) grid per task: {task: {"vanilla": [loss per seed], (step, rate): [loss per
    seed]}}, from the build records of studies run with ``budget.laten_grid`` (or ``laten_choice: select``)."""
    out: dict = {}
    for r in records:
        inj = r.get("injection") or {}
        if r["method"] != "laten" or not inj.get("selection"):
            continue
        t = out.setdefault(r["task"], {"vanilla": []})
        if inj.get("vanilla_align_loss") is not None:
            t["vanilla"].append(inj["vanilla_align_loss"])
        for g in inj["selection"]:
            t.setdefault((g["step"], g["rate"]), []).append(g["align_loss"])
    return out


def laten_grid_table(records: list[dict]) -> str:
    """Align loss of the LaTen-injected student at every step × rate, mean ± std (min–max) over seeds, next to
    the vanilla student's on the same examples."""
    grid = laten_grid(records)
    if not grid:
        return ""
    lines = ["| task | step | rate | align loss (mean ± std over seeds) | min – max | vs vanilla student |",
             "|---|---:|---:|---|---|---|"]
    for task, cells in grid.items():
        van = cells.get("vanilla") or []
        if van:
            m, sd = mean_std(van)
            lines.append(f"| {task} | 0 | – | {m:.4f} ± {sd:.4f} | {min(van):.4f} – {max(van):.4f} | (vanilla) |")
        for (step, rate), losses in sorted((k, v) for k, v in cells.items() if k != "vanilla"):
            m, sd = mean_std(losses)
            vs = f"{m - mean_std(van)[0]:+.4f}" if van else "–"
            lines.append(f"| {task} | {step} | {rate:g} | {m:.4f} ± {sd:.4f} | {min(losses):.4f} – {max(losses):.4f} "
                         f"| {vs} |")
    return "\n".join(lines) + "\n"


def plot_laten_grid(records: list[dict], path: Path) -> Path | None:
    """Align loss minus the vanilla student's, per step, one line per rate (mean over seeds, band min–max)."""
    grid = laten_grid(records)
    if not grid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(grid), figsize=(4.8 * len(grid), 3.6), squeeze=False)
    for ax, (task, cells) in zip(axes[0], grid.items()):
        base = mean_std(cells["vanilla"])[0] if cells.get("vanilla") else 0.0
        rates = sorted({k[1] for k in cells if k != "vanilla"})
        for rate in rates:
            pts = sorted((k[0], v) for k, v in cells.items() if k != "vanilla" and k[1] == rate)
            steps = [p[0] for p in pts]
            ax.plot(steps, [mean_std(v)[0] - base for _, v in pts], marker="o", label=f"rate {rate:g}")
            ax.fill_between(steps, [min(v) - base for _, v in pts], [max(v) - base for _, v in pts], alpha=0.15)
        ax.axhline(0, color="#888", lw=0.8)
        ax.set_title(f"LaTen {task}: align loss − vanilla" if cells.get("vanilla") else f"LaTen {task}: align loss")
        ax.set_xlabel("hypernetwork step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 1.5 tick
        ax.legend(fontsize=7)
    return _save(fig, path)


def equal_steps_table(curves: dict, a: str = LORA, b: str = "laten-lora") -> str:
    """Training loss of arms ``a`` and ``b`` at equal steps (mean ± std over seeds; the same batches in one seed),
    and per seed the first step at which each arm's loss is at or below ``a``'s final loss.

    Both arms are shown against the same target: a step's loss depends on its batch as much as on the arm (an easy
    batch early on can already be under the final loss), so ``b``'s step says something only beside ``a``'s."""
    runs: dict = {}
    for label, pts in curves.items():
        m = ARM_LABEL.match(label)
        if m and m["method"] in (a, b):
            runs.setdefault(m["task"], {}).setdefault(m["method"], {})[int(m["seed"])] = dict(pts)
    lines = []
    for task, by in runs.items():
        if a not in by or b not in by:
            continue
        seeds = sorted(set(by[a]) & set(by[b]))
        steps = sorted(set.intersection(*(set(by[x][s]) for x in (a, b) for s in seeds))) if seeds else []
        if not steps:
            continue
        if not lines:
            lines = [f"| task | step | {a} loss | {b} loss | {b} − {a} |", "|---|---:|---|---|---|"]
        for st in steps:
            la, lb = ([by[x][s][st] for s in seeds] for x in (a, b))
            (ma, sa), (mb, sb) = mean_std(la), mean_std(lb)
            d = mean_std([y - x for x, y in zip(la, lb)])
            lines.append(f"| {task} | {st} | {ma:.4f} ± {sa:.4f} | {mb:.4f} ± {sb:.4f} | {d[0]:+.4f} ± {d[1]:.4f} |")
        reach = []
        for s in seeds:
            target = by[a][s][steps[-1]]
            hits = [(x, next((st for st in steps if by[x][s][st] <= target), None)) for x in (a, b)]
            reach.append(f"seed {s}: " + ", ".join(f"{x} step {h}" if h else f"{x} not within {steps[-1]}"
                                                   for x, h in hits))
        lines.append(f"| {task} | | first step at or below {a}'s final loss | {'; '.join(reach)} | |")
    return "\n".join(lines) + "\n" if lines else ""


# The study's head-to-head questions beyond "vs student" and "vs LoRA" (the table's columns): Seeking against its
# controls and PiSSA (is the located sub-matrix what helps, or any SVD init?), and parametric against
# language-based transfer at the same teacher-derived examples.
COMPARISONS = [("seeking", "seeking-random"), ("seeking", "seeking-shuffled"), ("seeking", "pissa"),
               ("seeking", "seqkd"), ("seeking", "gkd"), ("laten", "seqkd"), ("laten-lora", "laten")]


def comparisons(records: list[dict], pairs=COMPARISONS) -> list[dict]:
    """Paired differences a − b on each task over the seeds both arms have: the score's difference with its 95%
    paired-bootstrap interval and p-value, and the answer loss's (mean ± std over seeds of the per-seed
    difference). Only arms evaluated in the same dtype on the same examples are compared."""
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


def comparisons_table(records: list[dict], pairs=COMPARISONS, comps: list[dict] | None = None) -> str:
    """:func:`comparisons` as a markdown table; ``comps``: already computed (and Holm-adjusted by :func:`adjust`),
    else computed here and adjusted among themselves."""
    if comps is None:
        comps = comparisons(records, pairs)
        for c, q in zip(comps, holm([c["p"] for c in comps])):
            c["p_holm"] = q
    if not comps:
        return ""
    lines = ["| a − b | task | seeds | Δ score [95% CI] | p (Holm) | significant (raw / Holm) | "
             "Δ answer loss (mean ± std) |", "|---|---|---:|---|---|---|---|"]
    for c in comps:
        loss = f"{c['loss'][0]:+.3f} ± {c['loss'][1]:.3f}" if c["loss"] else "–"
        verdict = f"{'yes' if c['p'] <= ALPHA else 'no'} / {'yes' if c['p_holm'] <= ALPHA else 'no'}"
        lines.append(f"| {c['a']} − {c['b']} | {c['task']} | {len(c['seeds'])} | {c['delta']:+.3f} [{c['low']:+.3f}, "
                     f"{c['high']:+.3f}] | {_p_cell(c['p'], c['p_holm'])} | {verdict} | {loss} |")
    return "\n".join(lines) + "\n"


def _ms(stat: dict | None, fmt: str = "+.3f") -> str:
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt.lstrip('+')}}" if stat else "–"


def _md_table(intro: str, header: list[str], align: str, rows: list[list]) -> list[str]:
    """A markdown table under its introducing sentence (``align``: its separator line); nothing without rows."""
    if not rows:
        return []
    return [intro, "", "| " + " | ".join(header) + " |", align, *("| " + " | ".join(map(str, r)) + " |" for r in rows),
            ""]


def analysis_tables(summary: dict | None) -> str:
    """The analysis stage's numbers (its figures' summaries) as tables: the parametric similarity of the Seeking
    and PiSSA inits and of the LaTen delta to the student's weights (mean ± std over layers), the teacher × student
    representation similarity per module and measure, and the next-token behaviour of the two models."""
    if not summary:
        return ""
    params = summary.get("params") or {}
    out = _md_table(
        "Parametric similarity of each LoRA init's update BA to the student's weight W (per layer, mean ± std over "
        "layers; W − BA is the frozen remainder):",
        ["init", "module", "layers", "cos(BA, W)", "cos(BA, W − BA)", "‖BA‖ / ‖W‖"], "|---|---|---:|---|---|---|",
        [[init, mod, st["cos_BA_original"]["n"], _ms(st["cos_BA_original"]), _ms(st["cos_BA_remaining"]),
          _ms(st["norm_ratio"], ".3f")] for init, mods in params.items() for mod, st in sorted(mods.items())])
    out += _md_table(
        "LaTen's delta Δ against the student's weight (on the located rows × columns, and over the whole matrix):",
        ["module", "layers", "cos(Δ, W located)", "cos(Δ, W)", "‖Δ‖ / ‖W located‖"], "|---|---:|---|---|---|",
        [[mod, st["cos_delta_located"]["n"], _ms(st["cos_delta_located"], "+.4f"), _ms(st["cos_delta_full"], "+.4f"),
          _ms(st["norm_ratio"], ".4f")] for mod, st in sorted((summary.get("laten_delta") or {}).items())])
    rep_rows = []
    for mod, measures in (summary.get("representations") or {}).items():
        for name, st in measures.items():
            dg = st.get("diagonal") or {}
            within = dg.get("best_within_2_of_proportional")
            rep_rows.append([mod, name, _ms(st.get("all"), ".3f"), _ms(st.get("teacher_ge_student"), ".3f"),
                             f"{dg.get('proportional_mean', float('nan')):.3f}",
                             f"{dg.get('best_mean', float('nan')):.3f}", "–" if within is None else f"{within:.0%}"])
    out += _md_table(
        "Teacher × student representation similarity of each module's output (mean ± std over layer pairs; "
        "'teacher ≥ student' keeps the pairs whose teacher layer index is at least the student's; the diagonal "
        "pairs each student layer with the teacher layer at the same relative depth, or with its best-matching "
        "one):",
        ["module", "measure", "all pairs", "teacher ≥ student", "same relative depth", "best teacher layer",
         "best within 2 layers of the same depth"], "|---|---|---|---|---:|---:|---:|", rep_rows)
    beh = summary.get("behaviour") or {}
    if beh:
        out += [f"Next-token behaviour on {beh['n_examples']} examples ({beh['n_tokens']} answer tokens): KL(teacher ‖ "
                f"student) mean {beh['kl_mean']:.3f}, median {beh['kl_median']:.3f}, 90th percentile "
                f"{beh['kl_p90']:.3f}; top-1 agreement {beh['top1_agreement']:.1%}; top-1 accuracy teacher "
                f"{beh['teacher_top1_accuracy']:.1%}, student {beh['student_top1_accuracy']:.1%}.", ""]
    return "\n".join(out)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def plot_scores(rows: list[dict], path: Path) -> Path | None:
    """Each arm's score per task; None while no evaluation has a record (a study that has just started)."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    arms = max(sum(r["task"] == t for r in rows) for t in tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5, 0.5 * arms + 1.5) * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        sub = [r for r in rows if r["task"] == task]
        ax.bar([r["method"] for r in sub], [r["mean"] for r in sub], yerr=[r["std"] for r in sub], capsize=3,
               color=["#888" if r["method"] in ("student", "teacher") else "#3b7dd8" for r in sub])
        ax.set_title(f"{task} ({sub[0]['metric']})")
        # anchored at the label's end so that long arm names stay under their own bar
        plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    return _save(fig, path)


def write_report(out: Path, records: list[dict], manifest: dict, figures: list[Path] = (), *,
                 analysis: dict | None = None, curves: dict | None = None,
                 progress: dict | None = None) -> dict:
    """Results and report of ``records`` into ``out``. ``figures``: PNGs included as they are (copied into
    ``out/figures``); ``analysis``: the analysis stage's result, whose ``plots`` are drawn; ``curves``: the
    training loss per arm (label -> [(step, loss)]) for loss_curves.png; ``progress``: the stages recorded,
    planned and their summed stage times (records.Loaded.progress), which head the results."""
    from pkt.analyse import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records)
    comps = comparisons(records)
    family = adjust(rows, comps)
    write_json(out / "results.json", {"rows": rows, "comparisons": comps, "records": records})
    buf = io.StringIO()
    cols = ["method", "task", "metric", "n_examples", "mean", "std", "delta", "delta_low", "delta_high", "delta_p",
            "delta_p_holm", "delta_lora", "delta_lora_low", "delta_lora_high", "delta_lora_p", "delta_lora_p_holm",
            "at_cap", "answer_loss_mean", "answer_loss_std", "dtype"]
    if any("first_answer" in r for r in rows):
        cols.insert(cols.index("at_cap") + 1, "first_answer")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    table = markdown_table(rows) + (f"\n{stats_note(family)}" if family else "")
    inj = injection_table(records)
    inj = f"\n## Injected delta (LaTen)\n\n{inj}" if inj else ""
    grid = laten_grid_table(records)
    grid = f"\n## LaTen across steps, rates and seeds (align loss)\n\n{grid}" if grid else ""
    pairs = comparisons_table(records, comps=comps)
    pairs = f"\n## Paired comparisons between arms\n\n{pairs}" if pairs else ""
    steps = equal_steps_table(curves or {})
    steps = f"\n## Fine-tuning at equal steps (training loss)\n\n{steps}" if steps else ""
    incompat = analysis_tables((analysis or {}).get("summary"))
    incompat = f"\n## Neural incompatibility (the analysis stage)\n\n{incompat}" if incompat else ""
    status = progress_note(progress)
    status = f"{status}\n\n" if status else ""
    write_text(out / "results.md",
               f"# Results: {manifest.get('name', 'pkt run')}\n\n{status}{table}{pairs}{inj}{grid}{steps}{incompat}")
    figs = [plot_scores(rows, out / "scores.png"), plot_laten_grid(records, out / "laten_grid.png")]
    if analysis and analysis.get("plots"):
        figs += [out / FIGURES / n for n in plots.analysis_figures(analysis["plots"], out / FIGURES)]
    for f in map(Path, figures):
        dst = out / FIGURES / f.name
        if f.is_file() and f.resolve() != dst.resolve():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        figs.append(dst)
    if curves:
        from pkt.tracking import plot_loss_curves

        figs.append(plot_loss_curves(curves, out / "loss_curves.png"))
    figs = [Path(f) for f in figs if f is not None and Path(f).is_file()]
    for f in figs:
        plots.compact_png(f)
    write_text(out / "report.html", render_html(manifest, rows, figs, f"{status}{stage_time_note(progress)}",
                                                family=family))
    return {"rows": rows, "files": ["results.json", "results.csv", "results.md", "report.html",
                                    *(f.relative_to(out).as_posix() for f in figs)]}


def render_html(manifest: dict, rows: list[dict], figures: list[Path], status: str = "", family: int = 0) -> str:
    first = any("first_answer" in r for r in rows)
    head = ["method", "task", "metric", "seeds", "n", "score", "Δ vs student [95% CI]", "p (Holm)",
            "Δ vs lora [95% CI]", "p (Holm)",
            "at cap", *["first answer"] * first, "answer loss", "eval dtype"]
    body = []
    for r in rows:
        delta = _delta_cell(r)
        loss = "–" if r["answer_loss_mean"] is None else f"{r['answer_loss_mean']:.3f} ± {r['answer_loss_std']:.3f}"
        cells = [r["method"], r["task"], r["metric"], len(r["seeds"]), r["n_examples"],
                 f"{r['mean']:.3f} ± {r['std']:.3f}", delta, _p_cell(r.get("delta_p"), r.get("delta_p_holm")),
                 _lora_cell(r), _p_cell(r.get("delta_lora_p"), r.get("delta_lora_p_holm")),
                 "–" if r.get("at_cap") is None else f"{r['at_cap']:.1%}", *[_fmt(r.get("first_answer"))] * first,
                 loss, r.get("dtype") or "–"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    imgs = []
    for f in figures:
        f = Path(f)
        if f.is_file():
            data = base64.b64encode(f.read_bytes()).decode()
            imgs.append(f'<figure><img alt="{html.escape(f.stem)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(f.stem)}</figcaption></figure>")
    stages = "".join(
        f"<tr><td>{html.escape(s['stage'])}</td><td>{s['seconds']:.1f}</td><td>{'cached' if s['cached'] else 'run'}</td></tr>"
        for s in manifest.get("stages", [])
    )
    cfg = html.escape(manifest.get("config_yaml", ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pkt report: {html.escape(str(manifest.get('name', '')))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f0f0f0}}img{{max-width:100%}}figure{{margin:1em 0}}pre{{background:#f7f7f7;padding:1em;overflow:auto}}</style>
</head><body>
<h1 id="title">pkt report: {html.escape(str(manifest.get('name', '')))}</h1>
<p>teacher <b>{html.escape(str(manifest.get('teacher', '')))}</b> → student <b>{html.escape(str(manifest.get('student', '')))}</b>;
seeds {html.escape(str(manifest.get('seeds', '')))}; pkt {html.escape(str(manifest.get('versions', {}).get('pkt', '')))};
finished {html.escape(str(manifest.get('finished', '')))}</p>
{f"<p><b>{html.escape(status.strip().replace('**', ''))}</b></p>" if status else ""}
<h2>Results</h2>
<table id="results"><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(body)}</table>
<p>Scores are means ± std over seeds; Δ is the paired difference to the vanilla student (or to LoRA);
answer loss is the mean teacher-forced NLL of gold responses (lower is better). {html.escape(stats_note(family)) if family else ""}</p>
<h2>Figures</h2>{''.join(imgs)}
<h2>Stages</h2><table><tr><th>stage</th><th>seconds</th><th>status</th></tr>{stages}</table>
<h2>Configuration</h2><pre>{cfg}</pre>
</body></html>
"""
