"""``pkt eval --model M --tasks gsm8k,mmlu,humaneval,mbpp [--limit N] [--shots K] --out DIR [--config FILE]``.

Settings: defaults < ``--config`` YAML (section ``eval``: any of the options below by name) < flags.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from pkt.cli import config_option


def eval_command(
    model: str = typer.Option(..., "--model", help="Embedded name, local HF directory or hub id."),
    tasks: str = typer.Option("gsm8k,mmlu,humaneval,mbpp", "--tasks",
                              help="Comma list of gsm8k, mmlu, humaneval, mbpp, <task>_loss, or 'loss' (all four)."),
    out: str = typer.Option(..., "--out", help="Output directory (metrics.json, <task>/predictions.jsonl)."),
    limit: int = typer.Option(None, "--limit", help="Seeded fixed subset of N examples per task."),
    shots: int = typer.Option(None, "--shots", help="GSM8K / MMLU shots (default: the protocol's)."),
    protocol: str = typer.Option("pkt", "--protocol",
                                 help="pkt (PKT papers' format) | standard (lm-eval gsm8k_cot and mmlu 5-shot, "
                                      "Qwen2.5-Coder instruct for code) | e.g. 'pkt,humaneval=qwen-coder'."),
    style: str = typer.Option("chat", "--style", help="Prompt style: chat (model's template) | tulu (paper)."),
    answer_loss: bool = typer.Option(False, "--answer-loss", help="Also compute <task>_loss for each task."),
    loss_split: str = typer.Option("align", "--loss-split", help="PKT split for answer loss (held out: align)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    decoding: str = typer.Option("padded", "--decoding", help="greedy decoding: padded | continuous (batching)"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Default: 256 GSM8K, 512 code."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; >0 samples (pass@k)."),
    top_p: float = typer.Option(0.95, "--top-p"),
    n_samples: int = typer.Option(1, "--n-samples", help="Samples per code problem for pass@k."),
    pass_k: str = typer.Option("1", "--pass-k", help="Comma list of k for pass@k (needs n-samples >= k)."),
    mbpp_variant: str = typer.Option("full", "--mbpp-variant", help="full (500 test tasks) | sanitized (257)."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    reference: str = typer.Option(None, "--reference",
                                  help="The model MODEL was built from (e.g. the student): if too few of the "
                                       "entries MODEL changed survive --dtype, evaluate in float32 instead."),
    min_surviving: float = typer.Option(0.5, "--min-surviving", min=0.0, max=1.0,
                                        help="With --reference: the fraction of changed entries that must survive "
                                             "--dtype."),
    device: str = typer.Option(None, "--device", help="e.g. cuda, cpu (default: cuda if available)."),
    exec_timeout: float = typer.Option(10.0, "--exec-timeout", help="Wall seconds per generated program."),
    exec_workers: int = typer.Option(2, "--exec-workers", help="Programs run in parallel."),
    exec_max_memory_mb: int = typer.Option(512, "--exec-max-memory-mb",
                                           help="Address-space limit of each program process (MiB)."),
    exec_max_procs: int = typer.Option(4, "--exec-max-procs", help="Processes + threads each program may run "
                                       "(worst case: workers x procs x memory; 4 GiB by default)."),
    allow_weak_sandbox: bool = typer.Option(False, "--allow-weak-sandbox",
                                            help="Run code even without namespace/uid isolation (rlimits only)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    config: Path = config_option("eval"),  # applied by its callback, before the other options are read
) -> None:
    """Evaluate a model; writes per-example JSONL and metrics.json under --out."""
    import torch

    from pkt.errors import PktError
    from pkt.evaluate.harness import EvalConfig, evaluate_model, parse_task_list
    from pkt.config import validate
    from pkt.io import check_output_dir
    from pkt.models.load import check_model_dir, load_model, load_tokenizer, parse_dtype, resolve

    names = parse_task_list(tasks, answer_loss)
    try:
        ks = tuple(int(k) for k in pass_k.split(",") if k.strip())
    except ValueError:
        raise PktError(f"--pass-k {pass_k!r}: expected a comma list of integers") from None
    cfg = validate(EvalConfig, {
        "limit": limit, "seed": seed, "shots": shots, "protocol": protocol, "style": style, "batch_size": batch_size,
        "decoding": decoding,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "n_samples": n_samples,
        "pass_ks": ks, "mbpp_variant": mbpp_variant, "loss_split": loss_split, "exec_timeout": exec_timeout,
        "exec_workers": exec_workers, "exec_max_memory_mb": exec_max_memory_mb, "exec_max_procs": exec_max_procs,
        "allow_weak_sandbox": allow_weak_sandbox, "progress": progress,
    }, "pkt eval")
    # Everything the user can get wrong is checked here, before a model is loaded or a task runs.
    check_output_dir(out, "--out")
    parse_dtype(dtype)
    path = resolve(model)
    if os.path.isdir(path):
        check_model_dir(path, model)
    precision = None
    if reference is not None:
        from pkt.evaluate.precision import choose_dtype

        dtype, precision = choose_dtype(model, reference, dtype, min_surviving)
        if precision["fallback"]:
            typer.echo(f"only {precision['surviving']}/{precision['changed']} entries changed vs {reference} survive "
                       f"{precision['requested']}: evaluating in float32", err=True)
    tok = load_tokenizer(model)
    m = load_model(model, dtype=dtype)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m.to(dev)
    results = evaluate_model(m, tok, names, out_dir=out, config=cfg, log=typer.echo,
                             meta={"model": model, "dtype": dtype, "device": dev, "precision": precision})
    summary = {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}
               for k, v in results.items() if k in names}
    typer.echo(json.dumps({"model": model, **summary}, indent=1))


def register(app: typer.Typer) -> None:
    app.command("eval", help="Evaluate a model on GSM8K, MMLU, HumanEval, MBPP and answer loss.")(eval_command)
