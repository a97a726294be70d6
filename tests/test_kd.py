"""The knowledge-distillation baselines as their own command, `pkt kd` (seqkd, gkd), on tiny models.

* seqkd answers: generated to completion within the budget and flagged ``finished``; truncated ones dropped
  or kept open (no end-of-turn token in the training labels), with their counts;
* gkd: the loss against a direct float64 computation of the generalized JSD; the loop's first logged loss
  (off-policy, LoRA B = 0) against the teacher-vs-student forward KL computed outside it; the CLI run;

* in process (CliRunner): teacher answers written to OUT/kd_train.jsonl and reused by a re-run; the student
  trained on them; a stale answers file and an unknown task are one-line errors with exit status 2;
* the split generation in :func:`pkt.align.distill.teacher_answers` answers exactly as one plain
  ``generate`` call over all prompts (what ``pkt run`` got before it was split);
* ``accelerate launch`` with 2 CPU processes (gloo): the same answers file (byte for byte), per-step losses
  (rel 1e-5) and merged student weights (rel 1e-5, abs 5e-6) as one process with the same global batch.
  LoRA dropout is off: its masks are drawn per process, so with dropout the runs agree only in
  distribution. Without it they differ only in the order in which gradients are summed (measured: losses
  equal to the 5 logged decimals, merged weights within 1.5e-7 when every answer was closed with the
  end-of-turn token, within 1.8e-6 of weights up to 0.4 now that the truncated answers are kept open).
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
    # the tiny random teacher rarely ends an answer within 12 tokens: keep truncated answers (open)
    (tmp_path / "kd.yaml").write_text("finetune:\n  dropout: 0.0\nkd:\n  max_new_tokens: 12\n  truncated: keep\n")
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
    assert summary["method"] == "seqkd" and summary["init"] == "lora" and summary["steps"] == 4
    n_done = sum(bool(x.meta["finished"]) for x in rows)
    assert summary["answers"] == {"answers": 6, "finished": n_done, "truncated": 6 - n_done, "dropped": 0,
                                  "kept_open": 6 - n_done, "train_rows": 6}
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
    assert [{k: v for k, v in g.meta.items() if k != "finished"} for g in got] == \
        [{"id": i, "answer_source": "teacher"} for i in range(7)]


def test_answers_run_to_completion_within_the_budget(qwen_pair, one_thread):
    """Property: a finished answer is what a larger budget also gives; a truncated one is a prefix of it."""
    teacher, _, tok = qwen_pair
    ex = [ChatExample(x["messages"][0]["content"], "", {"id": i}) for i, x in enumerate(_rows(8))]
    short = teacher_answers(teacher, tok, ex, max_new_tokens=40, batch_size=3, progress=False)
    long = teacher_answers(teacher, tok, ex, max_new_tokens=80, batch_size=3, progress=False)
    assert {g.meta["finished"] for g in short} == {True, False}  # both kinds occur on this pair
    for a, b in zip(short, long):
        if a.meta["finished"]:
            assert b.meta["finished"] and b.assistant == a.assistant
        else:
            assert b.assistant.startswith(a.assistant) and len(b.assistant) > len(a.assistant)


def test_budget_policy_counts_and_open_answers(tiny_tok):
    from pkt.align.distill import budget_policy
    from pkt.data.chat import IGNORE, tokenize_example
    from pkt.errors import PktError

    rows = [ChatExample(f"q{i}", f"answer {i}", {"id": i, "finished": i % 3 == 0}) for i in range(6)]
    kept, counts = budget_policy(rows, "drop")
    assert [r.meta["id"] for r in kept] == [0, 3]
    assert counts == {"answers": 6, "finished": 2, "truncated": 4, "dropped": 4, "kept_open": 0, "train_rows": 2}
    kept, counts = budget_policy(rows, "keep")
    assert [r.meta["id"] for r in kept] == list(range(6)) and counts["kept_open"] == 4 and counts["dropped"] == 0
    eos = tiny_tok.eos_token_id
    for r in kept:
        labels = [t for t in tokenize_example(r, tiny_tok, "chat", 128)["labels"] if t != IGNORE]
        # a finished answer is closed with the end-of-turn token; a truncated one is not
        assert (labels[-1] == eos) == r.meta["finished"]
        assert tiny_tok.decode(labels, skip_special_tokens=True).strip() == r.assistant
    with pytest.raises(PktError, match="every one of the 2"):
        budget_policy([ChatExample("q", "a", {"finished": False})] * 2, "drop")


# ---- GKD ----------------------------------------------------------------------------------------------

def _direct_gjsd(s_logits, t_logits, mask, beta):
    """Eq. (1) of the GKD paper in float64, token by token: β·KL(T‖M) + (1−β)·KL(S‖M), M = βT + (1−β)S."""
    out = []
    for pos in mask.nonzero().tolist():
        ps = torch.softmax(s_logits[tuple(pos)].double(), -1)
        pt = torch.softmax(t_logits[tuple(pos)].double(), -1)

        def kl(p, q):
            return float((p * (p.log() - q.log())).sum())

        if beta == 0:
            out.append(kl(pt, ps))
        elif beta == 1:
            out.append(kl(ps, pt))
        else:
            mix = beta * pt + (1 - beta) * ps
            out.append(beta * kl(pt, mix) + (1 - beta) * kl(ps, mix))
    return out


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_loss_matches_direct_computation(qwen_pair, beta):
    from pkt.align.gkd import generalized_jsd_loss

    teacher, student, tok = qwen_pair
    ids = torch.tensor([[5, 17, 9, 33, 2, 41, 8], [12, 3, 3, 27, 19, 0, 0]])
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    with torch.no_grad():
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    want = _direct_gjsd(s, t, labels != -100, beta)
    got = generalized_jsd_loss(s, t, labels, beta=beta, reduction="none")
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert float(generalized_jsd_loss(s, t, labels, beta=beta, reduction="batchmean")) == \
        pytest.approx(sum(want) / len(want), rel=1e-4)
    assert min(want) > 0  # two different random models: a non-trivial oracle


def test_gkd_loop_first_loss_is_the_forward_kl(qwen_pair, one_thread):
    """Off-policy (lmbda 0), LoRA B = 0 at step 1: the logged loss is KL(teacher‖student) over the gold
    answer tokens of the step, computed here without the loop."""
    from pkt.align.finetune import FinetuneConfig
    from pkt.align.gkd import GKDConfig, gkd_finetune
    from pkt.align.lora_init import make_lora_model
    from pkt.data.chat import tokenize_example

    teacher, student, tok = qwen_pair
    ex = [ChatExample(x["messages"][0]["content"], x["messages"][1]["content"], {}) for x in _rows(4)]
    ft = FinetuneConfig(r=4, alpha=8, dropout=0.0, lr=1e-2, epochs=2, batch_size=4, micro_batch_size=2,
                        max_length=64, warmup_ratio=0.0)
    want = []
    for e in ex:
        f = tokenize_example(e, tok, "chat", 64)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        with torch.no_grad():
            want += _direct_gjsd(student(input_ids=ids).logits[:, :-1], teacher(input_ids=ids).logits[:, :-1],
                                 labels[:, 1:] != -100, 0.0)
    model = make_lora_model(student, "lora", ft.targets, ft.r, ft.alpha, ft.dropout)
    logs = gkd_finetune(model, teacher, tok, ex, ft, GKDConfig(lmbda=0.0), progress=False)
    assert len(logs) == 2 and logs[0]["on_policy"] == 0 and logs[0]["tokens"] == len(want)
    assert logs[0]["loss"] == pytest.approx(sum(want) / len(want), rel=1e-4)
    assert logs[1]["loss"] < logs[0]["loss"]  # it learns the teacher's distributions


def test_gkd_loop_is_on_policy_and_stops_on_a_non_finite_loss(qwen_pair, one_thread):
    from pkt.align.finetune import FinetuneConfig
    from pkt.align.gkd import GKDConfig, gkd_finetune
    from pkt.align.lora_init import make_lora_model
    from pkt.errors import PktError

    teacher, student, tok = qwen_pair
    ex = [ChatExample(x["messages"][0]["content"], x["messages"][1]["content"], {}) for x in _rows(3)]
    ft = FinetuneConfig(r=4, alpha=8, dropout=0.0, lr=1e-3, epochs=1, batch_size=3, micro_batch_size=3,
                        max_length=64)
    model = make_lora_model(student, "lora", ft.targets, ft.r, ft.alpha, ft.dropout)
    logs = gkd_finetune(model, teacher, tok, ex, ft, GKDConfig(max_new_tokens=6), progress=False)
    # every prompt answered by the student's own sample (at most 6 tokens each), not by the gold answer
    assert logs[0]["on_policy"] == 3 and 3 <= logs[0]["tokens"] <= 3 * 6
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("nan"))
    with pytest.raises(PktError, match="gkd: loss is nan at step 1"):
        gkd_finetune(model, teacher, tok, ex, ft, GKDConfig(max_new_tokens=6), progress=False)


def test_kd_cli_gkd(env):
    tmp, t, s = env
    out = tmp / "gkd"
    r = testing.invoke_cli(["kd", "--method", "gkd", "--teacher", t, "--student", s, "--task", "gsm8k", "--out",
                            str(out), "--n-train", "4", "--gkd-max-new-tokens", "8", "--config", str(tmp / "kd.yaml"),
                            *SMALL])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["method"] == "gkd" and summary["gkd"]["lmbda"] == 1.0 and summary["gkd"]["beta"] == 0.0
    assert summary["steps"] == 2 and not (out / KD_FILE).exists()  # no teacher answers: the student samples
    from safetensors.torch import load_file

    merged, student = load_file(str(out / "run" / "merged" / "model.safetensors")), load_file(
        str(Path(s) / "model.safetensors"))
    assert any(not torch.equal(merged[k], student[k]) for k in merged)
    # the tracker holds exactly the loop's own log, and the merged checkpoint carries a card naming the method
    from huggingface_hub import ModelCard

    from pkt import tracking

    rows = [json.loads(x) for x in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    scalars = tracking.read_tensorboard(out / "run" / "logs" / "gkd")
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [st for st, _ in scalars[tag]] == [r["step"] for r in rows], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[tag] for r in rows], rel=1e-6, abs=1e-12), tag
    card = ModelCard.load(out / "run" / "merged" / "README.md")
    assert "gkd" in card.data.tags and card.data.library_name == "transformers"
    r = testing.invoke_cli(["kd", "--method", "sft", "--teacher", t, "--student", s, "--task", "gsm8k", "--out",
                            str(tmp / "bad")])
    assert r.exit_code != 0 and "--method 'sft'" in str(r.exception) and not (tmp / "bad").exists()


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
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=5e-6, msg=k)
    student = load_file(str(Path(s) / "model.safetensors"))
    assert any(not torch.equal(a[k], student[k]) for k in a)  # the merged update is not empty
