"""``pkt eval`` on a tiny saved model and the fixture data directory."""

from __future__ import annotations

import json

import pytest

from pkt import testing



@pytest.fixture
def data_dir(fixture_data_dir):
    return fixture_data_dir


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tok):
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    return testing.save_tiny(model, tiny_tok, tmp_path / "tiny")


def test_eval_cli_writes_metrics_and_predictions(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--tasks", "gsm8k,mmlu,mbpp", "--limit", "2",
                           "--max-new-tokens", "4", "--out", str(out), "--no-progress", "--answer-loss"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["tasks"] == ["gsm8k", "mmlu", "mbpp", "gsm8k_loss", "mmlu_loss", "mbpp_loss"]
    assert m["gsm8k"]["n"] == 2 and "accuracy" in m["mmlu"] and m["mbpp"]["pass@1"] == 0.0
    assert m["gsm8k_loss"]["nll"] > 0
    for t in m["tasks"]:
        assert len((out / t / "predictions.jsonl").read_text().splitlines()) == 2
    assert json.loads(r.output[r.output.index("{"):])["model"] == tiny_model_dir


def test_eval_cli_shots_and_style(data_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    r = testing.invoke_cli(["eval", "--model", tiny_model_dir, "--tasks", "mmlu", "--shots", "5",
                           "--style", "tulu", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "mmlu" / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["shots"] == 5 and rec["prompt"].startswith("<|user|>\n")


@pytest.mark.parametrize("args,msg", [
    (["--tasks", "gsm9k"], "unknown eval task"),
    (["--tasks", "gsm8k", "--style", "fancy"], "style"),
    (["--tasks", "gsm8k", "--pass-k", "a"], "--pass-k"),
])
def test_eval_cli_bad_input_is_one_line(args, msg, data_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    import sys

    from pkt.cli import main

    monkeypatch.setattr(sys, "argv", ["pkt", "eval", "--model", tiny_model_dir, "--out", str(tmp_path / "o"), *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1
