"""Shared by HumanEval and MBPP: code extraction, the unbiased pass@k estimator, sandboxed execution."""

from __future__ import annotations

import re

import numpy as np

from pkt.errors import PktError

INSTRUCTION = "Complete the following python function.\n\n\n"
ASSISTANT_PREFIX = "Here is the completed function:\n\n\n```python\n"
_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\r?\n(.*?)(?:```|$)", re.S)


def strip_fences(text: str) -> str:
    """Code from a completion that started inside a ```python block: cut at the closing fence; if the model
    opened a new fenced block instead, take that block's content."""
    text = text.replace("\r\n", "\n")
    close = text.find("```")
    if close == -1:
        return text
    head = text[:close]
    if head.strip():
        return head
    m = _FENCE.search(text, close)
    return m.group(1) if m else head


def defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021), numerically stable."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def execute(programs: list[str], cfg, desc: str):
    from pkt.evaluate import sandbox

    iso = sandbox.isolation()
    strong = iso.get("net") == "namespace" and iso.get("fs") == "namespace" and iso.get("user") != "self"
    if not strong and not cfg.allow_weak_sandbox:
        raise PktError(f"code sandbox isolation is incomplete here ({iso}); run as root or with user namespaces, "
                       "or pass allow_weak_sandbox (--allow-weak-sandbox) to accept rlimits-only isolation")
    sc = sandbox.SandboxConfig(timeout=cfg.exec_timeout, max_memory_mb=cfg.exec_max_memory_mb,
                               max_procs=cfg.exec_max_procs)
    results = sandbox.run_programs(programs, sc, workers=cfg.exec_workers, progress=cfg.progress, desc=desc)
    # Recorded with the metrics: the limits the verdicts were reached under, and how many programs were
    # never judged (setup refused or failed: they count as not passed, but a large number means the
    # score measures the machine, not the model).
    info = {**iso, "max_memory_mb": sc.max_memory_mb, "max_procs": sc.max_procs, "timeout": sc.timeout,
            "workers": cfg.exec_workers, "errors": sum(r.status == "error" for r in results)}
    return results, info


def pass_metrics(correct_per_problem: list[list[bool]], ks) -> dict:
    out = {}
    n_min = min((len(c) for c in correct_per_problem), default=0)
    for k in ks:
        if k <= n_min:
            vals = [pass_at_k(len(c), sum(c), k) for c in correct_per_problem]
            out[f"pass@{k}"] = float(np.mean(vals)) if vals else 0.0
    return out


def collect(rows, prompts, outs, codes, results) -> tuple[list[dict], list[list[bool]]]:
    """Per-sample records and per-problem pass lists; ``results`` are in (problem, sample) order."""
    records, correct, k = [], [], 0
    for r, p, os_, cs in zip(rows, prompts, outs, codes):
        per = []
        for o, c in zip(os_, cs):
            res = results[k]
            k += 1
            per.append(res.passed)
            records.append({"id": r["task_id"], "prompt": p, "output": o, "extracted": c, "correct": res.passed,
                            "status": res.status, "error": res.stderr[-500:] if not res.passed else ""})
        correct.append(per)
    return records, correct
