"""Real chat data: system turns, multi-turn conversations, JSONL or Hugging Face datasets, assistant-only labels."""

from __future__ import annotations

import json

import pytest
import torch

from pkt.data.chat import (IGNORE, Conversation, load_chat_data, parse_conversation, read_conversations, render,
                           render_prompt, tokenize_example, with_answer)
from pkt.data.jsonl import ChatExample
from pkt.errors import DataError, PktError

CONV = {"messages": [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 * 4 = 20. The answer is 20"},
], "id": "c1"}


def _labelled_runs(feats) -> list[list[int]]:
    """Maximal runs of labelled token ids."""
    runs, cur = [], []
    for t, lab in zip(feats["input_ids"], feats["labels"]):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("turns", ["all", "last"])
def test_chat_template_labels_cover_exactly_the_assistant_turns(tiny_tok, turns):
    conv = parse_conversation(CONV, "x:1")
    feats = tokenize_example(conv, tiny_tok, "chat", max_length=512, assistant_turns=turns)
    # the whole text is the model's own rendering of the conversation (the template renders the system turn)
    full = tiny_tok.apply_chat_template(CONV["messages"], tokenize=False)
    assert tiny_tok.decode(feats["input_ids"]) + "\n" == full
    assert "<|im_start|>system\nYou are a careful calculator.<|im_end|>" in full
    answers = [m["content"] + tiny_tok.eos_token for m in CONV["messages"] if m["role"] == "assistant"]
    want = answers if turns == "all" else answers[-1:]
    assert [tiny_tok.decode(r) for r in _labelled_runs(feats)] == want


def test_tulu_format_renders_the_system_turn_as_open_instruct_does(tiny_tok):
    conv = parse_conversation(CONV, "x:1")
    eos = tiny_tok.eos_token
    expected = ("<|system|>\nYou are a careful calculator.\n<|user|>\nWhat is 2 + 3?\n<|assistant|>\n"
                f"2 + 3 = 5.{eos}\n<|user|>\nAnd times 4?\n<|assistant|>\n5 * 4 = 20. The answer is 20{eos}")
    feats = tokenize_example(conv, tiny_tok, "tulu", max_length=512)
    assert tiny_tok.decode(feats["input_ids"]) == expected
    assert [tiny_tok.decode(r) for r in _labelled_runs(feats)] == [f"2 + 3 = 5.{eos}",
                                                                   f"5 * 4 = 20. The answer is 20{eos}"]
    prompt, response = render(conv, tiny_tok, "tulu")
    assert prompt + response == expected and response == f"5 * 4 = 20. The answer is 20{eos}"


def _old_tokenize(example, tok, style, max_length, train_on_inputs):
    """The two-turn tokenisation as it was before conversations (the PKT splits must not change)."""
    if style == "chat":
        prompt = tok.apply_chat_template([{"role": "user", "content": example.user}], tokenize=False,
                                         add_generation_prompt=True)
    else:
        prompt = f"<|user|>\n{example.user}\n<|assistant|>\n"
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(example.assistant + tok.eos_token, add_special_tokens=False)["input_ids"]
    keep = max(0, min(len(p), max_length - len(r)))
    p = p[len(p) - keep:]
    r = r[: max_length - len(p)]
    ids = p + r
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": list(ids) if train_on_inputs else [IGNORE] * len(p) + r}


@pytest.mark.parametrize("style", ["chat", "tulu"])
@pytest.mark.parametrize("max_length,train_on_inputs", [(512, False), (512, True), (20, False), (6, False)])
def test_two_turn_splits_tokenise_as_before(tiny_tok, style, max_length, train_on_inputs):
    ex = ChatExample("Question: Natalia sold 48 clips in April. How many in total?", "Answer: 72. The answer is 72")
    assert tokenize_example(ex, tiny_tok, style, max_length, train_on_inputs) == \
        _old_tokenize(ex, tiny_tok, style, max_length, train_on_inputs)
    # the same rows read as conversations tokenise identically
    conv = parse_conversation({"messages": ex.messages()}, "x:1")
    assert tokenize_example(conv, tiny_tok, style, max_length, train_on_inputs) == \
        tokenize_example(ex, tiny_tok, style, max_length, train_on_inputs)


def test_truncation_keeps_the_final_answer(tiny_tok):
    conv = parse_conversation(CONV, "x:1")
    full = tokenize_example(conv, tiny_tok, "chat", max_length=512)
    short = tokenize_example(conv, tiny_tok, "chat", max_length=30)
    assert len(short["input_ids"]) == 30
    assert short["input_ids"] == full["input_ids"][-30:] and short["labels"] == full["labels"][-30:]
    last = tiny_tok.decode(_labelled_runs(short)[-1])
    assert last == CONV["messages"][-1]["content"] + tiny_tok.eos_token


