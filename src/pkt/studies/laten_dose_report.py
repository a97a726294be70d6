"""The laten-dose report (``laten-dose.md``, ``laten-dose.png``), derived from its committed records alone, and
the choices the study makes from them (which points get a held-out accuracy, which point is tested).

:mod:`pkt.studies.laten_dose` writes ``laten-dose.json`` (the settings, the held-out sets, pkt run's point),
``student.json`` (the untuned student: held-out loss, held-out accuracy, test), ``grids/<run>-s<seed>.json`` (one
hypernetwork training and every (step, rate) of it scored: held-out loss per example, ‖Δ‖/‖W‖, the share of Δ
surviving bf16), ``accuracy/<point>-s<seed>.json`` (a point's held-out accuracy) and ``tests/<point>-s<seed>.json``
(the selected point on the test subset). This module reads nothing else, so the report is re-derived from a
commit byte for byte (no timestamps, paths or timings in the output, a seeded bootstrap, PNG metadata without the
library version).

Names. A run ``k{k}of{s}-l{λ}`` is k hypernetwork steps of a OneCycle spanning s steps at penalty λ (a null's run
adds its name: ``k{k}of{s}-l{λ}-random``); a point
``<run>-step{t}-r{rate}`` is its checkpoint t applied at that transfer rate. A row of the grid is (schedule, λ,
step, rate): the ``cycle`` schedule's step t is the point ``k{max}of{n_extract}-…-step{t}``, the ``trained``
schedule's is ``k{t}of{t}-…-step{t}`` (the two are one training when t is the whole extract split).

Choices, on held-out data only. The held-out loss of a point and seed is the mean over the held-out examples of
each one's mean token NLL (steps-saved's unit), and a row's is the mean over the seeds. Held-out accuracy is
measured at the ``accuracy.best`` distinct points of lowest mean loss and at pkt run's point
(:func:`accuracy_points`). The operating point (:func:`select`) is the row of lowest mean held-out loss, or
(``select: accuracy``) the accuracy point of best mean held-out accuracy; a tie goes to the smaller dose: the
smaller rate, then the fewer steps, then the schedule and the penalty listed first (the settings' order).

Statistics. Δ of a row against the student: the paired bootstrap over held-out examples (resampled once for
every seed) and seeds (:func:`pkt.experiment.stats.paired_difference`); a row helps where the whole 95% interval
is below 0, hurts where it is above. On the test subset the selected point is compared with the student as the
pilot compares a build (:func:`pkt.studies.pilot_report.compare`: Δ with its interval, exact McNemar per seed,
Holm over the seeds' comparisons stated). The selected point against its null (``nulls``): the held-out loss
paired over examples and seeds as above, and on the test subset the point minus its null, seed by seed; the seeds'
McNemar tests of the point against the student, of the point against each null and of each null against the
student are one Holm family.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pkt.errors import PktError
from pkt.experiment.rows import ALPHA
from pkt.experiment.stats import N_BOOT, holm, paired_difference
from pkt.studies import staged
from pkt.studies.staged import p_value, pct, pts, read_record

META, STUDENT, GRIDS, ACCURACY, TESTS = "laten-dose.json", "student.json", "grids", "accuracy", "tests"
REPORT, PLOT = "laten-dose.md", "laten-dose.png"
# what LaTen's apply reads of its settings to locate and extract (pkt.laten.locate, pkt.locate.pairing.extract)
LOCATE_SETTINGS = ("teacher", "student", "task", "seed_file", "style", "modules", "layer_strategy", "cutoff_len",
                   "norm", "vocab_top", "chunk", "teacher_dtype", "student_dtype", "seed")
POINT_KEYS = ("schedule", "penalty", "step", "rate", "trained", "span")


def run_label(trained: int, span: int, penalty: float, vectors: str = "real") -> str:
    return f"k{trained}of{span}-l{penalty:g}" + ("" if vectors == "real" else f"-{vectors}")


def point_label(p: dict) -> str:
    return (f"{run_label(p['trained'], p['span'], p['penalty'], p.get('vectors', 'real'))}-step{p['step']}"
            f"-r{p['rate']:g}")


def grid_file(label: str, seed: int) -> str:
    return f"{label}-s{seed}.json"


def pairing_file(rate: float) -> str:
    return f"pairing-r{rate:g}.pt"


def schedule_steps(settings: dict, schedule: str) -> list[int]:
    """The steps a schedule's rows are scored at: every step of ``steps`` for the cycle, ``trained_steps`` (or
    every step) for the trained schedule."""
    if schedule == "trained" and settings.get("trained_steps") is not None:
        return list(settings["trained_steps"])
    return list(settings["steps"])


def run_of(settings: dict, n_extract: int, schedule: str, step: int) -> tuple[int, int]:
    """(steps trained, cycle span) of the run whose checkpoint ``step`` a schedule's row reads."""
    if schedule == "cycle":
        return max(settings["steps"]), n_extract
    return step, step


