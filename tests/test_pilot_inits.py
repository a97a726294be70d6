"""`pkt study pilot` over several inits: a LoRA-only config keeps its stage names and keys, each init gets its own lr
chosen on held-out, Seeking's extraction is one stage shared by every seeking build, a PiSSA build's ‖ΔW‖/‖W‖ is
what reached the model (0 at step 0) while its init's own ‖B₀A₀‖/‖W‖ is large, and a tiny sweep of the four inits
runs, resumes without stage work, restores from its records and re-derives its report byte for byte."""

import re
from pathlib import Path

import pytest
from staged_studies import config_file, rederived, saved_pair, tree

from pkt.errors import PktError
from pkt.studies import pilot_report as R
from pkt.testing import save_tiny

ROOT = Path(__file__).parents[1]


def test_a_lora_only_config_keeps_its_stage_names_and_keys(shared_data):
    """configs/pilot-gsm8k.yaml (no `inits`) names and keys every stage as the pilot did before inits existed: the
    build key below is that pilot's formula, written out; the evaluations' keys are built on the build's name."""
    from pkt.cli.postpkt import finetune_config
    from pkt.experiment.fingerprint import data_identity, model_identity
    from pkt.studies.pilot import Pilot, load_config
    from pkt.studies.pilot_plan import render_plan

    cfg, text = load_config(ROOT / "configs" / "pilot-gsm8k.yaml")
    assert cfg.inits == ["lora"] and cfg.teacher is None
    pilot = Pilot(cfg, None, text, log=lambda m: None, dry=True)
    for n, e in R.budgets(cfg.model_dump(mode="json")):
        for lr in cfg.lrs:
            for seed in cfg.seeds:
                old = {"kind": "pilot-build", "init": "lora", "task": "gsm8k",
                       "finetune": finetune_config(None, r=16, alpha=16, dropout=None, lr=lr, epochs=e, batch_size=16,
                                                   micro_batch_size=4, max_length=384, n_train=n, style="chat",
                                                   dtype="float32", seed=seed, report_to="none").model_dump(),
                       **pilot.common, "models": {cfg.student: model_identity(cfg.student)},
                       "data": data_identity("gsm8k", ("train",))}
                assert pilot.build_key(n, e, lr, seed) == (f"build-n{n}-e{e:g}-lr{lr:g}-s{seed}", old)
    # a PiSSA setting does not reach LoRA's key (only PiSSA reads it)
    niter = Pilot(cfg.model_copy(update={"pissa_niter": 4}), None, text, log=lambda m: None, dry=True)
    assert niter.build_key(256, 1.0, 3e-4, 0) == pilot.build_key(256, 1.0, 3e-4, 0)
    assert niter.build_key(256, 1.0, 3e-4, 0, "pissa")[1]["finetune"]["pissa_niter"] == 4
    # the plan (the trimmed grid: 4 budgets x 2 lrs, and 64 x 3 epochs): every stage under the name it had, no
    # extraction
    plan = render_plan(pilot)
    assert "plan: 10 builds and 17 evaluations (0 stages cached)" in plan and "extract" not in plan
    names = [r[0] for r in pilot.plan()]
    assert names[:2] == ["heldout-student", "test-student"]
    assert "build-n1000-e1-lr0.001-s0" in names and "heldout-n64-e1-lr0.0003-s0" in names
    assert "build-n64-e3-lr0.001-s0" in names
    assert all(not x.startswith(("build-pissa", "build-seeking", "extract")) for x in names)


def _points(scores: dict, init: str = "lora") -> dict:
    return {R.point_name(64, 1.0, lr, s, init): {"heldout": {"score": v}, "build": {"update": {"all": u}}}
            for (lr, s), (v, u) in scores.items()}


