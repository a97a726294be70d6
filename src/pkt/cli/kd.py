"""``pkt kd``: the knowledge-distillation baseline on its own (teacher answers → LoRA SFT of the student).

``pkt run`` builds the same arm inside the study; this command exists so that the baseline can be built
like the PostPKT arms, in particular data-parallel under ``accelerate launch`` (the teacher's generation is
split across the processes, see :mod:`pkt.align.distill`).

Outputs in ``--out``: ``kd_train.jsonl`` (the teacher's answers, reused by a re-run with the same settings)
and its settings ``kd_data.json``; ``run/`` with ``adapter/``, ``adapter_init/``, ``merged/``,
``train_log.jsonl`` and ``summary.json`` (the layout of :func:`pkt.align.finetune.train_and_save`).
Settings: defaults < ``--config`` YAML (sections ``finetune`` and ``kd``) < flags; the fine-tuning flags
are those of ``pkt postpkt``.
"""

from __future__ import annotations

import typer

from pkt.cli.postpkt import (R, Alpha, BatchSize, Dtype, Epochs, Lr, MaxLength, MicroBatchSize, NTrain, Seed,
                             Style, Targets, TrainOnInputs, finetune_config)


def kd(
    teacher: str = typer.Option(..., help="Teacher that answers the training prompts."),
    student: str = typer.Option(..., help="Student: embedded name, local HF directory or hub id."),
    task: str = typer.Option(..., help="Task whose train split supplies the prompts (gsm8k, mmlu, ...)."),
    out: str = typer.Option(..., help="Output directory (kd_train.jsonl, run/ with adapter/ and merged/)."),
    config: str = typer.Option(None, "--config", help="YAML settings file (sections 'finetune', 'kd')."),
    max_new_tokens: int = typer.Option(None, help="Longest teacher answer in tokens [256]."),
    gen_batch_size: int = typer.Option(None, help="Prompts per teacher generation batch [8]."),
    teacher_dtype: str = typer.Option(None, help="Teacher dtype [float32]."),
    r: R = None,
    alpha: Alpha = None,
    targets: Targets = None,
    lr: Lr = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    micro_batch_size: MicroBatchSize = None,
    max_length: MaxLength = None,
    n_train: NTrain = None,
    style: Style = None,
    train_on_inputs: TrainOnInputs = None,
    dtype: Dtype = None,
    seed: Seed = None,
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Knowledge distillation: the teacher answers the train prompts greedily, the student is LoRA-fine-tuned on them."""
    from pathlib import Path

    from pkt.align.distill import KD_FILE, KDConfig, distill_finetune, kd_data
    from pkt.align.finetune import dist_state
    from pkt.config import load_config
    from pkt.data.tasks import get_task, load_split

    get_task(task)  # a typo fails here, before any model is loaded
    ft = finetune_config(config, r=r, alpha=alpha, targets=targets, lr=lr, epochs=epochs, batch_size=batch_size,
                         micro_batch_size=micro_batch_size, max_length=max_length, n_train=n_train, style=style,
                         train_on_inputs=train_on_inputs, dtype=dtype, seed=seed)
    kc = load_config(KDConfig, config, section="kd", max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                     dtype=teacher_dtype)
    main = dist_state().is_main_process
    say = (lambda m: typer.echo(m, err=True)) if main else (lambda m: None)
    examples = load_split(task, "train")[: ft.n_train]
    out_dir = Path(out)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    kd_file = out_dir / KD_FILE
    rows, reused = kd_data(teacher, examples, kd_file, kc, style=ft.style, meta={"task": task},
                           progress=not quiet, log=say)
    say(f"kd: LoRA r={ft.r} α={ft.alpha} on {','.join(ft.targets)}; fine-tuning on {len(rows)} teacher answers")
    s = distill_finetune(student, rows, ft, out_dir / "run", progress=not quiet,
                         extra={"task": task, "teacher": teacher, "student": student, "data": str(kd_file),
                                "data_reused": reused, "kd": kc.model_dump()})
    if main:  # under `accelerate launch` only the main process writes and reports
        typer.echo(f"{out_dir / 'run'}: {s['steps']} steps, final loss {s['final_loss']}, "
                   f"train {s['train_seconds']} s")


def register(root: typer.Typer) -> None:
    root.command("kd")(kd)