def paper_point(settings: dict, step: int | None, n_extract: int | None = None) -> dict | None:
    """pkt run's LaTen point for the budget (its step, ``laten_apply_rate`` or ``laten_rate``, ``laten_penalty``
    and ``laten_schedule``), or None
    without ``accuracy.paper``; a PktError naming the setting when the grid does not hold it."""
    if step is None:
        return None
    from pkt.laten import LatenConfig

    b = settings["budget"]
    p = {"schedule": "trained" if b["laten_schedule"] == "trained" else "cycle",
         "penalty": float(b.get("laten_penalty", LatenConfig.model_fields["penalty"].default)), "step": step,
         "rate": float(b.get("laten_apply_rate") or b["laten_rate"])}
    what = f"pkt run's LaTen point ({p['schedule']} schedule, step {step}, rate {p['rate']:g}, λ {p['penalty']:g})"
    if p["schedule"] not in settings["schedules"]:
        raise PktError(f"accuracy.paper: {what} needs schedules to hold {p['schedule']!r}")
    if step not in schedule_steps(settings, p["schedule"]):
        where = "trained_steps" if p["schedule"] == "trained" and settings.get("trained_steps") else "steps"
        raise PktError(f"accuracy.paper: {what} needs step {step} in {where}")
    if p["rate"] not in [float(r) for r in settings["rates"]]:
        raise PktError(f"accuracy.paper: {what} needs rate {p['rate']:g} in rates")
    if p["penalty"] not in [float(x) for x in settings["penalties"]]:
        raise PktError(f"accuracy.paper: {what} needs penalty {p['penalty']:g} in penalties")
    if n_extract is not None:
        p["trained"], p["span"] = run_of(settings, n_extract, p["schedule"], step)
    return p


def load(records: str | Path) -> dict:
    """{"meta", "student", "grids": {(run, seed): record}, "accuracy": {name: record}, "tests": {name: record}}."""
    root = staged.records_root(records, META, "laten-dose")
    grids = staged.seeded_records(root / GRIDS, "laten-dose", "grid", "run")
    student = root / STUDENT
    return {"meta": read_record(root / META, "laten-dose"),
            "student": read_record(student, "laten-dose") if student.is_file() else {}, "grids": grids,
            "accuracy": staged.read_records(root / ACCURACY, "laten-dose"),
            "tests": staged.read_records(root / TESTS, "laten-dose")}


# ---- the grid and the choices ---------------------------------------------------------------------------------
def _point(rec: dict, row: dict, seed: int) -> dict | None:
    g = rec["grids"].get((run_label(row["trained"], row["span"], row["penalty"]), seed))
    if g is None:
        return None
    for p in g["result"]["points"]:
        if p["step"] == row["step"] and float(p["rate"]) == row["rate"]:
            return p
    raise PktError(f"{GRIDS}/{grid_file(g['run'], seed)}: no point at step {row['step']}, rate {row['rate']:g} "
                   "(a stale record)")