def test_each_init_selects_its_own_lr_and_the_matched_lr_is_closest_by_ratio():
    lrs = [1e-4, 3e-4, 1e-3]
    pts = {**_points({(1e-4, 0): (0.1, 0.001), (3e-4, 0): (0.3, 0.002), (1e-3, 0): (0.2, 0.004)}),
           **_points({(1e-4, 0): (0.4, 0.010), (3e-4, 0): (0.2, 0.020), (1e-3, 0): (0.1, 0.040)}, "pissa")}
    assert R.point_name(64, 1.0, 1e-4, 0, "pissa") == "pissa-n64-e1-lr0.0001-s0"
    assert R.select_lr(pts, 64, 1.0, lrs, [0])[0] == 3e-4
    assert R.select_lr(pts, 64, 1.0, lrs, [0], "pissa")[0] == 1e-4
    assert R.select_lr(pts, 64, 1.0, lrs, [0], "seeking") == (None, {})
    # LoRA's selected build moved 0.2%; PiSSA's nearest by ratio is 1e-4 (0.010/0.002 = 5x, the others 10x, 20x)
    assert R.matched_lr(pts, 64, 1.0, lrs, [0], "pissa", 0.002) == 1e-4
    # by ratio, not by difference: LoRA's 1e-4 and 1e-3 moved 0.1% and 0.4%; 0.22% is nearer 0.1% by difference
    # but nearer 0.4% by ratio (1.8x against 2.2x); 0.2% is 2x from both: a tie goes to the smaller lr
    two = [1e-4, 1e-3]
    assert R.matched_lr(pts, 64, 1.0, two, [0], "lora", 0.0022) == 1e-3
    assert R.matched_lr(pts, 64, 1.0, two, [0], "lora", 0.002) == 1e-4
    assert R.matched_lr(pts, 64, 1.0, lrs, [0], "lora", 0.002) == 3e-4
    assert R.matched_lr(pts, 64, 1.0, lrs, [0], "pissa", None) is None
    assert R.matched_lr(pts, 64, 1.0, lrs, [0, 1], "pissa", 0.002) is None  # seed 1 not recorded yet
    assert R.test_name(64, 1.0, 0) == "n64-e1-s0"
    assert R.test_name(64, 1.0, 0, "seeking-random", matched=True) == "seeking-random-n64-e1-matched-s0"
    assert R.inits({"inits": ["pissa", "lora", "seeking"]}) == ["lora", "pissa", "seeking"]
    assert R.inits({}) == ["lora"]


def test_a_pissa_build_counts_its_init_move_apart_from_the_update_that_reached_the_model(tmp_path, qwen_pair,
                                                                                         shared_data):
    """PiSSA's init stores W − B₀A₀ and adapts B₀A₀, so the model at step 0 is the student: at lr 0 the merged
    build minus the student is ~0 while ‖B₀A₀‖/‖W‖ is large. Trained, the merged-minus-student measure agrees with
    the converted adapter's product (peft's conversion)."""
    from pkt.cli.postpkt import finetune_config
    from pkt.postpkt import SeekingConfig, run_postpkt
    from pkt.studies.adapter_update import adapter_dir, base_tensors, merged_update_norms, summarise, update_norms

    _, student, tok = qwen_pair
    sdir = Path(save_tiny(student, tok, tmp_path / "student"))
    base = base_tensors(sdir)
    sizes = {}
    for lr in (0.0, 1e-2):
        ft = finetune_config(None, r=2, alpha=2, lr=lr, epochs=1, batch_size=2, micro_batch_size=2, max_length=160,
                             n_train=4, seed=0, report_to="none")
        out = tmp_path / f"pissa-{lr:g}"
        run_postpkt(None, str(sdir), "gsm8k", "pissa", out, ft, SeekingConfig(), progress=False, log=lambda m: None)
        reached = summarise(merged_update_norms(out / "merged", base, out / "adapter_init"))
        start = summarise(update_norms(out / "adapter_init", base))
        converted = summarise(update_norms(adapter_dir(out), base))
        sizes[lr] = (reached["all"], start["all"], converted["all"])
    reached, start, converted = sizes[0.0]
    assert reached < 1e-6 and converted < 1e-6  # the model at step 0 is the student (to float32 rounding)
    assert start > 0.3  # the top-2 singular directions of the tiny student's matrices
    reached, start, converted = sizes[1e-2]
    assert reached > 1e-3 and reached == pytest.approx(converted, rel=1e-3)
    assert start == pytest.approx(sizes[0.0][1])  # the init does not depend on the lr


def _config(tmp_path, student: str, teacher: str | None, **over) -> str:
    data = {"name": "tiny-sweep", "student": student, "teacher": teacher, "task": "gsm8k",
            "records": str(tmp_path / "records"), "inits": ["lora", "pissa", "seeking", "seeking-random"],
            "seeds": [0, 1], "train_examples": [4], "epochs": [1], "lrs": [1e-3, 1e-2], "batch_size": 2,
            "micro_batch_size": 2, "max_length": 160, "rank": 2, "alpha": 2, "extract_samples": 2,
            "matched_test": True, "progress": False,
            "eval": {"test_size": 3, "max_new_tokens": 4, "batch_size": 4},
            "heldout": {"size": 3, "answer_loss": False}, **over}
    return config_file(tmp_path / f"sweep-{len(over)}.yaml", data)


