"""Stage cache (resume, atomicity), paired bootstrap, and the report files."""

import json

import numpy as np
import pytest

from pkt.experiment.cache import StageCache, stable_hash
from pkt.experiment.report import (adjust, aggregate, analysis_tables, comparisons, comparisons_table, equal_steps_table,
                                   write_report)
from pkt.experiment.stats import mean_std, paired_bootstrap


def test_stage_cache_runs_once_and_leaves_nothing_on_failure(tmp_path):
    cache = StageCache(tmp_path, log=lambda s: None)
    calls = []

    def work(d):
        calls.append(d)
        (d / "artifact.txt").write_text("x")
        return {"value": 1}

    with cache.lock():
        p1, r1 = cache.run("stage", {"a": 1}, work)
        p2, r2 = cache.run("stage", {"a": 1}, work)
        assert p1 == p2 and r1 == r2 == {"value": 1} and len(calls) == 1 and (p1 / "artifact.txt").is_file()
        assert [r.cached for r in cache.records] == [False, True]
        p3, _ = cache.run("stage", {"a": 2}, work)  # different config -> different key -> recomputed
        assert p3 != p1 and len(calls) == 2

        def boom(d):
            (d / "half.txt").write_text("half")
            raise RuntimeError("killed")

        with pytest.raises(RuntimeError):
            cache.run("stage", {"a": 3}, boom)
        assert not cache.path("stage", {"a": 3}).exists()
        assert not [p for p in (tmp_path / "stages").iterdir() if ".tmp" in p.name]
    # a hard kill leaves a temporary directory: the next runner, once it holds the lock, reclaims it
    (tmp_path / "stages" / ".stage-abc.tmp999").mkdir()
    with StageCache(tmp_path, log=lambda s: None).lock():
        assert not [p for p in (tmp_path / "stages").iterdir() if ".tmp" in p.name]


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    base = [list(rng.integers(0, 2, 200)) for _ in range(3)]
    same = paired_bootstrap(base, base)
    assert same == (0.0, 0.0, 0.0)
    better = [[1] * 200 for _ in range(3)]
    d, lo, hi = paired_bootstrap(better, base)
    assert lo <= d <= hi and lo > 0
    assert d == pytest.approx(1 - np.mean([np.mean(b) for b in base]))
    with pytest.raises(ValueError):
        paired_bootstrap([[1, 0]], [[1]])
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2)))


