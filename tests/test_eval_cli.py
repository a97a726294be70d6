"""``pkt eval`` on a tiny saved model and the fixture data directory."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pkt import testing
from pkt.evaluate.tasks import gsm8k


@pytest.fixture
def data_dir(fixture_data_dir):
    return fixture_data_dir


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tok):
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    return testing.save_tiny(model, tiny_tok, tmp_path / "tiny")


# --- independent oracles: the same numbers computed without pkt's generation, scoring or batching -----------

def _greedy(model, tok, prompt: str, n: int, stop: list[str]) -> str:
    """Unbatched, unpadded, cache-free greedy decoding: one full forward per new token."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = {tok.eos_token_id, tok.pad_token_id, model.generation_config.eos_token_id} - {None}
    new = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids).logits[0, -1].argmax())
            if t in eos:
                break
            new.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    text = tok.decode(new, skip_special_tokens=True)
    cut = min([text.find(s) for s in stop if s in text] + [len(text)])
    return text[:cut]


def _last_number(text: str) -> float | None:
    nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(nums[-1]) if nums else None


def _letter_scores(model, tok, prompt: str) -> dict[str, float]:
    """Log-probability of each answer letter (best of its " X"/"X" single-token forms) after the prompt."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    out = {}
    for letter in "ABCD":
        forms = [tok(v, add_special_tokens=False)["input_ids"] for v in (" " + letter, letter)]
        out[letter] = max(float(lp[f[0]]) for f in forms if len(f) == 1)
    return out


def _answer_nll(model, tok, user: str, assistant: str) -> tuple[float, int]:
    """Mean NLL of the assistant text + end-of-turn token after the chat-template prompt, one forward."""
    prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(assistant + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    nll = -sum(float(lp[len(p) + i - 1, t]) for i, t in enumerate(r))
    return nll / len(r), len(r)


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_cli_predictions_and_metrics_match_independent_oracles(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--tasks", "gsm8k,mmlu", "--limit", "2",
                           "--max-new-tokens", "4", "--out", str(out), "--no-progress", "--answer-loss"])
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    m = json.loads((out / "metrics.json").read_text())
    assert m["tasks"] == ["gsm8k", "mmlu", "gsm8k_loss", "mmlu_loss"]

    # GSM8K: each output is the model's greedy continuation; correct iff its last number is the gold one.
    golds = [json.loads(x)["answer"].split("####")[-1].strip()
             for x in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    recs = _rows(out / "gsm8k" / "predictions.jsonl")
    assert len(recs) == 2 and len({x["id"] for x in recs}) == 2
    for x in recs:
        assert x["output"] == _greedy(model, tok, x["prompt"], 4, gsm8k.STOP)
        assert x["correct"] == (_last_number(x["output"]) == float(golds[x["id"]]))
    assert m["gsm8k"]["accuracy"] == sum(x["correct"] for x in recs) / 2

    # MMLU: the prediction is the most likely letter; accuracy counts matches with the CSV's answer column.
    recs = _rows(out / "mmlu" / "predictions.jsonl")
    assert len(recs) == 2
    for x in recs:
        scores = _letter_scores(model, tok, x["prompt"])
        assert x["output"] == max(scores, key=scores.get)
        for letter in "ABCD":
            assert x["logprobs"][letter] == pytest.approx(scores[letter], abs=2e-4)
        subject, index = x["id"].rsplit("_", 1)
        assert x["gold"] in "ABCD" and subject in x["prompt"].replace(" ", "_").lower()
    assert m["mmlu"]["accuracy"] == sum(x["output"] == x["gold"] for x in recs) / 2

    # Answer loss: token-weighted mean NLL of the gold answers, recomputed from the chat template.
    for task in ("gsm8k_loss", "mmlu_loss"):
        recs = _rows(out / task / "predictions.jsonl")
        assert len(recs) == 2
        got = [_answer_nll(model, tok, x["prompt"], x["gold"]) for x in recs]
        for x, (nll, n) in zip(recs, got):
            assert x["tokens"] == n and x["nll"] == pytest.approx(nll, rel=1e-4)
        assert m[task]["nll"] == pytest.approx(sum(a * n for a, n in got) / sum(n for _, n in got), rel=1e-4)
    assert json.loads(r.output[r.output.index("{"):])["model"] == tiny_model_dir


def _fake_generate(answers: dict[str, str]):
    """Stand-in for the model's generation: the answer whose key (a task text) occurs in the prompt."""
    def generate(model, tokenizer, prompts, **kw):
        outs = []
        for p in prompts:
            hits = [a for key, a in answers.items() if key in p]
            assert len(hits) == 1, p[:200]
            outs.append([hits[0]] * kw.get("num_samples", 1))
        return outs
    return generate


