"""The pilot curve's report (``pilot.md``, ``pilot.png``), derived from its committed records alone.

:mod:`pkt.studies.pilot` writes one small JSON record per finished piece of work into the records directory:
``pilot.json`` (the settings and the held-out set), ``student.json`` (the untuned student on the held-out set
and on the test subset), ``points/<point>.json`` (one build: its training summary, ‖ΔW‖/‖W‖ and its
held-out score) and ``tests/<budget>-s<seed>.json`` (the build whose lr the held-out set chose, on the test
subset). A LoRA build's names are unprefixed; another init's carry it first (``pissa-n256-e1-lr0.0003-s0``), and
a test of the lr that matches LoRA's update size (``matched_test``) ends in ``-matched-s<seed>``.
This module reads nothing else: no run directory, no weights, no model, so that the curve is re-derived from a
commit, byte for byte (no timestamps or paths in the output, rows in the grid's order, a seeded bootstrap, PNG
metadata without the library version).

Selection (:func:`select_lr`): per init and budget (train examples × epochs) the lr with the best mean held-out
score over the seeds; a tie goes to the smaller lr, the smaller update to the student (a tie says the held-out set
cannot tell them apart, so the more conservative one is kept). A budget is selected only once every (lr, seed)
of it has a record. The test subset is read only for the selected build, so it plays no part in the choice.

Comparison with the student on the test subset: the paired difference with its 95% interval (questions and seeds
resampled: :func:`pkt.experiment.stats.paired_difference`), the exact McNemar test on the discordant questions
of each seed (:func:`pkt.experiment.stats.mcnemar_exact`) and Holm's correction of those p-values across the
budgets reported (per seed). A budget counts as significant when Δ > 0 and every seed's Holm p ≤ 0.05.

Several inits (``inits``): each init's selected build is compared with the student and with LoRA's selected build
of the same budget, paired on the same questions, and Holm's correction runs over every comparison the report
states. "Matched update size" (:func:`matched_lr`): for each init, the lr whose ‖ΔW‖/‖W‖ is closest (by ratio)
to that of LoRA's selected build, read on the held-out set (and on the test subset when ``matched_test``).
A config of LoRA alone gives the report it gave before inits existed.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from pkt.errors import PktError
from pkt.studies import staged
from pkt.studies.staged import p_value, pct, pts, read_record
from pkt.experiment.rows import ALPHA
from pkt.experiment.stats import holm, mcnemar_exact, paired_difference

META, STUDENT, POINTS, TESTS = "pilot.json", "student.json", "points", "tests"
REPORT, PLOT = "pilot.md", "pilot.png"
LORA = "lora"
# how each init is built: `pkt postpkt --init <init>` (seeking-random: --init seeking --control random)
INIT_CLI = {"lora": "--init lora", "pissa": "--init pissa", "seeking": "--init seeking",
            "seeking-random": "--init seeking --control random"}


def _prefix(init: str) -> str:
    # LoRA's names are those of a pilot before inits existed, so its stages and records keep their names
    return "" if init == LORA else f"{init}-"


def point_name(n: int, epochs: float, lr: float, seed: int, init: str = LORA) -> str:
    return f"{_prefix(init)}n{n}-e{epochs:g}-lr{lr:g}-s{seed}"


def budget_name(n: int, epochs: float) -> str:
    return f"n{n}-e{epochs:g}"


def test_name(n: int, epochs: float, seed: int, init: str = LORA, matched: bool = False) -> str:
    """The record name of a test evaluation: the selected build's, or (``matched``) the matched-update build's."""
    return f"{_prefix(init)}{budget_name(n, epochs)}{'-matched' if matched else ''}-s{seed}"


def inits(settings: dict) -> list[str]:
    """The inits of a pilot's settings in the order it runs them: LoRA first (the others are compared with it)."""
    listed = settings.get("inits") or [LORA]
    return [LORA] + [i for i in listed if i != LORA]


def load(records: str | Path) -> dict:
    """{"meta", "student", "points": {name: record}, "tests": {name: record}} of a records directory."""
    root = staged.records_root(records, META, "pilot", "the pilot")
    student = root / STUDENT
    return {"meta": read_record(root / META, "pilot"),
            "student": read_record(student, "pilot") if student.is_file() else {},
            "points": staged.read_records(root / POINTS, "pilot"), "tests": staged.read_records(root / TESTS, "pilot")}


def budgets(settings: dict) -> list[tuple[int, float]]:
    """The (train examples, epochs) budgets of a pilot's settings, in the order the pilot runs them."""
    grid = [(n, float(e)) for n in settings["train_examples"] for e in settings["epochs"]]
    grid += [(int(n), float(e)) for n, e in settings.get("extra_budgets") or []]
    return sorted(dict.fromkeys(grid), key=lambda b: (b[0] * b[1], b[0]))


