"""Numbers docs/results.md states about the committed CPU study that no report column holds, recomputed from its
records (``pytest -s tests/test_results_claims.py`` prints them): the variance components the statistics' coverage
test is calibrated to, and the correlation of answer loss with accuracy across the fine-tuned arm-seeds; and the
decisive study's tables in docs/results.md, checked cell by cell against its records, and the steps-saved figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import stats

STUDY = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-study" / "results.json"
ARMS = ("lora", "pissa", "seeking", "seqkd")


def _records():
    return json.loads(STUDY.read_text())["records"]


def variance_components(diffs: np.ndarray) -> tuple[float, float, float]:
    """(question, seed, residual) components of a seeds × questions table of differences, from the two-way
    random-effects ANOVA's mean squares (one observation per cell)."""
    s, q = diffs.shape
    m = diffs.mean()
    ms_q = s * ((diffs.mean(0) - m) ** 2).sum() / (q - 1)
    ms_s = q * ((diffs.mean(1) - m) ** 2).sum() / (s - 1)
    resid = diffs - diffs.mean(0) - diffs.mean(1)[:, None] + m
    ms_e = (resid ** 2).sum() / ((q - 1) * (s - 1))
    return (ms_q - ms_e) / s, (ms_s - ms_e) / q, ms_e


def test_variance_components_match_the_simulations_calibration():
    """arm − student on GSM8K: the question component dominates, the seed one is ~0 (what tests/test_stats.py's
    simulated studies assume)."""
    recs = _records()
    base = {r["seed"]: r["per_example"] for r in recs if r["task"] == "gsm8k" and r["method"] == "student"}
    for arm in ARMS:
        rows = sorted((r for r in recs if r["task"] == "gsm8k" and r["method"] == arm), key=lambda r: r["seed"])
        d = np.array([np.subtract(r["per_example"], base[r["seed"]]) for r in rows])
        q, s, e = variance_components(d)
        print(f"{arm}: question {q:.4f}, seed {s:.5f}, residual {e:.4f}")
        assert 0.06 <= q <= 0.14 and abs(s) < 0.002 and 0.02 <= e <= 0.07


def test_variance_components_oracle():
    """Planted components are recovered (a large simulated table)."""
    rng = np.random.default_rng(0)
    d = rng.normal(0, 0.3, 2000)[None] + rng.normal(0, 0.1, 40)[:, None] + rng.normal(0, 0.2, (40, 2000))
    q, s, e = variance_components(d)
    assert abs(q - 0.09) < 0.01 and abs(s - 0.01) < 0.006 and abs(e - 0.04) < 0.002


def test_answer_loss_goes_with_lower_accuracy_on_gsm8k():
    """Across the 27 fine-tuned GSM8K arm-seeds a lower answer loss goes with a lower accuracy (r = +0.65);
    on HumanEval the two are unrelated (r = +0.13)."""
    recs = _records()
    r = {}
    for task in ("gsm8k", "humaneval"):
        rows = [x for x in recs if x["task"] == task and x["method"] not in ("student", "teacher")]
        r[task] = stats.pearsonr([x["answer_loss"] for x in rows], [x["score"] for x in rows])
        print(f"{task}: {len(rows)} arm-seeds, r = {r[task].statistic:+.2f}, p = {r[task].pvalue:.2g}")
    assert round(r["gsm8k"].statistic, 2) == 0.65 and r["gsm8k"].pvalue < 0.001
    assert round(r["humaneval"].statistic, 2) == 0.13 and r["humaneval"].pvalue > 0.4


DECISIVE = STUDY.parents[1] / "decisive-gsm8k"
PILOT = STUDY.parents[1] / "pilot-gsm8k"
DOC = STUDY.parents[2] / "results.md"
INIT_NAMES = {"LoRA": "lora", "PiSSA": "pissa", "Seeking": "seeking", "seeking-random": "seeking-random"}


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading`` (header and rule rows left out)."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("|"))
    rows = []
    for x in lines[start + 2:]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split("|")])
    return rows


