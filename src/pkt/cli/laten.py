"""``pkt laten train | apply | attribute``: PrePKT (LaTen) from the command line.

Settings: defaults (pkt.laten.LatenConfig) < ``--config file.yaml`` (sections ``train:`` / ``apply:``) <
flags. The commands only parse, validate and call pkt.laten.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(help="PrePKT (LaTen): locate neurons, align them with a hypernetwork, inject into the student.",
                  no_args_is_help=True)

_CONFIG = typer.Option(None, "--config", help="YAML file with 'train:' / 'apply:' sections (flags override it).")


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


@app.command()
def train(
    config: Path = _CONFIG,
    out: str = typer.Option("runs/laten", help="Run directory (checkpoints, log.jsonl, config.json)."),
    teacher: str = typer.Option(None, help="Teacher model (embedded name, HF directory or hub id)."),
    student: str = typer.Option(None, help="Student model."),
    task: str = typer.Option(None, help="Task whose PKT splits are used (gsm8k, mmlu, humaneval, mbpp)."),
    extract_file: str = typer.Option(None, help="Chat JSONL replacing the extract split (one step per example)."),
    align_file: str = typer.Option(None, help="Chat JSONL replacing the align split."),
    seed_file: str = typer.Option(None, help="Chat JSONL replacing the train split (apply's seed example)."),
    style: str = typer.Option(None, help="Prompt style: chat | tulu."),
    steps: int = typer.Option(None, help="Stop after this many steps (default: one per extract example)."),
    schedule: str = typer.Option(None, help="OneCycle over the steps trained (trained) or over the whole extract "
                                 "split, the reference's (extract) [trained]."),
    batch_size: int = typer.Option(None, help="P: samples per step (P-1 align + the extract example)."),
    micro_batch: int = typer.Option(None, help="Samples per forward/backward pass."),
    lr: float = typer.Option(None, help="Peak learning rate (OneCycle)."),
    transfer_rate: float = typer.Option(None, help="Fraction of the student's FFN/attention width transferred."),
    penalty: float = typer.Option(None, help="λ of the λ·mean(H(K)²) penalty."),
    init_std: float = typer.Option(None, help="Std of the hypernetwork's normal init."),
    cutoff_len: int = typer.Option(None, help="Max tokens per sample."),
    norm: str = typer.Option(None, help="Attribution final-norm convention: yu | laten."),
    vocab_top: int = typer.Option(None, help="Attribution normaliser over the top-K tokens (0 = exact, slow)."),
    seed: int = typer.Option(None, help="Seed (hypernetwork init, align sampling, the random null's vectors)."),
    teacher_vectors: str = typer.Option(None, help="What the hypernetwork translates: the teacher's located "
                                        "vectors (real) or the random-teacher null, random directions of their "
                                        "norms (random) [real]."),
    resume: bool = typer.Option(True, help="Continue an existing run in --out from its last step."),
    threads: int = typer.Option(None, help="torch CPU threads."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    report_to: str = typer.Option(None, "--report-to", help="Per-step log: tensorboard (under --out/logs) | "
                                  "trackio | wandb | mlflow | none."),
) -> None:
    """Train the hypernetwork: one step per extract example; a checkpoint and a log line per step."""
    from pkt.config import load_config
    from pkt.laten import LatenConfig, train as _train

    _threads(threads)
    cfg = load_config(LatenConfig, config, section="train" if config else None, teacher=teacher, student=student,
                      task=task, extract_file=extract_file, align_file=align_file, seed_file=seed_file, style=style,
                      max_steps=steps, schedule=schedule, batch_size=batch_size, micro_batch=micro_batch, lr=lr,
                      transfer_rate=transfer_rate, penalty=penalty, init_std=init_std, cutoff_len=cutoff_len,
                      norm=norm, vocab_top=vocab_top, seed=seed, teacher_vectors=teacher_vectors,
                      report_to=report_to)
    t0 = time.perf_counter()
    rows = _train(cfg, out, resume=resume, progress=progress, log=lambda s: typer.echo(s, err=True))
    last = rows[-1] if rows else {}
    typer.echo(f"{out}: {len(rows)} steps in {time.perf_counter() - t0:.1f} s; last loss {last.get('loss', float('nan')):.4f}")


@app.command()
def apply(
    config: Path = _CONFIG,
    run: str = typer.Option("runs/laten", help="Run directory written by `pkt laten train`."),
    step: int = typer.Option(None, help="Checkpoint step (optimiser steps taken; 0 = initialisation)."),
    transfer_rate: float = typer.Option(None, help="Fraction of neurons transferred (may differ from training)."),
    out: str = typer.Option(None, help="Directory for the fused HF checkpoint."),
    seed: int = typer.Option(None, help="Seed choosing the seed example from the train split."),
    threads: int = typer.Option(None, help="torch CPU threads."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Re-locate with a seed example, translate with checkpoint STEP and save a fused student checkpoint."""
    from pkt.config import load_config
    from pkt.laten import ApplyConfig, apply as _apply

    _threads(threads)
    acfg = load_config(ApplyConfig, config, section="apply" if config else None, step=step,
                       transfer_rate=transfer_rate, out=out, seed=seed)
    manifest, _ = _apply(run, acfg.step, acfg.transfer_rate, acfg.out, seed=acfg.seed, progress=progress,
                         log=lambda s: typer.echo(s, err=True))
    typer.echo(json.dumps(manifest, indent=2))