def _means(points: dict, n: int, epochs: float, lrs: list[float], seeds: list[int], init: str, value) -> dict:
    """{lr: mean over the seeds of value(point)} for the lrs whose every seed has a record."""
    means = {}
    for lr in lrs:
        got = [value(points[k]) for s in seeds if (k := point_name(n, epochs, lr, s, init)) in points]
        if len(got) == len(seeds):
            means[lr] = sum(got) / len(got)
    return means


def select_lr(points: dict, n: int, epochs: float, lrs: list[float], seeds: list[int],
              init: str = LORA) -> tuple[float | None, dict]:
    """(selected lr or None while a point of the budget is missing, {lr: mean held-out score over seeds})."""
    means = _means(points, n, epochs, lrs, seeds, init, lambda p: p["heldout"]["score"])
    if len(means) < len(lrs):
        return None, means
    # best mean; on a tie the smaller lr (sorted ascending, so max keeps the first of equals)
    best = max(sorted(means), key=lambda lr: round(means[lr], 12))
    return best, means


def mean_updates(points: dict, n: int, epochs: float, lrs: list[float], seeds: list[int], init: str = LORA) -> dict:
    """{lr: mean ‖ΔW‖/‖W‖ over the seeds} of an init's builds of one budget."""
    return _means(points, n, epochs, lrs, seeds, init, lambda p: p["build"]["update"]["all"])


def matched_lr(points: dict, n: int, epochs: float, lrs: list[float], seeds: list[int], init: str,
               target: float | None) -> float | None:
    """The lr of ``init`` whose mean ‖ΔW‖/‖W‖ is closest to ``target`` (LoRA's selected build's) by ratio, the
    smaller lr on a tie; None while a point is missing or the target is unknown. By ratio because the update
    sizes of a sweep span orders of magnitude: 0.1% is as far from 0.2% as 0.2% is from 0.4%."""
    ups = mean_updates(points, n, epochs, lrs, seeds, init)
    if target is None or target <= 0 or len(ups) < len(lrs):
        return None

    def distance(lr: float) -> float:
        return round(abs(math.log(ups[lr] / target)), 12) if ups[lr] > 0 else math.inf

    return min(sorted(ups), key=distance)


def compare(student_test: dict, tests: list[dict], base: list[dict] | None = None, against: str = "the student's") \
        -> dict:
    """The selected builds of one budget (one per seed) against the student on the same test questions, or, with
    ``base`` (one test result per seed, e.g. LoRA's selected builds), against those, seed by seed."""
    base = base or [student_test] * len(tests)
    for t, b in zip(tests, base, strict=True):
        if t["test"]["ids"] != b["ids"]:
            raise PktError(f"test record of seed {t['seed']}: its questions differ from {against} test subset")
    method = [t["test"]["per_example"] for t in tests]
    d = paired_difference(method, [b["per_example"] for b in base])
    discord = []
    for m, b in zip(method, base):
        only_a = sum(x > y for x, y in zip(m, b["per_example"]))
        only_b = sum(y > x for x, y in zip(m, b["per_example"]))
        discord.append((only_a, only_b, mcnemar_exact(only_a, only_b)))
    score = sum(t["test"]["score"] for t in tests) / len(tests)
    return {"score": score, "delta": d.mean, "low": d.low, "high": d.high, "p_boot": d.p, "mcnemar": discord}


def sweep_seeds(s: dict) -> list[int]:
    """The seeds whose every lr has a held-out record (the settings' ``select_seeds``, else every seed); the
    other seeds have a test record of each init's selected lr only."""
    return list(s.get("select_seeds") or s["seeds"])


def _tests(rec: dict, n: int, e: float, seeds: list[int], init: str, lr: float | None, matched: bool = False) \
        -> list[dict | None]:
    """The test records of one init and budget, each checked against the lr the held-out records give."""
    found = [rec["tests"].get(test_name(n, e, seed, init, matched)) for seed in seeds]
    for seed, t in zip(seeds, found):
        if t is not None and (lr is None or float(t["lr"]) != lr):
            what = "match LoRA's update size at" if matched else "select"
            raise PktError(f"test record {test_name(n, e, seed, init, matched)}: lr {t['lr']:g}, but the held-out "
                           f"records {what} {'nothing yet' if lr is None else format(lr, 'g')} (a stale record)")
    return found