def test_render_prompt_takes_the_conversation_so_far(tiny_tok):
    msgs = CONV["messages"][:-1]
    assert render_prompt(msgs, tiny_tok, "chat") == tiny_tok.apply_chat_template(msgs, tokenize=False,
                                                                                 add_generation_prompt=True)
    assert render_prompt("hi", tiny_tok, "chat") == render_prompt([{"role": "user", "content": "hi"}], tiny_tok)


def test_template_that_rewrites_earlier_turns_is_refused(tiny_tok):
    import copy

    tok = copy.deepcopy(tiny_tok)
    # renders only the latest user turn: the prompt of answer 2 does not extend answer 1's text
    tok.chat_template = ("{% for m in messages %}{% if loop.last or m['role'] != 'user' %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(PktError, match="prefix-stable"):
        tokenize_example(parse_conversation(CONV, "x:1"), tok, "chat")


@pytest.mark.parametrize("row,msg", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "turn 1 must have role 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system turn may only come first"),
    ({"messages": [{"role": "user", "content": "a"}]}, "last turn must be the assistant's"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "turn 0 has role 'tool'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "turn 0 has no string"),
    ({"messages": []}, "non-empty list"),
    ({"text": "hi"}, "missing key 'messages'"),
])
def test_validation_errors_name_file_and_line(tmp_path, row, msg):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CONV) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        read_conversations(path)
    assert str(e.value).startswith(f"{path}:3: ") and msg in str(e.value)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CONV) + "\n{oops\n")
    with pytest.raises(DataError, match=f"{path}:2: invalid JSON"):
        load_chat_data(path)


def test_hf_dataset_directory_and_dataset_dict(tmp_path):
    import datasets

    rows = [CONV, {"messages": CONV["messages"][1:3], "id": "c2"}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    got = load_chat_data(tmp_path / "ds")
    assert [c.messages() for c in got] == [r["messages"] for r in rows]
    assert got[0].meta["id"] == "c1" and got[1].user == "What is 2 + 3?" and got[0].assistant.endswith("20")
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_chat_data(tmp_path / "dd", split="test")) == 1
    with pytest.raises(DataError, match="no split 'dev'"):
        load_chat_data(tmp_path / "dd", split="dev")


def test_hf_dataset_errors_name_the_row(tmp_path):
    import datasets

    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "id": "x"}
    datasets.Dataset.from_list([{**CONV}, bad]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"ds\[train\] row 1: turn 1 must have role 'assistant'"):
        load_chat_data(tmp_path / "ds")
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DataError, match="no 'messages' column"):
        load_chat_data(tmp_path / "plain")
    with pytest.raises(DataError, match="no such file or directory"):
        load_chat_data(tmp_path / "missing.jsonl")


def test_with_answer_replaces_only_the_final_answer():
    conv = parse_conversation(CONV, "x:1")
    new = with_answer(conv, "teacher says 20", {"answer_source": "teacher"})
    assert new.messages()[:-1] == conv.messages()[:-1] and new.assistant == "teacher says 20"
    assert new.meta == {"id": "c1", "answer_source": "teacher"}
    ex = with_answer(ChatExample("q", "a", {"id": 1}), "b")
    assert isinstance(ex, ChatExample) and (ex.user, ex.assistant, ex.meta) == ("q", "b", {"id": 1})
    assert isinstance(new, Conversation)


def test_multi_turn_jsonl_with_system_turns_fine_tunes_on_the_tiny_pair(qwen_pair, tmp_path):
    from pkt.align.finetune import FinetuneConfig, finetune
    from pkt.align.lora_init import make_lora_model

    _, student, tok = qwen_pair
    rows = []
    for a in range(1, 7):
        rows.append({"messages": [{"role": "system", "content": "Answer with the sum."},
                                  {"role": "user", "content": f"What is {a} + 1?"},
                                  {"role": "assistant", "content": f"{a + 1}."},
                                  {"role": "user", "content": f"And {a} + 2?"},
                                  {"role": "assistant", "content": f"{a} + 2 = {a + 2}."}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_chat_data(path)
    model = make_lora_model(student, "lora", r=4, alpha=8, dropout=0.0)
    cfg = FinetuneConfig(r=4, alpha=8, lr=1e-2, batch_size=6, micro_batch_size=3, epochs=5, max_length=128,
                         dropout=0.0)
    logs = finetune(model, tok, data, cfg, progress=False)
    assert len(logs) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    # what it trained on: exactly both assistant turns of every conversation
    for conv in data:
        runs = _labelled_runs(tokenize_example(conv, tok, cfg.style, cfg.max_length))
        assert [tok.decode(r) for r in runs] == [m["content"] + tok.eos_token for m in conv.messages()
                                                 if m["role"] == "assistant"]


def test_data_identity_follows_the_content(tmp_path):
    from pkt.data.chat import data_identity

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONV) + "\n")
    first = data_identity(path)
    assert first["source"] == str(path) and len(first["sha256"]) == 64
    assert data_identity(path) == first
    path.write_text(json.dumps(CONV) + "\n" + json.dumps(CONV) + "\n")
    assert data_identity(path)["sha256"] != first["sha256"]
    assert data_identity("owner/name") == {"source": "owner/name"} and data_identity(None) is None


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(CONV).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=f"{path}:2: not UTF-8 \\(byte 0xff"):
        read_conversations(path)