def test_report_files(tmp_path):
    recs = []
    for seed in (0, 1):
        recs.append({"method": "student", "task": "gsm8k", "seed": seed, "metric": "accuracy", "score": 0.25,
                     "per_example": [1, 0, 0, 0], "answer_loss": 1.5, "n": 4, "dtype": "bfloat16"})
        recs.append({"method": "seeking", "task": "gsm8k", "seed": seed, "metric": "accuracy", "score": 0.5,
                     "per_example": [1, 1, 0, 0], "answer_loss": 1.2, "n": 4, "dtype": "float32",
                     "precision": {"fallback": True, "fraction": 0.02 + seed / 100, "requested": "bfloat16"}})
    rows = aggregate(recs)
    seek = next(r for r in rows if r["method"] == "seeking")
    assert seek["mean"] == 0.5 and seek["delta"] == pytest.approx(0.25) and seek["answer_loss_mean"] == pytest.approx(1.2)
    assert next(r for r in rows if r["method"] == "student")["delta"] is None
    write_report(tmp_path, recs, {"name": "t", "stages": [{"stage": "s", "seconds": 1.0, "cached": False}]})
    for f in ("results.json", "results.csv", "results.md", "report.html", "scores.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["method"] == "seeking"
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "<td>seeking</td>" in html
    md = (tmp_path / "results.md").read_text()
    assert "| seeking | gsm8k | accuracy | 2 | 4 | 0.500 ± 0.000 | +0.250" in md
    # the dtype each row was evaluated in, with the worst seed's surviving fraction when it fell back
    table = [ln for ln in md.splitlines() if ln.startswith("| seeking |")]
    assert table[-1].endswith("| float32 (2.0% of the change survives bfloat16) |")
    # the intervals' design and the Holm family are stated under the table; one comparison here (seeking vs student)
    assert "resamples the questions once for all seeds" in md and "over the 1 comparison this report" in md
    assert "| 1.500 ± 0.000 | bfloat16 |" in md
    assert "dtype" in (tmp_path / "results.csv").read_text().splitlines()[0]


def test_float32_rows_are_paired_with_the_float32_student(tmp_path):
    """A model evaluated in float32 (its change would not survive bf16) is compared with the student
    evaluated in float32; the student-fp32 row itself shows the dtype's effect against the bf16 student."""
    def rec(method, per, dtype, **kw):
        return {"method": method, "task": "gsm8k", "seed": 0, "metric": "accuracy", "score": float(np.mean(per)),
                "n": len(per), "per_example": per, "answer_loss": 1.0, "dtype": dtype, **kw}

    inj = {"choice": "paper", "step": 4, "rate": 0.1, "delta_rel_norm": 1.6e-3, "delta_bf16_ratio": 0.56,
           "delta_bf16_changed": 0.45}
    records = [rec("student", [0.0, 0.0, 0.0, 0.0], "bfloat16"),
               rec("student-fp32", [1.0, 1.0, 0.0, 0.0], "float32"),
               rec("laten", [1.0, 1.0, 1.0, 0.0], "float32", injection=inj),
               rec("lora", [1.0, 0.0, 0.0, 0.0], "bfloat16")]
    rows = {r["method"]: r for r in aggregate(records)}
    # exact means of the paired differences: laten vs the fp32 student 1/4 (vs the bf16 one it would be 3/4)
    assert rows["laten"]["delta"] == pytest.approx(0.25) and rows["laten"]["delta_vs"] == "student-fp32"
    assert rows["student-fp32"]["delta"] == pytest.approx(0.5) and rows["student-fp32"]["delta_vs"] == "student"
    assert rows["lora"]["delta"] == pytest.approx(0.25) and rows["lora"]["delta_vs"] == "student"
    assert rows["laten"]["delta_lora"] is None  # float32 laten vs bfloat16 lora would compare dtypes too
    write_report(tmp_path, records, {"name": "t"})
    md = (tmp_path / "results.md").read_text()
    assert "+0.250 [" in md and "(vs student-fp32)" in md
    line = next(x for x in md.splitlines() if x.startswith("| laten | gsm8k | 0 |"))
    assert line.split("|")[4:10] == [" paper ", " 4 ", " 0.1 ", " 0.0016 ", " 0.56 ", " 45.0% "]


def test_arms_against_lora_laten_grid_and_equal_steps(tmp_path):
    """The study's questions in the report: each arm's paired Δ to LoRA, LaTen's align loss over step × rate ×
    seed next to the vanilla student's, and laten-lora's training loss against lora's at equal steps."""
    def rec(method, seed, per, **kw):
        return {"method": method, "task": "gsm8k", "seed": seed, "metric": "accuracy", "score": float(np.mean(per)),
                "n": len(per), "per_example": per, "answer_loss": 1.0, "dtype": "float32", **kw}

    def inj(seed):
        grid = [{"step": s, "rate": r, "align_loss": 2.0 - 0.1 * s + r + 0.01 * seed}
                for s in (1, 2) for r in (0.1, 1.0)]
        return {"choice": "paper", "step": 2, "rate": 0.1, "selection": grid, "vanilla_align_loss": 2.0 + 0.01 * seed}

    records = []
    for seed in (0, 1):
        records += [rec("student", seed, [0, 0, 0, 0]), rec("lora", seed, [1, 0, 0, 0]),
                    rec("seeking", seed, [1, 1, 1, 0]), rec("laten", seed, [0, 0, 0, 0], injection=inj(seed))]
    rows = {r["method"]: r for r in aggregate(records)}
    assert rows["seeking"]["delta_lora"] == pytest.approx(0.5) and rows["laten"]["delta_lora"] == pytest.approx(-0.25)
    assert rows["lora"]["delta_lora"] is None and rows["student"]["delta_lora"] is None
    curves = {f"{m} (gsm8k, seed {s})": [(1, 2.0 + s), (2, 1.5 + s), (3, base + s)]
              for s in (0, 1) for m, base in (("lora", 1.2), ("laten-lora", 1.0))}
    curves["laten-lora (gsm8k, seed 1)"][1] = (2, 2.0)  # seed 1 is below lora's final loss (2.2) a step early
    write_report(tmp_path, records, {"name": "t"}, curves=curves)
    md = (tmp_path / "results.md").read_text()
    assert "| seeking | gsm8k | accuracy | 2 | 4 | 0.750 ± 0.000 | +0.750 [" in md and "| +0.500 [" in md
    # the grid: step 2, rate 0.1 is 0.1 below the vanilla student's loss on average over the two seeds
    assert "| gsm8k | 0 | – | 2.0050 ± 0.0071 | 2.0000 – 2.0100 | (vanilla) |" in md
    assert "| gsm8k | 2 | 0.1 | 1.9050 ± 0.0071 | 1.9000 – 1.9100 | -0.1000 |" in md
    assert (tmp_path / "laten_grid.png").stat().st_size > 0
    assert "| gsm8k | 3 | 1.7000 ± 0.7071 | 1.5000 ± 0.7071 | -0.2000 ± 0.0000 |" in md
    # lora's own first step at its final loss beside laten-lora's (lora reaches it by definition, at the last step
    # at the latest)
    assert "| first step at or below lora's final loss | seed 0: lora step 3, laten-lora step 3; " \
           "seed 1: lora step 3, laten-lora step 2 |" in md
    # an arm that never gets there says so
    never = {k: [(st, loss + (0.5 if k.startswith("laten-lora") else 0.0)) for st, loss in v]
             for k, v in curves.items()}
    assert "seed 0: lora step 3, laten-lora not within 3; seed 1: lora step 3, laten-lora not within 3 |" in \
        equal_steps_table(never)


def test_paired_comparisons_between_arms(tmp_path):
    """Seeking against its controls and against language-based transfer, over the seeds both arms have, with the
    interval's verdict; arms evaluated in different dtypes are not compared."""
    def rec(method, seed, per, loss, dtype="float32"):
        return {"method": method, "task": "gsm8k", "seed": seed, "metric": "accuracy", "score": float(np.mean(per)),
                "n": len(per), "per_example": per, "answer_loss": loss, "dtype": dtype}

    records = []
    for seed in (0, 1, 2):
        records += [rec("student", seed, [0] * 40, 1.0), rec("seeking", seed, [1] * 30 + [0] * 10, 0.8 + 0.01 * seed),
                    rec("seeking-random", seed, [1] * 30 + [0] * 9 + [1], 0.9)]
    records += [rec("seqkd", 0, [0] * 40, 0.7), rec("gkd", 0, [0] * 40, 0.7, dtype="bfloat16")]
    md_table = comparisons_table(records)
    lines = {ln.split("|")[1].strip(): ln for ln in md_table.splitlines()[2:]}
    assert set(lines) == {"seeking − seeking-random", "seeking − seqkd"}  # no shuffled/pissa records; gkd is bf16
    assert lines["seeking − seeking-random"].startswith("| seeking − seeking-random | gsm8k | 3 | -0.025 [")
    assert "| no / no | -0.090 ± 0.010 |" in lines["seeking − seeking-random"]
    assert "| seeking − seqkd | gsm8k | 1 | +0.750 [" in lines["seeking − seqkd"]
    # 30 of 40 questions won, none lost: significant also after Holm over these two comparisons
    assert lines["seeking − seqkd"].endswith("| yes / yes | +0.100 ± 0.000 |")
    records[1]["metrics"] = {"hit_max_new_tokens": 10}  # seeking, seed 0: 10 of 40 outputs cut at the cap
    records[4]["metrics"] = {"hit_max_new_tokens": 0}
    write_report(tmp_path, records, {"name": "t"})
    md = (tmp_path / "results.md").read_text()
    # in the report, the comparisons are Holm-adjusted together with the table's Δ columns (a larger family)
    comps = comparisons(records)
    adjust(aggregate(records), comps)
    assert "## Paired comparisons between arms\n\n" + comparisons_table(records, comps=comps) in md
    # the share of outputs at the new-token cap, averaged over the seeds that count them
    assert "| Δ vs lora [95% CI] |" not in md and "| at cap | answer loss |" in md
    assert "| seeking | gsm8k | accuracy | 3 | 40 |" in md and "| 12.5% | 0.810 ± 0.010 |" in md
    assert "| student | gsm8k | accuracy | 3 | 40 | 0.000 ± 0.000 | – | – | – | 1.000 ± 0.000 |" in md
    assert "<th>at cap</th>" in (tmp_path / "report.html").read_text()


def test_analysis_numbers_are_tables_in_results_md(tmp_path):
    """The analysis stage's summary (what its figures show) is printed as tables: one row per init and module,
    per LaTen module, per module and measure, and the behaviour line; nothing without an analysis."""
    def stat(mean, std=0.0, n=24):
        return {"mean": mean, "std": std, "min": mean, "max": mean, "n": n}

    summary = {
        "params": {"seeking": {"up_proj": {"cos_BA_original": stat(0.0001), "cos_BA_remaining": stat(-0.228, 0.059),
                                           "norm_ratio": stat(0.235)}},
                   "pissa": {"up_proj": {"cos_BA_original": stat(0.215), "cos_BA_remaining": stat(-0.0),
                                         "norm_ratio": stat(0.215)}}},
        "laten_delta": {"v_proj": {"cos_delta_located": stat(0.0008, 0.004), "cos_delta_full": stat(0.0005),
                                   "norm_ratio": stat(0.0021)}},
        "representations": {"up": {"cka": {"all": stat(0.732, 0.115, 672), "teacher_ge_student": stat(0.745),
                                           "diagonal": {"proportional_mean": 0.899, "best_mean": 0.907,
                                                        "best_within_2_of_proportional": 0.9166}}}},
        "behaviour": {"n_examples": 4, "n_tokens": 575, "kl_mean": 0.23, "kl_median": 0.031, "kl_p90": 0.61,
                      "top1_agreement": 0.897, "teacher_top1_accuracy": 0.83, "student_top1_accuracy": 0.791}}
    text = analysis_tables(summary)
    assert "| seeking | up_proj | 24 | +0.000 ± 0.000 | -0.228 ± 0.059 | 0.235 ± 0.000 |" in text
    assert "| pissa | up_proj | 24 | +0.215 ± 0.000 | -0.000 ± 0.000 | 0.215 ± 0.000 |" in text
    assert "| v_proj | 24 | +0.0008 ± 0.0040 | +0.0005 ± 0.0000 | 0.0021 ± 0.0000 |" in text
    assert "| up | cka | 0.732 ± 0.115 | 0.745 ± 0.000 | 0.899 | 0.907 | 92% |" in text
    assert "top-1 agreement 89.7%" in text and "KL(teacher ‖ student) mean 0.230" in text
    assert analysis_tables(None) == analysis_tables({}) == ""

    rec = {"method": "student", "task": "gsm8k", "seed": 0, "metric": "accuracy", "score": 0.5, "n": 2,
           "per_example": [1.0, 0.0], "dtype": "float32"}
    write_report(tmp_path / "a", [rec], {"name": "t"}, analysis={"summary": summary})
    write_report(tmp_path / "b", [rec], {"name": "t"})
    with_analysis, without = ((tmp_path / d / "results.md").read_text() for d in "ab")
    assert "## Neural incompatibility (the analysis stage)" in with_analysis and text in with_analysis
    assert "Neural incompatibility" not in without


def test_first_answer_column_only_where_records_have_it(tmp_path):
    """GSM8K records with first_answer_accuracy get a `first answer` column (mean over seeds); a study whose
    records predate it keeps its table as it was (committed results.md files stay byte-identical)."""
    def rec(method, seed, score, first=None):
        metrics = {} if first is None else {"first_answer_accuracy": first}
        return {"method": method, "task": "gsm8k", "seed": seed, "metric": "accuracy", "score": score,
                "per_example": [1, 0, 0, 0], "answer_loss": 1.0, "n": 4, "dtype": "float32", "metrics": metrics}

    recs = [rec("student", s, 0.25, 0.25) for s in (0, 1)] + [rec("lora", 0, 0.25, 0.5), rec("lora", 1, 0.25, 0.75)]
    write_report(tmp_path / "with", recs, {"name": "t", "stages": []})
    md = (tmp_path / "with" / "results.md").read_text()
    assert "| first answer |" in md and "| lora | gsm8k | accuracy | 2 | 4 | 0.250 ± 0.000 |" in md
    assert "| 0.625 | 1.000 ± 0.000 |" in md  # lora's (0.5 + 0.75) / 2, then its answer loss
    assert "first_answer" in (tmp_path / "with" / "results.csv").read_text().splitlines()[0]
    assert "<th>first answer</th>" in (tmp_path / "with" / "report.html").read_text()
    old = [dict(r, metrics={}) for r in recs]
    write_report(tmp_path / "without", old, {"name": "t", "stages": []})
    assert "first answer" not in (tmp_path / "without" / "results.md").read_text()
    assert "first_answer" not in (tmp_path / "without" / "results.csv").read_text()
    assert all("first_answer" not in r for r in aggregate(old))


def test_the_report_names_the_methods_at_their_own_lr(tmp_path):
    """A study with ``method_lrs`` says under its table which methods trained at their own lr and at which; one
    without says nothing of it (so the committed reports stay as they are)."""
    per = [1.0, 0.0, 0.0, 1.0]
    records = [{"method": m, "task": "gsm8k", "seed": 0, "metric": "accuracy", "score": 0.5, "n": 4,
                "per_example": per, "answer_loss": 1.0, "dtype": "float32"} for m in ("student", "lora", "seqkd")]
    cfg = {"budget": {"lr": 3e-4}, "method_lrs": {"seqkd": 1e-4}}
    write_report(tmp_path / "own", records, {"name": "t", "config": cfg})
    write_report(tmp_path / "plain", records, {"name": "t", "config": {**cfg, "method_lrs": {}}})
    own = (tmp_path / "own" / "results.md").read_text()
    assert "Learning rates: seqkd 0.0001 (each its own, `method_lrs`); every other fine-tuned method at the " \
           "budget's 0.0003" in own
    assert "Learning rates: seqkd 0.0001" in (tmp_path / "own" / "report.html").read_text()
    assert "Learning rates" not in (tmp_path / "plain" / "results.md").read_text()
    assert "Learning rates" not in (tmp_path / "plain" / "report.html").read_text()


def test_cost_per_method_reads_each_stages_own_time_and_peak(tmp_path):
    """report.html's cost table: per method, task and kind of stage, the median and range of each stage's own wall
    time and the largest peak memory, from the stage records (the manifest lists a cached stage at 0 s)."""
    from pathlib import Path

    from pkt.experiment.records import load
    from pkt.experiment.report import cost_html, method_costs

    stages = [{"stage": "lora-gsm8k-s0", "seconds": 100.0, "peak_rss_bytes": 2 * 2**30},
              {"stage": "lora-gsm8k-s1", "seconds": 300.0, "peak_rss_bytes": 3 * 2**30},
              {"stage": "lora-gsm8k-s2", "seconds": 200.0},
              {"stage": "eval-lora-gsm8k-s0", "seconds": 600.0},
              {"stage": "extract-gsm8k", "seconds": 50.0}, {"stage": "analysis", "seconds": 7200.0}]
    got = {(r["method"], r["task"], r["stage"]): r for r in method_costs(stages, ["gsm8k"])}
    build = got[("lora", "gsm8k", "build")]
    assert (build["n"], build["median_s"], build["min_s"], build["max_s"]) == (3, 200.0, 100.0, 300.0)
    assert build["peak_gib"] == pytest.approx(3.0)
    assert got[("lora", "gsm8k", "evaluation")]["peak_gib"] is None
    assert set(got) == {("lora", "gsm8k", "build"), ("lora", "gsm8k", "evaluation"), ("extract", "gsm8k", "extract"),
                        ("analysis", None, "analysis")}
    html = cost_html({"stages": stages}, ["gsm8k"])
    assert "<td>lora</td><td>gsm8k</td><td>build</td><td>3</td><td>3.3 min</td><td>100 s – 5.0 min</td><td>3.0</td>" in html
    assert "<td>2.00 h</td><td>–</td>" in html and cost_html(None, ["gsm8k"]) == ""
    # the committed CPU study: its manifest lists lora-gsm8k-s0 as cached at 0 s; the table has the record's time
    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu-study"
    listed = next(s for s in json.loads((root / "study.json").read_text())["stages"] if s["stage"] == "lora-gsm8k-s0")
    record = json.loads((root / "stages" / "lora-gsm8k-s0.json").read_text())
    timed = next(s for s in load(root).progress["stages"] if s["stage"] == "lora-gsm8k-s0")
    assert listed["seconds"] == 0.0 and timed["seconds"] == record["seconds"] > 60
