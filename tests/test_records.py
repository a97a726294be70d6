"""Committable stage records: a tiny study exports them as its stages finish, and `pkt report` rebuilds the same
results.md from the records alone (no run directory, no weights, no model); so do the committed docs/results/*.

The study runs once per module (student, teacher, lora, the seeking-random control, laten, the float32 student
and the analysis on the tiny Qwen2 pair), in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pkt.config import validate
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.records import load, load_records, portable
from pkt.experiment.runner import Study
from pkt.testing import TINY_BUDGET, save_tiny, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
METHODS = ["student", "teacher", "lora", "seeking-random", "laten"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(run dir, records dir, Study.run's result, the stages exported before the run's manifest existed)."""
    import os

    raw = os.environ.get("PKT_DATA_DIR")
    assert raw and Path(raw).is_dir(), "this test reads the benchmark data: set PKT_DATA_DIR (see README)"
    tmp = tmp_path_factory.mktemp("records")
    tok = tiny_tokenizer()
    t = save_tiny(tiny_model("qwen2", "teacher", len(tok)), tok, tmp / "teacher")
    s = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp / "student")
    cfg = validate(ExperimentConfig, {"name": "tiny", "teacher": t, "student": s, "tasks": ["gsm8k"], "seeds": [0],
                                      "methods": METHODS, "dtype": "float32", "teacher_dtype": "float32",
                                      "analysis_examples": 2, "budget": TINY_BUDGET, "records": str(tmp / "records")})
    run = tmp / "run"
    import pkt.experiment.records as R

    real, early = R.export_stage, []

    def export_stage(stage_dir, dest):
        if not (run / "manifest.json").exists():
            early.append(Path(stage_dir).name)
        return real(stage_dir, dest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "export_stage", export_stage)
        result = Study(cfg, run, "name: tiny\n", log=lambda s: None).run()
    return run, tmp / "records", result, early


