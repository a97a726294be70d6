"""Which kernels produced a record, and the "auto" dtype chosen by measuring, not assumed."""

from __future__ import annotations

import json

import pytest

from pkt import machine
from pkt.experiment.cache import StageCache


def test_kernel_class_names_the_cpu_capability_and_amx():
    k = machine.kernel_class()
    assert set(k) == {"arch", "cpu", "torch", "cpu_capability", "amx_bf16", "avx512_bf16", "gpu"}
    line = machine.describe(k)
    assert k["cpu_capability"] in line and ("AMX bf16" in line) == k["amx_bf16"] and (k["cpu"] or "") in line
    assert machine.describe({**k, "amx_bf16": not k["amx_bf16"]}) != line


@pytest.mark.parametrize("fp32, bf16, expected", [(2.0, 1.0, "bfloat16"), (1.0, 1.0, "float32"),
                                                   (1.0, 2.0, "float32"), (1.1, 1.0, "float32")])
def test_fastest_dtype_takes_bf16_only_when_clearly_faster(monkeypatch, fp32, bf16, expected):
    import torch

    monkeypatch.setattr(machine, "_matmul_seconds", lambda dt, n, r: fp32 if dt is torch.float32 else bf16)
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: False)
    machine.fastest_dtype.cache_clear()
    try:
        dtype, ratio = machine.fastest_dtype()
        assert dtype == expected and ratio == round(fp32 / bf16, 2)
    finally:
        machine.fastest_dtype.cache_clear()


def test_auto_dtype_in_a_config_is_resolved_when_read(monkeypatch):
    from pkt.experiment.config import ExperimentConfig

    monkeypatch.setattr(machine, "fastest_dtype", lambda: ("bfloat16", 9.0))
    c = ExperimentConfig(eval_dtype="auto", teacher_dtype="auto")
    assert (c.eval_dtype, c.teacher_dtype) == ("bfloat16", "bfloat16")  # what stage keys and the manifest carry
    monkeypatch.setattr(machine, "fastest_dtype", lambda: ("float32", 0.5))
    assert ExperimentConfig(eval_dtype="auto").eval_dtype == "float32"
    assert ExperimentConfig(eval_dtype="bfloat16").eval_dtype == "bfloat16"  # a pinned dtype stays


def test_auto_autocast_follows_the_faster_matmul_and_reaches_the_fine_tuning(monkeypatch):
    from types import SimpleNamespace

    from pkt.experiment.config import ExperimentConfig
    from pkt.methods.base import finetune_cfg

    monkeypatch.setattr(machine, "fastest_dtype", lambda: ("bfloat16", 2.4))
    c = ExperimentConfig(autocast="auto")
    assert c.autocast == "bf16" and c.dtype == "float32"  # bf16 arithmetic over float32 weights
    assert finetune_cfg(SimpleNamespace(cfg=c, n_train={"gsm8k": 4}), "gsm8k", 0, "lora").autocast == "bf16"
    monkeypatch.setattr(machine, "fastest_dtype", lambda: ("float32", 0.5))
    c = ExperimentConfig(autocast="auto")
    assert c.autocast == "none"
    assert finetune_cfg(SimpleNamespace(cfg=c, n_train={"gsm8k": 4}), "gsm8k", 0, "lora").autocast == "none"
    assert ExperimentConfig(autocast="bf16").autocast == "bf16"  # a pinned setting stays


def test_a_stage_record_says_which_kernels_made_it_and_a_reuse_on_others_says_so(tmp_path):
    logs = []
    cache = StageCache(tmp_path, log=logs.append)
    with cache.lock():
        path, _ = cache.run("s", {"a": 1}, lambda d: {"x": 1})
    rec = json.loads((path / "stage.json").read_text())
    assert rec["machine"] == machine.kernel_class() and rec["peak_rss_bytes"] > 0
    assert rec["peak_scope"] in ("stage", "process")
    with cache.lock():
        cache.run("s", {"a": 1}, lambda d: {"x": 2})
    assert "computed on" not in logs[-1]
    rec["machine"] = {**rec["machine"], "amx_bf16": not rec["machine"]["amx_bf16"]}
    (path / "stage.json").write_text(json.dumps(rec))
    with cache.lock():
        _, result = cache.run("s", {"a": 1}, lambda d: {"x": 3})
    assert result == {"x": 1} and "computed on" in logs[-1] and "this machine is" in logs[-1]


