"""``pkt postpkt``: one PostPKT arm (LoRA SFT of the student with a seeking / pissa / lora init).

Settings: defaults (Seeking's paper values) < ``--config`` YAML (sections ``finetune`` and ``extract``)
< flags.
"""

from __future__ import annotations

import typer


def postpkt(
    student: str = typer.Option(..., help="Student: embedded name, local HF directory or hub id."),
    task: str = typer.Option(..., help="Task (train split for SFT, extract split for seeking)."),
    init: str = typer.Option(..., help="LoRA init: seeking | pissa | lora."),
    out: str = typer.Option(..., help="Output directory (adapter/, adapter_init/, merged/, summary.json)."),
    teacher: str = typer.Option(None, help="Teacher (seeking without --factors)."),
    factors: str = typer.Option(None, help="Reuse an extraction directory from `pkt extract sensitivity`."),
    config: str = typer.Option(None, "--config", help="YAML settings file (sections 'finetune', 'extract')."),
    r: int = typer.Option(None, help="LoRA rank [16]."),
    alpha: float = typer.Option(None, help="LoRA alpha [16]."),
    targets: str = typer.Option(None, help="Module kinds, comma-separated [q,k,v,o,gate,up,down]."),
    lr: float = typer.Option(None, help="Learning rate [3e-4]."),
    epochs: float = typer.Option(None, help="Epochs [3]."),
    batch_size: int = typer.Option(None, help="Examples per optimizer step [64]."),
    micro_batch_size: int = typer.Option(None, help="Examples per forward pass [4]."),
    max_length: int = typer.Option(None, help="Token cutoff [2048]."),
    n_train: int = typer.Option(None, help="Use the first N training examples [all]."),
    style: str = typer.Option(None, help="Prompt style: chat | tulu [chat]."),
    train_on_inputs: bool = typer.Option(None, "--train-on-inputs/--response-only",
                                         help="Train on prompt tokens too [response only]."),
    dtype: str = typer.Option(None, help="Student dtype [float32]."),
    seed: int = typer.Option(None, help="Seed [1]."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """PostPKT: init the student's LoRA (seeking = extracted teacher blocks; pissa; lora), fine-tune, save."""
    from pkt.align.finetune import FinetuneConfig
    from pkt.config import load_config
    from pkt.errors import PktError
    from pkt.postpkt import SeekingConfig, run_postpkt

    if init not in ("seeking", "pissa", "lora"):
        raise PktError(f"--init {init!r}: expected seeking, pissa or lora")
    ft = load_config(
        FinetuneConfig, config, section="finetune", r=r, alpha=alpha,
        targets=targets.split(",") if targets else None, lr=lr, epochs=epochs, batch_size=batch_size,
        micro_batch_size=micro_batch_size, max_length=max_length, n_train=n_train, style=style,
        train_on_inputs=train_on_inputs, dtype=dtype, seed=seed,
    )
    ex = load_config(SeekingConfig, config, section="extract", style=style, train_on_inputs=train_on_inputs)
    s = run_postpkt(teacher, student, task, init, out, ft, ex, factors_dir=factors, progress=not quiet,
                    log=lambda m: typer.echo(m, err=True))
    typer.echo(f"{out}: {s['steps']} steps, final loss {s['final_loss']}, train {s['train_seconds']} s, "
               f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")


def register(root: typer.Typer) -> None:
    root.command("postpkt")(postpkt)