def _records_only(src: Path, dst: Path) -> Path:
    """The records of a records directory, without the report pkt run wrote next to them: study.json and
    stages/*.json (figures/ holds the report's figures here; only an old study's records keep PNGs there)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "study.json", dst / "study.json")
    shutil.copytree(src / "stages", dst / "stages")
    return dst


def test_records_are_exported_as_stages_finish(study):
    run, records, result, early = study
    stages = result["manifest"]["stages"]
    names = {s["stage"] for s in stages}
    assert {f.stem for f in (records / "stages").glob("*.json")} == names
    # each stage's record was written when the stage finished, before the run's end wrote its manifest
    assert sorted(early) == sorted(s["key"] for s in stages)
    # small, no weights, no machine paths
    files = [p for p in records.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".md", ".csv", ".html", ".png") for p in files)
    assert sum(p.stat().st_size for p in files) < 2_000_000
    for p in [records / "study.json", *(records / "stages").glob("*.json")]:
        text = p.read_text()
        assert str(run) not in text and str(run.parent) not in text, p.name
    study_json = json.loads((records / "study.json").read_text())
    assert study_json["name"] == "tiny" and study_json["methods"] == METHODS and "estimate" not in study_json
    assert study_json["config"]["teacher"] == "<local>/teacher"


def test_loaded_records_are_the_walks(study):
    """load_records reconstructs exactly the records Study._walk built (with portable model paths)."""
    _, records, result, _ = study
    recs, manifest, analysis = load_records(records)
    assert recs == portable(result["records"])
    assert [r["method"] for r in recs] == ["student", "student-fp32", "teacher", "lora", "seeking-random", "laten"]
    laten = recs[-1]
    assert laten["injection"]["step"] == 1 and laten["model_dir"].startswith("stages/laten-gsm8k-s0-")
    assert manifest["name"] == "tiny" and set(analysis["plots"]) >= {"params", "laten_delta", "representations",
                                                                     "behaviour"}
    assert set(load(records).curves) == {"lora (gsm8k, seed 0)", "seeking-random (gsm8k, seed 0)",
                                         "laten (gsm8k, seed 0)"}


def test_report_from_the_records_alone(study, tmp_path, pkt_cli):
    run, records, result, _ = study
    md, rows = (run / "results.md").read_bytes(), json.loads((run / "results.json").read_text())["rows"]
    # the copy a git checkout on another machine has: records only, the run directory gone
    fresh = _records_only(records, tmp_path / "checkout")
    moved = tmp_path / "run-elsewhere"
    shutil.move(str(run), moved)
    try:
        code, out, err = pkt_cli("report", fresh)
    finally:
        shutil.move(str(moved), run)
    assert code == 0, err
    assert (fresh / "results.md").read_bytes() == md and md.decode() in out
    assert json.loads((fresh / "results.json").read_text())["rows"] == rows == result["rows"]
    assert (fresh / "results.csv").read_bytes() == (run / "results.csv").read_bytes()
    figures = ["scores.png", "loss_curves.png", "figures/params.png", "figures/laten_delta.png",
               "figures/representations_cka.png", "figures/representations_rsa.png",
               "figures/representations_dcka.png", "figures/behaviour.png"]
    for f in figures:
        assert (fresh / f).stat().st_size > 1000, f
    html = (fresh / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures) and "<td>seeking-random</td>" in html
    # the run's own report and the one pkt run wrote into the records directory are the same bytes
    assert (records / "results.md").read_bytes() == md
    # --out elsewhere writes the same report there and leaves the records directory as it was
    before = {f: f.read_bytes() for f in fresh.rglob("*") if f.is_file()}
    code, _, err = pkt_cli("report", fresh, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    assert (tmp_path / "elsewhere" / "results.md").read_bytes() == md
    assert {f: f.read_bytes() for f in fresh.rglob("*") if f.is_file()} == before


def test_report_of_a_study_still_running(study, tmp_path, pkt_cli):
    """Records are committed as stages finish: the report of a study whose later stages have no record yet says
    so first, and its rows count the seeds they hold; the finished study's report carries no such line."""
    _, records, result, _ = study
    full = (records / "results.md").read_text()
    assert "Unfinished" not in full and "Stage time" not in full  # results.md: the results, not the run's speed
    stage_seconds = sum(json.loads(f.read_text())["seconds"] for f in (records / "stages").glob("*.json"))
    assert (f"Stage time: {stage_seconds / 60:.0f} min over {len(result['manifest']['stages'])} stages"
            in (records / "report.html").read_text())
    part = _records_only(records, tmp_path / "part")
    total = len({s["key"] for s in result["manifest"]["stages"]})
    gone = [part / "stages" / "eval-laten-gsm8k-s0.json", part / "stages" / "analysis.json"]
    for f in gone:
        f.unlink()
    code, out, err = pkt_cli("report", part)
    assert code == 0, err
    md = (part / "results.md").read_text()
    assert md.splitlines()[2] == (f"**Unfinished study: records of {total - 2} of {total} stages.** Each row is "
                                  "over the seeds finished so far (column `seeds`).")
    assert "| method | task | metric | seeds | n |" in md and "| lora | gsm8k | accuracy | 1 | 3 |" in md
    assert "| laten |" not in md and "Unfinished study" in (part / "report.html").read_text()


def test_report_before_any_evaluation(study, tmp_path, pkt_cli):
    """A study whose first stages (extraction, KD answers, ...) have records but no evaluation yet: pkt report
    writes the empty table with its progress line, and no scores figure, instead of failing."""
    _, records, _, _ = study
    early = _records_only(records, tmp_path / "early")
    for f in (early / "stages").glob("*.json"):
        if f.stem.startswith("eval-") or f.stem == "analysis":
            f.unlink()
    code, _, err = pkt_cli("report", early)
    assert code == 0, err
    md = (early / "results.md").read_text()
    assert "records of" in md and "| student |" not in md
    assert not (early / "scores.png").exists() and (early / "report.html").is_file()