def rows(rec: dict) -> list[dict]:
    """Every row of the grid (schedule × λ × step × rate, in the settings' order) with each seed's point."""
    s, n_extract = rec["meta"]["settings"], rec["meta"]["n_extract"]
    out = []
    for schedule in s["schedules"]:
        for lam in s["penalties"]:
            for step in schedule_steps(s, schedule):
                for rate in s["rates"]:
                    trained, span = run_of(s, n_extract, schedule, step)
                    row = {"schedule": schedule, "penalty": float(lam), "step": step, "rate": float(rate),
                           "trained": trained, "span": span}
                    row["seeds"] = {seed: _point(rec, row, seed) for seed in s["seeds"]}
                    done = [p["loss_per_example"] for p in row["seeds"].values() if p is not None]
                    row["mean"] = sum(done) / len(done) if len(done) == len(s["seeds"]) else None
                    out.append(row)
    return out


def dose(row: dict, settings: dict) -> tuple:
    """The order "smaller dose first": rate, steps, then the settings' order of schedules and penalties."""
    return (row["rate"], row["step"], settings["schedules"].index(row["schedule"]),
            [float(x) for x in settings["penalties"]].index(row["penalty"]))


def _as_point(row: dict) -> dict:
    return {k: row[k] for k in POINT_KEYS}


def _same(a: dict, b: dict) -> bool:
    """One training and checkpoint at one rate (two schedules' rows can be one point)."""
    return all(a[k] == b[k] for k in ("penalty", "step", "rate", "trained", "span"))


def grids_complete(rec: dict) -> bool:
    return all(r["mean"] is not None for r in rows(rec))


def accuracy_points(rec: dict) -> list[dict]:
    """The points whose held-out accuracy is measured: the ``accuracy.best`` distinct points of lowest mean
    held-out loss (ties to the smaller dose), then pkt run's point unless it is one of them."""
    s = rec["meta"]["settings"]
    grid = rows(rec)
    if any(r["mean"] is None for r in grid):
        raise PktError("the held-out grid is not complete: no accuracy point can be chosen yet")
    chosen: list[dict] = []
    for r in sorted(grid, key=lambda r: (round(r["mean"], 12), dose(r, s))):
        if len(chosen) >= s["accuracy"]["best"]:
            break
        if not any(_same(r, c) for c in chosen):
            chosen.append(_as_point(r))
    paper = rec["meta"].get("paper_point")
    if paper and not any(_same(paper, c) for c in chosen):
        chosen.append({k: paper[k] for k in POINT_KEYS})
    return chosen


def _accuracy(rec: dict, p: dict, seed: int) -> dict | None:
    return rec["accuracy"].get(f"{point_label(p)}-s{seed}")


def accuracy_complete(rec: dict) -> bool:
    seeds = rec["meta"]["settings"]["seeds"]
    return grids_complete(rec) and all(_accuracy(rec, p, s) for p in accuracy_points(rec) for s in seeds)


def select(rec: dict) -> dict:
    """The operating point, chosen on the held-out records alone (see the module's docstring)."""
    s = rec["meta"]["settings"]
    grid = rows(rec)
    if any(r["mean"] is None for r in grid):
        raise PktError("the held-out grid is not complete: no point can be selected yet")
    if s["select"] == "loss":
        return _as_point(min(grid, key=lambda r: (round(r["mean"], 12), dose(r, s))))
    points = accuracy_points(rec)
    if not all(_accuracy(rec, p, seed) for p in points for seed in s["seeds"]):
        raise PktError("the held-out accuracies are not complete: no point can be selected yet")

    def acc(p: dict) -> float:
        return sum(_accuracy(rec, p, seed)["heldout"]["score"] for seed in s["seeds"]) / len(s["seeds"])

    return min(points, key=lambda p: (-round(acc(p), 12), dose(p, s)))


# ---- what the report states ---------------------------------------------------------------------------------
def _per_example(point: dict) -> list[float]:
    return [a / n if n else 0.0 for a, n in point["per_example"]]


