"""The pilot curve's report (``pilot.md``, ``pilot.png``), derived from its committed records alone.

:mod:`pkt.studies.pilot` writes one small JSON record per finished piece of work into the records directory:
``pilot.json`` (the settings and the held-out set), ``student.json`` (the untuned student on the held-out set
and on the test subset), ``points/<point>.json`` (one LoRA build: its training summary, ‖ΔW‖/‖W‖ and its
held-out score) and ``tests/<budget>-s<seed>.json`` (the build whose lr the held-out set chose, on the test
subset). This module reads nothing else: no run directory, no weights, no model, so that the curve is re-derived
from a commit, byte for byte (no timestamps or paths in the output, rows in the grid's order, a seeded bootstrap,
PNG metadata without the library version).

Selection (:func:`select_lr`): per budget (train examples × epochs) the lr with the best mean held-out score
over the seeds; a tie goes to the smaller lr, the smaller update to the student (a tie says the held-out set
cannot tell them apart, so the more conservative one is kept). A budget is selected only once every (lr, seed)
of it has a record. The test subset is read only for the selected build, so it plays no part in the choice.

Comparison with the student on the test subset: the paired difference with its 95% interval (questions and seeds
resampled: :func:`pkt.experiment.stats.paired_difference`), the exact McNemar test on the discordant questions
of each seed (:func:`pkt.experiment.stats.mcnemar_exact`) and Holm's correction of those p-values across the
budgets reported (per seed). A budget counts as significant when Δ > 0 and every seed's Holm p ≤ 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

from pkt.errors import PktError
from pkt.experiment.rows import ALPHA
from pkt.experiment.stats import holm, mcnemar_exact, paired_difference
from pkt.io import write_text

META, STUDENT, POINTS, TESTS = "pilot.json", "student.json", "points", "tests"
REPORT, PLOT = "pilot.md", "pilot.png"


def point_name(n: int, epochs: float, lr: float, seed: int) -> str:
    return f"n{n}-e{epochs:g}-lr{lr:g}-s{seed}"


def budget_name(n: int, epochs: float) -> str:
    return f"n{n}-e{epochs:g}"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PktError(f"{path}: not a pilot record ({e})") from None
    if not isinstance(data, dict):
        raise PktError(f"{path}: not a pilot record (expected a JSON object)")
    return data


def load(records: str | Path) -> dict:
    """{"meta", "student", "points": {name: record}, "tests": {name: record}} of a records directory."""
    root = Path(records)
    if not (root / META).is_file():
        raise PktError(f"{root}: no {META} (not a pilot records directory, or the pilot has not started)")
    student = root / STUDENT
    return {"meta": _read(root / META), "student": _read(student) if student.is_file() else {},
            "points": {p.stem: _read(p) for p in sorted((root / POINTS).glob("*.json"))},
            "tests": {p.stem: _read(p) for p in sorted((root / TESTS).glob("*.json"))}}


def budgets(settings: dict) -> list[tuple[int, float]]:
    """The (train examples, epochs) budgets of a pilot's settings, in the order the pilot runs them."""
    grid = [(n, float(e)) for n in settings["train_examples"] for e in settings["epochs"]]
    grid += [(int(n), float(e)) for n, e in settings.get("extra_budgets") or []]
    return sorted(dict.fromkeys(grid), key=lambda b: (b[0] * b[1], b[0]))


def select_lr(points: dict, n: int, epochs: float, lrs: list[float], seeds: list[int]) -> tuple[float | None, dict]:
    """(selected lr or None while a point of the budget is missing, {lr: mean held-out score over seeds})."""
    means = {}
    for lr in lrs:
        scores = [points[k]["heldout"]["score"] for s in seeds if (k := point_name(n, epochs, lr, s)) in points]
        if len(scores) == len(seeds):
            means[lr] = sum(scores) / len(scores)
    if len(means) < len(lrs):
        return None, means
    # best mean; on a tie the smaller lr (sorted ascending, so max keeps the first of equals)
    best = max(sorted(means), key=lambda lr: round(means[lr], 12))
    return best, means


def compare(student_test: dict, tests: list[dict]) -> dict:
    """The selected builds of one budget (one per seed) against the student on the same test questions."""
    for t in tests:
        if t["test"]["ids"] != student_test["ids"]:
            raise PktError(f"test record of seed {t['seed']}: its questions differ from the student's test subset")
    method = [t["test"]["per_example"] for t in tests]
    base = [student_test["per_example"]] * len(tests)
    d = paired_difference(method, base)
    discord = []
    for m in method:
        only_a = sum(a > b for a, b in zip(m, student_test["per_example"]))
        only_b = sum(b > a for a, b in zip(m, student_test["per_example"]))
        discord.append((only_a, only_b, mcnemar_exact(only_a, only_b)))
    score = sum(t["test"]["score"] for t in tests) / len(tests)
    return {"score": score, "delta": d.mean, "low": d.low, "high": d.high, "p_boot": d.p, "mcnemar": discord}


