"""Held-out loss by optimizer step (`pkt study steps-saved`, docs/steps-saved.md).

The probe of the shared training loop changes nothing of the training (weights and per-step losses equal bit for
bit with and without it, for SFT and GKD, with dropout on); its step 0 is the untrained model's answer loss; the
study's arms see the same batches; a tiny study runs, resumes without stage work, restores from its records on
another machine and re-derives its report byte for byte; a bad config is one line naming the setting.
"""

from __future__ import annotations

import copy

import pytest
import torch

from staged_studies import config_file, rederived, saved_pair, tree

from pkt.align.finetune import FinetuneConfig, Heldout, finetune, heldout_probe
from pkt.align.lora_init import make_lora_model
from pkt.data.chat import tokenize_example
from pkt.data.jsonl import ChatExample
from pkt.evaluate.generate import response_nll

TRAIN = [ChatExample(f"What is {a} + {b}?" + " Think." * (a % 3), f"{a} + {b} = {a + b}. The answer is {a + b}")
         for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1)]]
HELD = [ChatExample(f"What is {a} times {b}?", f"{a} * {b} = {a * b}. The answer is {a * b}")
        for a, b in [(2, 3), (4, 5), (6, 7)]]


def _lora(student, seed=0):
    torch.manual_seed(seed)  # the LoRA A init draws from torch's global RNG
    return make_lora_model(copy.deepcopy(student), "lora", r=4, alpha=8, dropout=0.1)


def _lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _cfg(**over) -> FinetuneConfig:
    return FinetuneConfig(**{"r": 4, "alpha": 8, "dropout": 0.1, "lr": 1e-2, "batch_size": 2, "micro_batch_size": 1,
                             "epochs": 2, "max_length": 64, "warmup_ratio": 0.25, "report_to": "none", **over})


TRAINING = ("step", "epoch", "loss", "lr", "grad_norm")