def test_cli_validate_conversations(tmp_path):
    from pkt.testing import invoke_cli

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(CONV) + "\n")
    ok = invoke_cli(["data", "validate", "--conversations", path])
    assert ok.exit_code == 0 and "1 conversations OK" in ok.output, ok.output
    strict = invoke_cli(["data", "validate", path])  # the PKT-split format: exactly user, assistant
    assert strict.exit_code != 0 and "2 turns" in str(strict.exception)


def test_postpkt_data_option_trains_on_a_conversation_file(tmp_path, tiny_tok):
    from huggingface_hub import ModelCard

    from pkt import testing

    s = testing.save_tiny(testing.tiny_model("qwen2", "student", len(tiny_tok)), tiny_tok, tmp_path / "student")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({**CONV, "id": f"c{i}"}) + "\n" for i in range(5)))
    out = tmp_path / "run"
    args = ["postpkt", "--student", s, "--init", "lora", "--data", path, "--out", out, "--r", "2", "--batch-size", "5",
            "--micro-batch-size", "5", "--max-length", "128", "--epochs", "1", "--assistant-turns", "last",
            "--report-to", "none", "--quiet"]
    from pkt.testing import invoke_cli

    r = invoke_cli(args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 5 and summary["data_source"] == str(path)
    assert summary["config"]["assistant_turns"] == "last" and summary["task"] is None
    card = ModelCard.load(out / "merged" / "README.md")
    assert "chat.jsonl" in card.text and card.data.datasets is None


def test_postpkt_bad_data_fails_naming_file_and_line_before_loading(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "chat.jsonl"
    bad = {"messages": [{"role": "assistant", "content": "hi"}]}
    path.write_text(json.dumps(CONV) + "\n" + json.dumps(bad) + "\n")
    p = subprocess.run([sys.executable, "-m", "pkt.cli", "postpkt", "--student", "no/such-model-anywhere", "--init",
                        "lora", "--data", str(path), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert f"{path}:2: turn 0 must have role 'user'" in p.stderr
    assert not (tmp_path / "o").exists()
    p = subprocess.run([sys.executable, "-m", "pkt.cli", "postpkt", "--student", "x/y", "--init", "lora",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--task is required" in p.stderr


def test_kd_data_option_teacher_answers_the_final_turn_in_context(tmp_path, tiny_tok):
    from pkt import testing
    from pkt.testing import invoke_cli

    v = len(tiny_tok)
    t = testing.save_tiny(testing.tiny_model("qwen2", "teacher", v), tiny_tok, tmp_path / "teacher")
    s = testing.save_tiny(testing.tiny_model("qwen2", "student", v), tiny_tok, tmp_path / "student")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({**CONV, "id": f"c{i}"}) + "\n" for i in range(3)))
    out = tmp_path / "kd"
    args = ["kd", "--teacher", t, "--student", s, "--data", path, "--out", out, "--max-new-tokens", "4",
            "--truncated", "keep", "--r", "2", "--batch-size", "3", "--micro-batch-size", "3", "--max-length", "128",
            "--epochs", "1", "--report-to", "none", "--quiet"]
    r = invoke_cli(args)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "kd_train.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        # system and earlier turns kept; only the final answer is the teacher's
        assert row["messages"][:-1] == CONV["messages"][:-1] and row["answer_source"] == "teacher"
        assert row["messages"][-1]["role"] == "assistant"
    assert json.loads((out / "run" / "summary.json").read_text())["data_source"] == str(path)
    again = invoke_cli(args)  # the cached answers are reused for the same conversations
    assert again.exit_code == 0 and "reusing 3 teacher answers" in again.output
    both = invoke_cli(["kd", "--teacher", t, "--student", s, "--data", path, "--task", "gsm8k", "--out", out])
    assert both.exit_code != 0 and "one of --task" in str(both.exception)