def test_the_decisive_studys_tables_in_results_md_are_its_records():
    """Every held-out cell (score and ‖ΔW‖/‖W‖), every selected lr and every test score docs/results.md states for
    the decisive study is its committed records' (a cell of a stage not yet recorded is not a number)."""
    from pkt.studies import pilot_report as R
    from pkt.studies.staged import pts

    rec = R.load(DECISIVE)
    text = DOC.read_text(encoding="utf-8")
    lrs = [3e-5, 1e-4, 3e-4, 1e-3]
    held = _table_after(text, "**Held-out accuracy by lr**")
    assert [r[0] for r in held] == [n for n, i in INIT_NAMES.items() if i in {p["init"] for p in rec["points"].values()}]
    for name, *cells, selected in held:
        init = INIT_NAMES[name]
        for lr, cell in zip(lrs, cells):
            p = rec["points"].get(R.point_name(64, 1.0, lr, 0, init))
            if p is None:
                assert "%" not in cell, (name, lr, cell)
                continue
            assert cell.replace("**", "") == f"{p['heldout']['score']:.1%} ({p['build']['update']['all']:.3%})"
        lr, _ = R.select_lr(rec["points"], 64, 1.0, lrs, [0], init)
        assert selected == (f"{lr:.0e}".replace("e-0", "e-") if lr is not None else "–"), (name, selected)
    tests = _table_after(text, "**On the test questions**")
    selected = {b["init"]: b for b in R.derive(rec)["selected"]}
    for name, lr, *seeds, vs_student, vs_lora in tests:
        init = INIT_NAMES[name]
        for seed, cell in enumerate(seeds):
            t = rec["tests"].get(R.test_name(64, 1.0, seed, init))
            assert (cell == f"{t['test']['score']:.1%}" and lr == f"{t['lr']:.0e}".replace("e-0", "e-")) if t \
                else "%" not in cell, (name, seed, cell)
        # the differences as the report computes them (questions resampled once for all seeds), its ✓ its verdict
        b = selected[init]
        for cell, c in ((vs_student, b["cmp"]), (vs_lora, b.get("vs_lora"))):
            if c is None:
                assert cell == "–", (name, cell)
                continue
            assert cell.replace("**", "").removesuffix(" ✓") == f"{pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}]"
            assert cell.endswith("✓") == c["significant"], (name, cell)
            assert cell.startswith("**") == (c["low"] > 0 or c["high"] < 0), (name, cell)


def test_the_decisive_studys_question_churn_in_results_md_is_its_records():
    """The counts of questions that change verdict, as docs/results.md states them, are the report's derivation."""
    from pkt.studies import pilot_report as R

    churn = {(c["a"], c["b"]): c for c in R.derive(R.load(DECISIVE))["churn"]}
    text = " ".join(DOC.read_text(encoding="utf-8").split())

    def mean(v):
        return f"{sum(v) / len(v):.1f}"

    sk = churn["seeking", "seeking-random"]
    assert (f"Seeking and seeking-random differ on {mean(sk['same_seed'])} of the 300 questions "
            f"({', '.join(map(str, sk['same_seed']))})") in text
    assert f"Seeking differs from itself between two seeds on {mean(sk['a_seeds'])}" in text
    lo = churn["lora", "seeking"]
    assert (f"Seeking and LoRA differ on {mean(lo['same_seed'])} at the same seed against LoRA's {mean(lo['a_seeds'])} "
            f"and Seeking's {mean(lo['b_seeds'])} seed to seed") in text
    assert f"PiSSA and LoRA on {mean(churn['lora', 'pissa']['same_seed'])}" in text


def test_the_pilot_curve_figures_in_results_md_are_its_records():
    """Each pilot budget's Δ over the student that docs/results.md quotes is the pilot report's derivation."""
    from pkt.studies import pilot_report as R
    from pkt.studies.staged import pts

    text = " ".join(DOC.read_text(encoding="utf-8").split())
    done = {(b["n"], b["epochs"]): b["cmp"] for b in R.derive(R.load(PILOT))["selected"] if b["cmp"]}
    assert (64, 1.0) in done
    c = done[64, 1.0]
    assert f"(pilot-gsm8k: {pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}])" in text
    for n in (128, 256):
        if (n, 1.0) in done:
            c = done[n, 1.0]
            assert f"{n} examples {pts(c['delta'])} [{pts(c['low'])}, {pts(c['high'])}]" in text, n