def test_records_of_the_old_format(study, tmp_path, pkt_cli):
    """Records of runs before this format (bf03009): evaluations named only by their stage, an analysis without
    plot inputs whose PNGs travel in figures/."""
    run, records, _, _ = study
    old = _records_only(records, tmp_path / "old")
    for f in (old / "stages").glob("eval-*.json"):
        rec = json.loads(f.read_text())
        del rec["result"]["evaluated_as"]
        f.write_text(json.dumps(rec))
    f = old / "stages" / "analysis.json"
    rec = json.loads(f.read_text())
    del rec["result"]["plots"]
    f.write_text(json.dumps(rec))
    analysis_dir = next((run / "stages").glob("analysis-*"))
    (old / "figures").mkdir()
    for name in rec["result"]["figures"]:
        shutil.copy(analysis_dir / name, old / "figures" / name)
    code, _, err = pkt_cli("report", old)
    assert code == 0, err
    assert (old / "results.md").read_bytes() == (run / "results.md").read_bytes()
    html = (old / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 + len(rec["result"]["figures"])  # + scores, loss curves


def test_malformed_records_are_one_line(study, tmp_path, pkt_cli):
    _, records, _, _ = study
    bad = _records_only(records, tmp_path / "bad")
    victim = bad / "stages" / "eval-lora-gsm8k-s0.json"
    victim.write_text('{"stage": "eval-lora-gsm8k-s0", ')
    code, _, err = pkt_cli("report", bad)
    assert code == 2 and str(victim) in err and "malformed" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    rec = json.loads((records / "stages" / "eval-lora-gsm8k-s0.json").read_text())
    del rec["result"]["per_example"]
    victim.write_text(json.dumps(rec))
    code, _, err = pkt_cli("report", bad)
    assert code == 2 and str(victim) in err and "per_example" in err and err.count("\n") == 1
    (bad / "study.json").write_text("[]")
    code, _, err = pkt_cli("report", bad)
    assert code == 2 and str(bad / "study.json") in err and err.count("\n") == 1
    for missing in (tmp_path / "nowhere", tmp_path):  # no directory; a directory without records
        code, _, err = pkt_cli("report", missing)
        assert code == 2 and str(missing) in err and err.count("\n") == 1


def test_committed_results_reproduce(tmp_path, pkt_cli):
    """Every committed study under docs/results/ is records + the report made from them: `pkt report`
    regenerates its results.md byte for byte (the acceptance test of the records)."""
    studies = sorted(p.parent for p in RESULTS.glob("*/study.json"))
    # a results directory without its records could not be checked: every one must have them (the records of
    # `pkt study pilot`, pilot.json, are checked by tests/test_pilot.py; steps-saved's and laten-dose's by
    # tests/test_committed_studies.py)
    from pkt.studies import laten_dose_report, pilot_report, steps_saved_report

    others = sorted(p.parent for report in (pilot_report, steps_saved_report, laten_dose_report)
                    for p in RESULTS.glob(f"*/{report.META}"))
    assert RESULTS.is_dir() and sorted(p for p in RESULTS.iterdir() if p.is_dir()) == sorted(studies + others)
    assert studies, "docs/results/ holds no committed study"
    for d in studies:
        out = tmp_path / d.name
        code, _, err = pkt_cli("report", d, "--out", out)
        assert code == 0, f"{d}: {err}"
        assert (out / "results.md").read_bytes() == (d / "results.md").read_bytes(), d
        assert json.loads((out / "results.json").read_text()) == json.loads((d / "results.json").read_text()), d
        assert (out / "scores.png").is_file()
        # report.html too, byte for byte but for its embedded plots (their pixels follow matplotlib's version)
        html = [_without_images((x / "report.html").read_text(encoding="utf-8")) for x in (out, d)]
        assert html[0] == html[1] and html[0][1] > 0, d


def _without_images(html: str) -> tuple[str, int]:
    """The html with each embedded PNG replaced by a placeholder, and how many there were."""
    return re.subn(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,…", html)


def test_loaded_records_with_vanilla_evaluations_shared_by_seeds(tmp_path):
    """budget.eval_seed: the student is evaluated once and stands for every seed; the records read back are still
    exactly the walk's (one row per seed, each with its own seed)."""
    tok = tiny_tokenizer()
    t = save_tiny(tiny_model("qwen2", "teacher", len(tok)), tok, tmp_path / "teacher")
    s = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "student")
    cfg = validate(ExperimentConfig, {"name": "seeds", "teacher": t, "student": s, "seeds": [0, 1],
                                      "methods": ["student", "lora"], "dtype": "float32", "teacher_dtype": "float32",
                                      "analysis": False, "budget": {**TINY_BUDGET, "eval_seed": 7},
                                      "records": str(tmp_path / "records")})
    result = Study(cfg, tmp_path / "run", log=lambda s: None).run()
    recs, _, analysis = load_records(tmp_path / "records")
    assert recs == portable(result["records"]) and analysis is None
    assert [(r["method"], r["seed"]) for r in recs] == [("student", 0), ("student-fp32", 0), ("lora", 0),
                                                         ("student", 1), ("student-fp32", 1), ("lora", 1)]
    assert (tmp_path / "records" / "results.md").read_bytes() == (tmp_path / "run" / "results.md").read_bytes()


def test_run_flag_exports_records(tmp_path, shared_data, monkeypatch, pkt_cli):
    import yaml

    tok = tiny_tokenizer()
    s = save_tiny(tiny_model("qwen2", "student", len(tok)), tok, tmp_path / "student")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "flag", "teacher": s, "student": s, "tasks": ["gsm8k"], "seeds": [0],
                                    "methods": ["student"], "eval_dtype": "float32", "analysis": False,
                                    "budget": TINY_BUDGET}))
    monkeypatch.chdir(tmp_path)
    code, _, err = pkt_cli("run", path, "--out", tmp_path / "run", "--records", "rec")
    assert code in (0, None), err[-2000:]
    assert json.loads((tmp_path / "rec" / "study.json").read_text())["name"] == "flag"
    assert [p.name for p in (tmp_path / "rec" / "stages").iterdir()] == ["eval-student-gsm8k-s0.json"]
    assert (tmp_path / "rec" / "results.md").read_text() == (tmp_path / "run" / "results.md").read_text()


