"""benchmarks/decode_banned.py: the ban reaches both decoding engines, removes exactly the banned tokens and changes
nothing on a path that never picked one (the property its --reference check relies on)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, where benchmarks/ lives

from benchmarks.decode_banned import banned, banned_ids, main, same_where_unbanned  # noqa: E402
from pkt import testing  # noqa: E402
from pkt.evaluate.generate import generate  # noqa: E402

PROMPTS = ["def add(a, b):\n", "The answer is", "Question: Natalia sold 48 clips", "for i in range(10):"]


def test_banned_ids_are_the_tokens_holding_the_text(tiny_tok):
    ids = banned_ids(tiny_tok, "a")
    assert ids and all("a" in tiny_tok.decode([i]) for i in ids)
    others = set(range(len(tiny_tok))) - set(ids)
    assert not any("a" in tiny_tok.decode([i]) for i in others)


@pytest.mark.parametrize("engine", ["padded", "continuous"])
def test_ban_removes_tokens_and_nothing_else(engine, tiny_tok):
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    kw = dict(max_new_tokens=10, batch_size=2, progress=False, engine=engine)
    free = [o[0] for o in generate(model, tiny_tok, PROMPTS, **kw)]
    seen = [c for c in free[0] if c.isascii() and c.isalnum()]
    assert seen
    with banned(model, banned_ids(tiny_tok, seen[0])):  # a character greedy decoding does write
        held = [o[0] for o in generate(model, tiny_tok, PROMPTS, **kw)]
    assert held[0] != free[0] and not any(seen[0] in o for o in held)
    unseen = next(c for c in "#@$%&~ZQXJ" if not any(c in o for o in free))
    with banned(model, banned_ids(tiny_tok, unseen)):  # tokens no greedy path chose: every output is unchanged
        assert [o[0] for o in generate(model, tiny_tok, PROMPTS, **kw)] == free
    assert [o[0] for o in generate(model, tiny_tok, PROMPTS, **kw)] == free  # the hook is gone after the block


def test_same_where_unbanned_counts(tmp_path):
    ref = tmp_path / "predictions.jsonl"
    ref.write_text("".join(json.dumps({"id": i, "output": o}) + "\n"
                           for i, o in (("a", "x = 1"), ("b", "# c\nx = 2"), ("c", "y = 3"))))
    rows = [{"id": "a", "output": "x = 1"}, {"id": "b", "output": "x = 2"}, {"id": "c", "output": "y = 4"}]
    assert same_where_unbanned(rows, tmp_path, "#") == {"reference_without_it": 2, "identical": 1}
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: not a prediction row"):
        same_where_unbanned(rows, tmp_path / "bad.jsonl", "#")


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--task mmlu: configs/cpu-study.yaml evaluates gsm8k, humaneval"):
        main(["configs/cpu-study.yaml", "--task", "mmlu", "--ban", "#", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="decode_banned: nope.yaml: no such config file"):
        main(["nope.yaml", "--task", "humaneval", "--ban", "#", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # checked before any model is loaded
        main(["configs/cpu-study.yaml", "--task", "humaneval", "--ban", "#", "--out", str(tmp_path),
              "--reference", str(tmp_path / "missing")])
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "predictions.jsonl").exists()