@app.command()
def attribute(
    model: str = typer.Option(..., help="Model (embedded name, HF directory or hub id)."),
    task: str = typer.Option("gsm8k", help="Task whose split provides the example."),
    split: str = typer.Option("extract", help="extract | align | train."),
    index: int = typer.Option(0, help="Example index in the split."),
    style: str = typer.Option("chat", help="Prompt style: chat | tulu."),
    norm: str = typer.Option("yu", help="Final-norm convention: yu | laten."),
    vocab_top: int = typer.Option(1024, help="Top-K vocabulary normaliser (0 = exact)."),
    rate: float = typer.Option(0.1, help="Certify the top rate × width neurons per layer (0 = score all)."),
    dtype: str = typer.Option("float32", help="Model dtype."),
    threads: int = typer.Option(None, help="torch CPU threads."),
) -> None:
    """Attribute one example and time it against a plain forward pass over the same sequence."""
    import torch

    from pkt.data.tasks import load_split
    from pkt.errors import PktError
    from pkt.locate.attribution import attribute as _attribute, attribution_inputs
    from pkt.models.arch import ArchSpec
    from pkt.models.load import load_model, load_tokenizer

    _threads(threads)
    rows = load_split(task, split)
    if not 0 <= index < len(rows):
        raise PktError(f"{task}/{split} has {len(rows)} examples; index {index} is out of range")
    m, tok = load_model(model, dtype=dtype), load_tokenizer(model)
    spec = ArchSpec.from_model(m)
    ids, target = attribution_inputs(rows[index], tok, style)
    with torch.no_grad():
        m(input_ids=ids)  # warm-up
        t0 = time.perf_counter()
        m(input_ids=ids)
        fwd = time.perf_counter() - t0
    top = None if rate <= 0 else (max(1, int(rate * spec.q_dim)), max(1, int(rate * spec.intermediate_size)))
    att = _attribute(m, ids, target, norm=norm, vocab_top=vocab_top or None, top=top, spec=spec)
    typer.echo(json.dumps({
        "tokens": ids.shape[1], "target": tok.decode([target]), "logprob": round(att.logprob, 4),
        "forward_s": round(fwd, 2), "attribution_s": round(att.seconds["total"], 2),
        "ratio": round(att.seconds["total"] / fwd, 2), "evaluated": att.evaluated,
        "top_attn_layers": torch.topk(att.attn_layers, 5).indices.tolist(),
        "top_ffn_layers": torch.topk(att.ffn_layers, 5).indices.tolist(),
    }, indent=2))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="laten")