def derive(rec: dict) -> dict:
    """Every number the report states, from the records ``rec`` (:func:`load`)."""
    s = rec["meta"]["settings"]
    seeds = list(s["seeds"])
    st = rec["student"]
    base = st.get("heldout_loss")
    grid = rows(rec)
    for r in grid:
        r["delta"] = r["sd"] = r["rel_norm"] = r["bf16_changed"] = r["below"] = None
        if r["mean"] is None:
            continue
        per_seed = [r["seeds"][x] for x in seeds]
        losses = [p["loss_per_example"] for p in per_seed]
        r["sd"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
        r["rel_norm"] = sum(p["rel_norm"] for p in per_seed) / len(per_seed)
        r["bf16_changed"] = sum(p["bf16_changed"] for p in per_seed) / len(per_seed)
        if base is not None:
            ref = _per_example(base)
            d = paired_difference([_per_example(p) for p in per_seed], [ref] * len(per_seed))
            r["delta"] = (d.mean, d.low, d.high, d.p)
            r["below"] = sum(x < base["loss_per_example"] for x in losses)
    real = [k for k in rec["grids"] if k[0] in {run_label(r["trained"], r["span"], r["penalty"]) for r in grid}]
    out = {"rows": grid, "complete": grids_complete(rec), "n_grids": len(real), "accuracy": None,
           "selected": None, "test": None, "nulls": []}
    if not out["complete"]:
        return out
    points = accuracy_points(rec)
    acc = []
    for p in points:
        got = [_accuracy(rec, p, seed) for seed in seeds]
        row = next(r for r in grid if _same(r, p))
        why = [w for w, ok in (("lowest held-out loss", p in points[: s["accuracy"]["best"]]),
                               ("pkt run's point", rec["meta"].get("paper_point") and
                                _same(rec["meta"]["paper_point"], p))) if ok]
        acc.append({"point": p, "row": row, "why": " and ".join(why),
                    "scores": [g["heldout"]["score"] if g else None for g in got],
                    "mean": sum(g["heldout"]["score"] for g in got) / len(got) if all(got) else None})
    out["accuracy"] = acc
    if s["select"] == "accuracy" and not accuracy_complete(rec):
        return out
    chosen = select(rec)
    out["selected"] = {"point": chosen, "row": next(r for r in grid if _same(r, chosen))}
    tests = [rec["tests"].get(f"{point_label(chosen)}-s{seed}") for seed in seeds]
    out["nulls"] = [_null(rec, chosen, null, grid, tests) for null in s.get("nulls") or []]
    if all(tests) and st.get("test"):
        from pkt.studies.pilot_report import compare

        c = compare(st["test"], tests)
        c["scores"] = [t["test"]["score"] for t in tests]
        out["test"] = c
        # the comparisons stated on the test subset, one Holm family: each seed's McNemar test of the point
        # against the student, and of the point against each null and of each null against the student
        family = [c] + [x for n in out["nulls"] for x in (n["vs_null"], n["vs_student"]) if x is not None]
        adjusted = iter(holm([m[2] for x in family for m in x["mcnemar"]]))
        for x in family:
            x["holm"] = [next(adjusted) for _ in x["mcnemar"]]
            x["significant"] = x["delta"] > 0 and all(p <= ALPHA for p in x["holm"])
    return out


def _null(rec: dict, chosen: dict, null: str, grid: list[dict], tests: list[dict | None]) -> dict:
    """The selected point against its null ``null``: every point of the null's run beside the same point of the
    real run (held-out loss, paired over examples and seeds), the selected point's held-out accuracy, and on the
    test subset the point minus its null and the null minus the student."""
    from pkt.studies.pilot_report import compare

    seeds = list(rec["meta"]["settings"]["seeds"])
    q = {**chosen, "vectors": null}
    label = run_label(q["trained"], q["span"], q["penalty"], null)
    grids = [rec["grids"].get((label, seed)) for seed in seeds]
    points = []
    if all(grids):
        for first in grids[0]["result"]["points"]:
            at = {**q, "step": first["step"], "rate": float(first["rate"])}
            mine = [next(p for p in g["result"]["points"] if p["step"] == at["step"] and float(p["rate"]) == at["rate"])
                    for g in grids]
            twin = next(r for r in grid if _same(r, at))
            d = paired_difference([_per_example(twin["seeds"][x]) for x in seeds], [_per_example(p) for p in mine])
            losses = [p["loss_per_example"] for p in mine]
            points.append({"step": at["step"], "rate": at["rate"], "real": twin["mean"],
                           "mean": sum(losses) / len(losses), "sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                           "rel_norm": sum(p["rel_norm"] for p in mine) / len(mine), "delta": (d.mean, d.low, d.high, d.p),
                           "selected": at["step"] == chosen["step"] and at["rate"] == float(chosen["rate"])})
    acc = [_accuracy(rec, q, seed) for seed in seeds]
    real_acc = [_accuracy(rec, chosen, seed) for seed in seeds]
    ntests = [rec["tests"].get(f"{point_label(q)}-s{seed}") for seed in seeds]
    out = {"null": null, "point": q, "grids": sum(g is not None for g in grids), "points": points,
           "heldout": [a["heldout"]["score"] for a in acc] if all(acc) else None,
           "real_heldout": [a["heldout"]["score"] for a in real_acc] if all(real_acc) else None,
           "vs_null": None, "vs_student": None, "scores": None}
    st = rec["student"].get("test")
    if all(ntests) and st:
        out["vs_student"] = compare(st, ntests)
        out["scores"] = [t["test"]["score"] for t in ntests]
        if all(tests):
            out["vs_null"] = compare(st, tests, base=[t["test"] for t in ntests], against="its null's")
    return out


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _signed(v: float) -> str:
    return (f"{v:+.4f}" if v == 0 or abs(v) >= 5e-5 else f"{v:+.1e}").replace("-", "−")


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.2e}"


