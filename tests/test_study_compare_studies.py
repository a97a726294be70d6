"""pkt.studies.compare_studies (`pkt study compare`): the same arm in two studies, counted by hand on made-up records
and run on the committed CPU study against its dropout control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkt.studies.compare_studies import main, table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs/results"


def record(study: Path, method: str, seed: int, per_example: list[float], limit: int = 4, loss: float = 1.0):
    stages = study / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    rec = {"inputs": {"settings": {"task": "gsm8k", "loss_examples": 8, "eval": {"limit": limit, "seed": 0}},
                      "data": {"gsm8k": "abc"}},
           "result": {"evaluated_as": {"method": method, "task": "gsm8k", "seed": seed},
                      "per_example": per_example, "answer_loss": loss}}
    (stages / f"eval-{method}-gsm8k-s{seed}.json").write_text(json.dumps(rec))


def test_by_hand(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    record(a, "student", 0, [1, 0, 0, 1])
    record(b, "student", 0, [1, 0, 0, 1])
    record(a, "lora", 0, [1, 0, 0, 0], loss=0.5)
    record(b, "lora", 0, [1, 1, 1, 0], loss=0.25)
    record(a, "lora", 1, [0, 0, 0, 0], loss=0.5)
    record(b, "lora", 1, [0, 0, 0, 0], loss=0.25)
    record(a, "pissa", 0, [1, 1, 1, 1])  # only in A: no row
    rows = table(a, b)[4:]
    assert len(rows) == 2
    assert rows[0].startswith("| student | gsm8k | 0 | 2 | 2 | 4 | 0 | +0.0 [+0.0, +0.0] |")  # vanilla first
    # lora: 1 → 3 passed of 8, two items differ; B − A = mean over seeds of (2/4, 0/4) = +25 points
    assert rows[1].startswith("| lora | gsm8k | 0,1 | 1 | 3 | 8 | 2 | +25.0 [")
    assert rows[1].endswith("| 0.500 → 0.250 |")


def test_refuses_different_questions_and_bad_records(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    record(a, "lora", 0, [1, 0, 0, 0])
    record(b, "lora", 0, [1, 0, 0, 0, 1], limit=5)
    with pytest.raises(SystemExit, match="lora/gsm8k, seed 0: the two evaluations ask different questions "
                                         r"\(limit\)"):
        table(a, b)
    (b / "stages" / "eval-lora-gsm8k-s0.json").write_text("{}")
    with pytest.raises(SystemExit, match="eval-lora-gsm8k-s0.json: not an evaluation record"):
        table(a, b)
    with pytest.raises(SystemExit, match="no stages/ directory"):
        table(a, tmp_path / "missing")


def test_the_committed_dropout_control(capsys):
    assert main([str(RESULTS / "cpu-study"), str(RESULTS / "cpu-study-dropout0")]) == 0
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    # the vanilla student is deterministic: evaluated again from another commit, it must not move one question
    assert "| 25 | 25 | 150 | 0 | +0.0 [+0.0, +0.0] |" in rows["student", "gsm8k"]
    for arm in ("lora", "pissa", "seeking"):
        assert ("| 0,1,2 |" in rows[arm, "gsm8k"]), rows[arm, "gsm8k"]
