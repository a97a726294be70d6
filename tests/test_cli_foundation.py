"""CLI contract: --help everywhere, and bad input -> one line on stderr, exit code 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

PKT = [sys.executable, "-m", "pkt.cli"]


def run(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run(PKT + list(args), capture_output=True, text=True, env=e, timeout=120)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkt: error:"), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0]


def test_help_on_every_subcommand():
    res = run("--help")
    assert res.returncode == 0
    listed = {line.strip("│ ").split()[0] for line in res.stdout.splitlines()
              if line.startswith("│ ") and line.strip("│ ") and not line.startswith("│  ")}
    assert {"models", "data", "extract", "postpkt", "laten", "kd", "eval", "analyze", "run"} <= listed, res.stdout
    for args in (["models", "list"], ["models", "prepare"], ["models", "info"], ["data", "validate"], ["data", "show"]):
        r = run(*args, "--help")
        usage = next((line for line in r.stdout.splitlines() if "Usage:" in line), "")
        assert r.returncode == 0 and " ".join(args) in usage, (args, r.stdout, r.stderr)  # the command's own help


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"messages": [}\n', ":1: invalid JSON"),
        ('{"foo": 1}\n', ":1: missing key 'messages'"),
        (json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n",
         ":1: turn 0 must have role 'user'"),
        ("", "empty file"),
    ],
)
def test_malformed_data_file(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert_one_line_error(run("data", "validate", str(path)), str(path), needle)


def test_unknown_task_and_missing_data_dir(tmp_path):
    assert_one_line_error(run("data", "show", "gsm9k", env={"PKT_DATA_DIR": str(tmp_path)}), "unknown task 'gsm9k'")
    assert_one_line_error(run("data", "show", "gsm8k", env={"PKT_DATA_DIR": str(tmp_path / "x")}), "no such directory")


def test_unknown_model(tmp_path):
    assert_one_line_error(run("models", "info", "no-such-model.bin", env={"PKT_HOME": str(tmp_path)}), "no-such-model.bin")
    assert_one_line_error(run("models", "prepare", "llama-9000", env={"PKT_HOME": str(tmp_path)}), "unknown embedded model")


def test_models_info_on_a_local_directory(tmp_path, qwen_pair):
    from pkt.testing import save_tiny

    _, student, tok = qwen_pair
    path = save_tiny(student, tok, tmp_path / "student")
    res = run("models", "info", path, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["num_layers"], info["hidden_size"], info["num_kv_heads"], info["head_dim"]) == (3, 48, 2, 8)
    assert info["bias"]["q"] and not info["tied_embeddings"]
