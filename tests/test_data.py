"""Chat JSONL validation, prompt rendering, response-only labels, and the task registry."""

import json

import pytest

from pkt.data.chat import IGNORE, collate, render, render_prompt, tokenize_example
from pkt.data.jsonl import ChatExample, read_chat_jsonl
from pkt.data.tasks import get_task, load_split, mbpp_rows, mmlu_rows, gsm8k_test, parse_tasks
from pkt.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "id": "x"}


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(lines))
    return p


def test_reads_rows_and_keeps_meta(tmp_path):
    rows = read_chat_jsonl(_write(tmp_path, [json.dumps(GOOD) + "\n", "\n", json.dumps(GOOD) + "\n"]))
    assert len(rows) == 2 and rows[0].user == "2+2?" and rows[0].assistant == "4" and rows[0].meta == {"id": "x"}


@pytest.mark.parametrize(
    "line, lineno, message",
    [
        ("{not json", 2, "invalid JSON"),
        (json.dumps({"msgs": []}), 2, "missing key 'messages'"),
        (json.dumps({"messages": [GOOD["messages"][1], GOOD["messages"][0]]}), 2, "turn 0 must have role 'user'"),
        (json.dumps({"messages": [GOOD["messages"][0]]}), 2, "list of 2 turns"),
        (json.dumps({"messages": [{"role": "user", "content": 3}, GOOD["messages"][1]]}), 2, "no string 'content'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, line, lineno, message):
    path = _write(tmp_path, [json.dumps(GOOD) + "\n", line + "\n"])
    with pytest.raises(DataError) as e:
        read_chat_jsonl(path)
    assert str(e.value).startswith(f"{path}:{lineno}:") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_split_rows_and_conversations_share_one_validator(tmp_path):
    """A system turn is a valid conversation but not a PKT-split row; both readers say so through the same
    validator, with the same message for a defect they share."""
    from pkt.data.chat import read_conversations

    system = {"messages": [{"role": "system", "content": "be brief"}, *GOOD["messages"]]}
    path = _write(tmp_path, [json.dumps(system) + "\n"])
    assert read_conversations(path)[0].turns[0] == ("system", "be brief")
    with pytest.raises(DataError, match=f"{path}:1: 'messages' must be a list of 2 turns"):
        read_chat_jsonl(path)
    swapped = {"messages": [GOOD["messages"][1], GOOD["messages"][0]]}
    path = _write(tmp_path, [json.dumps(swapped) + "\n"])
    errors = []
    for read in (read_chat_jsonl, read_conversations):
        with pytest.raises(DataError) as e:
            read(path)
        errors.append(str(e.value))
    assert errors[0] == errors[1] == f"{path}:1: turn 0 must have role 'user', got 'assistant'"


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_chat_jsonl(_write(tmp_path, ["\n"]))
    with pytest.raises(DataError, match="no such file"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


def test_chat_and_tulu_rendering(tiny_tok):
    ex = ChatExample("What is 2+2?", "4")
    prompt, response = render(ex, tiny_tok, "chat")
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "4<|im_end|>"
    assert render_prompt("hi", tiny_tok, "tulu") == "<|user|>\nhi\n<|assistant|>\n"
    with pytest.raises(Exception, match="prompt style 'bogus'"):
        render_prompt("hi", tiny_tok, "bogus")


@pytest.mark.parametrize("style", ["chat", "tulu"])
def test_labels_cover_exactly_the_response(tiny_tok, style):
    ex = ChatExample("Question: 3 apples and 4 more?", "Answer: 7")
    prompt, response = render(ex, tiny_tok, style)
    feats = tokenize_example(ex, tiny_tok, style)
    n_prompt = len(tiny_tok(prompt, add_special_tokens=False)["input_ids"])
    labelled = [t for t, lab in zip(feats["input_ids"], feats["labels"]) if lab != IGNORE]
    assert feats["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert tiny_tok.decode(labelled) == response
    everything = tokenize_example(ex, tiny_tok, style, train_on_inputs=True)
    assert everything["labels"] == everything["input_ids"]


def test_truncation_keeps_the_answer(tiny_tok):
    ex = ChatExample("word " * 200, "Answer: 7")
    feats = tokenize_example(ex, tiny_tok, "chat", max_length=32)
    assert len(feats["input_ids"]) == 32
    assert tiny_tok.decode([t for t, lab in zip(feats["input_ids"], feats["labels"]) if lab != IGNORE]).startswith("Answer: 7")


def test_collate_pads_left_and_right(tiny_tok):
    a = tokenize_example(ChatExample("a", "b"), tiny_tok)
    b = tokenize_example(ChatExample("a much longer question here", "b"), tiny_tok)
    for side in ("left", "right"):
        batch = collate([a, b], tiny_tok.pad_token_id, side)
        n = len(a["input_ids"])
        row = batch["input_ids"][0].tolist()
        kept = row[-n:] if side == "left" else row[:n]
        assert kept == a["input_ids"]
        assert batch["attention_mask"][0].sum() == n
        pad = batch["labels"][0][:-n] if side == "left" else batch["labels"][0][n:]
        assert (pad == IGNORE).all() and len(pad) == batch["input_ids"].shape[1] - n


def test_unknown_task_and_split():
    with pytest.raises(DataError, match="unknown task 'gsm9k'"):
        get_task("gsm9k")
    with pytest.raises(DataError, match="unknown task"):
        parse_tasks("gsm8k,nope")


def test_missing_data_dir_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PKT_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="PKT_DATA_DIR=.*no such directory"):
        load_split("gsm8k", "extract")


def test_real_splits_and_test_sets(shared_data):
    sizes = {"gsm8k": (20, 80, 1000), "mmlu": (20, 80, 1000), "humaneval": (20, 80, 1000), "mbpp": (32, 40, 300)}
    for task, expected in sizes.items():
        assert tuple(len(load_split(task, s)) for s in ("extract", "align", "train")) == expected
    gsm = gsm8k_test()
    assert len(gsm) == 1319 and all(r["gold"].lstrip("-").replace(".", "").isdigit() for r in gsm)
    mmlu = mmlu_rows("test")
    assert len(mmlu) == 14042 and len({r["subject"] for r in mmlu}) == 57
    assert len(mmlu_rows("dev")) == 285
    assert len(mbpp_rows("full")) == 500 and len(mbpp_rows("sanitized")) == 257
