"""Stage cache (resume, atomicity), paired bootstrap, and the report files."""

import json

import numpy as np
import pytest

from pkt.experiment.cache import StageCache, stable_hash
from pkt.experiment.report import aggregate, write_report
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
    assert "| seeking | gsm8k | accuracy | 4 | 0.500 ± 0.000 | +0.250" in md
    # the dtype each row was evaluated in, with the worst seed's surviving fraction when it fell back
    assert md.splitlines()[-1].endswith("| float32 (2.0% of the change survives bfloat16) |")
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
    write_report(tmp_path, records, {"name": "t"})
    md = (tmp_path / "results.md").read_text()
    assert "+0.250 [" in md and "(vs student-fp32)" in md
    line = next(x for x in md.splitlines() if x.startswith("| laten | gsm8k | 0 |"))
    assert line.split("|")[4:10] == [" paper ", " 4 ", " 0.1 ", " 0.0016 ", " 0.56 ", " 45.0% "]