def _name(p: dict) -> str:
    return f"{p['schedule']}, λ {p['penalty']:g}, step {p['step']}, rate {p['rate']:g}"


def render(rec: dict, out: dict) -> str:
    meta, st = rec["meta"], rec["student"]
    s, h, t, lat = meta["settings"], meta["heldout"], meta["test"], meta["laten"]
    seeds = list(s["seeds"])
    n_runs = len({(r["trained"], r["span"], r["penalty"]) for r in out["rows"]})
    paper = meta.get("paper_point")
    lines = [f"# LaTen dose–response: {s['name']}", "",
             f"LaTen (`{s['teacher']}` → `{s['student']}`, {s['task']}): the hypernetwork trained with pkt run's "
             f"settings ({lat['batch_size']} examples per step, lr {lat['lr']:g}, training rate "
             f"{lat['transfer_rate']:g}, {lat['teacher_dtype']} teacher, {lat['student_dtype']} student), applied at "
             f"every step of {', '.join(map(str, s['steps']))} (schedule `cycle`: the OneCycle over the "
             f"{meta['n_extract']}-step extract split, stopped there; `trained`: a cycle over exactly the steps "
             f"trained" + (f", at {', '.join(map(str, s['trained_steps']))}" if s.get("trained_steps") else "")
             + f"), transfer rates {', '.join(f'{x:g}' for x in s['rates'])} and alignment penalties λ "
             f"{', '.join(f'{x:g}' for x in s['penalties'])}; seeds {', '.join(map(str, seeds))} "
             f"({n_runs} hypernetwork trainings per seed). Each point is fused into the student ({s['dtype']}) and "
             "scored without any fine-tuning." + (f" pkt run's point: {_name(paper)}." if paper else ""), "",
             f"Held-out set: {h['description']}; held-out loss: the teacher-forced NLL of its gold answers, the mean "
             "over examples of each example's mean token NLL (steps-saved's measure). Held-out accuracy: "
             f"{meta['accuracy_set']['description']}, {t['protocol']}. Test: {t['description']}.", "",
             f"Recorded: {out['n_grids']} of {n_runs * len(seeds)} grids"
             + "".join(f", {n['grids']} of {len(seeds)} `{n['null']}` null grids" for n in out["nulls"])
             + f", {len(rec['accuracy'])} held-out accuracy evaluations, {len(rec['tests'])} test evaluations.", ""]
    hl, ha, ht = st.get("heldout_loss"), st.get("heldout"), st.get("test")
    lines += [f"Untuned student: held-out loss {_f(hl and hl['loss_per_example'])}, held-out accuracy "
              f"{pct(ha and ha['score'])}, test {pct(ht and ht['score'])}"
              + (f" ({round(ht['score'] * ht['n'])}/{ht['n']})" if ht else "") + ".", ""]
    seed_cols = " / ".join(f"s{x}" for x in seeds)
    lines += ["## Held-out loss by step, schedule, rate and penalty", "",
              f"| schedule | λ | step | rate | held-out loss (mean ± SD over seeds) | per seed ({seed_cols}) | "
              "Δ vs student [95% CI] | seeds below the student | ‖Δ‖/‖W‖ | Δ surviving bf16 |",
              "|---|---:|---:|---:|---|---|---|---:|---:|---:|",
              f"| student | – | 0 | 0 | {_f(hl and hl['loss_per_example'])} | – | – | – | 0 | 0 |"]
    for r in out["rows"]:
        head = f"| {r['schedule']} | {r['penalty']:g} | {r['step']} | {r['rate']:g} |"
        per = " / ".join(_f(p and p["loss_per_example"]) for p in (r["seeds"][x] for x in seeds))
        if r["mean"] is None:
            lines.append(f"{head} – | {per} | – | – | – | – |")
            continue
        d = r["delta"]
        delta = "–" if d is None else f"{_signed(d[0])} [{_signed(d[1])}, {_signed(d[2])}]"
        below = "–" if r["below"] is None else f"{r['below']}/{len(seeds)}"
        lines.append(f"{head} {r['mean']:.4f} ± {r['sd']:.4f} | {per} | {delta} | {below} | {_sci(r['rel_norm'])} "
                     f"| {pct(r['bf16_changed'])} |")
    lines += ["", "‖Δ‖/‖W‖: the injection's norm over that of the located rows and columns it lands on (mean over "
              "seeds); Δ surviving bf16: the share of those weights whose bf16 value W + Δ differs from W's "
              "(`pkt.inject.delta_stats`). Δ vs student: held-out loss minus the student's, paired bootstrap over "
              f"the held-out examples and the seeds ({N_BOOT:,} draws, seed 0).", ""]
    lines += _helps(out, seeds)
    if out["accuracy"] is not None:
        lines += ["## Held-out accuracy at a few points", "",
                  f"| point | measured as | held-out loss | held-out accuracy (mean) | per seed ({seed_cols}) | "
                  "student |", "|---|---|---:|---:|---|---:|"]
        for a in out["accuracy"]:
            lines.append(f"| {_name(a['point'])} | {a['why']} | {_f(a['row']['mean'])} | {pct(a['mean'])} | "
                         + " / ".join(pct(x) for x in a["scores"]) + f" | {pct(ha and ha['score'])} |")
        lines.append("")
    if out["selected"] is not None:
        r = out["selected"]["row"]
        by = "lowest mean held-out loss" if s["select"] == "loss" else "best mean held-out accuracy"
        lines += ["## The selected point", "",
                  f"Selected on the held-out set alone ({by}; ties to the smaller dose): **{_name(r)}** (point "
                  f"`{point_label(r)}`), held-out loss {r['mean']:.4f} against the student's "
                  f"{_f(hl and hl['loss_per_example'])}"
                  + (f", Δ {_signed(r['delta'][0])} [{_signed(r['delta'][1])}, {_signed(r['delta'][2])}]"
                     if r["delta"] else "") + f"; ‖Δ‖/‖W‖ {_sci(r['rel_norm'])}.", ""]
    c = out["test"]
    lines += ["## The selected point on the test subset", "",
              f"| point | test (mean) | per seed ({seed_cols}) | student | Δ [95% CI] | bootstrap p | "
              "McNemar p per seed (only LaTen / only student) | Holm p | significant |",
              "|---|---:|---|---:|---|---:|---|---|:---:|"]
    if c is None:
        lines.append("| – | – | – | – | – | – | – | – | |")
    else:
        mc = ", ".join(f"{p_value(p)} ({a}/{z})" for a, z, p in c["mcnemar"])
        lines.append(f"| {_name(out['selected']['point'])} | {pct(c['score'])} | "
                     + " / ".join(pct(x) for x in c["scores"])
                     + f" | {pct(ht['score'])} | {pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}] | "
                     f"{p_value(c['p_boot'])} | {mc} | {', '.join(map(p_value, c['holm']))} | "
                     f"{'✓' if c['significant'] else ''} |")
    family = "the seeds' tests" + (", with those against the nulls below" if out["nulls"] else "")
    lines += ["", "Δ in points: the selected point's test score minus the untuned student's on the same questions; "
              "interval: paired bootstrap (questions and seeds resampled); McNemar: exact, per seed, on the "
              f"discordant questions; Holm: over {family}; significant: Δ > 0 and every seed's Holm p ≤ "
              f"{ALPHA:g}. The test subset played no part in any choice.", ""]
    for n in out["nulls"]:
        lines += _render_null(n, out, seeds, st)
    lines += [f"![held-out loss by step]({PLOT})", ""]
    return "\n".join(lines)