def derive(rec: dict) -> dict:
    """Every number the report states, from the records ``rec`` (:func:`load`)."""
    s = rec["meta"]["settings"]
    lrs, seeds, sweep = [float(x) for x in s["lrs"]], list(s["seeds"]), sweep_seeds(s)
    rows, selected = [], []
    for n, e in budgets(s):
        lora = None
        for init in inits(s):
            lr, means = select_lr(rec["points"], n, e, lrs, sweep, init)
            for x in lrs:
                for seed in sweep:
                    p = rec["points"].get(point_name(n, e, x, seed, init))
                    rows.append({"init": init, "n": n, "epochs": e, "lr": x, "seed": seed, "point": p,
                                 "selected": lr == x})
            tests = _tests(rec, n, e, seeds, init, lr)
            done = lr is not None and all(tests) and "test" in rec["student"]
            ups = mean_updates(rec["points"], n, e, lrs, sweep, init)
            b = {"init": init, "n": n, "epochs": e, "lr": lr, "heldout": means.get(lr) if lr is not None else None,
                 "means": means, "updates": ups, "tests": tests if done else None,
                 "cmp": compare(rec["student"]["test"], tests) if done else None}
            if init == LORA:
                lora = b
            else:
                b["vs_lora"] = (compare(None, tests, [t["test"] for t in lora["tests"]], "LoRA's")
                                if done and lora["tests"] else None)
                target = lora["updates"].get(lora["lr"]) if lora["lr"] is not None else None
                m = matched_lr(rec["points"], n, e, lrs, sweep, init, target)
                mt = _tests(rec, n, e, seeds, init, m, matched=True) if m != lr else [None]
                b["matched"] = {"lr": m, "target": target, "update": ups.get(m), "heldout": means.get(m),
                                "lora_heldout": lora["heldout"], "same": m is not None and m == lr,
                                "cmp": compare(None, mt, [t["test"] for t in lora["tests"]], "LoRA's")
                                if m is not None and m != lr and all(mt) and lora["tests"] else None}
            selected.append(b)
        # Seeking against its controls (the same procedure on other blocks of the teacher): whether the blocks
        # Seeking chose matter, paired seed by seed on the same questions
        budget = {b["init"]: b for b in selected if (b["n"], b["epochs"]) == (n, e)}
        seeking = budget.get("seeking")
        for init, b in budget.items():
            if seeking is not None and init.startswith("seeking-"):
                b["vs_seeking"] = (compare(None, seeking["tests"], [t["test"] for t in b["tests"]], f"{init}'s")
                                   if seeking["tests"] and b["tests"] else None)
    # Holm across every comparison the report states (per seed: each seed's McNemar is its own test)
    stated = [c for b in selected for c in (b["cmp"], b.get("vs_lora"), (b.get("matched") or {}).get("cmp"),
                                            b.get("vs_seeking")) if c]
    for i in range(len(seeds)):
        adj = holm([c["mcnemar"][i][2] for c in stated])
        for c, p in zip(stated, adj):
            c.setdefault("holm", []).append(p)
    for c in stated:
        c["significant"] = c["delta"] > 0 and all(p <= ALPHA for p in c["holm"])
        c["differs"] = all(p <= ALPHA for p in c["holm"])
    churn = question_churn(selected, seeds)
    on_grid = {id(r["point"]) for r in rows if r["point"] is not None}
    # records of points the config's grid no longer holds (a grid trimmed while it ran): shown, never selected from
    off_grid = sorted((p for p in rec["points"].values() if id(p) not in on_grid),
                      key=lambda p: (p.get("init", LORA), p["train_examples"], float(p["epochs"]), float(p["lr"]),
                                     p["seed"]))
    return {"rows": rows, "selected": selected, "n_comparisons": len(stated), "off_grid": off_grid, "churn": churn}


def _discordant(a: dict, b: dict) -> int:
    """Questions one test record gets right and the other wrong (the same questions, in the same order)."""
    x, y = a["test"]["per_example"], b["test"]["per_example"]
    if a["test"]["ids"] != b["test"]["ids"]:
        raise PktError("test records on different questions cannot be paired")
    return sum(bool(u) != bool(v) for u, v in zip(x, y))


def question_churn(selected: list[dict], seeds: list[int]) -> list[dict]:
    """How many test questions change verdict between two selected builds of one budget: two inits at the same seed
    (the same examples in the same order and the same seed; the init differs, and with it its selected lr and its
    default dropout), against one init's own seed-to-seed change (the noise a seed alone makes). Needs both builds
    tested on every seed (≥ 2); else nothing."""
    if len(seeds) < 2:
        return []
    out = []
    for (n, e) in dict.fromkeys((b["n"], b["epochs"]) for b in selected):
        done = {b["init"]: b["tests"] for b in selected if (b["n"], b["epochs"]) == (n, e) and b["tests"]}
        if len(done) < 2:
            continue
        names = list(done)
        own = {i: [_discordant(done[i][a], done[i][b]) for a, b in itertools.combinations(range(len(seeds)), 2)]
               for i in names}
        for a, b in itertools.combinations(names, 2):
            same = [_discordant(x, y) for x, y in zip(done[a], done[b])]
            out.append({"n": n, "epochs": e, "a": a, "b": b, "same_seed": same, "a_seeds": own[a],
                        "b_seeds": own[b]})
    return out


