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


# ---- Seeking controls ---------------------------------------------------------------------------------

def _extraction(env, rank=2):
    tmp, t, s = env
    ext = tmp / "ext"
    r = testing.invoke_cli(["extract", "sensitivity", "--teacher", t, "--student", s, "--task", "gsm8k", "--out",
                            str(ext), "--rank", str(rank), "--n-samples", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    return ext


def test_derangement_has_no_fixed_point():
    from pkt.errors import PktError
    from pkt.postpkt import derangement

    for n in (2, 3, 5, 24):
        perms = {tuple(derangement(n, seed)) for seed in range(20)}
        for p in perms:
            assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
        assert n == 2 or len(perms) > 1  # seeded, not one fixed answer (n=2 has a single derangement)
    assert derangement(7, 3) == derangement(7, 3)
    with pytest.raises(PktError, match="at least 2"):
        derangement(1, 0)


def test_random_control_keeps_singular_values_not_subspaces(env):
    from pkt.postpkt import control_factors

    factors, manifest = load_extraction(_extraction(env))
    new, info = control_factors(factors, manifest["blocks"], "random", seed=5)
    assert info["control"] == "random" and set(new) == set(factors)
    for name, (b, a) in factors.items():
        b2, a2 = new[name]
        assert b2.shape == b.shape and a2.shape == a.shape
        r = b.shape[1]
        want = torch.linalg.svdvals((b @ a).double())[:r]
        got = torch.linalg.svdvals((b2 @ a2).double())[:r]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # same spectrum, rank and scale
        torch.testing.assert_close(a2 @ a2.T, torch.eye(r), atol=1e-5, rtol=0)  # A = V'ᵀ orthonormal rows
        # the column and row spaces are not the extracted ones: the cosines of the principal angles
        # between the two r-dim subspaces (singular values of U1ᵀU2) are not all 1
        u1 = torch.linalg.qr(b.double())[0]
        u2 = torch.linalg.qr(b2.double())[0]
        assert float(torch.linalg.svdvals(u1.T @ u2).min()) < 0.99, name
        assert float(torch.linalg.svdvals(a.double() @ a2.double().T).min()) < 0.99, name
    again, _ = control_factors(factors, manifest["blocks"], "random", seed=5)
    assert all(torch.equal(again[k][0], new[k][0]) for k in new)  # seeded


def test_shuffled_control_moves_each_factor_to_a_deranged_layer(env):
    from pkt.postpkt import control_factors

    factors, manifest = load_extraction(_extraction(env))
    new, info = control_factors(factors, manifest["blocks"], "shuffled", seed=1)
    perm = info["layer_perm"]
    n_layers = manifest["student_arch"]["num_layers"]
    assert sorted(perm) == list(range(n_layers)) and all(perm[j] != j for j in range(n_layers))
    assert set(new) == set(factors)
    for blk in manifest["blocks"]:
        j, kind, name = blk["student_layer"], blk["kind"], blk["student"]
        dest = next(b["student"] for b in manifest["blocks"] if b["student_layer"] == perm[j] and b["kind"] == kind)
        assert dest != name
        assert torch.equal(new[dest][0], factors[name][0]) and torch.equal(new[dest][1], factors[name][1])


@pytest.mark.parametrize("control", ["random", "shuffled"])
def test_controls_keep_the_student_output(env, control):
    from transformers import AutoModelForCausalLM

    from pkt.align.lora_init import make_lora_model
    from pkt.postpkt import control_factors

    tmp, _, s = env
    factors, manifest = load_extraction(_extraction(env))
    new, _ = control_factors(factors, manifest["blocks"], control, seed=0)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32)(input_ids=ids).logits
        model = make_lora_model(AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32), "seeking",
                                manifest["targets"], r=2, alpha=2, dropout=0.0, factors=new)
        got = model(input_ids=ids).logits
        lora_on = sum(float((m.lora_B["default"].weight @ m.lora_A["default"].weight).norm())
                      for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B)
    assert lora_on > 0  # the control's BA is really in the adapter ...
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)  # ... and removed from the base: W - BA + BA


def test_postpkt_cli_control(env):
    tmp, t, s = env
    ext = _extraction(env)
    out = tmp / "ctrl"
    r = testing.invoke_cli(["postpkt", "--student", s, "--task", "gsm8k", "--init", "seeking", "--factors", str(ext),
                            "--control", "shuffled", "--r", "2", "--alpha", "2", "--batch-size", "6",
                            "--micro-batch-size", "3", "--max-length", "64", "--epochs", "1", "--quiet", "--out",
                            str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["control"] == "shuffled" and Path(summary["factors"]) == tmp / "ctrl.shuffled-factors"
    cm = json.loads((tmp / "ctrl.shuffled-factors" / "manifest.json").read_text())
    assert cm["method"] == "seeking-shuffled" and cm["source_extraction"] == str(ext)
    bad = testing.invoke_cli(["postpkt", "--student", s, "--task", "gsm8k", "--init", "lora", "--control", "random",
                              "--out", str(tmp / "bad")])
    assert bad.exit_code != 0 and "--control" in str(bad.exception) and not (tmp / "bad").exists()