NULL_WHAT = {"random": "each located teacher vector replaced by a fixed random direction of its own norm (the same "
                       "sites, sizes and consistency across steps; none of the teacher's content)"}


def _comparison_row(name: str, c: dict, base: str) -> str:
    mc = ", ".join(f"{p_value(p)} ({a}/{z})" for a, z, p in c["mcnemar"])
    return (f"| {name} | {base} | {pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}] | {p_value(c['p_boot'])} | "
            f"{mc} | {', '.join(map(p_value, c['holm']))} | {'✓' if c['significant'] else ''} |")


def _render_null(n: dict, out: dict, seeds: list[int], st: dict) -> list[str]:
    """The selected point against one null: the null's run point by point, then the selected point's scores."""
    q = n["point"]
    seed_cols = " / ".join(f"s{x}" for x in seeds)
    lines = [f"## The selected point against its `{n['null']}` null", "",
             f"The selected point's run retrained per seed with {NULL_WHAT.get(n['null'], n['null'])}, and scored the "
             f"same way (run `{run_label(q['trained'], q['span'], q['penalty'], n['null'])}`; {n['grids']} of "
             f"{len(seeds)} seeds recorded). The hypernetwork learns from the student's own loss on align examples, "
             "so it can lower the held-out loss whatever it is fed; the teacher's part is the difference.", ""]
    if n["points"]:
        lines += ["| step | rate | LaTen held-out loss | null held-out loss (mean ± SD) | LaTen − null [95% CI] | "
                  "null ‖Δ‖/‖W‖ |", "|---:|---:|---:|---|---|---:|"]
        for p in n["points"]:
            d = p["delta"]
            mark = "**" if p["selected"] else ""
            lines.append(f"| {mark}{p['step']}{mark} | {p['rate']:g} | {_f(p['real'])} | {p['mean']:.4f} ± "
                         f"{p['sd']:.4f} | {_signed(d[0])} [{_signed(d[1])}, {_signed(d[2])}] | {_sci(p['rel_norm'])} |")
        lines += ["", "LaTen − null: held-out loss, paired bootstrap over the held-out examples and the seeds (negative: "
                  "the teacher's vectors lower the loss more than the null's). Bold: the selected point.", ""]
    held = n["heldout"]
    lines += [f"Held-out accuracy at the selected point: LaTen {pct(_mean(n['real_heldout']))}, null "
              f"{pct(_mean(held))}" + (f" (per seed {' / '.join(pct(x) for x in held)})" if held else "")
              + f"; test: LaTen {pct(out['test'] and out['test']['score'])}, null {pct(_mean(n['scores']))}"
              + (f" (per seed {' / '.join(pct(x) for x in n['scores'])})" if n["scores"] else "") + ".", ""]
    if n["vs_student"] is not None:
        lines += [f"| comparison on the test subset | against | Δ [95% CI] | bootstrap p | McNemar p per seed (only "
                  f"the first / only the second; {seed_cols}) | Holm p | significant |",
                  "|---|---|---|---:|---|---|:---:|"]
        if n["vs_null"] is not None:
            lines.append(_comparison_row("selected point − null", n["vs_null"], "the null, seed by seed"))
        lines.append(_comparison_row("null − student", n["vs_student"], "the untuned student"))
        lines.append("")
    return lines


