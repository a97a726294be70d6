"""pkt.studies.compare_predictions (`pkt study compare-predictions`): paired counts, failure kinds and output style of
two evaluations' predictions, against values worked by hand; digests compare as their predictions do; a malformed row
is one message naming its file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkt.studies.compare_predictions import (
    DIGEST_FORMAT, compare, failure_kind, load, main, table, target_style, write_digests)

RAISE = "Traceback ...\nAssertionError\npkt-sandbox: the program raised {}\n"


def row(i, correct, code="    return 1", error=None, status=None):
    return {"id": f"T/{i}", "correct": correct, "extracted": code, "error": error,
            "status": status or ("passed" if correct else "failed")}


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_failure_kinds():
    assert failure_kind(row(0, True)) == "passed"
    assert failure_kind(row(0, False, code="  \n")) == "no code extracted"
    # the last exception named wins: a handler that raised again reports the second one
    err = RAISE.format("KeyError") + RAISE.format("AssertionError")
    assert failure_kind(row(0, False, error=err)) == "AssertionError"
    assert failure_kind(row(0, False, error="killed after 10 s", status="timeout")) == "timeout"


def test_compare_by_hand(tmp_path, capsys):
    commented = "    # count them\n    n = 0\n    # done\n    return n"
    a = [row(0, True, commented), row(1, True, commented), row(2, False, error=RAISE.format("ValueError")),
         row(3, True), row(9, True)]  # T/9 only in A: not compared
    b = [row(0, True), row(1, False, error=RAISE.format("AssertionError")), row(2, True),
         row(3, False, code=""), ]
    c = compare(load(write(tmp_path / "a.jsonl", a)), load(write(tmp_path / "b.jsonl", b)))
    assert (c["common"], c["a_passed"], c["b_passed"], c["only_a"], c["only_b"]) == (4, 3, 2, 2, 1)
    assert c["b_fails_on_only_a"] == {"AssertionError": 1, "no code extracted": 1}
    assert c["a_fails_on_only_b"] == {"ValueError": 1}
    # A: two outputs of 4 lines with 2 comments each, two of 1 line; B: three of 1 line, one empty
    assert c["style_a"] == {"median_lines": 2.5, "mean_comment_lines": 1.0, "with_comment": 0.5}
    assert c["style_b"] == {"median_lines": 1.0, "mean_comment_lines": 0.0, "with_comment": 0.0}
    assert c["by_b_comment"] == {"with": {"n": 0, "only_a": 0, "only_b": 0},
                                 "without": {"n": 4, "only_a": 2, "only_b": 1}}
    # A comments on T/0 and T/1 (passes both), B on neither
    assert c["by_comment"] == {"both": {"n": 0, "only_a": 0, "only_b": 0},
                               "a_only": {"n": 2, "only_a": 1, "only_b": 0},
                               "b_only": {"n": 0, "only_a": 0, "only_b": 0},
                               "neither": {"n": 2, "only_a": 1, "only_b": 1}}
    assert c["passes_by_comment_a"] == {"with": {"passed": 2, "n": 2}, "without": {"passed": 1, "n": 2}}
    assert c["passes_by_comment_b"] == {"with": {"passed": 0, "n": 0}, "without": {"passed": 2, "n": 4}}
    swapped = compare(load(tmp_path / "b.jsonl"), load(tmp_path / "a.jsonl"))
    assert swapped["by_b_comment"] == {"with": {"n": 2, "only_a": 0, "only_b": 1},
                                       "without": {"n": 2, "only_a": 1, "only_b": 1}}
    assert swapped["by_comment"]["b_only"] == {"n": 2, "only_a": 0, "only_b": 1}
    # a stage directory is read through its predictions.jsonl
    (tmp_path / "stage").mkdir()
    write(tmp_path / "stage" / "predictions.jsonl", b)
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "stage"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["only_b"] == 1
    assert main([str(tmp_path / "a.jsonl"), str(tmp_path / "stage")]) == 0
    text = capsys.readouterr().out
    assert "A passes 3, B passes 2; only A 2, only B 1" in text
    assert "output has no comment: 4; only A passes 2, only B 1" in text


def test_bad_input_names_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps(row(0, True)) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"p\.jsonl:2: not a prediction row"):
        load(bad)
    with pytest.raises(SystemExit, match="no such file"):
        load(tmp_path / "missing")


def test_digests_compare_like_their_predictions(tmp_path):
    """--digest writes one small file per code evaluation of a run (a GSM8K one is skipped); comparing the digests
    gives what comparing the full predictions gives."""
    stages = tmp_path / "stages"
    sides = {"eval-student-humaneval-s0": [row(0, True, "    # a\n    return 1"),
                                           row(1, False, error=RAISE.format("X"))],
             "eval-lora-humaneval-s0": [row(0, False, code=""), row(1, True)],
             "eval-lora-gsm8k-s0": [row(0, True)]}
    for name, rows in sides.items():
        d = stages / f"{name}-0123456789abcdef"
        d.mkdir(parents=True)
        write(d / "predictions.jsonl", rows)
        task = name.split("-")[-2]
        (d / "stage.json").write_text(json.dumps({"stage": name, "key": {"settings": {"task": task}}}))
    out = tmp_path / "digests"
    assert main(["--digest", str(stages), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval-lora-humaneval-s0.json", "eval-student-humaneval-s0.json"]
    full = compare(*(load(stages / f"{n}-0123456789abcdef") for n in list(sides)[:2]))
    assert compare(load(out / "eval-student-humaneval-s0.json"), load(out / "eval-lora-humaneval-s0.json")) == full
    assert full["b_fails_on_only_a"] == {"no code extracted": 1} and full["a_fails_on_only_b"] == {"X": 1}
    assert write_digests(stages, out) == [out / "eval-lora-humaneval-s0.json", out / "eval-student-humaneval-s0.json"]
    # with records, only the recorded keys; an unfinished stage dir (no stage.json) is never read
    rec = tmp_path / "records"
    rec.mkdir()
    (rec / "eval-lora-humaneval-s0.json").write_text(json.dumps({"key": "eval-lora-humaneval-s0-0123456789abcdef"}))
    (stages / "eval-student-humaneval-s0-0123456789abcdef" / "stage.json").unlink()
    assert write_digests(stages, tmp_path / "d2", rec) == [tmp_path / "d2" / "eval-lora-humaneval-s0.json"]
    assert write_digests(stages, tmp_path / "d3") == [tmp_path / "d3" / "eval-lora-humaneval-s0.json"]
    digest = json.loads((out / "eval-lora-humaneval-s0.json").read_text())
    del digest["rows"][1]["kind"]
    (out / "eval-lora-humaneval-s0.json").write_text(json.dumps(digest))
    with pytest.raises(SystemExit, match=r"not a predictions digest \(row 'T/1' lacks \['kind'\]\)"):
        load(out / "eval-lora-humaneval-s0.json")
    (out / "eval-lora-humaneval-s0.json").write_text('{"format": "other"}')
    with pytest.raises(SystemExit, match="not a predictions digest"):
        load(out / "eval-lora-humaneval-s0.json")


def digest(path: Path, rows) -> None:
    path.write_text(json.dumps({"format": DIGEST_FORMAT, "rows": [
        {"id": f"T/{i}", "correct": c, "kind": "passed" if c else "AssertionError", "lines": 3, "comment_lines": k}
        for i, (c, k) in enumerate(rows)]}))


def test_table_against_the_student_by_hand(tmp_path, capsys):
    """Every arm against the one student digest, per seed and summed over seeds."""
    digest(tmp_path / "eval-student-humaneval-s0.json", [(True, 1), (True, 1), (False, 0), (True, 0)])
    digest(tmp_path / "eval-seeking-random-humaneval-s0.json", [(False, 0), (True, 2), (True, 0), (True, 0)])
    digest(tmp_path / "eval-seeking-random-humaneval-s1.json", [(False, 1), (False, 0), (False, 0), (True, 1)])
    digest(tmp_path / "eval-lora-gsm8k-s0.json", [(True, 0)] * 4)  # not a code task: not read
    rows = table(tmp_path)
    assert [(r["arm"], r["seed"]) for r in rows] == [("seeking-random", "0"), ("seeking-random", "1"),
                                                     ("seeking-random", "all")]
    s0, s1, pooled = rows
    assert (s0["only_a"], s0["only_b"], s0["by_b_comment"]["without"]) == (1, 1, {"n": 3, "only_a": 1, "only_b": 1})
    assert (s1["only_a"], s1["only_b"], s1["by_b_comment"]["with"]) == (2, 0, {"n": 2, "only_a": 1, "only_b": 0})
    assert (pooled["common"], pooled["a_passed"], pooled["b_passed"]) == (8, 6, 4)
    # summed counts, but no test on them: the seeds' questions are the same questions
    assert (pooled["only_a"], pooled["only_b"], pooled["mcnemar_p"]) == (3, 1, None)
    assert pooled["style_b"]["with_comment"] == 0.375  # 1 of 4, then 2 of 4
    assert pooled["by_b_comment"] == {"with": {"n": 3, "only_a": 1, "only_b": 0},
                                      "without": {"n": 5, "only_a": 2, "only_b": 1}}
    # the student comments on T/0 and T/1: s0's arm comments on T/1 only, s1's on T/0 and T/3
    assert pooled["by_comment"] == {"both": {"n": 2, "only_a": 1, "only_b": 0},  # s1's T/0
                                    "a_only": {"n": 2, "only_a": 2, "only_b": 0},  # s0's T/0, s1's T/1
                                    "b_only": {"n": 1, "only_a": 0, "only_b": 0},
                                    "neither": {"n": 3, "only_a": 0, "only_b": 1}}  # s0's T/2
    assert main(["--table", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| humaneval | seeking-random | all | 4 / 6 of 8 | 3 | 1 | – | 38% | 1 / 0 of 2 | 2 / 0 of 2 " \
           "| 0 / 0 of 1 | 0 / 1 of 3 |" in out
    assert "The student on humaneval: its outputs with a comment pass 2 of 2, those without 1 of 2." in out
    (tmp_path / "eval-student-humaneval-s0.json").unlink()
    with pytest.raises(SystemExit, match="0 student digests for humaneval"):
        table(tmp_path)
    with pytest.raises(SystemExit, match="no code evaluation digests"):
        table(tmp_path / "nothing")


def test_style_of_training_targets(tmp_path):
    """A target's code is its fenced blocks (the prose around them is not code), or the whole answer."""
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in (
        "Here:\n```python\n# add\ndef f(a, b):\n    return a + b\n```\n# Not code, a heading",
        "def g():\n    return 1",
        "x = 1")]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in chat))
    assert target_style(f) == {"n": 3, "median_lines": 2, "mean_comment_lines": 0.33, "with_comment": 0.333}
    assert target_style(f, first=2)["with_comment"] == 0.5
    f.write_text(json.dumps(chat[0]) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(SystemExit, match=r"train\.jsonl:2: not a chat row"):
        target_style(f)
    with pytest.raises(SystemExit, match="no such file"):
        target_style(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit):  # argparse's usage error: no negative slice of the file
        main(["--style-of", str(f), "--first", "-1"])