def test_the_steps_saved_figures_in_results_md_are_its_records():
    """Questions 2 and 4's steps-saved figures (held-out loss differences, steps to LoRA's final loss, steps saved)
    are the steps-saved report's derivation from its committed records."""
    from pkt.studies import steps_saved_report as R

    text = " ".join(DOC.read_text(encoding="utf-8").split())
    d = R.derive(R.load(DOC.parent / "results" / "steps-saved-gsm8k"))
    assert d["seeds"] == [0, 1, 2] and d["examples"] == 80
    delta = {a: [row["delta"][a] for row in d["table"]] for a in ("laten-lora", "seeking")}
    lora = [row["arms"]["lora"][0] for row in d["table"]]

    def ci(x):  # a lowering of the loss, stated as a positive number with its interval
        return f"{-x[0]:.4f} [{-x[2]:.4f}, {-x[1]:.4f}]"

    lat, seek = delta["laten-lora"], delta["seeking"]
    assert f"held-out loss by {ci(lat[0])} before any step (LoRA's start: {lora[0]:.4f})" in text
    assert f"({-lat[1][0]:.4f}, {-lat[2][0]:.4f}, {-lat[3][0]:.4f}) to {ci(lat[4])} after the 4th" in text
    assert f"LoRA's loss falls by {lora[0] - lora[4]:.3f}" in text
    s = d["summary"]
    assert f"final held-out loss after {s['laten-lora']['steps']:.2f} steps" in text
    assert f"**{s['laten-lora']['saved']:.2f} [{s['laten-lora']['saved_ci'][0]:.2f}, " \
           f"{s['laten-lora']['saved_ci'][1]:.2f}] steps saved** of 4" in text
    assert abs(seek[0][0]) < 1e-6  # Seeking's init preserves the student's output
    assert f"by {-seek[1][0]:.4f} after it and {ci(seek[4])} after the 4th" in text
    assert f"final loss after {s['seeking']['steps']:.2f} steps (**{s['seeking']['saved']:.2f} " \
           f"[{s['seeking']['saved_ci'][0]:.2f}, {s['seeking']['saved_ci'][1]:.2f}] saved**)" in text
    # question 2: the injection's effect on held-out loss, relative to the student's
    assert f"by {ci(lat[0])}, {-lat[0][0] / lora[0]:.1%} of the student's {lora[0]:.4f}" in text


def test_the_steps_saved_controls_figures_in_results_md_are_their_records():
    """Question 4's controls: the controls study's steps saved over three seeds, and Seeking against its control from
    the joined report (the controls' config names the first study in compare_with); the two studies' LoRA curves
    are equal bit for bit at every seed."""
    from pkt.studies import steps_saved_report as R
    from pkt.studies.steps_saved import load_config

    text = " ".join(DOC.read_text(encoding="utf-8").split())
    root = DOC.parents[1]
    main, ctl = (R.load(DOC.parent / "results" / d) for d in ("steps-saved-gsm8k", "steps-saved-controls-gsm8k"))
    for seed in (0, 1, 2):
        a, b = ({k: v for k, v in rec["curves"][("lora", seed)]["result"].items() if k != "train_seconds"}
                for rec in (ctl, main))  # everything but the time it took
        assert a == b, seed
    cfg = load_config(root / "configs" / "steps-saved-controls-gsm8k.yaml")[0]
    assert cfg.compare_with == ["docs/results/steps-saved-gsm8k"]
    d = R.derive(R.load(DOC.parent / "results" / "steps-saved-controls-gsm8k", [root / c for c in cfg.compare_with]))
    assert d["seeds"] == [0, 1, 2] and d["family"] == 26
    s = d["summary"]
    for arm, words in (("seeking-random", "random init of the same spectrum saving"), ("pissa", "top components,")):
        x = s[arm]
        assert f"{words} {x['saved']:.2f} [{x['saved_ci'][0]:.2f}, {x['saved_ci'][1]:.2f}]" in text, arm
    (c,) = d["controls"]
    assert (c["arm"], c["control"]) == ("seeking", "seeking-random")
    m, lo, hi, _, q_loss = c["loss"]

    def signed(v, k):
        return f"{v:+.{k}f}".replace("-", "−")

    assert (f"seeking-random: {signed(m, 4)} [{signed(lo, 4)}, {signed(hi, 4)}] in final held-out loss and "
            f"{signed(c['saved'], 2)} [{signed(c['saved_ci'][0], 2)}, {signed(c['saved_ci'][1], 2)}] steps "
            "saved") in text
    assert q_loss == c["holm"] == 1.0 and "(Holm 1.0 for both, in the report's family of 26)" in text