def _mean(xs: list[float] | None) -> float | None:
    return None if not xs else sum(xs) / len(xs)


def _helps(out: dict, seeds: list[int]) -> list[str]:
    """Where the delta helps, where it hurts, and how much the seeds agree: from the grid's rows."""
    done = [r for r in out["rows"] if r["delta"] is not None]
    if not done:
        return []
    helps = [r for r in done if r["delta"][2] < 0]
    hurts = [r for r in done if r["delta"][1] > 0]
    best, worst = min(done, key=lambda r: r["delta"][0]), max(done, key=lambda r: r["delta"][0])
    agree = sum(r["below"] in (0, len(seeds)) for r in done)
    sds = sorted(r["sd"] for r in done)
    spread = max(done, key=lambda r: r["sd"])

    def where(rs: list[dict]) -> str:
        return "; ".join(_name(r) for r in rs) if rs else "none"

    return ["## Where the delta helps and where it hurts", "",
            f"* Lower held-out loss than the student (whole 95% interval below 0): {len(helps)} of {len(done)} "
            f"rows: {where(helps)}.",
            f"* Higher (whole interval above 0): {len(hurts)} of {len(done)} rows: {where(hurts)}.",
            f"* Neither: {len(done) - len(helps) - len(hurts)} rows. Largest decrease: {_name(best)} "
            f"({_signed(best['delta'][0])}); {'largest increase' if worst['delta'][0] > 0 else 'smallest decrease'}: "
            f"{_name(worst)} ({_signed(worst['delta'][0])}).",
            f"* Seed to seed: every seed on the same side of the student at {agree} of {len(done)} rows; the SD of "
            f"the held-out loss over seeds is {statistics.median(sds):.4f} at the median row and {spread['sd']:.4f} "
            f"at most ({_name(spread)}).", ""]


