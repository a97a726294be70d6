"""Bad input to ``pkt eval`` and ``pkt data validate``: one line naming the file or setting, exit status 2,
no traceback, found before any model is loaded or task runs, and nothing half-written left in --out."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from pkt import testing
from pkt.errors import PktError


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tok):
    model = testing.tiny_model("qwen2", "student", len(tiny_tok))
    return testing.save_tiny(model, tiny_tok, tmp_path / "tiny")


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading weights is the expensive step: any error these tests provoke must come before it."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("pkt: error: "), err
    for n in needles:
        assert n in err, (n, err)


def files_under(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- pkt data validate --------------------------------------------------------------------------------------

def test_data_validate_non_utf8_names_file_and_line(tmp_path, pkt_cli):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    f = tmp_path / "latin1.jsonl"
    f.write_bytes((good + "\n" + good.replace('"q"', '"caf\u00e9"') + "\n").encode("latin-1"))
    code, _, err = pkt_cli("data", "validate", f)
    # 0xe9 is the latin-1 'é' on line 2; its column is where it sits in that line (1-based).
    col = good.replace('"q"', '"caf\u00e9"').index("\u00e9") + 1
    assert_one_line_error(code, err, f"{f}:2:", "0xe9", f"column {col}")


# --- pkt eval: settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (["--n-samples", "2"], ["n_samples=2", "temperature 0"]),
    (["--n-samples", "2", "--temperature", "0"], ["n_samples=2", "temperature 0"]),
    (["--limit", "0"], ["limit"]),
    (["--n-samples", "2", "--temperature", "0.8", "--pass-k", "1,5"], ["pass@5", "n_samples (2)"]),
    (["--pass-k", "2"], ["pass@2", "n_samples (1)"]),
    (["--exec-max-procs", "0"], ["exec_max_procs"]),
    (["--dtype", "float8"], ["dtype 'float8'"]),
])
def test_bad_settings_fail_before_anything_runs(args, needles, tiny_model_dir, tmp_path, no_model_load, pkt_cli):
    out = tmp_path / "out"
    code, _, err = pkt_cli("eval", "--model", tiny_model_dir, "--tasks", "gsm8k,humaneval", "--out", out,
                           "--no-progress", *args)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_library_rejects_greedy_multi_sampling_before_the_first_task(monkeypatch):
    from pkt.evaluate import harness

    ran = []
    monkeypatch.setattr(harness, "run_task", lambda *a, **k: ran.append(a) or ([], {}))
    with pytest.raises(PktError, match="n_samples=2 at temperature 0"):
        harness.evaluate_model(object(), object(), ["gsm8k", "humaneval"], n_samples=2, temperature=0.0)
    assert ran == []


# --- pkt eval: --out ------------------------------------------------------------------------------------------

def test_out_that_is_a_file(tiny_model_dir, tmp_path, no_model_load, pkt_cli):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    code, _, err = pkt_cli("eval", "--model", tiny_model_dir, "--tasks", "gsm8k", "--out", out, "--no-progress")
    assert_one_line_error(code, err, f"--out {out}", "not a directory")
    assert out.read_text() == "keep me\n"


def test_out_below_a_file(tiny_model_dir, tmp_path, no_model_load, pkt_cli):
    blocker = tmp_path / "results.txt"
    blocker.write_text("x")
    code, _, err = pkt_cli("eval", "--model", tiny_model_dir, "--tasks", "gsm8k", "--out", blocker / "run1",
                           "--no-progress")
    assert_one_line_error(code, err, f"{blocker} is not a directory")


def test_read_only_out(tiny_model_dir, tmp_path):
    """A really read-only --out: mode 0555 for a normal user; as root (who ignores modes) a read-only bind
    mount in a private mount namespace. The command runs in a subprocess either way."""
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "run1"
    cmd = [sys.executable, "-m", "pkt.cli", "eval", "--model", tiny_model_dir, "--tasks", "gsm8k", "--out",
           str(out), "--no-progress"]
    if os.geteuid() == 0:
        assert shutil.which("unshare") and shutil.which("mount"), "needs util-linux unshare/mount as root"
        script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && touch {ro}/probe 2>/dev/null "
                  "&& exit 99; exec \"$@\"")
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", *cmd]
    else:
        ro.chmod(0o555)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert f"--out {out}: cannot write in {ro}" in r.stderr
    assert os.listdir(ro) == []


def test_full_disk_mid_run_leaves_only_complete_files(fixture_data_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                      pkt_cli):
    """The disk fills while the second task's predictions are written (half the bytes land, then ENOSPC):
    the error names that file, its temp file is gone, and what the first task wrote is complete."""
    real = pathlib.Path.write_text

    def filling(self, data, *a, **k):
        if "gsm8k" in str(self.parent.name) and ".tmp" in self.name:
            real(self, data[: len(data) // 2], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", filling)
    out = tmp_path / "out"
    code, _, err = pkt_cli("eval", "--model", tiny_model_dir, "--tasks", "mmlu,gsm8k", "--limit", "2",
                           "--max-new-tokens", "4", "--out", out, "--no-progress")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1] == f"pkt: error: {out / 'gsm8k' / 'predictions.jsonl'}: cannot write (No space left on device)"
    assert files_under(out) == ["metrics.json", "mmlu/predictions.jsonl"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "mmlu" in metrics and "gsm8k" not in metrics
    assert [json.loads(x)["id"] is not None for x in (out / "mmlu" / "predictions.jsonl").read_text().splitlines()] \
        == [True, True]


# --- pkt eval: the model directory --------------------------------------------------------------------------

def test_model_dir_that_is_not_a_causal_lm(tmp_path, tiny_tok, no_model_load, pkt_cli):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=len(tiny_tok), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32))
    d = testing.save_tiny(bert, tiny_tok, tmp_path / "bert")
    out = tmp_path / "out"
    code, _, err = pkt_cli("eval", "--model", d, "--tasks", "gsm8k", "--out", out, "--no-progress")
    assert_one_line_error(code, err, "BertModel", "not a causal LM", "config.json")
    assert not out.exists()


def test_model_dir_without_config(tmp_path, no_model_load, pkt_cli):
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\0" * 16)
    code, _, err = pkt_cli("eval", "--model", d, "--tasks", "gsm8k", "--out", tmp_path / "out", "--no-progress")
    assert_one_line_error(code, err, f"{d / 'config.json'} not found")


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_corrupt_safetensors(damage, tiny_model_dir, tmp_path, no_model_load, pkt_cli):
    f = pathlib.Path(tiny_model_dir) / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\xff" * 64 + data[64:])
    out = tmp_path / "out"
    code, _, err = pkt_cli("eval", "--model", tiny_model_dir, "--tasks", "gsm8k", "--out", out, "--no-progress")
    assert_one_line_error(code, err, str(f), "corrupt or truncated safetensors")
    assert not out.exists()


def test_model_checks_accept_a_good_directory(tiny_model_dir):
    # The other side of the checks above: the intact tiny model passes them and loads.
    from pkt.models.load import check_model_dir, load_model

    check_model_dir(tiny_model_dir)
    assert type(load_model(tiny_model_dir)).__name__ == "Qwen2ForCausalLM"