def _resume_elsewhere(study, records: Path, run: Path):
    """The study's configuration run again in another directory with ``records`` as its records (a clone of the
    repository on another machine: the committed records, no run directory)."""
    result = study[2]
    cfg = validate(ExperimentConfig, {**result["manifest"]["config"], "records": str(records)})
    logs = []
    out = Study(cfg, run, "name: tiny\n", log=logs.append).run()
    return out, logs


def _eval_results(records: Path) -> dict:
    keep = ("score", "per_example", "answer_loss", "dtype")
    return {f.stem: {k: json.loads(f.read_text())["result"][k] for k in keep}
            for f in sorted((records / "stages").glob("eval-*.json"))}


def test_a_study_resumes_on_another_machine_from_its_records(study, tmp_path):
    """A fresh run directory with the committed records computes nothing: every stage is restored or not
    needed, and results.md is the original's. Stage keys do not depend on where the run directory is."""
    _, records, result, _ = study
    fresh = _records_only(records, tmp_path / "checkout")
    out, logs = _resume_elsewhere(study, fresh, tmp_path / "elsewhere" / "run")
    assert [s for s in out["manifest"]["stages"] if not s["cached"]] == []
    assert any(line.startswith(f"restored {len(result['manifest']['stages'])} finished stages") for line in logs)
    assert (fresh / "results.md").read_bytes() == (records / "results.md").read_bytes()
    assert [f.read_bytes() for f in sorted((fresh / "stages").glob("*.json"))] == \
        [f.read_bytes() for f in sorted((records / "stages").glob("*.json"))]  # loss curves kept


def test_a_resumed_study_rebuilds_only_what_its_unfinished_stages_read(study, tmp_path):
    """Without the records of two evaluations (the seeking-random control's, which reads the extraction, and
    LaTen's), a resumed run rebuilds those two models and the extraction, and nothing else; their evaluations
    come out as on the first machine."""
    _, records, _, _ = study
    fresh = _records_only(records, tmp_path / "checkout")
    gone = [f for f in (fresh / "stages").glob("eval-*.json") if f.stem.startswith(("eval-seeking-random-",
                                                                                     "eval-laten-"))]
    assert len(gone) == 2
    for f in gone:
        f.unlink()
    out, _ = _resume_elsewhere(study, fresh, tmp_path / "run2")
    ran = sorted(s["stage"] for s in out["manifest"]["stages"] if not s["cached"])
    assert ran == ["eval-laten-gsm8k-s0", "eval-seeking-random-gsm8k-s0", "extract-gsm8k", "laten-gsm8k-s0",
                   "seeking-random-gsm8k-s0"]
    assert _eval_results(fresh) == _eval_results(records)


def test_a_resumed_study_rebuilds_what_its_analysis_reads(study, tmp_path):
    """Without the analysis's record, a resumed run recomputes the analysis and, because their files are not in a
    fresh run directory, the extraction and the LaTen model it reads (and nothing else); its numbers come out as
    on the first machine."""
    _, records, _, _ = study
    fresh = _records_only(records, tmp_path / "checkout")
    (fresh / "stages" / "analysis.json").unlink()
    out, _ = _resume_elsewhere(study, fresh, tmp_path / "run3")
    ran = sorted(s["stage"] for s in out["manifest"]["stages"] if not s["cached"])
    assert ran == ["analysis", "extract-gsm8k", "laten-gsm8k-s0"]
    new, old = (json.loads((d / "stages" / "analysis.json").read_text())["result"] for d in (fresh, records))
    assert new == old
