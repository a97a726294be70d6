"""The stage cache never serves a stale result: what each key covers, unreadable records, one runner.

The key test plans the tiny study (every method, the analysis), changes one ingredient at a time and
compares the set of stages whose key changed with the set that reads that ingredient, directly or
through an earlier stage's output. The expected sets are written out from the study's data flow.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from pkt.config import validate
from pkt.errors import PktError
from pkt.experiment import fingerprint
from pkt.experiment.cache import StageCache
from pkt.experiment.config import ExperimentConfig
from pkt.experiment.runner import Study
from pkt.testing import TINY_BUDGET, save_tiny

METHODS = ["student", "teacher", "lora", "pissa", "seeking", "laten", "seqkd"]
FT = {"lora", "pissa", "seeking", "seqkd"}


def evals(*methods):
    return {f"eval-{m}-gsm8k-s0" for m in methods}


def builds(*methods):
    return {f"{m}-gsm8k-s0" for m in methods}


# every model's evaluation, and the student's again in float32 (the baseline of models that fall back there)
EVALS = evals(*METHODS, "student-fp32")
ALL = {"extract-gsm8k", "kd-data-gsm8k", "analysis"} | EVALS | builds(*(set(METHODS) - {"student", "teacher"}))


@pytest.fixture
def study_env(tmp_path, qwen_pair, shared_data, monkeypatch):
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    shutil.copy(shared_data / "gsm8k" / "test.jsonl", data / "gsm8k" / "test.jsonl")
    shutil.copytree(shared_data / "pkt_splits" / "gsm", data / "pkt_splits" / "gsm")
    monkeypatch.setenv("PKT_DATA_DIR", str(data))
    monkeypatch.setenv("PKT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fingerprint, "_MEMO", None)
    teacher, student, tok = qwen_pair
    cfg = {"name": "keys", "teacher": save_tiny(teacher, tok, tmp_path / "teacher"),
           "student": save_tiny(student, tok, tmp_path / "student"), "tasks": ["gsm8k"], "methods": METHODS,
           "seeds": [0], "teacher_dtype": "float32", "analysis_examples": 2, "budget": TINY_BUDGET}
    return tmp_path, data, cfg, (teacher, tok)


def keys(cfg: dict, out) -> dict:
    return {r.stage: r.key for r in Study(validate(ExperimentConfig, cfg), out, log=lambda s: None).plan_stages()}


def changed(a: dict, b: dict) -> set:
    assert a.keys() == b.keys()
    return {s for s in a if a[s] != b[s]}


def test_each_ingredient_recomputes_exactly_its_stages(study_env, monkeypatch):
    tmp, data, cfg, (teacher, tok) = study_env
    out = tmp / "out"
    base = keys(cfg, out)
    assert set(base) == ALL
    assert keys(cfg, out) == base  # deterministic

    # settings: the fine-tuning lr reaches the four fine-tuned arms and their evaluations only
    lr = {**cfg, "budget": {**TINY_BUDGET, "lr": 1e-4}}
    assert changed(base, keys(lr, out)) == builds(*FT) | evals(*FT)
    # settings read by the evaluation and the analysis only (the analysis key used to omit it)
    loss = {**cfg, "budget": {**TINY_BUDGET, "loss_examples": 4}}
    assert changed(base, keys(loss, out)) == EVALS | {"analysis"}
    ana = {**cfg, "analysis_examples": 3}
    assert changed(base, keys(ana, out)) == {"analysis"}

    # pkt's code and the library versions: everything
    with monkeypatch.context() as m:
        m.setattr(fingerprint, "code_identity", lambda: {"pkt": "x", "source": "edited"})
        assert changed(base, keys(cfg, out)) == ALL
    real = fingerprint.library_versions()
    with monkeypatch.context() as m:
        m.setattr(fingerprint, "library_versions", lambda: {**real, "peft": "0.0.1"})
        assert changed(base, keys(cfg, out)) == ALL

    # data: the test set reaches the evaluations only; the align split LaTen only (and what reads its output)
    with open(data / "gsm8k" / "test.jsonl", "a") as f:
        f.write(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    assert changed(base, keys(cfg, out)) == EVALS
    base = keys(cfg, out)
    align = data / "pkt_splits" / "gsm" / "align.jsonl"
    lines = align.read_text().splitlines(keepends=True)
    align.write_text("".join(lines[1:] + lines[:1]))
    assert changed(base, keys(cfg, out)) == builds("laten") | evals("laten") | {"analysis"}
    base = keys(cfg, out)
    # a new mtime with the same content is not a change
    time.sleep(0.01)
    os.utime(align)
    assert keys(cfg, out) == base

    # the teacher's weights: every stage that reads the teacher, and what reads their outputs
    # (Seeking's factors, the KD data, LaTen's fused model); the student-only arms keep their keys
    import torch

    with torch.no_grad():
        teacher.model.norm.weight[0] += 1.0
    save_tiny(teacher, tok, tmp / "teacher")
    assert changed(base, keys(cfg, out)) == ({"extract-gsm8k", "kd-data-gsm8k", "analysis"}
                                             | builds("seeking", "laten", "seqkd")
                                             | evals("teacher", "seeking", "laten", "seqkd"))


def test_unreadable_record_counts_as_missing(tmp_path):
    cache = StageCache(tmp_path, log=lambda s: None)
    calls = []

    def work(d):
        calls.append(1)
        (d / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    with cache.lock():
        path, _ = cache.run("s", {"a": 1}, work)
        for bad in ("{not json", json.dumps({"stage": "s", "seconds": 1.0}), "", json.dumps([1, 2])):
            (path / "stage.json").write_text(bad)
            p2, res = cache.run("s", {"a": 1}, work)  # recomputed, not a crash, not the stale result
            assert p2 == path and res == {"n": len(calls)} and (path / "out.txt").read_text() == str(len(calls))
        assert len(calls) == 5
        assert cache.run("s", {"a": 1}, work)[1] == {"n": 5} and len(calls) == 5  # and then cached again
        # a stage whose outputs were pruned is rebuilt when needed
        cache.prune(path, [path / "out.txt"], "test")
        assert not (path / "out.txt").exists()
        assert cache.run("s", {"a": 1}, work)[1] == {"n": 6} and (path / "out.txt").read_text() == "6"
        assert not (path / "pruned.json").exists()


def test_a_second_runner_is_refused(tmp_path):
    a, b = StageCache(tmp_path, log=lambda s: None), StageCache(tmp_path, log=lambda s: None)
    with a.lock():
        (tmp_path / "stages").mkdir()
        work = tmp_path / "stages" / ".s-abc.tmp4242"  # the first runner's stage in progress
        work.mkdir()
        with pytest.raises(PktError, match=rf"output directory {tmp_path} is in use by another pkt run \(pid {os.getpid()}\)"):
            with b.lock():
                pass
        assert work.is_dir()  # not reclaimed by the refused runner
        with pytest.raises(RuntimeError):
            b.run("s", {}, lambda d: {})  # and it cannot write stages without the lock
    with b.lock():  # released: the next runner takes over and reclaims the leftovers
        assert not work.exists()


def test_second_pkt_run_on_the_same_out_is_one_line(tmp_path, qwen_pair, shared_data):
    teacher, student, tok = qwen_pair
    data = {"name": "lock", "teacher": save_tiny(teacher, tok, tmp_path / "t"),
            "student": save_tiny(student, tok, tmp_path / "s"), "methods": ["student"], "analysis": False,
            "budget": TINY_BUDGET}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / '.pkt-run.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode())\n"
        "print('held', flush=True); time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-m", "pkt.cli", "run", str(tmp_path / "c.yaml"), "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("plan:")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0] == (f"pkt: error: output directory {out} is in use by another pkt run (pid {holder.pid}); "
                        "wait for it or choose another --out")
    assert not (out / "stages").exists()