def test_a_tiny_sweep_of_four_inits_selects_per_init_shares_the_extraction_and_resumes(tmp_path, qwen_pair,
                                                                                        shared_data, pkt_cli,
                                                                                        monkeypatch):
    # A tiny model scores 0 on every held-out question, so every init's selection ties and takes its smaller lr,
    # where each init's update is also closest to LoRA's: the matched-update tests would never run. LoRA's choice
    # is steered to its larger lr (run and report alike), so that every other init's matched lr is not its own
    # selected one. Every other init keeps the real selection.
    select = R.select_lr

    def steered(points, n, epochs, lrs, seeds, init="lora"):
        lr, means = select(points, n, epochs, lrs, seeds, init)
        return (max(lrs) if init == "lora" and lr is not None else lr), means

    monkeypatch.setattr(R, "select_lr", steered)
    t, s = saved_pair(qwen_pair, tmp_path)
    cfg = _config(tmp_path, s, t)
    out, records = tmp_path / "out", tmp_path / "records"
    inits, lrs, seeds = ["lora", "pissa", "seeking", "seeking-random"], [1e-3, 1e-2], [0, 1]

    code, plan, err = pkt_cli("study", "pilot", cfg, "--dry-run")
    assert code == 0, err
    # 16 builds; 16 held-out, 8 selected tests and up to 6 matched tests, 2 of the student
    assert "plan: 16 builds, 1 extraction and 32 evaluations (0 stages cached)" in plan, plan
    assert "extract-gsm8k" in plan and "(lr to be matched; none if selected)" in plan

    code, log, err = pkt_cli("study", "pilot", cfg, "--out", out)
    assert code == 0, err
    # the teacher's extraction runs once for the 8 seeking and seeking-random builds (2 lrs x 2 seeds each)
    assert log.count("[run]    extract-gsm8k") == 1 and len(list((out / "stages").glob("extract-gsm8k-*"))) == 1
    extraction = next((out / "stages").glob("extract-gsm8k-*")).name
    rec = R.load(records)
    assert len(rec["points"]) == 16
    for init in inits:
        lr, _ = R.select_lr(rec["points"], 4, 1.0, lrs, seeds, init)
        for seed in seeds:
            t = rec["tests"][R.test_name(4, 1.0, seed, init)]
            assert t["lr"] == lr and t["init"] == init and t["test"]["ids"] == rec["student"]["test"]["ids"]
        for x in lrs:
            for seed in seeds:
                p = rec["points"][R.point_name(4, 1.0, x, seed, init)]
                assert p["init"] == init and p["build"]["steps"] == 2 and p["build"]["update"]["all"] > 0
                if init == "lora":
                    assert "init_update" not in p["build"]  # LoRA's record is the one it had: B₀ = 0
                else:  # PiSSA and Seeking start from a non-zero adapter, larger than the trained change here
                    assert p["build"]["init_update"]["all"] > p["build"]["update"]["all"]
                assert (p["build"].get("extraction", {}).get("stage") == extraction) == init.startswith("seeking")
    # the matched tests: each other init at the lr whose update is nearest LoRA's selected build's (the larger lr,
    # by ratio: PiSSA and Seeking move ~2.6x as far as LoRA at each lr), paired with LoRA's selected build
    assert rec["tests"]["n4-e1-s0"]["lr"] == 1e-2
    target = R.mean_updates(rec["points"], 4, 1.0, lrs, seeds)[1e-2]
    for init in inits[1:]:
        assert R.matched_lr(rec["points"], 4, 1.0, lrs, seeds, init, target) == 1e-2
        for seed in seeds:
            assert rec["tests"][R.test_name(4, 1.0, seed, init)]["lr"] == 1e-3
            t = rec["tests"][R.test_name(4, 1.0, seed, init, matched=True)]
            assert t["lr"] == 1e-2 and t["matched"]["target"] == target and t["init"] == init
    assert not list((out / "stages").glob("build-*/run/merged/model*.safetensors"))  # pruned after evaluation
    first = tree(records)
    md = (records / R.REPORT).read_text()
    for heading in ("## Each init's held-out curve over lr", "## The selected lr on the test subset, against the "
                    "student", "## Each init against LoRA, both at their selected lr", "## At matched update size"):
        assert heading in md
    # Holm over every comparison stated: 4 inits against the student, 3 against LoRA selected, 3 matched and Seeking
    # against its control, seeking-random (Seeking's builds minus the control's, paired seed by seed)
    assert "across all 11 comparisons stated above" in md and "3 matched-update test evaluations" in md
    assert "## Seeking against its controls, both at their selected lr" in md
    ctl = R.derive(rec)["selected"]
    sk, rnd = (next(b for b in ctl if b["init"] == i) for i in ("seeking", "seeking-random"))
    seeking_mean = sum(t["test"]["score"] for t in sk["tests"]) / 2
    random_mean = sum(t["test"]["score"] for t in rnd["tests"]) / 2
    assert rnd["vs_seeking"]["delta"] == pytest.approx(seeking_mean - random_mean)
    assert "vs_seeking" not in sk and "vs_seeking" not in next(b for b in ctl if b["init"] == "pissa")
    assert "| pissa | 4 | 1 | 0.001 | 0 | 2 |" in md

    code, log, err = pkt_cli("study", "pilot", cfg, "--out", out)  # resume: no stage work, not the extraction
    assert code == 0, err
    assert "[run]" not in log and "[redo]" not in log and tree(records) == first
    code, plan, _ = pkt_cli("study", "pilot", cfg, "--dry-run", "--out", out)
    assert "estimated 0 s" in plan

    # another machine, the committed records only: nothing recomputed, the teacher never loaded
    code, log, err = pkt_cli("study", "pilot", cfg, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    assert "[run]" not in log and "teacher loaded" not in log and tree(records) == first

    copy = tmp_path / "copy"  # the records alone, elsewhere: the report re-derived byte for byte
    assert rederived(pkt_cli, "pilot", R, records, copy,
                     _config(tmp_path, "nowhere", "nowhere", records=str(copy))) == first


def test_select_seeds_sweeps_the_lrs_on_one_seed_and_tests_the_selected_lr_on_every_seed(tmp_path, qwen_pair,
                                                                                         shared_data, pkt_cli):
    """With `select_seeds: [0]` the lr grid is built and evaluated on held-out for seed 0 only; seed 1 builds each
    init's selected lr alone and scores it on the test subset, so that three seeds cost one sweep and two builds.
    The comparisons pair every seed; the report states each seed's test score and ‖ΔW‖/‖W‖."""
    t, s = saved_pair(qwen_pair, tmp_path)
    # extract_samples above the extract split's 20 rows: the extraction takes them all, and the report says so
    cfg = _config(tmp_path, s, t, inits=["lora", "seeking"], select_seeds=[0], matched_test=False,
                  extract_samples=50)
    out, records = tmp_path / "out", tmp_path / "records"
    lrs = [1e-3, 1e-2]

    code, plan, err = pkt_cli("study", "pilot", cfg, "--dry-run")
    assert code == 0, err
    # 2 inits x 2 lrs on seed 0, and one build per init for seed 1; 4 held-out, 4 tests, 2 of the student
    assert "plan: 6 builds, 1 extraction and 10 evaluations (0 stages cached)" in plan, plan
    assert "build-seeking-n4-e1-s1 (lr to be chosen)" in plan and "heldout-n4-e1-lr0.001-s1" not in plan

    code, log, err = pkt_cli("study", "pilot", cfg, "--out", out)
    assert code == 0, err
    assert log.count("[run]    extract-gsm8k") == 1
    rec = R.load(records)
    assert sorted(rec["points"]) == sorted(R.point_name(4, 1.0, x, 0, i) for x in lrs for i in ("lora", "seeking"))
    for init in ("lora", "seeking"):
        lr, _ = R.select_lr(rec["points"], 4, 1.0, lrs, [0], init)
        t0, t1 = (rec["tests"][R.test_name(4, 1.0, seed, init)] for seed in (0, 1))
        assert t0["lr"] == t1["lr"] == lr and t0["build_stage"] != t1["build_stage"]
        assert t1["update"]["all"] > 0 and t0["update"] == rec["points"][R.point_name(4, 1.0, lr, 0, init)][
            "build"]["update"]
    md = (records / R.REPORT).read_text()
    assert "seeds 0, 1 (the lr grid is built and selected on seed 0;" in md
    assert "(20 examples of the extract split)" in md
    assert "## The selected builds seed by seed" in md and "| seeking | 4 | 1 | 0.001 | 1 |" in md
    assert "across all 3 comparisons stated above" in md  # 2 inits against the student, seeking against LoRA
    assert "Recorded: 4 of 4 grid points" in md
    first = tree(records)

    code, log, err = pkt_cli("study", "pilot", cfg, "--out", out)  # resume: no stage work
    assert code == 0, err
    assert "[run]" not in log and tree(records) == first
    # another machine, the committed records only: seed 1's builds (no grid point records them) are restored from
    # their test records too, not retrained; the plan counts every stage as done
    code, plan, err = pkt_cli("study", "pilot", cfg, "--dry-run", "--out", tmp_path / "elsewhere")
    assert code == 0, err
    assert "(17 stages cached), estimated 0 s" in plan, plan
    code, log, err = pkt_cli("study", "pilot", cfg, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    assert "[run]" not in log and "teacher loaded" not in log and tree(records) == first
    assert "[cached] build-seeking-n4-e1-lr0.001-s1: not needed" in log, log
    copy = tmp_path / "copy"
    assert rederived(pkt_cli, "pilot", R, records, copy,
                     _config(tmp_path, "nowhere", "nowhere", records=str(copy), inits=["lora", "seeking"],
                             select_seeds=[0], matched_test=False, extract_samples=50)) == first


@pytest.mark.parametrize("setting, needle", [
    ({"inits": ["pissa"]}, "inits: Value error, lora must be one of the inits"),
    ({"inits": ["lora", "dora"]}, "inits.1: Input should be 'lora', 'pissa', 'seeking' or 'seeking-random'"),
    ({"inits": ["lora", "lora"]}, "inits: Value error, values repeat"),
    ({"inits": ["lora", "seeking-random"]}, "teacher: Value error, init seeking-random starts from the teacher's "
                                            "extraction: name the teacher"),
    ({"seeds": [0, 1], "select_seeds": [2]}, "Value error, select_seeds: seed 2 is not one of the seeds [0, 1]"),
    ({"select_seeds": []}, "select_seeds: List should have at least 1 item"),
])
def test_a_bad_inits_setting_is_one_line_naming_it(tmp_path, shared_data, pkt_cli, setting, needle):
    path = config_file(tmp_path / "bad.yaml", {"student": "qwen2.5-coder-0.5b-instruct", "records": str(tmp_path / "r"),
                                               "train_examples": [4], "lrs": [1e-3], **setting})
    code, out, err = pkt_cli("study", "pilot", path, "--dry-run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pkt: error: ") and needle in err, err


def test_the_decisive_config_sweeps_on_seed_0_and_tests_three_seeds(shared_data):
    """configs/decisive-gsm8k.yaml: the four inits at lr 3e-5 ... 1e-3 on seed 0, the selected lr on seeds 0-2, one
    budget, held-out 150, test 300, and the plan its header quotes."""
    from pkt.studies.pilot import Pilot, load_config
    from pkt.studies.pilot_plan import render_plan

    cfg, text = load_config(ROOT / "configs" / "decisive-gsm8k.yaml")
    assert cfg.inits == ["lora", "pissa", "seeking", "seeking-random"] and cfg.teacher
    assert (cfg.lrs, cfg.seeds, cfg.select_seeds) == ([3e-5, 1e-4, 3e-4, 1e-3], [0, 1, 2], [0])
    assert len(R.budgets(cfg.model_dump(mode="json"))) == 1
    assert (cfg.heldout.size, cfg.eval.test_size, cfg.matched_test, cfg.dtype) == (150, 300, False, "float32")
    # the budget is the committed pilot's smallest significant one (its selected build beats the student on test)
    assert (cfg.train_examples, cfg.epochs) == ([64], [1])
    pilot = ROOT / "docs" / "results" / "pilot-gsm8k"
    test = R.load(pilot)["tests"]["n64-e1-s0"]
    assert (test["train_examples"], test["epochs"], test["lr"]) == (64, 1, 3e-4)
    assert "significantly raises the student's test score: 64 examples × 1 epoch" in (pilot / R.REPORT).read_text()
    # the whole study's plan, whatever its committed records already restore (they are this code's while it runs)
    from pkt.experiment.plan import human

    pilot = Pilot(cfg, None, text, log=lambda m: None, dry=True)
    assert re.search(r"plan: 24 builds, 1 extraction and 30 evaluations \(\d+ stages cached\)", render_plan(pilot))
    assert human(sum(r[2] for r in pilot.plan())) == "6.7 h"
    assert "24 builds, 1 extraction and 30 evaluations, 6.7 h" in text


def test_the_full_test_set_config_is_the_decisive_study_scored_on_all_1319_questions(shared_data):
    """configs/decisive-gsm8k-full.yaml: the decisive study's LoRA, Seeking and seeking-random on the whole test set.
    Every other setting is the decisive study's, so that its builds and held-out evaluations have the same stage
    keys (restored from the decisive study's records, not rerun) and only the test evaluations' keys differ."""
    from pkt.experiment.fingerprint import model_identity
    from pkt.studies.pilot import Pilot, load_config

    full, ftext = load_config(ROOT / "configs" / "decisive-gsm8k-full.yaml")
    dec, dtext = load_config(ROOT / "configs" / "decisive-gsm8k.yaml")
    a, b = full.model_dump(), dec.model_dump()
    assert a["eval"].pop("test_size") == 1319 and b["eval"].pop("test_size") == 300
    assert a.pop("inits") == ["lora", "seeking", "seeking-random"] and b.pop("inits")[1] == "pissa"
    assert (a.pop("name"), a.pop("records")) == ("decisive-gsm8k-full", "docs/results/decisive-gsm8k-full")
    del b["name"], b["records"]
    assert a == b
    pf, pd = (Pilot(c, None, t, log=lambda m: None, dry=True) for c, t in ((full, ftext), (dec, dtext)))
    for init in ("lora", "seeking", "seeking-random"):
        assert pf.build_key(64, 1.0, 1e-4, 2, init) == pd.build_key(64, 1.0, 1e-4, 2, init)
    label = "student", model_identity(full.student)
    assert pf.eval_key(label[0], "heldout", label[1]) == pd.eval_key(label[0], "heldout", label[1])
    assert pf.eval_key(label[0], "test", label[1]) != pd.eval_key(label[0], "test", label[1])


def test_the_function_transfer_config_pairs_with_the_decisive_study(shared_data):
    """configs/decisive-function-gsm8k.yaml evaluates every seed exactly as the decisive study's test evaluations
    (the same 300 questions, prompts, decoding and dtype), and trains at its budget, so their rows pair."""
    from pkt.config import load_config as load
    from pkt.experiment.config import ExperimentConfig
    from pkt.experiment.evaluation import eval_cfg
    from pkt.studies.pilot import Pilot, load_config

    cfg, text = load_config(ROOT / "configs" / "decisive-gsm8k.yaml")
    decisive = Pilot(cfg, None, text, log=lambda m: None, dry=True).eval_cfg("test").model_dump()
    fn = load(ExperimentConfig, ROOT / "configs" / "decisive-function-gsm8k.yaml")
    for seed in fn.seeds:
        assert eval_cfg(fn, seed, "gsm8k").model_dump() == decisive
    b = fn.budget_for("gsm8k")
    assert (b.train_examples, b.epochs, b.batch_size, b.max_length, b.rank, b.alpha, fn.dtype, fn.eval_dtype) == \
        (cfg.train_examples[0], cfg.epochs[0], cfg.batch_size, cfg.max_length, cfg.rank, cfg.alpha, cfg.dtype,
         "float32")
    assert b.lr in cfg.lrs and "lora" in fn.methods and "student" in fn.methods


def test_question_churn_counts_discordant_questions_same_seed_and_seed_to_seed():
    """The churn table's counts, against a hand count: two inits at the same seed, and each init across seeds."""
    def t(per, ids=(1, 2, 3, 4)):
        return {"test": {"per_example": per, "ids": list(ids)}}

    a = [t([1, 0, 0, 1]), t([1, 1, 0, 1])]  # seed 0, seed 1
    b = [t([0, 0, 0, 1]), t([1, 1, 1, 0])]
    sel = [{"init": "lora", "n": 64, "epochs": 1.0, "tests": a}, {"init": "seeking", "n": 64, "epochs": 1.0, "tests": b}]
    (c,) = R.question_churn(sel, [0, 1])
    assert (c["a"], c["b"]) == ("lora", "seeking")
    assert c["same_seed"] == [1, 2] and c["a_seeds"] == [1] and c["b_seeds"] == [4]
    assert R.question_churn(sel, [0]) == []  # one seed: no seed-to-seed noise to read it against
    untested = [sel[0], {**sel[1], "tests": None}]
    assert R.question_churn(untested, [0, 1]) == []
    with pytest.raises(PktError, match="different questions"):
        R.question_churn([sel[0], {**sel[1], "tests": [t([0] * 4, ids=(5, 6, 7, 8)), b[1]]}], [0, 1])
