"""LaTen's dose–response (`pkt study laten-dose`, docs/laten-dose.md).

A tiny study runs its grid (two schedules, two penalties, two rates, two seeds), chooses its accuracy points and
its operating point from held-out records alone, resumes without stage work, restores on another machine from its
records and re-derives its report byte for byte. A grid point equals `pkt.laten.apply` of the same checkpoint
(the loss of the saved, reloaded model); the student is restored bit for bit between points; ties go to the
smaller dose; a bad config is one line naming the setting.
"""

from __future__ import annotations

import json

import pytest
from staged_studies import config_file, rederived, saved_pair, tree

from pkt.studies import laten_dose_report as R

SEEDS = [0, 1]


def _config(tmp_path, teacher: str, student: str, **over) -> str:
    from pkt.testing import TINY_BUDGET

    data = {"name": "tiny-dose", "teacher": teacher, "student": student, "task": "gsm8k",
            "records": str(tmp_path / "records"), "seeds": SEEDS, "steps": [1, 2], "trained_steps": [1],
            "rates": [0.1, 0.5],
            "penalties": [1000, 0], "heldout": {"size": 3, "batch_size": 3},
            "accuracy": {"best": 1, "paper": True, "size": 3}, "teacher_dtype": "float32", "progress": False,
            "eval": {"test_size": 3, "max_new_tokens": 4, "batch_size": 4},
            "budget": {**TINY_BUDGET, "laten_lr": 1e-2}, **over}
    return config_file(tmp_path / f"dose-{len(over)}.yaml", data)


def _measure(student_dir: str):
    from pkt.models.load import load_tokenizer
    from pkt.studies.laten_dose import heldout_measure
    from pkt.studies.pilot_heldout import heldout_set

    tok = load_tokenizer(student_dir, padding_side="right")
    return heldout_measure(tok, heldout_set("gsm8k", 3, 0).loss, "chat", 3, 1024)