def test_eval_cli_code_verdicts_with_known_answers(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    """Code tasks with answers known in advance: the reference solution passes; the same solution followed by
    a forged exit, and wrong solutions, fail. pass@1 is therefore exactly 1/4 on MBPP's four fixture test
    tasks and 1/3 on the three HumanEval problems."""
    from pkt.evaluate.tasks import humaneval, mbpp

    rows = {int(x["task_id"]): x for x in _rows(data_dir / "mbpp" / "mbpp.jsonl")}
    fence = "```python\n{}\n```"
    monkeypatch.setattr(mbpp, "generate", _fake_generate({
        rows[11]["text"]: fence.format(rows[11]["code"]),
        rows[12]["text"]: fence.format(rows[12]["code"] + "\nraise SystemExit(0)"),
        rows[13]["text"]: fence.format(rows[13]["code"].split(":")[0] + ":\n    return None"),
        rows[367]["text"]: fence.format("def unrelated():\n    return None"),
    }))
    probs = humaneval.load_rows()
    picked = [p for p in probs if p["task_id"] in ("HumanEval/0", "HumanEval/2", "HumanEval/4")]
    monkeypatch.setattr(humaneval, "load_rows", lambda *a, **k: picked)
    monkeypatch.setattr(humaneval, "generate", _fake_generate({
        picked[0]["prompt"]: picked[0]["canonical_solution"] + "\n```",
        picked[1]["prompt"]: "    import os\n    os._exit(0)\n```",
        picked[2]["prompt"]: "    return 0.0\n```",
    }))
    out = tmp_path / "out"
    r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--tasks", "mbpp,humaneval", "--out", str(out),
                           "--no-progress"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    for task, ids in (("mbpp", [11, 12, 13, 367]), ("humaneval", ["HumanEval/0", "HumanEval/2", "HumanEval/4"])):
        recs = {x["id"]: x for x in _rows(out / task / "predictions.jsonl")}
        assert [recs[i]["correct"] for i in ids] == [True] + [False] * (len(ids) - 1), task
        assert [recs[i]["status"] for i in ids] == ["passed"] + ["failed"] * (len(ids) - 1), task
        assert m[task]["pass@1"] == pytest.approx(1 / len(ids)) and m[task]["n"] == len(ids)
        assert m[task]["sandbox"]["max_memory_mb"] == 512 and m[task]["sandbox"]["errors"] == 0


def test_eval_cli_sandbox_limits_reach_the_programs(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    # A reference solution that first allocates 300 MB passes under the default 512 MiB and fails
    # (MemoryError) under --exec-max-memory-mb 128: the flag is what the sandbox enforces.
    from pkt.evaluate.tasks import mbpp

    rows = {int(x["task_id"]): x for x in _rows(data_dir / "mbpp" / "mbpp.jsonl")}
    code = "_ballast = bytearray(300 * 10**6)\n" + rows[11]["code"]
    monkeypatch.setattr(mbpp, "generate", _fake_generate({rows[i]["text"]: f"```python\n{code}\n```"
                                                          for i in (11, 12, 13, 367)}))
    verdicts = {}
    for mem in ("512", "128"):
        out = tmp_path / f"out{mem}"
        r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--tasks", "mbpp", "--out", str(out),
                               "--no-progress", "--exec-max-memory-mb", mem])
        assert r.exit_code == 0, r.output
        recs = {x["id"]: x for x in _rows(out / "mbpp" / "predictions.jsonl")}
        verdicts[mem] = (recs[11]["correct"], "MemoryError" in recs[11]["error"])
        assert json.loads((out / "metrics.json").read_text())["mbpp"]["sandbox"]["max_memory_mb"] == int(mem)
    assert verdicts == {"512": (True, False), "128": (False, True)}


def test_eval_cli_shots_and_style(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--tasks", "mmlu", "--shots", "5",
                           "--style", "tulu", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recs = _rows(out / "mmlu" / "predictions.jsonl")
    dev = {p.name.removesuffix("_dev.csv"): p.read_text().splitlines()[1:]
           for p in (data_dir / "mmlu" / "dev").glob("*_dev.csv")}
    for x in recs:
        subject = x["id"].rsplit("_", 1)[0]
        # tulu style wraps the turn in <|user|>/<|assistant|>; the shots are that subject's dev questions.
        assert x["prompt"].startswith("<|user|>\n") and "<|assistant|>" in x["prompt"]
        assert x["shots"] == min(5, len(dev[subject]))
        first_dev_question = next(csv.reader(dev[subject][:1]))[0]
        assert first_dev_question in x["prompt"]
        scores = _letter_scores(model, tok, x["prompt"])
        assert x["output"] == max(scores, key=scores.get)


@pytest.mark.parametrize("args,msg", [
    (["--tasks", "gsm9k"], "unknown eval task"),
    (["--tasks", "gsm8k", "--style", "fancy"], "style"),
    (["--tasks", "gsm8k", "--pass-k", "a"], "--pass-k"),
])
def test_eval_cli_bad_input_is_one_line(args, msg, data_dir, tiny_model_dir, tmp_path, pkt_cli):
    code, _, err = pkt_cli("eval", "--model", tiny_model_dir, "--out", tmp_path / "o", *args)
    assert code == 2
    assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_eval_settings_defaults_then_config_then_flags(data_dir, tiny_model_dir, tmp_path):
    """--config's `eval:` section overrides the defaults, a flag given on the command line overrides both;
    a value from the file is checked as the flag would be."""
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("eval:\n  limit: 2\n  max-new-tokens: 3\n  batch_size: 1\n  tasks: gsm8k\n")
    out = tmp_path / "out"
    r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--config", cfg, "--limit", "1", "--out", out,
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["tasks"] == ["gsm8k"]  # from the file (the default is all four)
    assert (m["config"]["limit"], m["config"]["max_new_tokens"], m["config"]["batch_size"]) == (1, 3, 1)
    assert m["config"]["top_p"] == 0.95  # in neither: the default
    assert len(_rows(out / "gsm8k" / "predictions.jsonl")) == 1


@pytest.mark.parametrize("text, msg", [
    ("eval:\n  limt: 2\n", "eval.limt: unknown setting"),
    ("analysis:\n  limit: 2\n", "no 'eval:' section"),
    ("eval:\n  limit: two\n", "eval.limit: "),
])
def test_eval_config_errors_are_one_line(text, msg, data_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import sys

    from pkt.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(text)
    monkeypatch.setattr(sys, "argv", ["pkt", "eval", "--model", tiny_model_dir, "--out", str(tmp_path / "o"),
                                      "--config", str(cfg)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err