def plot(rec: dict, out: dict, path: Path) -> None:
    """Held-out loss by step: one panel per penalty, one colour per rate, one line style per schedule (seed
    range as error bars), the student as a horizontal line and the selected point starred."""
    plt = staged.pyplot()

    s = rec["meta"]["settings"]
    lams = [float(x) for x in s["penalties"]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"cycle": "-", "trained": "--"}
    fig, axes = plt.subplots(1, len(lams), figsize=(4.8 * len(lams), 4.0), sharey=True, squeeze=False)
    base = rec["student"].get("heldout_loss")
    sel = out["selected"]["point"] if out["selected"] else None
    for ax, lam in zip(axes[0], lams):
        for sch in s["schedules"]:
            for i, rate in enumerate(float(x) for x in s["rates"]):
                rs = [r for r in out["rows"] if r["schedule"] == sch and r["penalty"] == lam and r["rate"] == rate
                      and r["mean"] is not None]
                if not rs:
                    continue
                lo = [r["mean"] - min(p["loss_per_example"] for p in r["seeds"].values()) for r in rs]
                hi = [max(p["loss_per_example"] for p in r["seeds"].values()) - r["mean"] for r in rs]
                ax.errorbar([r["step"] for r in rs], [r["mean"] for r in rs], yerr=[lo, hi], capsize=2,
                            color=colours[i % len(colours)], linestyle=styles[sch], marker="o", markersize=3,
                            label=f"{sch}, rate {rate:g}")
        if base is not None:
            ax.axhline(base["loss_per_example"], color="grey", linestyle=":", linewidth=1, label="student")
        if sel is not None and sel["penalty"] == lam:
            ax.plot([sel["step"]], [out["selected"]["row"]["mean"]], marker="*", markersize=12, color="black",
                    linestyle="none", label="selected")
        ax.set_xscale("log")
        ax.set_xticks(s["steps"], [str(k) for k in s["steps"]])
        ax.minorticks_off()
        ax.set_xlabel("hypernetwork step")
        ax.set_title(f"λ {lam:g}")
    axes[0][0].set_ylabel("held-out answer loss (mean NLL per token)")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{s['name']}: held-out loss by step (bars: seed range)")
    fig.tight_layout()
    staged.save_png(fig, path)


def write_report(records: str | Path) -> Path:
    """laten-dose.md and laten-dose.png in the records directory, from its records; returns the .md's path."""
    return staged.write_report(records, REPORT, PLOT, load, derive, render, plot)