def test_tiny_study_is_apply_restores_the_student_resumes_and_rederives(tmp_path, qwen_pair, shared_data, pkt_cli):
    from pkt.laten import LatenConfig, apply, load_models
    from pkt.locate.pairing import load_pairing
    from pkt.models.load import load_model
    from pkt.studies.laten_dose import score_grid

    t, s = saved_pair(qwen_pair, tmp_path)
    cfg = _config(tmp_path, t, s)
    out, records = tmp_path / "out", tmp_path / "records"

    code, plan, err = pkt_cli("study", "laten-dose", cfg, "--dry-run")
    assert code == 0, err
    # per seed and penalty: the cycle's run (2 steps of the 20-step extract cycle) and the trained schedule's of 1
    assert "plan: 8 hypernetwork trainings, 2 locate stages, 8 grids and 9 evaluations (0 stages cached)" in plan
    assert "train-gsm8k-k2of20-l1000-s1" in plan and "train-gsm8k-k1of1-l0-s0" in plan
    assert "(point to be chosen)" in plan

    code, log, err = pkt_cli("study", "laten-dose", cfg, "--out", out)
    assert code == 0, err
    rec = R.load(records)
    assert sorted(rec["grids"]) == sorted((r, seed) for seed in SEEDS for r in
                                          ("k2of20-l1000", "k1of1-l1000", "k2of20-l0", "k1of1-l0"))
    g = rec["grids"][("k2of20-l1000", 0)]
    assert g["stage"].startswith("grid-gsm8k-k2of20-l1000-s0-") and g["train_stage"].startswith(
        "train-gsm8k-k2of20-l1000-s0-")
    assert [(p["step"], p["rate"]) for p in g["result"]["points"]] == [(1, 0.1), (2, 0.1), (1, 0.5), (2, 0.5)]
    assert [r["lr"] for r in g["train"]["log"]][0] < 1e-3  # step 1 of a 20-step cycle: the warm-up's lr/25
    assert rec["grids"][("k1of1-l1000", 0)]["train"]["log"][0]["lr"] == pytest.approx(1e-2)  # a 1-step cycle: peak
    grid = R.rows(rec)
    assert len(grid) == 2 * 2 * 2 + 2 * 2 and all(r["mean"] is not None for r in grid)
    # the same step and rate under the two schedules are two trainings: their held-out losses differ
    cyc, trn = [next(r for r in grid if (r["schedule"], r["penalty"], r["step"], r["rate"]) == (sch, 1000.0, 1, 0.5))
                for sch in ("cycle", "trained")]
    assert cyc["mean"] != trn["mean"]
    base = rec["student"]["heldout_loss"]["loss_per_example"]
    assert all(r["mean"] != base for r in grid)  # every point moved the student
    assert all(p["rel_norm"] > 0 and 0 <= p["bf16_changed"] <= 1 for r in grid for p in r["seeds"].values())
    # accuracy at the best point and at pkt run's (trained, step 1, rate 0.1, λ 1000); the test at the selected one
    points = R.accuracy_points(rec)
    assert points[-1] == {"schedule": "trained", "penalty": 1000.0, "step": 1, "rate": 0.1, "trained": 1, "span": 1} \
        or len(points) == 1
    assert sorted(rec["accuracy"]) == sorted(f"{R.point_label(p)}-s{x}" for p in points for x in SEEDS)
    chosen = R.select(rec)
    assert chosen == R._as_point(min(grid, key=lambda r: r["mean"]))
    assert sorted(rec["tests"]) == [f"{R.point_label(chosen)}-s{x}" for x in SEEDS]
    for x in SEEDS:
        test = rec["tests"][f"{R.point_label(chosen)}-s{x}"]["test"]
        assert test["ids"] == rec["student"]["test"]["ids"] and test["n"] == 3
    md = (records / R.REPORT).read_text()
    assert "## Held-out loss by step, schedule, rate and penalty" in md and "## The selected point" in md
    assert "## Where the delta helps and where it hurts" in md and (records / R.PLOT).stat().st_size > 0
    first = tree(records)

    # the oracle: a grid point is `pkt.laten.apply` of the same checkpoint, saved, reloaded and measured
    stages = out / "stages"
    key = json.loads((stages / g["stage"] / "stage.json").read_text())["key"]
    assert key["train"] == g["train_stage"] and key["locate"].startswith("locate-gsm8k-s0-")
    assert key["steps"] == [1, 2] and key["rates"] == [0.1, 0.5] and key["heldout"]["ids"] == rec["meta"][
        "heldout"]["ids"]
    assert sorted(p.name for p in (stages / g["train_stage"] / "train" / "checkpoints").iterdir()) == [
        "step-0001", "step-0002"]  # the scored steps' checkpoints only
    run_dir = stages / g["train_stage"] / "train"
    measure = _measure(s)
    fused_dir = tmp_path / "applied"
    apply(run_dir, 1, 0.5, fused_dir, seed=0, log=lambda m: None)
    want = measure(load_model(str(fused_dir)))
    got = next(p for p in g["result"]["points"] if (p["step"], p["rate"]) == (1, 0.5))
    assert [n for _, n in got["per_example"]] == [n for _, n in want["per_example"]]
    assert [x for x, _ in got["per_example"]] == pytest.approx([x for x, _ in want["per_example"]], rel=1e-5)
    manifest = json.loads((fused_dir / "pkt-laten.json").read_text())
    assert got["rel_norm"] == pytest.approx(manifest["delta_rel_norm"], rel=1e-6)

    # the student is restored between points: its loss after a whole grid equals its loss before, bit for bit
    models = load_models(LatenConfig(**json.loads((run_dir / "config.json").read_text())), log=lambda m: None)
    before = measure(models.student)
    loc = next(stages.glob("locate-gsm8k-s0-*"))
    pairings = {r: load_pairing(loc / R.pairing_file(r)) for r in (0.1, 0.5)}
    again = score_grid(models, run_dir, [1, 2], pairings, measure,
                       LatenConfig(**json.loads((run_dir / "config.json").read_text())))
    assert [p["per_example"] for p in again] == [p["per_example"] for p in g["result"]["points"]]
    after = measure(models.student)
    assert after["per_example"] == before["per_example"]
    assert [x for x, _ in after["per_example"]] == pytest.approx(
        [x for x, _ in rec["student"]["heldout_loss"]["per_example"]], rel=1e-6)

    code, log, err = pkt_cli("study", "laten-dose", cfg, "--out", out)  # resume: no stage work
    assert code == 0, err
    assert "[run]" not in log and "[redo]" not in log and tree(records) == first
    code, plan, _ = pkt_cli("study", "laten-dose", cfg, "--dry-run", "--out", out)
    assert code == 0 and "(point to be chosen)" not in plan and f"test-{R.point_label(chosen)}-s1" in plan

    # another machine: a fresh stage directory and the committed records alone: restored, nothing trained
    code, log, err = pkt_cli("study", "laten-dose", cfg, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    n_evals = 3 + len(rec["accuracy"]) + len(rec["tests"])
    assert "[run]" not in log and log.count("[restored]") == 8 + n_evals and tree(records) == first

    copy = tmp_path / "copy"  # the records alone, elsewhere, without the report: re-derived byte for byte
    assert rederived(pkt_cli, "laten-dose", R, records, copy,
                     _config(tmp_path, "nowhere", "nowhere", records=str(copy))) == first


def test_the_selected_point_against_its_random_null(tmp_path, qwen_pair, shared_data, pkt_cli):
    """nulls: [random]: the selected point's run retrained per seed on the null's vectors, its grid scored (each
    point `pkt.laten.apply` of the null's checkpoint), the null point evaluated on the held-out and test questions,
    the report setting it beside the point, one Holm family over the stated tests; resumable and re-derived."""
    from pkt.laten import apply
    from pkt.models.load import load_model

    t, s = saved_pair(qwen_pair, tmp_path)
    small = {"steps": [1, 2], "trained_steps": None, "schedules": ["cycle"], "rates": [0.5], "penalties": [1000],
             "accuracy": {"best": 1, "paper": False, "size": 3}, "nulls": ["random"]}
    cfg = _config(tmp_path, t, s, **small)
    out, records = tmp_path / "out", tmp_path / "records"
    code, plan, err = pkt_cli("study", "laten-dose", cfg, "--dry-run")
    assert code == 0, err
    # per seed: the real cycle run and the null's (the longest run stands for the point still to be chosen)
    assert "plan: 4 hypernetwork trainings, 2 locate stages, 4 grids and 11 evaluations" in plan, plan
    assert "disk: 8 hypernetwork checkpoints" in plan
    assert "train-gsm8k-k2of20-l1000-random-s1" in plan and "test-random-null (point to be chosen)-s0" in plan

    code, log, err = pkt_cli("study", "laten-dose", cfg, "--out", out)
    assert code == 0, err
    rec = R.load(records)
    chosen = R.select(rec)
    q = {**chosen, "vectors": "random"}
    assert sorted(rec["grids"]) == sorted((r, x) for x in SEEDS for r in ("k2of20-l1000", "k2of20-l1000-random"))
    for x in SEEDS:
        real, null = rec["grids"][("k2of20-l1000", x)], rec["grids"][("k2of20-l1000-random", x)]
        assert null["vectors"] == "random" and "vectors" not in real
        key = json.loads((out / "stages" / null["train_stage"] / "stage.json").read_text())["key"]
        assert key["laten"]["teacher_vectors"] == "random" and key["checkpoints"] == [1, 2]
        rp, np_ = real["result"]["points"], null["result"]["points"]
        assert [(p["step"], p["rate"]) for p in rp] == [(p["step"], p["rate"]) for p in np_]
        assert all(a["per_example"] != b["per_example"] and b["rel_norm"] > 0 for a, b in zip(rp, np_))
        assert f"{R.point_label(q)}-s{x}" in rec["accuracy"] and f"{R.point_label(q)}-s{x}" in rec["tests"]
        assert rec["tests"][f"{R.point_label(q)}-s{x}"]["test"]["ids"] == rec["student"]["test"]["ids"]
    assert R.point_label(q) == R.point_label(chosen).replace("-l1000-", "-l1000-random-")
    derived = R.derive(rec)
    n = derived["nulls"][0]
    assert n["grids"] == 2 and [p["step"] for p in n["points"]] == [1, 2]
    assert sum(p["selected"] for p in n["points"]) == 1
    family = [derived["test"], n["vs_null"], n["vs_student"]]
    raw = [m[2] for c in family for m in c["mcnemar"]]
    from pkt.experiment.stats import holm
    assert [h for c in family for h in c["holm"]] == holm(raw) and len(raw) == 3 * len(SEEDS)
    md = (records / R.REPORT).read_text()
    assert "## The selected point against its `random` null" in md
    assert "| selected point − null |" in md and "| null − student |" in md
    assert "2 of 2 grids, 2 of 2 `random` null grids" in md

    # the oracle: a null grid point is `pkt.laten.apply` of the null run's checkpoint, saved and reloaded
    g = rec["grids"][("k2of20-l1000-random", 0)]
    fused_dir = tmp_path / "null-applied"
    manifest, _ = apply(out / "stages" / g["train_stage"] / "train", 2, 0.5, fused_dir, seed=0, log=lambda m: None)
    assert manifest["teacher_vectors"] == "random"
    want = _measure(s)(load_model(str(fused_dir)))
    got = next(p for p in g["result"]["points"] if p["step"] == 2)
    assert [x for x, _ in got["per_example"]] == pytest.approx([x for x, _ in want["per_example"]], rel=1e-5)

    first = tree(records)
    code, log, err = pkt_cli("study", "laten-dose", cfg, "--out", out)  # resume: no stage work
    assert code == 0 and "[run]" not in log and "[redo]" not in log and tree(records) == first
    code, log, err = pkt_cli("study", "laten-dose", cfg, "--out", tmp_path / "elsewhere")  # restored from records
    assert code == 0 and "[run]" not in log and tree(records) == first
    copy = tmp_path / "copy"
    assert rederived(pkt_cli, "laten-dose", R, records, copy,
                     _config(tmp_path, "nowhere", "nowhere", records=str(copy), **small)) == first


def _rec(losses: dict, select: str = "loss", accuracy: dict | None = None) -> dict:
    """Records of a one-seed grid (cycle schedule, steps 1 and 2, rates 0.1 and 0.3, λ 1000) whose held-out losses
    are ``losses[(step, rate)]``."""
    settings = {"seeds": [0], "steps": [1, 2], "schedules": ["cycle"], "trained_steps": None, "rates": [0.1, 0.3],
                "penalties": [1000.0], "select": select, "accuracy": {"best": 2}}
    pts = [{"step": k, "rate": r, "loss_per_example": v} for (k, r), v in losses.items()]
    return {"meta": {"settings": settings, "n_extract": 20, "paper_point": None},
            "grids": {("k2of20-l1000", 0): {"run": "k2of20-l1000", "seed": 0, "result": {"points": pts}}},
            "accuracy": accuracy or {}, "tests": {}}


def test_selection_reads_held_out_records_only_and_ties_go_to_the_smaller_dose():
    best = _rec({(1, 0.1): 1.2, (2, 0.1): 1.1, (1, 0.3): 1.3, (2, 0.3): 1.15})
    assert (R.select(best)["step"], R.select(best)["rate"]) == (2, 0.1)
    # a tie between step 2 at rate 0.1 and step 1 at rate 0.3: the smaller rate; between steps: the fewer
    tie = _rec({(1, 0.1): 1.2, (2, 0.1): 1.0, (1, 0.3): 1.0, (2, 0.3): 1.3})
    assert (R.select(tie)["step"], R.select(tie)["rate"]) == (2, 0.1)
    tie = _rec({(1, 0.1): 1.0, (2, 0.1): 1.0, (1, 0.3): 1.3, (2, 0.3): 1.3})
    assert (R.select(tie)["step"], R.select(tie)["rate"]) == (1, 0.1)
    # test records play no part: the same choice whatever they hold
    tie["tests"] = {"k2of20-l1000-step2-r0.3-s0": {"test": {"score": 1.0}}}
    assert (R.select(tie)["step"], R.select(tie)["rate"]) == (1, 0.1)
    # by accuracy: among the accuracy points (the 2 of lowest loss), the best held-out accuracy
    acc = {f"k2of20-l1000-step{k}-r{r:g}-s0": {"heldout": {"score": v}} for k, r, v in [(2, 0.1, 0.1), (1, 0.3, 0.2)]}
    by_acc = _rec({(1, 0.1): 1.2, (2, 0.1): 1.0, (1, 0.3): 1.05, (2, 0.3): 1.3}, "accuracy", acc)
    assert [(p["step"], p["rate"]) for p in R.accuracy_points(by_acc)] == [(2, 0.1), (1, 0.3)]
    assert (R.select(by_acc)["step"], R.select(by_acc)["rate"]) == (1, 0.3)
    missing = _rec({(1, 0.1): 1.2, (2, 0.1): 1.0, (1, 0.3): 1.05})
    with pytest.raises(Exception, match="no point at step 2, rate 0.3"):
        R.select(missing)


@pytest.mark.parametrize("setting, needle", [
    ({"steps": [2, 1]}, "steps: Value error, must increase"),
    ({"trained_steps": [3]}, "trained_steps: Value error, 3 is not one of steps [1, 2]"),
    ({"rates": [0.1, 0.1]}, "rates: Value error, values repeat"),
    ({"rates": [0]}, "rates.0"),
    ({"schedules": ["onecycle"]}, "schedules.0"),
    ({"task": "humaneval"}, "task: Value error, HumanEval has no held-out pool"),
    ({"steps": [1, 30]}, "steps: 30 exceeds the gsm8k extract split's 20 examples"),
    ({"rates": [0.5]}, "accuracy.paper: pkt run's LaTen point (trained schedule, step 1, rate 0.1, λ 1000) needs "
                       "rate 0.1 in rates"),
    ({"penalties": [0]}, "needs penalty 1000 in penalties"),
    ({"lr": 1e-3}, "lr: Extra inputs are not permitted"),
    ({"select": "accuracy", "accuracy": {"best": 0, "paper": False}}, "select 'accuracy' chooses among the accuracy"),
])
def test_a_bad_config_is_one_line_naming_the_setting(tmp_path, shared_data, pkt_cli, setting, needle):
    code, out, err = pkt_cli("study", "laten-dose", _config(tmp_path, "qwen2.5-coder-1.5b-instruct",
                                                            "qwen2.5-coder-0.5b-instruct", **setting), "--dry-run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pkt: error: ") and needle in err, err
    assert not (tmp_path / "records").exists()


def test_the_committed_config_trains_pkt_runs_laten(shared_data):
    """configs/laten-dose-gsm8k.yaml: the embedded pair, gsm8k, seeds 0-2, steps-saved's LaTen budget; its paper
    point's run is exactly `pkt run`'s LaTen training for that budget (the paper's step 4 at rate 0.1, λ 1000)."""
    from pathlib import Path

    from pkt.experiment.config import ExperimentConfig
    from pkt.methods.laten import laten_settings
    from pkt.studies.laten_dose import LatenDose, Run, load_config
    from pkt.studies.steps_saved import load_config as steps_config

    root = Path(__file__).parents[1]
    cfg, text = load_config(root / "configs" / "laten-dose-gsm8k.yaml")
    study = LatenDose(cfg, None, text, log=lambda m: None, dry=True)
    assert (cfg.student, cfg.teacher, cfg.task, cfg.seeds) == ("qwen2.5-coder-0.5b-instruct",
                                                               "qwen2.5-coder-1.5b-instruct", "gsm8k", [0, 1, 2])
    assert study.paper == {"schedule": "trained", "penalty": 1000.0, "step": 4, "rate": 0.1, "trained": 4, "span": 4}
    assert sorted(cfg.rates) == [0.1, 0.3, 1.0] and 0.0 in cfg.penalties and study.n_extract == 20
    ss, _ = steps_config(root / "configs" / "steps-saved-gsm8k.yaml")
    pkt_run = ExperimentConfig(teacher=ss.teacher, student=ss.student, tasks=["gsm8k"], methods=["student", "laten"],
                               dtype=ss.dtype, teacher_dtype=ss.teacher_dtype, style=ss.style, budget=ss.budget,
                               report_to="none")
    assert study.laten_cfg(Run(4, 4, 1000.0), 2) == laten_settings(pkt_run, "gsm8k", 2)
    # the cycle schedule: 20 steps of the extract split's cycle, which is also the trained schedule's 20-step run
    assert study.run_of("cycle", 8, 0.0) == Run(20, 20, 0.0) == study.run_of("trained", 20, 0.0)
    assert len(study.runs()) == 2 * 5