def test_the_probe_changes_no_training_bit(qwen_pair):
    """Dropout on, micro-batches, two epochs (a reshuffle): with the probe at 0, 1, 2, 4 and the last step the
    LoRA weights and every per-step training number are equal to those of a run without it, bit for bit."""
    _, student, tok = qwen_pair
    cfg = _cfg()
    plain_model, probed_model = _lora(student), _lora(student)
    plain = finetune(plain_model, tok, TRAIN, cfg, progress=False)
    plain_rng = torch.get_rng_state()
    probe = heldout_probe(Heldout(HELD, (0, 1, 2, 4, 8), batch_size=2), tok, cfg.style)
    probed = finetune(probed_model, tok, TRAIN, cfg, progress=False, probe=probe)
    assert len(plain) == 8  # 4 steps per epoch (7 examples by 2), 2 epochs
    assert [{k: r[k] for k in TRAINING} for r in probed] == [{k: r[k] for k in TRAINING} for r in plain]
    a, b = _lora_state(probed_model), _lora_state(plain_model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # the global RNG is where the run without the probe left it
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert [r["step"] for r in probe.records] == [0, 1, 2, 4, 8]
    assert [r.get("heldout_loss") for r in probed] == [None if k not in (1, 2, 4, 8) else
                                                         probe.records[[1, 2, 4, 8].index(k) + 1]["loss"]
                                                         for k in range(1, 9)]
    assert probe.records[-1]["loss"] != probe.records[0]["loss"]  # training moved the held-out loss
    # each step's examples, as indices into TRAIN: every epoch a permutation of all seven
    assert len(probe.batches) == 8 and sorted(sum(probe.batches[:4], [])) == list(range(7))
    assert sorted(sum(probe.batches[4:], [])) == list(range(7)) and probe.batches[:4] != probe.batches[4:]
    assert not probed_model.training and not any(m.training for m in probed_model.modules())


def test_the_probe_changes_no_gkd_bit(qwen_pair):
    """GKD samples the student's continuations from torch's RNG and draws its on-policy coin from the loop's: the
    probe leaves both where they were."""
    from pkt.align.gkd import GKDConfig, gkd_finetune

    teacher, student, tok = qwen_pair
    ft = _cfg(batch_size=4, micro_batch_size=2)
    gcfg = GKDConfig(lmbda=0.5, max_new_tokens=6)
    plain_model, probed_model = _lora(student), _lora(student)
    plain = gkd_finetune(plain_model, teacher, tok, TRAIN, ft, gcfg, progress=False)
    probe = heldout_probe(Heldout(HELD, (0, 2, 3)), tok, ft.style)
    probed = gkd_finetune(probed_model, teacher, tok, TRAIN, ft, gcfg, progress=False, probe=probe)
    keys = (*TRAINING, "on_policy")
    assert [{k: r[k] for k in keys} for r in probed] == [{k: r[k] for k in keys} for r in plain]
    a, b = _lora_state(probed_model), _lora_state(plain_model)
    assert all(torch.equal(a[n], b[n]) for n in a) and [r["step"] for r in probe.records] == [0, 2, 3]


def test_step_zero_is_the_untrained_models_answer_loss(qwen_pair):
    """A LoRA starts as the student (B = 0): the probe's step 0 is the plain student's response_nll on the same
    examples, tokenised as `pkt eval`'s answer loss tokenises them."""
    _, student, tok = qwen_pair
    held = Heldout(HELD, (0,), batch_size=2, max_length=1024)
    probe = heldout_probe(held, tok, "chat")
    finetune(_lora(student), tok, TRAIN, _cfg(epochs=1), progress=False, probe=probe)
    feats = [tokenize_example(e, tok, "chat", max_length=1024) for e in HELD]
    student.eval()
    ref = response_nll(student, feats, tok.pad_token_id, batch_size=2, progress=False)
    got = probe.records[0]
    assert [n for _, n in got["per_example"]] == [n for _, n in ref]
    assert [s for s, _ in got["per_example"]] == pytest.approx([s for s, _ in ref], rel=1e-6)
    assert got["loss"] == pytest.approx(sum(s for s, _ in ref) / sum(n for _, n in ref), rel=1e-6)
    assert got["tokens"] == sum(n for _, n in ref) > 0


def test_a_step_the_run_never_reaches_fails_before_training(qwen_pair):
    from pkt.errors import PktError

    _, student, tok = qwen_pair
    model = _lora(student)
    before = _lora_state(model)
    with pytest.raises(PktError, match=r"heldout_at 9: the run has 4 optimizer steps"):
        finetune(model, tok, TRAIN, _cfg(epochs=1), progress=False,
                 probe=heldout_probe(Heldout(HELD, (0, 9)), tok, "chat"))
    assert all(torch.equal(before[n], p) for n, p in _lora_state(model).items())


# ---- the study ---------------------------------------------------------------------------------------------------
def _config(tmp_path, teacher: str, student: str, **over) -> str:
    from pkt.testing import TINY_BUDGET

    data = {"name": "tiny-steps", "teacher": teacher, "student": student, "task": "gsm8k",
            "records": str(tmp_path / "records"), "seeds": [0, 1], "arms": ["lora", "laten-lora"],
            "heldout_at": [0, 1, 2], "heldout": {"size": 3, "batch_size": 3}, "teacher_dtype": "float32",
            "progress": False, "budget": {**TINY_BUDGET, "lr": 1e-2, "dropout": 0.1}, **over}
    return config_file(tmp_path / f"steps-{len(over)}.yaml", data)


def test_tiny_study_pairs_its_arms_resumes_and_rederives_its_report(tmp_path, qwen_pair, shared_data, pkt_cli):
    import json

    from pkt.models.load import load_model, load_tokenizer
    from pkt.studies import steps_saved_report as R
    from pkt.studies.pilot_heldout import heldout_set

    t, s = saved_pair(qwen_pair, tmp_path)
    cfg = _config(tmp_path, t, s)
    out, records = tmp_path / "out", tmp_path / "records"

    code, plan, err = pkt_cli("study", "steps-saved", cfg, "--dry-run")
    assert code == 0, err
    assert "plan: 4 curves and 2 input builds (0 stages cached)" in plan and "laten-gsm8k-s1" in plan

    code, log, err = pkt_cli("study", "steps-saved", cfg, "--out", out)
    assert code == 0, err
    assert log.count("[run]") == 6 and "[steps-saved] 4/4 laten-lora seed 1" in log  # 2 LaTen builds, 4 curves
    rec = R.load(records)
    assert sorted(rec["curves"]) == [("laten-lora", 0), ("laten-lora", 1), ("lora", 0), ("lora", 1)]
    for seed in (0, 1):
        lora, laten = rec["curves"][("lora", seed)]["result"], rec["curves"][("laten-lora", seed)]["result"]
        # the same batches, step by step: the same data order (the seed) and the same examples per step
        assert lora["batches"] == laten["batches"] and len(lora["batches"]) == 2 and lora["steps"] == 2
        assert sorted(sum(lora["batches"], [])) == list(range(4))
        assert [h["step"] for h in lora["heldout"]] == [0, 1, 2]
        # LaTen moved the student: the curves differ from step 0 on; training moved both
        assert laten["heldout"][0]["loss"] != lora["heldout"][0]["loss"]
        assert lora["heldout"][2]["loss"] != lora["heldout"][0]["loss"]
    assert rec["curves"][("lora", 0)]["result"]["batches"] != rec["curves"][("lora", 1)]["result"]["batches"]
    # step 0 of lora is the untrained student's answer loss on the held-out set (tokenised as pkt eval's)
    saved_tok = load_tokenizer(s)  # the student directory's tokenizer, which the run reads
    feats = [tokenize_example(e, saved_tok, "chat", max_length=1024) for e in heldout_set("gsm8k", 3, 0).loss]
    ref = response_nll(load_model(s).eval(), feats, saved_tok.pad_token_id, batch_size=3, progress=False)
    step0 = rec["curves"][("lora", 1)]["result"]["heldout"][0]["per_example"]
    assert [x[1] for x in step0] == [n for _, n in ref]
    assert [x[0] for x in step0] == pytest.approx([x for x, _ in ref], rel=1e-6)
    stages = out / "stages"
    assert not list(stages.glob("laten-*/fused/model*.safetensors"))  # LaTen's student deleted, its deltas kept
    assert len(list(stages.glob("laten-*/fused/laten_deltas.safetensors"))) == 2
    assert not list(stages.glob("curve-*/run/merged/model*.safetensors"))
    md = (records / R.REPORT).read_text()
    assert "Recorded: 4 of 4 curves; complete seeds: 0, 1." in md and "| laten-lora |" in md
    assert "## Steps to reach LoRA's final held-out loss" in md and (records / R.PLOT).stat().st_size > 0
    first = tree(records)

    code, log, err = pkt_cli("study", "steps-saved", cfg, "--out", out)  # resume: no stage work
    assert code == 0, err
    assert "[run]" not in log and "[redo]" not in log and log.count("[cached] curve-") == 4
    assert tree(records) == first
    code, plan, _ = pkt_cli("study", "steps-saved", cfg, "--dry-run", "--out", out)
    assert code == 0 and "plan: 4 curves and 0 input builds (4 stages cached)" in plan

    # another machine: a fresh stage directory and only the committed records: every curve restored, nothing built
    code, log, err = pkt_cli("study", "steps-saved", cfg, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    assert "[run]" not in log and log.count("[restored]") == 4 and tree(records) == first

    copy = tmp_path / "copy"  # the records alone, elsewhere, without the report: re-derived byte for byte
    assert rederived(pkt_cli, "steps-saved", R, records, copy,
                     _config(tmp_path, "nowhere", "nowhere", records=str(copy))) == first

    # a record whose batches are not lora's is refused: the comparison is paired by construction
    f = copy / R.CURVES / R.curve_file("laten-lora", 0)
    bad = json.loads(f.read_text())
    bad["result"]["batches"] = bad["result"]["batches"][::-1]
    f.write_text(json.dumps(bad))
    code, _, err = pkt_cli("study", "steps-saved", _config(tmp_path, "nowhere", "nowhere", records=str(copy)),
                           "--report")
    assert code == 2 and "laten-lora-s0.json: trained on other batches than lora's of seed 0" in err


def test_laten_lora_against_its_random_teacher_null(tmp_path, qwen_pair, shared_data, pkt_cli):
    """laten-random-lora: the same fine-tuning on the same batches of the student LaTen's null injected (built by
    pkt run's laten-random, its fused weights pruned like LaTen's); the report states laten-lora minus it."""
    import json

    from pkt.studies import steps_saved_report as R

    t, s = saved_pair(qwen_pair, tmp_path)
    cfg = _config(tmp_path, t, s, seeds=[0], arms=["lora", "laten-lora", "laten-random-lora"])
    out, records = tmp_path / "out", tmp_path / "records"
    code, log, err = pkt_cli("study", "steps-saved", cfg, "--out", out)
    assert code == 0, err
    rec = R.load(records)
    real, null = (rec["curves"][(a, 0)]["result"] for a in ("laten-lora", "laten-random-lora"))
    assert real["batches"] == null["batches"] == rec["curves"][("lora", 0)]["result"]["batches"]
    assert real["heldout"][0]["loss"] != null["heldout"][0]["loss"]  # another injection from step 0 on
    stages = out / "stages"
    manifest = json.loads(next(stages.glob("laten-random-gsm8k-s0-*/fused/pkt-laten.json")).read_text())
    assert manifest["teacher_vectors"] == "random"
    assert not list(stages.glob("laten*/fused/model*.safetensors"))  # both LaTen students pruned, deltas kept
    assert len(list(stages.glob("laten*/fused/laten_deltas.safetensors"))) == 2
    md = (records / R.REPORT).read_text()
    assert "| laten-lora − laten-random-lora |" in md and "LaTen's random-teacher null injected" in md


def test_report_joins_the_studies_its_config_names(tmp_path, shared_data, pkt_cli):
    """`pkt study steps-saved CONFIG --report` passes the config's compare_with to the report: the committed
    controls' records, reported from a copy with the committed config's settings, give the committed joined report."""
    import shutil
    from pathlib import Path

    import yaml

    from pkt.studies import steps_saved_report as R

    root = Path(__file__).resolve().parents[1]
    committed = root / "docs" / "results" / "steps-saved-controls-gsm8k"
    records = tmp_path / "records"
    shutil.copytree(committed, records)
    (records / R.REPORT).unlink()
    cfg = yaml.safe_load((root / "configs" / "steps-saved-controls-gsm8k.yaml").read_text())
    cfg.update(records=str(records), compare_with=[str(root / c) for c in cfg["compare_with"]])
    path = tmp_path / "controls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = pkt_cli("study", "steps-saved", path, "--report")
    assert code == 0, err
    assert (records / R.REPORT).read_bytes() == (committed / R.REPORT).read_bytes()
    del cfg["compare_with"]  # without it, the same records give the report of this study's arms alone
    path.write_text(yaml.safe_dump(cfg))
    assert pkt_cli("study", "steps-saved", path, "--report")[0] == 0
    assert "| seeking − seeking-random |" not in (records / R.REPORT).read_text(encoding="utf-8")


def test_crossings_interpolate_between_measured_steps():
    import numpy as np

    from pkt.studies.steps_saved_report import crossings

    at = np.array([0.0, 1.0, 2.0, 4.0, 8.0])
    curves = np.array([[2.0, 1.8, 1.6, 1.2, 1.0],   # reaches 1.0 at its last step
                       [1.5, 1.3, 1.0, 0.9, 0.8],   # exactly at step 2
                       [2.0, 1.8, 1.6, 1.4, 1.2],   # never
                       [0.9, 0.8, 0.7, 0.6, 0.5],   # already at step 0
                       [2.0, 1.8, 1.6, 1.2, 0.8]])  # between 4 and 8: 4 + (1.2 - 1.0) / 0.4 * 4 = 6
    got = crossings(curves, at, np.full(5, 1.0))
    assert got.tolist() == [8.0, 2.0, np.inf, 0.0, pytest.approx(6.0)]



def synthetic_records(arms: dict, seeds=(0, 1), name: str = "s") -> dict:
    """Loaded steps-saved records of ``arms`` ({arm: held-out losses (seed, step, example)}) at steps 0, 1, 2."""
    budget = {"epochs": 1, "batch_size": 2, "lr": 3e-4, "rank": 16, "alpha": 16}
    rec = {"meta": {"settings": {"name": name, "arms": list(arms), "seeds": list(seeds), "heldout_at": [0, 1, 2],
                                 "task": "gsm8k", "student": "tiny", "dtype": "float32", "budget": budget},
                    "heldout": {"ids": list(range(6)), "description": "6 questions"}, "n_train": 4, "steps": 2},
           "curves": {}}
    for a, v in arms.items():
        for seed in seeds:
            heldout = [{"step": k, "per_example": [[float(x) * 10, 10] for x in v[seed, k]]} for k in range(3)]
            rec["curves"][(a, seed)] = {"result": {"heldout": heldout, "batches": [[0], [1]], "train_loss": [1, 1],
                                                   "train_seconds": 1.0 + seed}}
    return rec


def _base(seeds: int = 2):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng, rng.uniform(1.0, 2.0, size=(seeds, 3, 6)) * np.array([1.0, 0.8, 0.6])[None, :, None]


def test_every_stated_comparison_with_lora_is_in_one_holm_family():
    """The steps-saved report corrects its comparisons with lora together: each step's difference and each arm's
    steps saved (whose p comes from the same replicates as its interval), Holm over all of them."""
    from pkt.experiment.stats import holm
    from pkt.studies import steps_saved_report as R

    # two seeds, 6 held-out examples, steps 0-2: "close" is lora's curve nudged by noise around 0 (no real
    # difference), "far" is lora's curve lowered by a constant (a sure one)
    rng, base = _base()
    d = R.derive(synthetic_records({"lora": base, "close": base + rng.normal(0, 0.02, size=base.shape),
                                    "far": base - 0.3}))
    raw = [row["delta"][a][3] for row in d["table"] for a in ("close", "far")]
    raw += [d["summary"][a]["p"] for a in ("close", "far")]
    stated = [row["delta"][a][4] for row in d["table"] for a in ("close", "far")]
    stated += [d["summary"][a]["holm"] for a in ("close", "far")]
    assert len(raw) == 8 and stated == holm(raw)
    assert d["summary"]["far"]["holm"] < 0.05 < d["summary"]["close"]["holm"]
    assert all(row["delta"]["far"][4] < 0.05 for row in d["table"])
    # the p of the steps saved is its replicates' two-sided bootstrap p (never below 2 / (draws + 1))
    assert d["summary"]["far"]["p"] == pytest.approx(2 / (R.N_BOOT + 1))
    assert d["controls"] == [] and d["family"] == 8


def test_a_joined_study_pairs_its_arms_with_the_others_and_compares_seeking_with_its_control():
    """compare_with: a study with other arms and the same lora is reported as one, over the seeds both ran; Seeking
    minus its control is stated (loss and steps) in the Holm family; a study with another lora or other settings
    is refused with a line naming what differs."""
    import copy

    from pkt.errors import PktError
    from pkt.studies import steps_saved_report as R

    rng, base = _base(3)
    first = synthetic_records({"lora": base, "seeking": base - 0.25}, seeds=(0, 1, 2), name="first")
    controls = synthetic_records({"lora": base, "seeking-random": base - 0.2 + rng.normal(0, 0.01, base.shape)},
                                 seeds=(0, 1), name="controls")
    joined = R.join(controls, [first])
    assert joined["meta"]["settings"]["arms"] == ["lora", "seeking-random", "seeking"]
    assert joined["meta"]["settings"]["seeds"] == [0, 1] and joined["meta"]["joined"] == {"first": ["lora", "seeking"]}
    d = R.derive(joined)
    assert d["recorded"] == d["expected"] == 6
    (x,) = d["controls"]
    assert (x["arm"], x["control"]) == ("seeking", "seeking-random")
    assert x["loss"][0] == pytest.approx(-0.05, abs=0.01) and x["loss"][2] < 0  # Seeking lower, by its interval
    assert x["saved"] > 0 and x["saved_ci"][0] > 0
    assert d["family"] == 2 * 3 + 2 + 2  # two arms against lora at 3 steps, their steps saved, the control pair
    text = R.render(joined, d)
    assert "| seeking − seeking-random |" in text and "Joined with first (its lora, seeking)" in text

    other = copy.deepcopy(first)  # another lora at seed 1: the arms would not be paired
    other["curves"][("lora", 1)]["result"]["heldout"][2]["per_example"][0][0] += 1e-6
    with pytest.raises(PktError, match="first's lora curve of seed 1 is not controls's"):
        R.join(controls, [other])
    other = copy.deepcopy(first)  # an arm both ran, with other curves: refused too
    other["curves"][("seeking-random", 0)] = copy.deepcopy(controls["curves"][("seeking-random", 0)])
    other["curves"][("seeking-random", 0)]["result"]["train_loss"] = [1, 2]
    with pytest.raises(PktError, match="first's seeking-random curve of seed 0 is not controls's"):
        R.join(controls, [other])
    other = copy.deepcopy(first)
    other["meta"]["settings"]["heldout_at"] = [0, 1, 4]
    with pytest.raises(PktError, match="first is not controls's study with other arms: its heldout_at differs"):
        R.join(controls, [other])

@pytest.mark.parametrize("setting, needle", [
    ({"arms": ["laten-lora"]}, "arms: Value error, 'lora' must be among the arms"),
    ({"arms": ["lora", "laten"]}, "arms: Value error, unknown arm 'laten'"),
    ({"heldout_at": [1, 2]}, "heldout_at: Value error, must start at 0"),
    ({"heldout_at": [0, 2, 2]}, "heldout_at: Value error, must increase step by step"),
    ({"task": "humaneval"}, "task: Value error, HumanEval has no held-out pool"),
    ({"heldout_at": [0, 1]}, "heldout_at ends at step 1, but the run has 2 optimizer steps"),
    ({"heldout_at": [0, 1, 4]}, "heldout_at ends at step 4, but the run has 2 optimizer steps"),
    ({"lr": 1e-3}, "lr: Extra inputs are not permitted"),
    ({"arm_lrs": {"seeking": 1e-4}}, "Value error, arm_lrs: 'seeking' is not one of the arms ['lora', 'laten-lora']"),
    ({"arm_lrs": {"lora": 0}}, "arm_lrs.lora: Input should be greater than 0"),
    ({"compare_with": ["no/such/records"]}, "compare_with: Value error, no/such/records holds no steps-saved records"),
])
def test_a_bad_config_is_one_line_naming_the_setting(tmp_path, shared_data, pkt_cli, setting, needle):
    code, out, err = pkt_cli("study", "steps-saved", _config(tmp_path, "qwen2.5-coder-1.5b-instruct",
                                                             "qwen2.5-coder-0.5b-instruct", **setting), "--dry-run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pkt: error: ") and needle in err, err


def test_seekings_controls_start_where_seeking_does_and_train_from_their_own_factors(tmp_path, qwen_pair,
                                                                                      shared_data, pkt_cli):
    """seeking-random and seeking-shuffled are arms too: built from the same extraction as seeking and turned into
    pkt run's control of that name (seeded with the fine-tuning seed); each is output-preserving at step 0 (the
    student's held-out loss, as seeking's) and trains from other factors than seeking's, on the same batches."""
    import json
    from pathlib import Path

    from pkt.studies import steps_saved_report as R

    t, s = saved_pair(qwen_pair, tmp_path)
    arms = ["lora", "seeking", "seeking-random", "seeking-shuffled"]
    cfg = _config(tmp_path, t, s, seeds=[0], arms=arms)
    out = tmp_path / "out"
    code, log, err = pkt_cli("study", "steps-saved", cfg, "--out", out)
    assert code == 0, err
    curves = {a: R.load(tmp_path / "records")["curves"][(a, 0)]["result"] for a in arms}
    step0 = [x[0] for x in curves["lora"]["heldout"][0]["per_example"]]
    for arm in arms[1:]:
        assert curves[arm]["batches"] == curves["lora"]["batches"]
        assert [x[0] for x in curves[arm]["heldout"][0]["per_example"]] == pytest.approx(step0, rel=1e-5), arm
    extraction = next((out / "stages").glob("extract-gsm8k-*"))  # one, shared by seeking and its controls
    for arm, control in (("seeking-random", "random"), ("seeking-shuffled", "shuffled")):
        assert curves[arm]["heldout"][-1]["loss"] != curves["seeking"]["heldout"][-1]["loss"], arm
        stage = next((out / "stages").glob(f"curve-{arm}-gsm8k-s0-*"))
        assert json.loads((stage / "run" / "summary.json").read_text())["control"] == control
        made = json.loads((stage / f"run.{control}-factors" / "manifest.json").read_text())
        assert (made["control"], made["seed"]) == (control, 0)
        assert Path(made["source_extraction"]) == extraction / "factors"


def test_an_arm_trains_at_its_own_lr_where_the_config_gives_one(tmp_path, shared_data):
    """`arm_lrs` changes that arm's lr alone (and so its stage key), nothing else of its fine-tuning; the report
    states it beside the budget's lr."""
    from pkt.studies import steps_saved_report as R
    from pkt.studies.steps_saved import StepsSaved, load_config

    teacher, student = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
    plain = StepsSaved(load_config(_config(tmp_path, teacher, student))[0], None, log=lambda m: None, dry=True)
    cfg, text = load_config(_config(tmp_path, teacher, student, arm_lrs={"laten-lora": 5e-3}))
    own = StepsSaved(cfg, None, text, log=lambda m: None, dry=True)
    a, b = own.finetune_cfg("laten-lora", 1), plain.finetune_cfg("laten-lora", 1)
    assert (a.lr, b.lr) == (5e-3, 1e-2) and a == b.model_copy(update={"lr": 5e-3})
    assert own.finetune_cfg("lora", 1) == plain.finetune_cfg("lora", 1)
    assert own.key("laten-lora", 1, {})[1] != plain.key("laten-lora", 1, {})[1]
    assert own.key("lora", 1, {})[1] == plain.key("lora", 1, {})[1]
    meta = {"settings": cfg.model_dump(mode="json"), "heldout": {"description": "3 questions"}, "n_train": 4,
            "steps": 2}
    head = R.render({"meta": meta}, {"arms": cfg.arms, "at": [0, 1, 2], "recorded": 0, "expected": 4, "seeds": []})
    assert "(2 optimizer steps), lr 0.01 (laten-lora: 0.005), rank" in head, head


def test_the_committed_config_is_the_study_budget(shared_data):
    """configs/steps-saved-gsm8k.yaml: the embedded pair, gsm8k, seeds 0-2, at the decisive study's budget: 64
    examples at batch 16 and lr 3e-4 (LoRA's selected lr there; 4 steps, measured after each), each arm fine-tuned
    with the settings pkt run gives it."""
    from pathlib import Path

    from pkt.studies.steps_saved import StepsSaved, load_config

    path = Path(__file__).parents[1] / "configs" / "steps-saved-gsm8k.yaml"
    cfg, text = load_config(path)
    study = StepsSaved(cfg, None, text, log=lambda m: None, dry=True)
    assert (cfg.student, cfg.teacher, cfg.task, cfg.seeds) == ("qwen2.5-coder-0.5b-instruct",
                                                               "qwen2.5-coder-1.5b-instruct", "gsm8k", [0, 1, 2])
    assert study.total == 4 and cfg.heldout_at == [0, 1, 2, 3, 4]
    from pkt.studies.pilot_heldout import heldout_set

    # its 80 held-out questions are among the pilot's 150 (the config's header says so)
    assert len(study.heldout.info["ids"]) == 80
    assert set(study.heldout.info["ids"]) <= set(heldout_set("gsm8k", 150, 0).info["ids"])
    assert cfg.arms == ["lora", "laten-lora", "seeking"] and cfg.arm_lrs == {"seeking": 1e-4}
    ft = study.finetune_cfg("laten-lora", 2)
    assert (ft.n_train, ft.batch_size, ft.lr, ft.epochs, ft.seed) == (64, 16, 3e-4, 1, 2)
    from pkt.studies import pilot_report as R

    pilot = R.load(Path(__file__).parents[1] / "docs" / "results" / "pilot-gsm8k")["tests"]["n64-e1-s0"]
    assert (pilot["train_examples"], pilot["epochs"], pilot["lr"]) == (ft.n_train, ft.epochs, ft.lr)
    assert ft == study.finetune_cfg("lora", 2)  # the arms differ only in the student they start from
    # Seeking trains at the lr the decisive study selected for it on held-out questions
    decisive = R.load(Path(__file__).parents[1] / "docs" / "results" / "decisive-gsm8k")["points"]
    assert R.select_lr(decisive, 64, 1.0, [3e-5, 1e-4, 3e-4, 1e-3], [0], "seeking")[0] == 1e-4
    assert study.finetune_cfg("seeking", 2).lr == 1e-4


def test_the_committed_controls_config_is_the_study_with_other_arms(shared_data):
    """configs/steps-saved-controls-gsm8k.yaml: steps-saved-gsm8k's study (the same lora, budget, seeds and held-out
    questions) with seeking-random and PiSSA, each at the lr the decisive study selected for it on held-out."""
    from pathlib import Path

    from pkt.studies import pilot_report as R
    from pkt.studies.steps_saved import StepsSaved, load_config

    root = Path(__file__).parents[1] / "configs"
    studies = [StepsSaved(load_config(root / f)[0], None, log=lambda m: None, dry=True)
               for f in ("steps-saved-gsm8k.yaml", "steps-saved-controls-gsm8k.yaml")]
    main, controls = studies
    assert controls.cfg.arms == ["lora", "seeking-random", "pissa"]
    assert controls.cfg.seeds == main.cfg.seeds and controls.cfg.heldout == main.cfg.heldout
    assert controls.heldout.info["ids"] == main.heldout.info["ids"]
    for seed in main.cfg.seeds:
        assert controls.finetune_cfg("lora", seed) == main.finetune_cfg("lora", seed)
        # seeking-random fine-tunes exactly as seeking does, from other factors
        assert controls.finetune_cfg("seeking-random", seed) == main.finetune_cfg("seeking", seed)
    decisive = R.load(Path(__file__).parents[1] / "docs" / "results" / "decisive-gsm8k")["points"]
    for init in ("pissa", "seeking-random"):
        assert R.select_lr(decisive, 64, 1.0, [3e-5, 1e-4, 3e-4, 1e-3], [0], init)[0] == \
            controls.finetune_cfg(init, 0).lr == 1e-4, init
