"""``pkt kd``: the knowledge-distillation baselines on their own, ``--method seqkd`` (default) or ``gkd``.

``seqkd``: teacher answers (to completion within ``--max-new-tokens``; truncated ones dropped or kept open,
``--truncated``) → LoRA SFT of the student (:mod:`pkt.align.distill`), data-parallel under ``accelerate
launch`` (the teacher's generation is split across the processes). ``gkd``: on-policy distillation,
the student samples and learns the teacher's next-token distributions (:mod:`pkt.align.gkd`; one process).
``pkt run`` builds the same arms inside the study.

Outputs in ``--out``: for seqkd ``kd_train.jsonl`` (every teacher answer with its ``finished`` flag, reused
by a re-run with the same settings) and its settings ``kd_data.json``; for both ``run/`` with ``adapter/``,
``adapter_init/``, ``merged/``, ``train_log.jsonl`` and ``summary.json`` (the layout of
:func:`pkt.align.finetune.train_and_save`; seqkd's summary has the answer counts under ``answers``).
Settings: defaults < ``--config`` YAML (sections ``finetune``, ``kd`` and ``gkd``) < flags; the fine-tuning
flags are those of ``pkt postpkt``.
"""

from __future__ import annotations

import typer

from pkt.cli.postpkt import (R, Alpha, BatchSize, Dtype, Epochs, Lr, MaxLength, MicroBatchSize, NTrain, ReportTo,
                             Seed, Style, Targets, TrainOnInputs, finetune_config)


def kd(
    teacher: str = typer.Option(..., help="Teacher that answers the training prompts."),
    student: str = typer.Option(..., help="Student: embedded name, local HF directory or hub id."),
    task: str = typer.Option(None, help="Task whose train split supplies the prompts (gsm8k, mmlu, ...); or --data."),
    out: str = typer.Option(..., help="Output directory (kd_train.jsonl, run/ with adapter/ and merged/)."),
    config: str = typer.Option(None, "--config", help="YAML settings file (sections 'finetune', 'kd', 'gkd')."),
    method: str = typer.Option("seqkd", help="seqkd (SFT on teacher answers) | gkd (on-policy distillation)."),
    max_new_tokens: int = typer.Option(None, help="seqkd: teacher answer budget in tokens [256]."),
    truncated: str = typer.Option(None, help="seqkd: answers that hit the budget: drop | keep (open, no "
                                  "end-of-turn token) [drop]."),
    lmbda: float = typer.Option(None, help="gkd: share of prompts on the student's own samples [1]."),
    beta: float = typer.Option(None, help="gkd: generalized JSD beta, 0 = forward KL [0]."),
    temperature: float = typer.Option(None, help="gkd: student sampling temperature [0.9]."),
    gkd_max_new_tokens: int = typer.Option(None, help="gkd: longest student continuation [128]."),
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
    report_to: ReportTo = None,
    data: str = typer.Option(None, help="Prompts in place of the task's train split: chat JSONL or a Hugging Face "
                             "dataset with a 'messages' column (the teacher answers each final turn in context)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Knowledge distillation into a LoRA student: seqkd (teacher answers → SFT) or gkd (on-policy)."""
    from pathlib import Path

    from pkt.align.distill import KD_FILE, KDConfig, budget_policy, distill_finetune, kd_data
    from pkt.dist import dist_state
    from pkt.align.gkd import GKDConfig, gkd_distill
    from pkt.config import load_config
    from pkt.data.tasks import get_task, load_split
    from pkt.errors import PktError

    if method not in ("seqkd", "gkd"):
        raise PktError(f"--method {method!r}: expected seqkd or gkd")
    if (task is None) == (data is None):
        raise PktError("give one of --task (its train split) or --data (your conversations)")
    if task is not None:
        get_task(task)  # a typo fails here, before any model is loaded
    ft = finetune_config(config, r=r, alpha=alpha, targets=targets, lr=lr, epochs=epochs, batch_size=batch_size,
                         micro_batch_size=micro_batch_size, max_length=max_length, n_train=n_train, style=style,
                         train_on_inputs=train_on_inputs, dtype=dtype, seed=seed, report_to=report_to)
    kc = load_config(KDConfig, config, section="kd", max_new_tokens=max_new_tokens, batch_size=gen_batch_size,
                     dtype=teacher_dtype, truncated=truncated)
    gc = load_config(GKDConfig, config, section="gkd", lmbda=lmbda, beta=beta, temperature=temperature,
                     max_new_tokens=gkd_max_new_tokens, teacher_dtype=teacher_dtype)
    main = dist_state().is_main_process
    say = (lambda m: typer.echo(m, err=True)) if main else (lambda m: None)
    if data is not None:
        from pkt.data.chat import load_chat_data

        examples = load_chat_data(data)[: ft.n_train]
    else:
        examples = load_split(task, "train")[: ft.n_train]
    out_dir = Path(out)
    if method == "gkd":
        say(f"gkd: LoRA r={ft.r} α={ft.alpha} on {','.join(ft.targets)}; lmbda={gc.lmbda} beta={gc.beta} on "
            f"{len(examples)} {data or f'{task}/train'} prompts")
        s = gkd_distill(teacher, student, examples, ft, gc, out_dir / "run", progress=not quiet,
                        extra={"task": task, "teacher": teacher, "student": student})
        typer.echo(f"{out_dir / 'run'}: {s['steps']} steps, final loss {s['final_loss']}, "
                   f"train {s['train_seconds']} s")
        return
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    kd_file = out_dir / KD_FILE
    answers, reused = kd_data(teacher, examples, kd_file, kc, style=ft.style, meta={"task": task, "prompts": data},
                              progress=not quiet, log=say)
    rows, counts = budget_policy(answers, kc.truncated)
    say(f"seqkd: {counts['finished']} of {counts['answers']} teacher answers finished within {kc.max_new_tokens} "
        f"tokens, {counts['dropped']} dropped, {counts['kept_open']} kept open; LoRA r={ft.r} α={ft.alpha} on "
        f"{','.join(ft.targets)}; fine-tuning on {len(rows)}")
    s = distill_finetune(student, rows, ft, out_dir / "run", progress=not quiet,
                         extra={"task": task, "teacher": teacher, "student": student, "data": str(kd_file),
                                "data_source": data,
                                "data_reused": reused, "kd": kc.model_dump(), "answers": counts})
    if main:  # under `accelerate launch` only the main process writes and reports
        typer.echo(f"{out_dir / 'run'}: {s['steps']} steps, final loss {s['final_loss']}, "
                   f"train {s['train_seconds']} s")


def register(root: typer.Typer) -> None:
    root.command("kd")(kd)