def test_the_stage_peak_is_its_own_where_linux_allows(tmp_path):
    """A small stage after a big allocation reports its own peak, not the process's."""
    import numpy as np

    from pkt.peak_memory import peak_rss_bytes, reset_peak

    def rss() -> int:
        line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    if not reset_peak():
        pytest.fail("this Linux refuses /proc/self/clear_refs: the stage peaks would be the process's")
    base = rss()
    big = np.ones(400 * 2**20 // 8)  # 400 MiB touched, then freed
    del big
    assert peak_rss_bytes() >= base + 350 * 2**20  # the process's peak saw it
    cache = StageCache(tmp_path, log=lambda s: None)
    with cache.lock():
        path, _ = cache.run("small", {"b": 1}, lambda d: {"x": 1})
    rec = json.loads((path / "stage.json").read_text())
    assert rec["peak_scope"] == "stage" and rec["peak_rss_bytes"] < base + 100 * 2**20


def test_memory_an_earlier_stage_freed_into_the_heap_is_not_charged_to_the_next():
    """glibc keeps freed blocks of a few MiB in its heap (a model's weight matrices, once the mmap threshold has
    risen); a stage after them would count them in its peak. The cache hands them back first (malloc_trim)."""
    import numpy as np

    from pkt.peak_memory import release_memory, rss_bytes

    if rss_bytes() is None:
        pytest.fail("/proc/self/status is not readable: no resident size to test")
    big = np.ones(16 * 2**20 // 8)  # one block above glibc's starting mmap threshold, freed: the threshold
    del big                         # rises to 16 MiB (its cap is 32), so the 4 MiB blocks below come from the heap
    blocks = [np.ones(4 * 2**20 // 8) for _ in range(200)]  # 800 MiB of heap, touched
    kept = blocks[1::2]  # every other block stays alive, so the freed ones are holes the heap cannot shrink past
    del blocks
    held = rss_bytes()
    assert release_memory()  # glibc (this project's Linux): the call exists
    after = rss_bytes()
    assert held - after > 300 * 2**20, (held, after)  # most of the ~400 MiB of holes went back to the OS
    assert len(kept) == 100


def test_a_record_from_another_cpu_model_says_so_and_one_from_before_cpu_was_recorded_does_not(tmp_path):
    """Two VMs of one kind (AVX-512, no AMX) differ in their bf16 kernels (P4, P6): the record names the CPU, and a
    reuse on another CPU model says so; a record made before the CPU was recorded is not taken for another one."""
    here = machine.kernel_class()
    assert "cpu" in here and machine.same_class(here, dict(here))
    assert not machine.same_class(here, {**here, "cpu": f"not {here['cpu']}"})
    assert machine.same_class(here, {k: v for k, v in here.items() if k != "cpu"})
    logs = []
    cache = StageCache(tmp_path, log=logs.append)
    with cache.lock():
        path, _ = cache.run("s", {"a": 1}, lambda d: {"x": 1})
    rec = json.loads((path / "stage.json").read_text())
    for other, noted in (({k: v for k, v in rec["machine"].items() if k != "cpu"}, False),
                         ({**rec["machine"], "cpu": "Another CPU"}, True)):
        (path / "stage.json").write_text(json.dumps({**rec, "machine": other}))
        with cache.lock():
            cache.run("s", {"a": 1}, lambda d: {"x": 2})
        assert ("computed on" in logs[-1]) is noted and (not noted or "Another CPU" in logs[-1])
