"""The knowledge-distillation baseline as its own command, `pkt kd`, on tiny models.

* in process (CliRunner): teacher answers written to OUT/kd_train.jsonl and reused by a re-run; the student
  trained on them; a stale answers file and an unknown task are one-line errors with exit status 2;
* the split generation in :func:`pkt.align.distill.teacher_answers` answers exactly as one plain
  ``generate`` call over all prompts (what ``pkt run`` got before it was split);
* ``accelerate launch`` with 2 CPU processes (gloo): the same answers file (byte for byte), per-step losses
  (rel 1e-5) and merged student weights (rel 1e-5, abs 1e-6) as one process with the same global batch.
  LoRA dropout is off: its masks are drawn per process, so with dropout the runs agree only in
  distribution. Without it they differ only in the order in which gradients are summed (measured: losses
  equal to the 5 logged decimals, merged weights within 1.5e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkt import testing
from pkt.align.distill import KD_FILE, KD_META, teacher_answers
from pkt.data.jsonl import ChatExample, read_chat_jsonl

ROOT = Path(__file__).resolve().parents[1]
PKT = [sys.executable, "-m", "pkt.cli"]
ACCELERATE = Path(sys.executable).with_name("accelerate")
CONFIG = ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"
# 6 prompts in generation batches of 2 (3 batches: 2 processes answer 2 and 1 of them); 6 examples in steps
# of 4 over micro-batches of 2, 2 epochs = 4 steps, the last of each epoch 2 examples (1 per process)
SMALL = ["--gen-batch-size", "2", "--r", "4", "--alpha", "8", "--lr", "1e-2",
         "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2", "--max-length", "96", "--quiet"]


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?" + " Think." * (i % 3)},
                          {"role": "assistant", "content": f"The answer is {2 * i + 1}"}]} for i in range(n)]


@pytest.fixture
def one_thread():
    # tiny matrices: on a busy 2-core machine two OpenMP threads mostly wait for each other (the CLI test
    # measured 35 s with 2 threads, 5 s with 1); the subprocess runs get OMP_NUM_THREADS=1 likewise
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_tok, one_thread):
    data = tmp_path / "data" / "pkt_splits" / "gsm"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(8)))
    # both sections of the settings file: the fine-tuning one (shared with `pkt postpkt`) and the teacher's
    (tmp_path / "kd.yaml").write_text("finetune:\n  dropout: 0.0\nkd:\n  max_new_tokens: 12\n")
    monkeypatch.setenv("PKT_DATA_DIR", str(tmp_path / "data"))
    v = len(tiny_tok)
    t = testing.save_tiny(testing.tiny_model("qwen2", "teacher", v), tiny_tok, tmp_path / "teacher")
    s = testing.save_tiny(testing.tiny_model("qwen2", "student", v), tiny_tok, tmp_path / "student")
    return tmp_path, t, s


def test_kd_cli_writes_answers_trains_and_resumes(env):
    tmp, t, s = env
    out = tmp / "kd"
    args = ["kd", "--teacher", t, "--student", s, "--task", "gsm8k", "--out", str(out), "--n-train", "6",
            "--config", str(tmp / "kd.yaml"), *SMALL]
    r = testing.invoke_cli(args)
    assert r.exit_code == 0, r.output
    rows = read_chat_jsonl(out / KD_FILE)
    assert [x.user for x in rows] == [x["messages"][0]["content"] for x in _rows(6)]
    assert all(x.meta["answer_source"] == "teacher" for x in rows)
    assert not any(x.assistant.startswith("The answer is") for x in rows)  # the teacher's text, not the gold
    meta = json.loads((out / KD_META).read_text())
    assert meta["teacher"] == t and meta["n"] == 6 and meta["max_new_tokens"] == 12 and meta["task"] == "gsm8k"
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["method"] == "kd" and summary["init"] == "lora" and summary["steps"] == 4
    assert summary["config"]["r"] == 4 and summary["config"]["lr"] == 1e-2 and summary["config"]["dropout"] == 0
    assert summary["kd"]["max_new_tokens"] == 12 and summary["data_reused"] is False
    for d in ("adapter", "adapter_init", "merged"):
        assert (out / "run" / d).is_dir()
    losses = [json.loads(line)["loss"] for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]

    # a re-run resumes from the answers (the file is not rewritten) and trains to the same losses
    before = (out / KD_FILE).stat().st_mtime_ns
    r = testing.invoke_cli(args)
    assert r.exit_code == 0, r.output
    assert (out / KD_FILE).stat().st_mtime_ns == before
    summary2 = json.loads((out / "run" / "summary.json").read_text())
    assert summary2["data_reused"] is True and summary2["final_loss"] == summary["final_loss"]

    # other teacher settings or other prompts: the file is not silently reused
    r = testing.invoke_cli(args + ["--max-new-tokens", "5"])
    assert r.exit_code != 0 and "max_new_tokens=12" in str(r.exception)
    args4 = [a if a != "6" else "4" for a in args]
    (out / KD_META).unlink()  # without the sidecar the prompts are still compared
    r = testing.invoke_cli(args4)
    assert r.exit_code != 0 and "6 prompts are not the 4 selected" in str(r.exception)


def test_kd_cli_bad_input_is_one_line_exit_2(env):
    tmp, t, s = env
    p = subprocess.run([*PKT, "kd", "--teacher", t, "--student", s, "--task", "gsm9k", "--out", str(tmp / "x")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "unknown task 'gsm9k'" in p.stderr and not (tmp / "x").exists()


def test_split_generation_equals_one_generate_call(qwen_pair, one_thread):
    from pkt.data.chat import render_prompt
    from pkt.evaluate.generate import generate

    teacher, _, tok = qwen_pair
    ex = [ChatExample(x["messages"][0]["content"], "", {"id": i}) for i, x in enumerate(_rows(7))]
    got = teacher_answers(teacher, tok, ex, max_new_tokens=8, batch_size=3, progress=False)
    want = generate(teacher, tok, [render_prompt(e.user, tok, "chat") for e in ex], max_new_tokens=8, batch_size=3,
                    temperature=0.0, progress=False)
    assert [g.assistant for g in got] == [w[0].strip() for w in want]
    assert [g.meta for g in got] == [{"id": i, "answer_source": "teacher"} for i in range(7)]


def _run(cmd, cwd) -> str:
    # ACCELERATE_USE_CPU makes the torchrun workers CPU (gloo) processes on a machine without GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def test_two_process_kd_matches_one_process(env):
    tmp, t, s = env
    one, two = tmp / "one", tmp / "two"
    args = ["kd", "--teacher", t, "--student", s, "--task", "gsm8k", "--n-train", "6", "--config", "kd.yaml", *SMALL]
    assert "(1 process(es))" in _run([*PKT, *args, "--out", str(one)], tmp)
    err = _run([str(ACCELERATE), "launch", "--config_file", str(CONFIG), "--main_process_port", "29531",
                "-m", "pkt.cli", *args, "--out", str(two)], tmp)
    assert "(2 process(es))" in err  # really data-parallel, not two lone processes
    assert json.loads((two / "run" / "summary.json").read_text())["processes"] == 2
    assert (one / KD_FILE).read_text() == (two / KD_FILE).read_text()
    logs = [[json.loads(x)["loss"] for x in (d / "run" / "train_log.jsonl").read_text().splitlines()]
            for d in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 4
    assert logs[1] == pytest.approx(logs[0], rel=1e-5)
    assert logs[0][-1] < logs[0][0]  # it trains
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "run" / "merged" / "model.safetensors")) for d in (one, two))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    student = load_file(str(Path(s) / "model.safetensors"))
    assert any(not torch.equal(a[k], student[k]) for k in a)  # the merged update is not empty