def derive(rec: dict) -> dict:
    """Every number the report states, from the records ``rec`` (:func:`load`)."""
    s = rec["meta"]["settings"]
    lrs, seeds = [float(x) for x in s["lrs"]], list(s["seeds"])
    rows, selected = [], []
    for n, e in budgets(s):
        lr, means = select_lr(rec["points"], n, e, lrs, seeds)
        for x in lrs:
            for seed in seeds:
                p = rec["points"].get(point_name(n, e, x, seed))
                rows.append({"n": n, "epochs": e, "lr": x, "seed": seed, "point": p, "selected": lr == x})
        tests = [rec["tests"].get(f"{budget_name(n, e)}-s{seed}") for seed in seeds]
        for t in tests:
            if t is not None and (lr is None or float(t["lr"]) != lr):
                raise PktError(f"test record {budget_name(n, e)}-s{t['seed']}: lr {t['lr']:g}, but the held-out "
                               f"records select {'nothing yet' if lr is None else format(lr, 'g')} (a stale record)")
        done = lr is not None and all(tests) and "test" in rec["student"]
        selected.append({"n": n, "epochs": e, "lr": lr, "heldout": means.get(lr) if lr is not None else None,
                         "cmp": compare(rec["student"]["test"], tests) if done else None})
    reported = [b for b in selected if b["cmp"]]
    for i in range(len(seeds)):  # Holm across the budgets reported, per seed (each seed's McNemar is its own test)
        adj = holm([b["cmp"]["mcnemar"][i][2] for b in reported])
        for b, p in zip(reported, adj):
            b["cmp"].setdefault("holm", []).append(p)
    for b in reported:
        b["cmp"]["significant"] = b["cmp"]["delta"] > 0 and all(p <= ALPHA for p in b["cmp"]["holm"])
    return {"rows": rows, "selected": selected}


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def render(rec: dict, out: dict) -> str:
    meta, st = rec["meta"], rec["student"]
    s, h, t = meta["settings"], meta["heldout"], meta["test"]
    metric = meta.get("metric", "score")
    n_points = sum(r["point"] is not None for r in out["rows"])
    n_tests = sum(b["cmp"] is not None for b in out["selected"])
    lines = [f"# Pilot: {s['name']}", "",
             f"Plain LoRA of `{s['student']}` on {s['task']} ({metric}, {t['protocol']}), trained on the first N "
             f"examples of the PKT train split; batch {s['batch_size']} (micro-batch {s['micro_batch_size']}), "
             f"max length {s['max_length']}, rank {s['rank']}, α {s['alpha']:g}, {s['dtype']}, seeds "
             f"{', '.join(map(str, s['seeds']))}. For each budget the lr is chosen on the held-out set only "
             f"({h['description']}); the chosen build alone is evaluated on the test subset ({t['description']}).",
             "", f"Recorded: {n_points} of {len(out['rows'])} grid points, {n_tests} of {len(out['selected'])} "
             "test evaluations.", ""]
    sh, stt = st.get("heldout"), st.get("test")
    lines += [f"Untuned student: held-out {_pct(sh and sh['score'])}"
              + (f" (answer loss {sh['answer_loss']:.3f})" if sh and sh.get("answer_loss") is not None else "")
              + f", test {_pct(stt and stt['score'])}"
              + (f" ({round(stt['score'] * stt['n'])}/{stt['n']})" if stt else "") + ".", ""]
    lines += ["## Held-out grid", "",
              "| train examples | epochs | lr | seed | steps | final train loss | held-out | held-out answer loss "
              "| ‖ΔW‖/‖W‖ | selected |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in out["rows"]:
        p = r["point"]
        if p is None:
            lines.append(f"| {r['n']} | {r['epochs']:g} | {r['lr']:g} | {r['seed']} | – | – | – | – | – | |")
            continue
        b, ho = p["build"], p["heldout"]
        loss = "–" if ho.get("answer_loss") is None else f"{ho['answer_loss']:.3f}"
        lines.append(f"| {r['n']} | {r['epochs']:g} | {r['lr']:g} | {r['seed']} | {b['steps']} | "
                     f"{b['final_loss']:.3f} | {_pct(ho['score'])} | {loss} | {100 * b['update']['all']:.3f}% | "
                     f"{'✓' if r['selected'] else ''} |")
    lines += ["", "## The selected lr on the test subset", "",
              "| train examples | epochs | selected lr | held-out | test | student | Δ [95% CI] | bootstrap p "
              "| McNemar p (only LoRA / only student) | Holm p | significant |",
              "|---:|---:|---:|---:|---:|---:|---|---:|---|---|:---:|"]
    for b in out["selected"]:
        c = b["cmp"]
        lr = "–" if b["lr"] is None else f"{b['lr']:g}"
        head = f"| {b['n']} | {b['epochs']:g} | {lr} | {_pct(b['heldout'])} |"
        if c is None:
            lines.append(head + " – | – | – | – | – | – | |")
            continue
        mc = ", ".join(f"{_p(p)} ({a}/{z})" for a, z, p in c["mcnemar"])
        lines.append(f"{head} {_pct(c['score'])} | {_pct(stt['score'])} | {_pts(c['delta'])} [{_pts(c['low'])}, "
                     f"{_pts(c['high'])}] | {_p(c['p_boot'])} | {mc} | {', '.join(map(_p, c['holm']))} | "
                     f"{'✓' if c['significant'] else ''} |")
    sig = [b for b in out["selected"] if b["cmp"] and b["cmp"]["significant"]]
    first = min(sig, key=lambda b: (b["n"] * b["epochs"], b["n"]), default=None)
    lines += ["", ("Smallest budget at which LoRA significantly raises the student's test score: "
                   f"{first['n']} examples × {first['epochs']:g} epoch{'' if first['epochs'] == 1 else 's'} "
                   f"(lr {first['lr']:g})." if first else
                   "No budget recorded so far raises the student's test score significantly."), "",
              f"Δ in points, test score of the selected build minus the student's on the same questions; interval: "
              f"paired bootstrap (questions and seeds resampled); McNemar: exact, per seed, on the discordant "
              f"questions; Holm: across the {n_tests} budgets reported, per seed; significant: Δ > 0 and every "
              f"seed's Holm p ≤ {ALPHA:g}. Selection: best mean held-out score over the seeds, ties to the smaller "
              "lr. ‖ΔW‖/‖W‖: the trained update over the adapted matrices (`pkt study adapter-update`).", "",
              f"![pilot curve]({PLOT})", ""]
    return "\n".join(lines)


def plot(rec: dict, out: dict, path: Path) -> None:
    """Held-out score per lr and the selected builds' test score (with the interval of Δ) by train examples; one
    line style per epochs value."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rec["meta"]["settings"]
    epochs = sorted({r["epochs"] for r in out["rows"]})
    styles, markers = ["-", "--", "-.", ":"], ["s", "D", "^", "v"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, e in enumerate(epochs):
        for j, lr in enumerate(float(x) for x in s["lrs"]):
            by_n: dict[int, list[float]] = {}
            for r in out["rows"]:
                if r["epochs"] == e and r["lr"] == lr and r["point"]:
                    by_n.setdefault(r["n"], []).append(r["point"]["heldout"]["score"])
            if by_n:
                ns = sorted(by_n)
                ax.plot(ns, [100 * sum(by_n[n]) / len(by_n[n]) for n in ns], linestyle=styles[i % 4], marker="o",
                        color=colours[j % len(colours)], alpha=0.6, label=f"held-out, lr {lr:g}, {e:g} ep")
        done = [b for b in out["selected"] if b["cmp"] and b["epochs"] == e]
        if done:
            ax.errorbar([b["n"] for b in done], [100 * b["cmp"]["score"] for b in done], capsize=3,
                        yerr=[[100 * (b["cmp"]["delta"] - b["cmp"]["low"]) for b in done],
                              [100 * (b["cmp"]["high"] - b["cmp"]["delta"]) for b in done]],
                        color="black", marker=markers[i % 4], linestyle=styles[i % 4],
                        label=f"test, selected lr, {e:g} ep (95% CI of Δ)")
    for which, style in (("test", "--"), ("heldout", ":")):
        if rec["student"].get(which):
            ax.axhline(100 * rec["student"][which]["score"], color="grey", linestyle=style, linewidth=1,
                       label=f"student, {'held-out' if which == 'heldout' else which}")
    ax.set_xscale("log")
    ticks = sorted({r["n"] for r in out["rows"]})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training examples")
    ax.set_ylabel(f"{rec['meta'].get('metric', 'score')} (%)")
    ax.set_title(f"{s['name']}: LoRA of the student by budget")
    ax.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no library version in the bytes
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def write_report(records: str | Path) -> Path:
    """pilot.md and pilot.png in the records directory, from its records; returns pilot.md's path."""
    root = Path(records)
    rec = load(root)
    out = derive(rec)
    write_text(root / REPORT, render(rec, out))
    plot(rec, out, root / PLOT)
    return root / REPORT