def _churn_lines(out: dict) -> list[str]:
    if not out.get("churn"):
        return []
    lines = ["", "## Which questions change", "",
             "Test questions whose verdict differs between two selected builds of the same budget: two inits at the "
             "same seed (the same examples in the same order and the same seed; the init differs, with its selected "
             "lr and default dropout), beside each init's own change from one seed to another (what a seed alone "
             "moves). A pair of inits "
             "whose same-seed count is no larger than their seed-to-seed counts changes which questions are solved "
             "no more than reseeding does.", "",
             "| first | second | train examples | epochs | same seed (per seed) | first, seed to seed | second, seed to "
             "seed |", "|---|---|---:|---:|---|---|---|"]
    for c in out["churn"]:
        def cell(v):
            return f"{sum(v) / len(v):.1f} ({', '.join(map(str, v))})"
        lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['epochs']:g} | {cell(c['same_seed'])} | "
                     f"{cell(c['a_seeds'])} | {cell(c['b_seeds'])} |")
    return lines


def _point_cells(p: dict) -> str:
    """steps | final train loss | held-out | held-out answer loss | ‖ΔW‖/‖W‖ of a held-out point's record."""
    b, ho = p["build"], p["heldout"]
    loss = "–" if ho.get("answer_loss") is None else f"{ho['answer_loss']:.3f}"
    return f"{b['steps']} | {b['final_loss']:.3f} | {pct(ho['score'])} | {loss} | {_upd(b['update']['all'])}"


