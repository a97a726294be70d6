"""Shared fixtures: tiny random teacher/student pairs (Llama MHA; Qwen2 GQA + biases) and a tiny tokenizer.

Fast tests use only these. Tests marked ``slow`` load the real embedded models; tests that read the
benchmark data use the ``shared_data`` fixture, which fails (never skips) when PKT_DATA_DIR is unset.
``pkt_cli`` runs the ``pkt`` command in this process, as the console script does.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pkt import testing

FIXTURES = Path(__file__).parent / "fixtures"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_tok():
    return testing.tiny_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_pair(request, tiny_tok):
    """(teacher, student, tokenizer) for both families: every test using it runs twice."""
    v = len(tiny_tok)
    return testing.tiny_model(request.param, "teacher", v), testing.tiny_model(request.param, "student", v), tiny_tok


@pytest.fixture
def qwen_pair(tiny_tok):
    v = len(tiny_tok)
    return testing.tiny_model("qwen2", "teacher", v), testing.tiny_model("qwen2", "student", v), tiny_tok


@pytest.fixture
def llama_pair(tiny_tok):
    v = len(tiny_tok)
    return testing.tiny_model("llama", "teacher", v), testing.tiny_model("llama", "student", v), tiny_tok


@pytest.fixture
def shared_data():
    raw = os.environ.get("PKT_DATA_DIR")
    assert raw and Path(raw).is_dir(), "this test reads the benchmark data: set PKT_DATA_DIR (see README)"
    return Path(raw)


@pytest.fixture
def fixture_data_dir(tmp_path, monkeypatch):
    """A PKT_DATA_DIR with the real layout, filled from tests/fixtures (so the real loaders run)."""
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    shutil.copy(FIXTURES / "gsm8k_tiny.jsonl", root / "gsm8k" / "test.jsonl")
    shutil.copytree(FIXTURES / "mmlu_tiny", root / "mmlu")
    (root / "mbpp").mkdir()
    shutil.copy(FIXTURES / "mbpp_tiny.jsonl", root / "mbpp" / "mbpp.jsonl")
    shutil.copy(FIXTURES / "sanitized_mbpp_tiny.json", root / "mbpp" / "sanitized-mbpp.json")
    shutil.copytree(FIXTURES / "pkt_splits_tiny", root / "pkt_splits")
    monkeypatch.setenv("PKT_DATA_DIR", str(root))
    return root


@pytest.fixture
def pkt_cli(monkeypatch, capfd):
    """``pkt_cli(*args)`` runs ``pkt ARGS`` through the console script's entry point (its one-line errors and
    exit codes included) and returns (exit code, stdout, stderr) of that command alone. Output is captured
    at the file descriptors, so what libraries' loggers print counts as it would in a terminal."""
    from pkt.cli import main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["pkt", *map(str, args)])
        capfd.readouterr()  # drop what came before (fixtures' progress bars)
        with pytest.raises(SystemExit) as e:
            main()
        out = capfd.readouterr()
        return e.value.code or 0, out.out, out.err

    return run
