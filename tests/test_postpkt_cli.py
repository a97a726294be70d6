"""End-to-end on tiny models through the CLI: `pkt extract sensitivity` and `pkt postpkt` (all inits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkt import testing
from pkt.config import load_config
from pkt.postpkt import SeekingConfig, load_extraction

ROOT = Path(__file__).resolve().parents[1]
PKT = [sys.executable, "-c", "from pkt.cli import main; main()"]  # the console script, in-venv


def _rows(n, offset=0):
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                          {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}"}]}
            for i in range(offset, offset + n)]


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_tok):
    data = tmp_path / "data" / "pkt_splits" / "gsm"
    data.mkdir(parents=True)
    for split, rows in {"extract": _rows(3), "align": _rows(2, 10), "train": _rows(6, 20)}.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("PKT_DATA_DIR", str(tmp_path / "data"))
    v = len(tiny_tok)
    t = testing.save_tiny(testing.tiny_model("qwen2", "teacher", v), tiny_tok, tmp_path / "teacher")
    s = testing.save_tiny(testing.tiny_model("qwen2", "student", v), tiny_tok, tmp_path / "student")
    return tmp_path, t, s


def test_extract_cli_writes_factors_and_manifest(env):
    tmp, t, s = env
    out = tmp / "ext"
    r = testing.invoke_cli(["extract", "sensitivity", "--teacher", t, "--student", s, "--task", "gsm8k", "--out", str(out),
                 "--rank", "4", "--n-samples", "2", "--targets", "q,k,v,o,gate,up,down,embed,lm_head", "--quiet"])
    assert r.exit_code == 0, r.output
    factors, m = load_extraction(out)
    assert m["n_samples"] == 2 and len(m["teacher_layers"]) == 3 and m["teacher_layers"] == sorted(m["teacher_layers"])
    assert len(m["blocks"]) == 3 * 7 + 2
    b, a = factors["model.layers.2.mlp.down_proj"]
    assert b.shape == (48, 4) and a.shape == (4, 112)
    assert factors["model.embed_tokens"][0].shape[0] == len(testing.tiny_tokenizer())
    assert m["peak_rss_bytes"] > 0 and "layer_map" in m


def test_extract_rowcol_saves_indices(env):
    tmp, t, s = env
    out = tmp / "ext_rc"
    r = testing.invoke_cli(["extract", "sensitivity", "--teacher", t, "--student", s, "--task", "gsm8k", "--out", str(out),
                 "--rank", "2", "--n-samples", "1", "--structure", "rowcol", "--layers", "last", "--quiet"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    tensors = load_file(str(out / "factors.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.rows"].numel() == 48
    assert json.loads((out / "manifest.json").read_text())["teacher_layers"] == [1, 2, 3]


@pytest.mark.parametrize("init", ["seeking", "pissa", "lora"])
def test_postpkt_cli_each_init(env, init):
    tmp, t, s = env
    out = tmp / f"run_{init}"
    cfg = tmp / "cfg.yaml"
    cfg.write_text("finetune:\n  r: 4\n  alpha: 4\n  batch_size: 4\n  micro_batch_size: 2\n  max_length: 64\n"
                   "  epochs: 1\nextract:\n  n_samples: 2\n")
    r = testing.invoke_cli(["postpkt", "--teacher", t, "--student", s, "--task", "gsm8k", "--init", init, "--out", str(out),
                 "--config", str(cfg), "--lr", "1e-3", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["lr"] == 1e-3 and summary["config"]["r"] == 4
    for d in ("adapter", "adapter_init", "merged"):
        assert (out / d).is_dir()
    if init == "seeking":
        assert Path(summary["factors"]).is_dir()


def test_postpkt_reuses_factors_and_checks_rank(env):
    tmp, t, s = env
    ext = tmp / "ext"
    assert testing.invoke_cli(["extract", "sensitivity", "--teacher", t, "--student", s, "--task", "gsm8k", "--out", str(ext),
                    "--rank", "2", "--n-samples", "1", "--quiet"]).exit_code == 0
    common = ["postpkt", "--student", s, "--task", "gsm8k", "--init", "seeking", "--factors", str(ext),
              "--batch-size", "6", "--micro-batch-size", "3", "--max-length", "64", "--epochs", "1", "--quiet"]
    assert testing.invoke_cli(common + ["--out", str(tmp / "ok"), "--r", "2", "--alpha", "2"]).exit_code == 0
    bad = testing.invoke_cli(common + ["--out", str(tmp / "bad"), "--r", "4"])
    assert bad.exit_code != 0 and "rank" in str(bad.exception)


def test_cli_errors_are_one_line_exit_2(env):
    tmp, t, s = env
    cmd = [*PKT, "postpkt", "--student", s, "--task", "gsm8k", "--init", "magic",
           "--out", str(tmp / "x")]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "magic" in p.stderr
    p = subprocess.run([*PKT, "postpkt", "--student", s, "--task", "gsm8k", "--init",
                        "seeking", "--out", str(tmp / "y")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "needs --teacher" in p.stderr
    # a student larger than the teacher cannot be filled from it
    p = subprocess.run([*PKT, "extract", "sensitivity", "--teacher", s, "--student", t,
                        "--task", "gsm8k", "--out", str(tmp / "z"), "--n-samples", "1", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "cannot map" in p.stderr, p.stderr


def test_repo_yaml_matches_defaults():
    from pkt.align.finetune import FinetuneConfig

    path = ROOT / "configs" / "postpkt.yaml"
    assert load_config(SeekingConfig, path, section="extract") == SeekingConfig()
    assert load_config(FinetuneConfig, path, section="finetune") == FinetuneConfig()


@pytest.mark.slow
def test_real_pair_extraction_and_seeking_init(tmp_path, shared_data):
    """Qwen2.5-Coder 1.5B → 0.5B: one seed sample, bf16 teacher, up/down only; the student's output is
    unchanged by the Seeking init. Run under the real-model lock (flock /tmp/pkt-real.lock ...)."""
    from pkt.align.lora_init import make_lora_model
    from pkt.models.load import load_model, load_tokenizer
    from pkt.postpkt import run_extraction

    teacher, student = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
    cfg = SeekingConfig(n_samples=1, dtype="bfloat16", accum_device="cpu", targets=["up", "down"], max_length=256)
    m = run_extraction(teacher, student, "gsm8k", cfg, tmp_path / "ext", progress=False, log=lambda s: None)
    assert len(m["teacher_layers"]) == m["student_arch"]["num_layers"] < m["teacher_arch"]["num_layers"]
    factors, _ = load_extraction(tmp_path / "ext")
    tok = load_tokenizer(student)
    model = load_model(student)
    ids = torch.tensor([tok("Natalia sold clips to 48 of her friends.")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        lora = make_lora_model(model, "seeking", ("up", "down"), r=16, alpha=16, factors=factors).eval()
        got = lora(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-3