def _off_grid(out: dict) -> list[str]:
    """The held-out records outside the config's grid, or nothing when every record is on it."""
    if not out.get("off_grid"):
        return []
    lines = ["", "Recorded outside the config's grid (points of an earlier version of it, whose records stay valid: a "
             "point's key holds its own budget and lr); shown for completeness, not selected from:", "",
             "| init | train examples | epochs | lr | seed | steps | final train loss | held-out | held-out answer loss "
             "| ‖ΔW‖/‖W‖ |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in out["off_grid"]:
        lines.append(f"| {p.get('init', LORA)} | {p['train_examples']} | {float(p['epochs']):g} | {float(p['lr']):g} | "
                     f"{p['seed']} | {_point_cells(p)} |")
    return lines


def _seeds_text(s: dict) -> str:
    seeds = ", ".join(map(str, s["seeds"]))
    if not s.get("select_seeds"):
        return seeds
    return (f"{seeds} (the lr grid is built and selected on seed {', '.join(map(str, s['select_seeds']))}; "
            "the other seeds build each init's selected lr alone, for the test subset)")


def _per_seed(out: dict) -> list[str]:
    """Each selected build's test score and ‖ΔW‖/‖W‖ seed by seed: the spread that the seeds' mean hides."""
    lines = ["", "## The selected builds seed by seed", "",
             "| init | train examples | epochs | lr | seed | test | ‖ΔW‖/‖W‖ |", "|---|---:|---:|---:|---:|---:|---:|"]
    for b in out["selected"]:
        for t in b["tests"] or []:  # with select_seeds every test record carries its build's update
            up = (t.get("update") or {}).get("all")
            lines.append(f"| {b['init']} | {b['n']} | {b['epochs']:g} | {b['lr']:g} | {t['seed']} | "
                         f"{pct(t['test']['score'])} | {_upd(up)} |")
    return lines


def render(rec: dict, out: dict) -> str:
    """pilot.md: LoRA's report when LoRA is the only init (as before inits existed), else the per-init one."""
    return (render_lora if inits(rec["meta"]["settings"]) == [LORA] else render_inits)(rec, out)


def render_lora(rec: dict, out: dict) -> str:
    meta, st = rec["meta"], rec["student"]
    s, h, t = meta["settings"], meta["heldout"], meta["test"]
    metric = meta.get("metric", "score")
    n_points = sum(r["point"] is not None for r in out["rows"])
    n_tests = sum(b["cmp"] is not None for b in out["selected"])
    lines = [f"# Pilot: {s['name']}", "",
             f"Plain LoRA of `{s['student']}` on {s['task']} ({metric}, {t['protocol']}), trained on the first N "
             f"examples of the PKT train split; batch {s['batch_size']} (micro-batch {s['micro_batch_size']}), "
             f"max length {s['max_length']}, rank {s['rank']}, α {s['alpha']:g}, {s['dtype']}, seeds "
             f"{_seeds_text(s)}. For each budget the lr is chosen on the held-out set only "
             f"({h['description']}); the chosen build alone is evaluated on the test subset ({t['description']}).",
             "", f"Recorded: {n_points} of {len(out['rows'])} grid points, {n_tests} of {len(out['selected'])} "
             "test evaluations.", ""]
    sh, stt = st.get("heldout"), st.get("test")
    lines += [f"Untuned student: held-out {pct(sh and sh['score'])}"
              + (f" (answer loss {sh['answer_loss']:.3f})" if sh and sh.get("answer_loss") is not None else "")
              + f", test {pct(stt and stt['score'])}"
              + (f" ({round(stt['score'] * stt['n'])}/{stt['n']})" if stt else "") + ".", ""]
    lines += ["## Held-out grid", "",
              "| train examples | epochs | lr | seed | steps | final train loss | held-out | held-out answer loss "
              "| ‖ΔW‖/‖W‖ | selected |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in out["rows"]:
        p = r["point"]
        if p is None:
            lines.append(f"| {r['n']} | {r['epochs']:g} | {r['lr']:g} | {r['seed']} | – | – | – | – | – | |")
            continue
        lines.append(f"| {r['n']} | {r['epochs']:g} | {r['lr']:g} | {r['seed']} | {_point_cells(p)} | "
                     f"{'✓' if r['selected'] else ''} |")
    lines += _off_grid(out)
    lines += ["", "## The selected lr on the test subset", "",
              "| train examples | epochs | selected lr | held-out | test | student | Δ [95% CI] | bootstrap p "
              "| McNemar p (only LoRA / only student) | Holm p | significant |",
              "|---:|---:|---:|---:|---:|---:|---|---:|---|---|:---:|"]
    for b in out["selected"]:
        c = b["cmp"]
        lr = "–" if b["lr"] is None else f"{b['lr']:g}"
        head = f"| {b['n']} | {b['epochs']:g} | {lr} | {pct(b['heldout'])} |"
        if c is None:
            lines.append(head + " – | – | – | – | – | – | |")
            continue
        mc = ", ".join(f"{p_value(p)} ({a}/{z})" for a, z, p in c["mcnemar"])
        lines.append(f"{head} {pct(c['score'])} | {pct(stt['score'])} | {pts(c['delta'])} [{pts(c['low'])}, "
                     f"{pts(c['high'])}] | {p_value(c['p_boot'])} | {mc} | {', '.join(map(p_value, c['holm']))} | "
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


def _cmp_cells(c: dict) -> str:
    """Δ [95% CI] | bootstrap p | McNemar p (discordant counts) per seed | Holm p per seed"""
    mc = ", ".join(f"{p_value(p)} ({a}/{z})" for a, z, p in c["mcnemar"])
    return (f"{pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}] | {p_value(c['p_boot'])} | {mc} | "
            f"{', '.join(map(p_value, c['holm']))}")


def _direction(c: dict) -> str:
    return ("higher" if c["delta"] > 0 else "lower") if c["differs"] else ""


def _pair_row(b: dict, lrs: tuple, c: dict | None, second_score: float | None) -> str:
    """A row of a table of paired comparisons (init against LoRA, Seeking against a control): ``b``'s budget, the two
    builds' lrs and test scores (``c["score"]`` is the first's), the difference and its tests."""
    lr = " / ".join("–" if x is None else f"{x:g}" for x in lrs)
    head = f"| {b['init']} | {b['n']} | {b['epochs']:g} | {lr} |"
    return head + (" – | – | – | – | – | |" if c is None else
                   f" {pct(c['score'])} / {pct(second_score)} | {_cmp_cells(c)} | {_direction(c)} |")


def _upd(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.3f}%"


def render_inits(rec: dict, out: dict) -> str:
    """pilot.md of a pilot of several inits: the grid, each init's held-out curve over lr with its update size, the
    selected builds against the student and against LoRA, and the inits at LoRA's update size."""
    meta, st = rec["meta"], rec["student"]
    s, h, t = meta["settings"], meta["heldout"], meta["test"]
    metric = meta.get("metric", "score")
    names = inits(s)
    lrs = [float(x) for x in s["lrs"]]
    n_points = sum(r["point"] is not None for r in out["rows"])
    tested = [b for b in out["selected"] if b["cmp"] is not None]
    matched_tested = [b for b in out["selected"] if (b.get("matched") or {}).get("cmp")]
    built = "; ".join(f"{i}: `pkt postpkt {INIT_CLI[i]}`" for i in names)
    # the extraction takes extract_samples examples or the whole split if it is smaller; records made before the
    # build kept the count say only the bound
    used = {p["build"]["extraction"].get("n_samples") for p in rec["points"].values()
            if isinstance(p.get("build", {}).get("extraction"), dict)} - {None}
    n_extract = f"{used.pop()}" if len(used) == 1 else f"up to {s['extract_samples']}"
    teacher = (f" Seeking's factors come from `{s['teacher']}` ({n_extract} examples of the extract "
               "split), extracted once and shared by every Seeking and seeking-random build."
               if any(i.startswith("seeking") for i in names) else "")
    lines = [f"# Pilot: {s['name']}", "",
             f"{', '.join(names)} of `{s['student']}` on {s['task']} ({metric}, {t['protocol']}), each built as "
             f"({built}), trained on the first N examples of the PKT train split; batch {s['batch_size']} "
             f"(micro-batch {s['micro_batch_size']}), max length {s['max_length']}, rank {s['rank']}, "
             f"α {s['alpha']:g}, {s['dtype']}, seeds {_seeds_text(s)}.{teacher} For each init and "
             f"budget the lr is chosen on the held-out set only ({h['description']}); each init's chosen build alone "
             f"is evaluated on the test subset ({t['description']}).",
             "", f"Recorded: {n_points} of {len(out['rows'])} grid points, {len(tested)} of {len(out['selected'])} "
             "selected builds' test evaluations"
             + (f", {len(matched_tested)} matched-update test evaluations" if s.get("matched_test") else "") + ".",
             ""]
    sh, stt = st.get("heldout"), st.get("test")
    lines += [f"Untuned student: held-out {pct(sh and sh['score'])}"
              + (f" (answer loss {sh['answer_loss']:.3f})" if sh and sh.get("answer_loss") is not None else "")
              + f", test {pct(stt and stt['score'])}"
              + (f" ({round(stt['score'] * stt['n'])}/{stt['n']})" if stt else "") + ".", ""]

    lines += ["## Held-out grid", "",
              "| init | train examples | epochs | lr | seed | steps | final train loss | held-out | held-out answer "
              "loss | ‖ΔW‖/‖W‖ | ‖B₀A₀‖/‖W‖ | selected |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in out["rows"]:
        p = r["point"]
        head = f"| {r['init']} | {r['n']} | {r['epochs']:g} | {r['lr']:g} | {r['seed']} |"
        if p is None:
            lines.append(head + " – | – | – | – | – | – | |")
            continue
        start = (p["build"].get("init_update") or {}).get("all", 0.0)  # LoRA starts at B₀ = 0
        lines.append(f"{head} {_point_cells(p)} | {_upd(start)} | {'✓' if r['selected'] else ''} |")

    lines += _off_grid(out)
    lines += ["", "## Each init's held-out curve over lr", "",
              "Held-out score (‖ΔW‖/‖W‖ of the build), means over the seeds; ✓ the selected lr.", "",
              "| init | train examples | epochs | " + " | ".join(f"lr {x:g}" for x in lrs) + " | selected lr |",
              "|---|---:|---:|" + "---:|" * len(lrs) + "---:|"]
    for b in out["selected"]:
        cells = [f"{pct(b['means'][x])} ({_upd(b['updates'].get(x))}){' ✓' if b['lr'] == x else ''}"
                 if x in b["means"] else "–" for x in lrs]
        lines.append(f"| {b['init']} | {b['n']} | {b['epochs']:g} | " + " | ".join(cells) +
                     f" | {'–' if b['lr'] is None else format(b['lr'], 'g')} |")

    lines += ["", "## The selected lr on the test subset, against the student", "",
              "| init | train examples | epochs | selected lr | held-out | test | student | Δ [95% CI] | bootstrap p "
              "| McNemar p (only init / only student) | Holm p | significant |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|:---:|"]
    for b in out["selected"]:
        c = b["cmp"]
        lr = "–" if b["lr"] is None else f"{b['lr']:g}"
        head = f"| {b['init']} | {b['n']} | {b['epochs']:g} | {lr} | {pct(b['heldout'])} |"
        lines.append(head + (" – | – | – | – | – | – | |" if c is None else
                             f" {pct(c['score'])} | {pct(stt['score'])} | {_cmp_cells(c)} | "
                             f"{'✓' if c['significant'] else ''} |"))

    if s.get("select_seeds"):
        lines += _per_seed(out)

    lora_of = {(b["n"], b["epochs"]): b for b in out["selected"] if b["init"] == LORA}
    lines += ["", "## Each init against LoRA, both at their selected lr", "",
              "| init | train examples | epochs | lr (init / LoRA) | test (init / LoRA) | Δ [95% CI] | bootstrap p "
              "| McNemar p (only init / only LoRA) | Holm p | differs |",
              "|---|---:|---:|---|---|---|---:|---|---|:---:|"]
    for b in out["selected"]:
        if b["init"] == LORA:
            continue
        lo, c = lora_of[b["n"], b["epochs"]], b["vs_lora"]
        lines.append(_pair_row(b, (b["lr"], lo["lr"]), c, lo["cmp"]["score"] if c else None))

    controls = [b for b in out["selected"] if "vs_seeking" in b]
    if controls:
        seeking_of = {(b["n"], b["epochs"]): b for b in out["selected"] if b["init"] == "seeking"}
        lines += ["", "## Seeking against its controls, both at their selected lr", "",
                  "Seeking's build minus the control's (the same procedure on other blocks of the teacher's layers), "
                  "seed by seed on the same questions: whether the blocks Seeking selects matter.", "",
                  "| control | train examples | epochs | lr (Seeking / control) | test (Seeking / control) | Δ [95% CI] "
                  "| bootstrap p | McNemar p (only Seeking / only control) | Holm p | differs |",
                  "|---|---:|---:|---|---|---|---:|---|---|:---:|"]
        for b in controls:
            sk, c = seeking_of[b["n"], b["epochs"]], b["vs_seeking"]
            lines.append(_pair_row(b, (sk["lr"], b["lr"]), c, b["cmp"]["score"] if c else None))

    lines += _churn_lines(out)
    lines += ["", "## At matched update size", "",
              "For each init, the lr whose ‖ΔW‖/‖W‖ (mean over the seeds) is closest, by ratio, to that of LoRA's "
              "selected build: the inits compared at the same size of the change that reached the model. "
              + ("The matched builds are also evaluated on the test subset (`matched_test`)." if s.get("matched_test")
                 else "Read on the held-out set only (`matched_test: false`): no test evaluation chose or checks it."),
              "", "| init | train examples | epochs | LoRA's ‖ΔW‖/‖W‖ | matched lr | its ‖ΔW‖/‖W‖ | held-out (init / "
              "LoRA) | test Δ vs LoRA [95% CI] | Holm p |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for b in out["selected"]:
        if b["init"] == LORA:
            continue
        m = b["matched"]
        if m["same"]:
            test = "the selected build (above)"
            holm_p = "–"
        elif m["cmp"] is not None:
            c = m["cmp"]
            test = f"{pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}]"
            holm_p = ", ".join(map(p_value, c["holm"]))
        else:
            test, holm_p = "–", "–"
        lines.append(f"| {b['init']} | {b['n']} | {b['epochs']:g} | {_upd(m['target'])} | "
                     f"{'–' if m['lr'] is None else format(m['lr'], 'g')} | {_upd(m['update'])} | "
                     f"{pct(m['heldout'])} / {pct(m['lora_heldout'])} | {test} | {holm_p} |")

    lines += ["", f"Δ in points: the test score of the first build minus the second's (the student's, LoRA's "
                  f"selected build of the same budget and seed{', or the control' + chr(39) + 's' if controls else ''}"
                  f") on the same questions; interval: paired bootstrap "
                  f"(questions and seeds resampled); McNemar: exact, per seed, on the discordant questions; Holm: "
                  f"across all {out['n_comparisons']} comparisons stated above, per seed; significant: Δ > 0 and every "
                  f"seed's Holm p ≤ {ALPHA:g}; differs: every seed's Holm p ≤ {ALPHA:g}, in the direction named. "
                  "Selection: per init, the best mean held-out score over the seeds, ties to the smaller lr. "
                  "‖ΔW‖/‖W‖: the change that reached the evaluated model, the merged build minus the student, over "
                  "the adapted matrices (for LoRA its adapter's product, the same change); ‖B₀A₀‖/‖W‖: the size of "
                  "the init's own adapter at step 0, which PiSSA and Seeking subtract from W, so that their model at "
                  "step 0 is the student.", "", f"![pilot: held-out score by lr and by update size]({PLOT})", ""]
    return "\n".join(lines)


def plot(rec: dict, out: dict, path: Path) -> None:
    """pilot.png: LoRA's curve by budget when LoRA is the only init, else each init's held-out score by lr and by
    update size (:func:`figure_lora`, :func:`figure_inits`)."""
    plt = staged.pyplot()

    fig = (figure_lora if inits(rec["meta"]["settings"]) == [LORA] else figure_inits)(plt, rec, out)
    staged.save_png(fig, path)


def figure_lora(plt, rec: dict, out: dict):
    """Two panels by train examples, one line style per epochs value: the held-out score per lr with the selected
    builds' test score (and the interval of Δ), and the held-out answer loss per lr."""
    s = rec["meta"]["settings"]
    epochs = sorted({r["epochs"] for r in out["rows"]})
    styles, markers = ["-", "--", "-.", ":"], ["s", "D", "^", "v"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for i, e in enumerate(epochs):
        for j, lr in enumerate(float(x) for x in s["lrs"]):
            by_n: dict[int, list[dict]] = {}
            for r in out["rows"]:
                if r["epochs"] == e and r["lr"] == lr and r["point"]:
                    by_n.setdefault(r["n"], []).append(r["point"]["heldout"])
            if by_n:
                ns = sorted(by_n)
                style = {"linestyle": styles[i % 4], "marker": "o", "color": colours[j % len(colours)], "alpha": 0.6,
                         "label": f"held-out, lr {lr:g}, {e:g} ep"}
                ax.plot(ns, [100 * sum(h["score"] for h in by_n[n]) / len(by_n[n]) for n in ns], **style)
                losses = [(n, [h["answer_loss"] for h in by_n[n]]) for n in ns]
                losses = [(n, sum(v) / len(v)) for n, v in losses if all(x is not None for x in v)]
                if losses:
                    loss_ax.plot(*zip(*losses), **style)
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
    held = rec["student"].get("heldout") or {}
    if held.get("answer_loss") is not None:
        loss_ax.axhline(held["answer_loss"], color="grey", linestyle=":", linewidth=1, label="student, held-out")
    loss_ax.set_xscale("log")
    loss_ax.set_xticks(ticks, [str(n) for n in ticks])
    loss_ax.minorticks_off()
    loss_ax.set_xlabel("training examples")
    loss_ax.set_ylabel("held-out answer loss (nats / token)")
    loss_ax.set_title("held-out answer loss (the training answers' format)")
    loss_ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def figure_inits(plt, rec: dict, out: dict):
    """Two panels: each init's mean held-out score against lr (its selected lr marked), and against its update size
    ‖ΔW‖/‖W‖ (LoRA's selected size drawn as a vertical line: the matched-update reading); one colour per init, one
    line style per budget."""
    s = rec["meta"]["settings"]
    names, styles = inits(s), ["-", "--", "-.", ":"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (by_lr, by_size) = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
    budget_list = budgets(s)
    for b in out["selected"]:
        k, i = budget_list.index((b["n"], b["epochs"])), names.index(b["init"])
        xs = sorted(b["means"])
        if not xs:
            continue
        style = dict(color=colours[i % len(colours)], linestyle=styles[k % 4], marker="o", alpha=0.8)
        label = b["init"] + ("" if len(budget_list) == 1 else f", {b['n']} x {b['epochs']:g} ep")
        by_lr.plot(xs, [100 * b["means"][x] for x in xs], label=label, **style)
        sized = [x for x in xs if x in b["updates"]]
        by_size.plot([100 * b["updates"][x] for x in sized], [100 * b["means"][x] for x in sized], **style)
        if b["lr"] is not None:
            by_lr.plot([b["lr"]], [100 * b["means"][b["lr"]]], marker="*", markersize=12, linestyle="none",
                       color=colours[i % len(colours)])
            if b["init"] == LORA and b["lr"] in b["updates"]:
                by_size.axvline(100 * b["updates"][b["lr"]], color=colours[i % len(colours)], linewidth=1,
                                linestyle=styles[k % 4], alpha=0.5)
    if rec["student"].get("heldout"):
        for ax in (by_lr, by_size):
            ax.axhline(100 * rec["student"]["heldout"]["score"], color="grey", linestyle=":", linewidth=1,
                       label="student, held-out" if ax is by_lr else None)
    for ax in (by_lr, by_size):
        ax.set_xscale("log")
        ax.minorticks_off()
    by_lr.set_xlabel("learning rate (★ selected on held-out)")
    by_size.set_xlabel("‖ΔW‖/‖W‖ (%) of the build (vertical: LoRA's selected)")
    by_lr.set_ylabel(f"held-out {rec['meta'].get('metric', 'score')} (%)")
    fig.suptitle(f"{s['name']}: each init's held-out score by lr and by update size")
    by_lr.legend(fontsize=6)
    fig.tight_layout()
    return fig


def write_report(records: str | Path) -> Path:
    """pilot.md and pilot.png in the records directory, from its records; returns pilot.md's path."""
    return staged.write_report(records, REPORT, PLOT, load, derive, render, plot)
