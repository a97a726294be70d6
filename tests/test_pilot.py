"""`pkt study pilot`: the held-out set shares no question with the PKT splits, the lr is chosen on held-out scores
alone, a tiny two-point pilot runs, resumes without stage work and its report is re-derived from the records."""

import json
import shutil

import pytest
from staged_studies import config_file, rederived, tree

from pkt.studies import pilot_report as R
from pkt.studies.pilot_heldout import heldout_set, normalise, pkt_gsm_answer
from pkt.testing import save_tiny


def test_gsm8k_heldout_shares_no_question_with_the_pkt_splits(shared_data):
    from pkt.data.tasks import SPLITS, load_split
    from pkt.evaluate.tasks.gsm8k import user_turn

    h = heldout_set("gsm8k", 150, 0)
    pkt = {normalise(e.user) for s in SPLITS for e in load_split("gsm8k", s)}
    assert len(pkt) == 1100
    assert not {normalise(user_turn(r["question"])) for r in h.rows} & pkt
    # every PKT question is found in train.jsonl under the normalisation, so the exclusion above removed them all
    assert h.info["pkt_prompts_in_source"] == 1100 and h.info["excluded"] >= 1100
    assert len(set(h.info["ids"])) == 150 == len(h.rows) == len(h.loss)
    assert heldout_set("gsm8k", 150, 0).info["ids"] == h.info["ids"]  # a fixed sample
    assert heldout_set("gsm8k", 150, 1).info["ids"] != h.info["ids"]
    # the held-out answer loss is measured on answers in the PKT splits' own format: the rebuild reproduces them
    source = {normalise(r["question"]): r["answer"]
              for r in map(json.loads, (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines())}
    prefix = user_turn("")
    pkt_rows = [e for s in SPLITS for e in load_split("gsm8k", s)]
    assert all(pkt_gsm_answer(source[normalise(e.user[len(prefix):])]) == e.assistant for e in pkt_rows)


def test_mbpp_heldout_is_validation_rows_outside_the_pkt_splits(shared_data):
    from pkt.data.tasks import SPLITS, load_split
    from pkt.evaluate.tasks.mbpp import user_turn

    h = heldout_set("mbpp", 40, 0)
    pkt = {normalise(e.user) for s in SPLITS for e in load_split("mbpp", s)}
    assert all(511 <= i <= 600 for i in h.info["ids"]) and len(h.rows) == 40
    assert not {normalise(user_turn(r)) for r in h.rows} & pkt
    assert all(e.assistant.endswith(r["code"]) for e, r in zip(h.loss, h.rows))
    with pytest.raises(Exception, match="heldout.size 500"):
        heldout_set("mbpp", 500, 0)


def _points(scores: dict) -> dict:
    return {R.point_name(64, 1.0, lr, s): {"heldout": {"score": v}} for (lr, s), v in scores.items()}


def test_selection_takes_the_best_heldout_lr_and_the_smaller_on_a_tie():
    lrs = [1e-4, 3e-4, 1e-3]
    best = _points({(1e-4, 0): 0.10, (3e-4, 0): 0.20, (1e-3, 0): 0.15})
    assert R.select_lr(best, 64, 1.0, lrs, [0])[0] == 3e-4
    tie = _points({(1e-4, 0): 0.10, (3e-4, 0): 0.20, (1e-3, 0): 0.20})
    assert R.select_lr(tie, 64, 1.0, lrs, [0])[0] == 3e-4
    # the mean over seeds decides: 1e-3 is best on seed 0 alone, 1e-4 on the mean
    seeds = _points({(1e-4, 0): 0.2, (1e-4, 1): 0.3, (3e-4, 0): 0.1, (3e-4, 1): 0.1, (1e-3, 0): 0.3, (1e-3, 1): 0.1})
    assert R.select_lr(seeds, 64, 1.0, lrs, [0, 1]) == (1e-4, {1e-4: 0.25, 3e-4: 0.1, 1e-3: 0.2})
    missing = _points({(1e-4, 0): 0.10, (3e-4, 0): 0.20})
    assert R.select_lr(missing, 64, 1.0, lrs, [0])[0] is None


def _config(tmp_path, student: str, **over) -> str:
    data = {"name": "tiny-pilot", "student": student, "task": "gsm8k", "records": str(tmp_path / "records"),
            "seeds": [0], "train_examples": [4], "epochs": [1], "lrs": [1e-3, 1e-2], "batch_size": 2,
            "micro_batch_size": 2, "max_length": 160, "rank": 2, "alpha": 2, "progress": False,
            "eval": {"test_size": 3, "max_new_tokens": 4, "batch_size": 4}, "heldout": {"size": 3}, **over}
    return config_file(tmp_path / f"pilot-{len(over)}.yaml", data)


def test_tiny_pilot_runs_resumes_and_rederives_its_report(tmp_path, qwen_pair, shared_data, pkt_cli):
    _, student, tok = qwen_pair
    cfg = _config(tmp_path, save_tiny(student, tok, tmp_path / "student"))
    out, records = tmp_path / "out", tmp_path / "records"

    code, plan, err = pkt_cli("study", "pilot", cfg, "--dry-run")
    assert code == 0, err
    assert "plan: 2 builds and 5 evaluations (0 stages cached)" in plan and "lr to be chosen" in plan

    code, log, err = pkt_cli("study", "pilot", cfg, "--out", out)
    assert code == 0, err
    assert log.count("[run]") == 7 and "[pilot] point 2/2" in log
    rec = R.load(records)
    assert sorted(rec["points"]) == ["n4-e1-lr0.001-s0", "n4-e1-lr0.01-s0"] and sorted(rec["tests"]) == ["n4-e1-s0"]
    test = rec["tests"]["n4-e1-s0"]
    assert test["lr"] == R.select_lr(rec["points"], 4, 1.0, [1e-3, 1e-2], [0])[0]  # chosen on held-out records
    assert test["test"]["ids"] == rec["student"]["test"]["ids"] and test["test"]["n"] == 3
    for p in rec["points"].values():
        assert p["build"]["steps"] == 2 and p["build"]["update"]["all"] > 0 and p["heldout"]["n"] == 3
        assert p["heldout"]["answer_loss"] > 0
    # the larger lr moves the student further
    assert rec["points"]["n4-e1-lr0.01-s0"]["build"]["update"]["all"] > rec["points"]["n4-e1-lr0.001-s0"]["build"][
        "update"]["all"]
    assert not list((out / "stages").glob("build-*/run/merged/model*.safetensors"))  # pruned after evaluation
    first = tree(records)

    code, log, err = pkt_cli("study", "pilot", cfg, "--out", out)  # resume: every stage cached, nothing rebuilt
    assert code == 0, err
    assert "[run]" not in log and "[redo]" not in log and log.count("not needed, its evaluations are cached") == 3
    assert tree(records) == first
    code, plan, _ = pkt_cli("study", "pilot", cfg, "--dry-run", "--out", out)
    assert "(7 stages cached)" in plan and "estimated 0 s" in plan

    # another machine: a fresh stage directory, only the committed records: every stage restored, none recomputed
    code, log, err = pkt_cli("study", "pilot", cfg, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    assert "[run]" not in log and log.count("[restored]") == 5 and tree(records) == first

    copy = tmp_path / "copy"  # the records alone, elsewhere, without the report: re-derived byte for byte
    assert rederived(pkt_cli, "pilot", R, records, copy, _config(tmp_path, "nowhere", records=str(copy))) == first
    md = (copy / R.REPORT).read_text()
    assert "| 4 | 1 | 0.001 | 0 | 2 |" in md and "McNemar" in md and "outside the config's grid" not in md

    # the grid trimmed to the selected lr after the fact: the other lr's record is still shown, apart, never selected
    other = next(x for x in (1e-3, 1e-2) if x != test["lr"])
    meta = json.loads((copy / R.META).read_text())
    meta["settings"]["lrs"] = [test["lr"]]
    (copy / R.META).write_text(json.dumps(meta))
    R.write_report(copy)
    md = (copy / R.REPORT).read_text()
    apart = md.split("outside the config's grid")[1].split("## ")[0]
    assert f"| lora | 4 | 1 | {other:g} | 0 | 2 |" in apart and f"| {test['lr']:g} |" not in apart


@pytest.mark.parametrize("setting, needle", [
    ({"lrs": ["fast"]}, "lrs.0"),
    ({"task": "humaneval"}, "task: Value error, HumanEval has no held-out pool"),
    ({"lrs": [1e-4, 1e-4]}, "lrs: Value error, values repeat"),
    ({"batch": 16}, "batch: Extra inputs are not permitted"),
    ({"train_examples": [5000]}, "train_examples 5000: the gsm8k PKT train split has only 1000 examples"),
])
def test_a_bad_config_is_one_line_naming_the_setting(tmp_path, shared_data, pkt_cli, setting, needle):
    code, out, err = pkt_cli("study", "pilot", _config(tmp_path, "qwen2.5-coder-0.5b-instruct", **setting),
                             "--dry-run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("pkt: error: ") and needle in err, err


def test_the_committed_config_builds_the_known_point_as_pkt_postpkt_does(shared_data):
    """configs/pilot-gsm8k.yaml's 256 x 1 x 3e-4 point is `pkt postpkt --init lora --n-train 256 --epochs 1
    --batch-size 16 --micro-batch-size 4 --max-length 384 --lr 3e-4 --seed 0` (the known 7.5% -> 15.5% point)."""
    from pathlib import Path

    from pkt.cli.postpkt import finetune_config
    from pkt.studies.pilot import Pilot, load_config

    cfg, _ = load_config(Path(__file__).parents[1] / "configs" / "pilot-gsm8k.yaml")
    assert (cfg.task, cfg.eval.shots, cfg.eval.protocol, cfg.eval.test_size, cfg.heldout.size) == (
        "gsm8k", 0, "pkt", 300, 150)
    cli = finetune_config(None, n_train=256, epochs=1, batch_size=16, micro_batch_size=4, max_length=384, lr=3e-4,
                          seed=0)
    assert Pilot(cfg, None).finetune_cfg(256, 1.0, 3e-4, 0).model_dump() == cli.model_dump()


def test_the_committed_code_pilot_holds_out_the_whole_validation_split_and_trains_untruncated(shared_data):
    """configs/pilot-mbpp.yaml selects on all 90 MBPP validation problems (ids 511-600), tests on the whole test
    split, and its max length cuts none of the 300 PKT train examples (else the top budget would train on cut code)."""
    from pathlib import Path

    from pkt.data.tasks import load_split
    from pkt.studies.pilot import Pilot, load_config

    from pkt.experiment.plan import human

    cfg, text = load_config(Path(__file__).parents[1] / "configs" / "pilot-mbpp.yaml")
    p = Pilot(cfg, None, text, log=lambda m: None, dry=True)
    # the plan its header quotes (no record restores any of it yet)
    assert human(sum(r[2] for r in p.plan())) == "4.6 h" and "9 builds and 14 evaluations, 4.6 h" in text
    assert (cfg.task, cfg.eval.shots, cfg.eval.protocol, cfg.eval.test_size) == ("mbpp", 0, "pkt", 500)
    assert sorted(p.heldout.info["ids"]) == list(range(511, 601))
    assert max(R.budgets(cfg.model_dump(mode="json")))[0] == len(load_split("mbpp", "train")) == 300
    from pkt.data.chat import tokenize_example
    from pkt.models.load import is_prepared, load_tokenizer

    assert is_prepared(cfg.student), f"{cfg.student} is not prepared: run scripts/setup.sh"
    tok = load_tokenizer(cfg.student)
    # the training path's own tokenisation, uncut (its truncation would hide the length it is checked for)
    longest = max(len(tokenize_example(e, tok, cfg.style, 10**6)["input_ids"]) for e in load_split("mbpp", "train"))
    assert longest <= cfg.max_length, longest


def test_committed_pilot_records_rederive(tmp_path):
    """Every committed pilot under docs/results/ is records alone plus what `pkt study pilot --report` makes of
    them: its pilot.md (once a budget has finished) is rebuilt byte for byte from a copy of the records."""
    from pathlib import Path

    found = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/pilot.json"))
    assert found, "no committed pilot records"
    for meta in found:
        rec = R.load(meta.parent)
        assert rec["student"]["test"]["n"] == len(rec["student"]["test"]["per_example"]) > 0
        if (meta.parent / R.REPORT).is_file():
            copy = tmp_path / meta.parent.name
            shutil.copytree(meta.parent, copy)
            (copy / R.REPORT).unlink()
            R.write_report(copy)
            assert (copy / R.REPORT).read_bytes() == (meta.parent / R.REPORT).read_bytes(), meta.parent
