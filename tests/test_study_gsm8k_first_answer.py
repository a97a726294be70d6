"""pkt.studies.gsm8k_first_answer (`pkt study gsm8k-first-answer`): per-question verdicts at the last number and at the
first stated answer, counted by hand on made-up outputs; the re-scored last number must equal the recorded verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkt.studies.gsm8k_first_answer import main, table, write_digests

STUDENT = "qwen2.5-coder-0.5b-instruct"  # embedded: only its tokenizer is read (offline, seconds)
WRITES_ON = "So the answer is 18.\n\nQuestion: Tom has 3 apples. Answer: 3 + 4 = 7. So the answer is 7."


def stage(stages: Path, name: str, outputs: list[tuple[str, str]], built: bool, correct=None,
          max_new_tokens: int = 256) -> None:
    d = stages / f"{name}-0123456789abcdef"
    d.mkdir(parents=True)
    rows = [{"id": i, "output": o, "gold": g,
             "correct": (correct[i] if correct else o.rstrip(".").split()[-1].rstrip(".") == g)}
            for i, (o, g) in enumerate(outputs)]
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"task": "gsm8k", "model": "stages/x/merged" if built else STUDENT,
                "eval": {"max_new_tokens": max_new_tokens}, "precision": {"reference": STUDENT} if built else None}
    (d / "stage.json").write_text(json.dumps({"stage": name, "key": {"settings": settings}}))


def test_digest_and_table_by_hand(tmp_path):
    stages, out = tmp_path / "stages", tmp_path / "answers"
    stage(stages, "eval-student-gsm8k-s0", [("So the answer is 18.", "18"), ("So the answer is 5.", "6")], False)
    # the arm states 18 and writes on (last number 7: wrong, first answer right), then gets the second right
    stage(stages, "eval-lora-gsm8k-s0", [(WRITES_ON, "18"), ("So the answer is 6.", "6")], True)
    # seed 1 was decoded with a 5-token cap, which both of its outputs reach
    stage(stages, "eval-lora-gsm8k-s1", [("So the answer is 18.", "18"), ("So the answer is 5.", "6")], True,
          max_new_tokens=5)
    (stages / "eval-lora-humaneval-s0-0123456789abcdef").mkdir()  # not GSM8K, unfinished: never read
    assert len(write_digests(stages, out)) == 3
    rows = {r["arm"]: r for r in table(out)}
    assert rows["student"]["correct"] == rows["student"]["correct_first"] == 0.5
    lora = rows["lora"]
    assert (lora["seeds"], lora["correct"], lora["correct_first"], lora["right_then_lost"]) == (2, 0.5, 0.75, 0.25)
    assert lora["correct_vs_student"][0] == 0.0 and lora["correct_first_vs_student"][0] == 0.25
    assert lora["at_cap"] == 0.5 and rows["student"]["at_cap"] == 0.0


def test_rescoring_must_equal_the_record(tmp_path):
    stages = tmp_path / "stages"
    stage(stages, "eval-student-gsm8k-s0", [("So the answer is 18.", "18")], False, correct={0: False})
    with pytest.raises(SystemExit, match="predictions.jsonl:1: re-scoring the last number disagrees"):
        write_digests(stages, tmp_path / "answers")


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "eval-student-gsm8k-s0.json").write_text('{"format": "other"}')
    with pytest.raises(SystemExit, match="not a GSM8K answers digest"):
        main(["--table", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--table", str(tmp_path / "nope")])
    assert "not a directory" in capsys.readouterr().err
