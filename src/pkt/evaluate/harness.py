"""Evaluate an in-memory model on GSM8K, MMLU, HumanEval, MBPP and answer loss.

Library entry point (the CLI ``pkt eval`` is a thin layer over it)::

    from pkt.evaluate import evaluate_model, EvalConfig
    metrics = evaluate_model(model, tokenizer, ["gsm8k", "mmlu"], out_dir="runs/eval", limit=50)

Writes ``<out_dir>/<task>/predictions.jsonl`` (prompt, output, extracted answer, correct, ...) and
``<out_dir>/metrics.json`` (updated after every task, atomically) and returns the metrics dict
``{task: {...}, "config": {...}}``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from pydantic import Field, field_validator, model_validator

from pkt.config import Settings, validate
from pkt.errors import PktError
from pkt.evaluate import tasks as T
from pkt.evaluate.generate import GenStats
from pkt.evaluate.tasks.common import parse_protocol
from pkt.io import write_json, write_jsonl


class EvalConfig(Settings):
    protocol: str = Field("pkt", description="pkt (PKT papers' format) | standard (lm-eval gsm8k_cot / mmlu, "
                                             "Qwen2.5-Coder instruct for code) | task=name overrides, comma list")
    limit: int | None = Field(None, ge=1, description="seeded subset of N examples per task (None: all)")
    seed: int = 0
    shots: int | None = Field(None, ge=0, description="GSM8K/MMLU shots (default 0 = PKT format)")
    style: str = Field("chat", pattern="^(chat|tulu)$")
    batch_size: int = Field(8, ge=1)
    decoding: str = Field("padded", pattern="^(padded|continuous)$",
                          description="greedy decoding engine: padded batches, or continuous batching "
                                      "(batch_size sequences at once, a finished one hands on its slot)")
    max_new_tokens: int | None = Field(None, ge=1, description="default: 256 GSM8K, 512 code")
    max_prompt_tokens: int = Field(2048, ge=16)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    n_samples: int = Field(1, ge=1, description="samples per code problem (pass@k needs n >= k)")
    pass_ks: tuple[int, ...] = (1,)
    mbpp_variant: str = Field("full", pattern="^(full|sanitized)$")
    loss_split: str = Field("align", pattern="^(extract|align|train)$")
    exec_timeout: float = Field(10.0, gt=0)
    exec_workers: int = Field(2, ge=1)
    # Per generated program; worst case exec_workers x exec_max_procs x exec_max_memory_mb (4 GiB by default).
    exec_max_memory_mb: int = Field(512, ge=64, description="address-space limit of each program process (MiB)")
    exec_max_procs: int = Field(4, ge=1, description="processes + threads each program may run")
    allow_weak_sandbox: bool = False
    progress: bool = True

    # Checked when the settings are read, so a bad combination fails before any task runs.
    @model_validator(mode="after")
    def _sampling_is_consistent(self):
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError(f"n_samples={self.n_samples} at temperature 0: greedy decoding makes every sample "
                             "the same; set temperature > 0 or n_samples 1")
        bad = [k for k in self.pass_ks if not 1 <= k <= self.n_samples]
        if bad:
            raise ValueError(f"pass_ks: pass@{bad[0]} needs 1 <= k <= n_samples ({self.n_samples})")
        return self

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, v: str) -> str:
        parse_protocol(v)  # a ValueError naming the unknown task or protocol becomes a settings error
        return v


def parse_task_list(tasks: str | Iterable[str], answer_loss: bool = False) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if "loss" in names:  # shorthand: answer loss of every task
        names = [n for n in names if n != "loss"] + list(T.LOSS_TASKS)
    if answer_loss:
        names += [f"{n}_loss" for n in names if n in T.GENERATION_TASKS]
    out = []
    for n in names:
        if n not in T.ALL_TASKS:
            raise PktError(f"unknown eval task {n!r}; known: {', '.join(T.ALL_TASKS)} (or 'loss')")
        if n not in out:
            out.append(n)
    if not out:
        raise PktError("no eval tasks given")
    return out


def run_task(name: str, model, tokenizer, cfg: EvalConfig, rows=None, **extra) -> tuple[list[dict], dict]:
    """Run one task; ``rows`` overrides its data (tests). Returns (records, metrics)."""
    stats = GenStats()
    t0 = time.perf_counter()
    mod = T.get(name)
    if name.endswith("_loss"):
        records, metrics = mod.run(model, tokenizer, cfg, rows=rows, task=name[:-5])
    else:
        records, metrics = mod.run(model, tokenizer, cfg, rows=rows, stats=stats, **extra)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    if stats.prompts:
        metrics["generation"] = stats.to_dict()
    return records, metrics


def evaluate_model(model, tokenizer, tasks: str | Iterable[str] = T.GENERATION_TASKS, *,
                   out_dir: str | Path | None = None, config: EvalConfig | None = None,
                   data: dict | None = None, answer_loss: bool = False, meta: dict | None = None, log=print,
                   **overrides) -> dict:
    """Evaluate ``model`` (any causal LM in memory) and return ``{task: metrics, ..., "config": {...}}``.

    ``config`` (or keyword ``overrides`` of its fields, e.g. ``limit=50, shots=5``) sets the protocol;
    ``data`` maps task names to row lists that replace the default test sets (for tests / custom data);
    ``answer_loss`` adds ``<task>_loss`` for each generation task listed; ``meta`` (e.g. the model name) is
    stored in metrics.json.
    """
    if config is None:
        config = validate(EvalConfig, {k: v for k, v in overrides.items() if v is not None}, "eval settings")
    elif overrides:
        config = config.model_copy(update=overrides)
    names = parse_task_list(tasks, answer_loss)
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    out = Path(out_dir) if out_dir is not None else None
    results: dict = {**(meta or {}), "config": config.model_dump(mode="json"), "tasks": names}
    try:
        for name in names:
            extra = {}
            rows = (data or {}).get(name)
            if name == "mmlu" and data and "mmlu_dev" in data:
                extra["dev_rows"] = data["mmlu_dev"]
            records, metrics = run_task(name, model, tokenizer, config, rows=rows, **extra)
            results[name] = metrics
            if log:
                log(f"{name}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in metrics.items() if not isinstance(v, dict)))
            if out is not None:
                target = out / name / "predictions.jsonl"
                try:
                    write_jsonl(target, records)
                    target = out / "metrics.json"
                    write_json(target, results)
                except OSError as e:  # full disk, read-only or removed --out: one line, no traceback
                    raise PktError(f"{target}: cannot write ({e.strerror or e})") from e
    finally:
        if was_training:
            model.train()
    return results
